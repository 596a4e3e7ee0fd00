//! `rna token`: create, list and revoke tokens in a token store file, or in the hub's shared
//! state (`--state kubernetes://NAMESPACE/NAME`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use rna::auth::{format_rfc3339, parse_ttl, Scope, StoreError, Tenant, TokenStore};
use rna::enroll::{HubAddress, HubState, JoinBook, NameRule, NewJoin};
use rna::state::{Backend, Documents, FileState, StateLocation};

use super::CliError;

/// Subcommands of `rna token`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; it is printed once, the store keeps its hash. With --join, a join
    /// token for one agent (or a fleet), printed inside the one line to run on the agent
    /// machine.
    Create {
        /// Token store file [default: tokens.toml, or tokens.toml of --state-dir].
        #[arg(long, env = "RNA_TOKENS")]
        store: Option<PathBuf>,
        /// Tenant, organization/environment.
        #[arg(long, env = "RNA_TENANT")]
        tenant: Tenant,
        /// Scope; repeat: connect:agentHub, proxy, read:infra:data, exec:infra:op, read:metrics,
        /// admin.
        #[arg(
            long = "scope",
            env = "RNA_SCOPES",
            value_delimiter = ',',
            required_unless_present = "join",
            conflicts_with = "join"
        )]
        scopes: Vec<Scope>,
        /// Lifetime, e.g. 30d, 12h (default: no expiry; a join token: 1h, at most 365d).
        #[arg(long, env = "RNA_TTL", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// A label to recognise the token by.
        #[arg(long, env = "RNA_LABEL", conflicts_with = "join")]
        label: Option<String>,
        /// Make a join token: single use and one hour unless --uses and --ttl say otherwise,
        /// bound to the tenant and to --name (or --name-prefix). It is kept in the hub's state
        /// folder (--state-dir, or the folder of --store) next to the CA it pins.
        #[arg(long, requires = "join_name")]
        join: bool,
        /// The agent name a join token enrolls.
        #[arg(long, group = "join_name", requires = "join")]
        name: Option<String>,
        /// Any agent name starting with this may enroll with the join token (a fleet; the
        /// printed line names the agent PREFIX plus its short host name).
        #[arg(long, group = "join_name", requires = "join")]
        name_prefix: Option<String>,
        /// How many agents may enroll with the join token [default: 1].
        #[arg(long, requires = "join")]
        uses: Option<u32>,
        /// The hub's state folder (as `rna hub --state-dir`), for --join.
        #[arg(long, env = "RNA_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// HOST:PORT agents dial, for the printed line [default: the hub's first --hub-name
        /// and port, as recorded in the state folder by the running hub; HUB-HOST:4433, to be
        /// replaced, before the hub has run].
        #[arg(long, requires = "join")]
        hub: Option<String>,
        /// Where the hub keeps its state: `file` (the files above) or
        /// `kubernetes://NAMESPACE/NAME`, the Secret hub replicas share (with the kubeconfig
        /// kubectl would use) [default: file].
        #[arg(
            long,
            env = "RNA_STATE",
            value_name = "file|kubernetes://NAMESPACE/NAME"
        )]
        state: Option<StateLocation>,
    },
    /// List tokens (never their secrets), and the join tokens of the same folder.
    List {
        /// Token store file [default: tokens.toml, or tokens.toml of --state-dir].
        #[arg(long, env = "RNA_TOKENS")]
        store: Option<PathBuf>,
        /// The hub's state folder (as `rna hub --state-dir`).
        #[arg(long, env = "RNA_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Where the hub keeps its state: `file` (the files above) or
        /// `kubernetes://NAMESPACE/NAME`, the Secret hub replicas share (with the kubeconfig
        /// kubectl would use) [default: file].
        #[arg(
            long,
            env = "RNA_STATE",
            value_name = "file|kubernetes://NAMESPACE/NAME"
        )]
        state: Option<StateLocation>,
    },
    /// Revoke a token by id.
    Revoke {
        /// Token store file [default: tokens.toml].
        #[arg(long, env = "RNA_TOKENS")]
        store: Option<PathBuf>,
        /// Token id (from `rna token list`), or the whole token (`rna_…`).
        #[arg(env = "RNA_TOKEN_ID", value_name = "ID|TOKEN")]
        id: String,
        /// Where the hub keeps its state: `file` (the files above) or
        /// `kubernetes://NAMESPACE/NAME`, the Secret hub replicas share (with the kubeconfig
        /// kubectl would use) [default: file].
        #[arg(
            long,
            env = "RNA_STATE",
            value_name = "file|kubernetes://NAMESPACE/NAME"
        )]
        state: Option<StateLocation>,
    },
}

/// Runs one `rna token` subcommand.
pub async fn run(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create {
            tenant,
            ttl,
            join: true,
            name,
            name_prefix,
            uses,
            hub,
            store,
            state_dir,
            state,
            ..
        } => {
            let backend = open(state, store, state_dir.as_deref()).await?;
            let rule = match (name, name_prefix) {
                (Some(name), _) => NameRule::Exact(name),
                (None, Some(prefix)) => NameRule::Prefix(prefix),
                (None, None) => {
                    return Err(CliError::BadArgument(
                        "--join needs --name or --name-prefix".into(),
                    ))
                }
            };
            create_join(&backend, tenant, rule, uses, ttl, hub).await?;
        }
        TokenCommand::Create {
            store,
            state_dir,
            tenant,
            scopes,
            ttl,
            label,
            state,
            ..
        } => {
            let backend = open(state, store, state_dir.as_deref()).await?;
            // Made again on a conflicting write, so the token printed is the one stored.
            let ((secret, record), _) = backend
                .update(|docs| {
                    let mut tokens = tokens_or_empty(&backend, docs)?;
                    let made = tokens.create(
                        tenant.clone(),
                        scopes.clone(),
                        ttl,
                        label.clone(),
                        SystemTime::now(),
                    )?;
                    docs.set(rna::state::TOKENS, tokens.to_toml());
                    Ok::<_, CliError>(made)
                })
                .await?;
            eprintln!(
                "created token {} for {} ({}); it is shown only once:",
                record.id,
                record.tenant,
                scope_list(&record.scopes)
            );
            out!("{}", secret.expose());
        }
        TokenCommand::List {
            store,
            state_dir,
            state,
        } => {
            let backend = open(state, store, state_dir.as_deref()).await?;
            let docs = backend.read().await?;
            list_tokens(&tokens(&backend, &docs)?)?;
            list_join_tokens(&join_book(&backend, &docs)?)?;
        }
        TokenCommand::Revoke { store, id, state } => {
            let store = store.unwrap_or_else(|| PathBuf::from("tokens.toml"));
            // The whole token names its id: `rna_<id>_<secret>`.
            let id = if id.starts_with("rna_") {
                rna::auth::token_id(&id)
                    .map_err(|_| {
                        CliError::BadArgument(format!(
                            "{:?}…: not a token (rna_ followed by 12 and 48 hex digits); give \
                             the whole token or its id from `rna token list`",
                            id.get(..16).unwrap_or("rna_")
                        ))
                    })?
                    .to_string()
            } else {
                id
            };
            let backend = open(state, Some(store), None).await?;
            backend
                .update(|docs| {
                    let mut tokens = tokens(&backend, docs)?;
                    tokens.revoke(&id)?;
                    docs.set(rna::state::TOKENS, tokens.to_toml());
                    Ok::<_, CliError>(())
                })
                .await?;
            out!("revoked {id}");
        }
    }
    Ok(())
}

/// The state backend of `--state`: the token store and the state folder's files (as before
/// `--state` existed), or the shared Secret.
async fn open(
    state: Option<StateLocation>,
    store: Option<PathBuf>,
    state_dir: Option<&Path>,
) -> Result<Backend, CliError> {
    let folder = join_state(store.as_deref(), state_dir);
    let files = FileState::new()
        .with(rna::state::TOKENS, store_path(store, state_dir))
        .with(rna::state::JOIN_TOKENS, folder.join_tokens())
        .with(rna::state::CA, folder.ca())
        .with(rna::state::ADDRESS, folder.address());
    Ok(Backend::open(&state.unwrap_or_default(), files).await?)
}

/// The token store; a missing one is an error (nothing to list or revoke), named as
/// `TokenStore::load` names it.
fn tokens(backend: &Backend, docs: &Documents) -> Result<TokenStore, StoreError> {
    let path = doc_origin(backend, rna::state::TOKENS);
    match (docs.get(rna::state::TOKENS), backend) {
        (Some(text), _) => TokenStore::parse(text, &path),
        // The file's own error, as the operating system words it.
        (None, Backend::File(_)) => TokenStore::load(&path),
        (None, Backend::Kubernetes(_)) => Err(StoreError::Io {
            path,
            source: std::io::ErrorKind::NotFound.into(),
        }),
    }
}

/// The token store, or an empty one when none exists yet (for `token create`).
fn tokens_or_empty(backend: &Backend, docs: &Documents) -> Result<TokenStore, StoreError> {
    match docs.get(rna::state::TOKENS) {
        Some(text) => TokenStore::parse(text, &doc_origin(backend, rna::state::TOKENS)),
        None => Ok(TokenStore::default()),
    }
}

/// The join tokens; none when the document does not exist yet.
fn join_book(backend: &Backend, docs: &Documents) -> Result<JoinBook, CliError> {
    match docs.get(rna::state::JOIN_TOKENS) {
        Some(text) => {
            rna::enroll::from_state_text(text, &doc_origin(backend, rna::state::JOIN_TOKENS))
                .map_err(|e| CliError::BadArgument(e.to_string()))
        }
        None => Ok(JoinBook::default()),
    }
}

/// Where a document is, for messages.
pub(super) fn doc_origin(backend: &Backend, name: &str) -> PathBuf {
    match backend {
        Backend::File(files) => files.path(name).unwrap_or_else(|| PathBuf::from(name)),
        Backend::Kubernetes(k) => PathBuf::from(format!("Secret {} key {name}", k.object())),
    }
}

/// The token store: `--store`, else `tokens.toml` of the state folder, else `tokens.toml`.
fn store_path(store: Option<PathBuf>, state_dir: Option<&Path>) -> PathBuf {
    store.unwrap_or_else(|| match state_dir {
        Some(dir) => HubState::new(dir).tokens(),
        None => PathBuf::from("tokens.toml"),
    })
}

/// The hub state folder join tokens live in: `--state-dir`, else the folder of the store.
fn join_state(store: Option<&Path>, state_dir: Option<&Path>) -> HubState {
    match (state_dir, store) {
        (Some(dir), _) => HubState::new(dir),
        (None, Some(store)) => HubState::new(rna::fsutil::folder_of(store)),
        (None, None) => HubState::new(Path::new(".")),
    }
}

/// The placeholder printed when the hub's address is not known yet.
const HUB_PLACEHOLDER: &str = "HUB-HOST:4433";

/// `rna token create --join`: records the join token and prints the line agents paste.
async fn create_join(
    backend: &Backend,
    tenant: Tenant,
    name: NameRule,
    uses: Option<u32>,
    ttl: Option<Duration>,
    hub: Option<String>,
) -> Result<(), CliError> {
    let fail = |e: rna::enroll::EnrollError| CliError::BadArgument(e.to_string());
    let docs = backend.read().await?;
    let ca_origin = doc_origin(backend, rna::state::CA);
    let ca = docs
        .get(rna::state::CA)
        .and_then(|pem| rna::certs::parse_certs(pem).ok())
        .and_then(|certs| certs.into_iter().next())
        .ok_or_else(|| {
            CliError::BadArgument(format!(
                "{}: no CA certificate (a hub with this state has not started yet)",
                ca_origin.display()
            ))
        })?;
    let pin = rna::enroll::ca_pin(&ca).map_err(fail)?;
    let address = match docs.get(rna::state::ADDRESS) {
        Some(text) => rna::enroll::from_state_text::<HubAddress>(
            text,
            &doc_origin(backend, rna::state::ADDRESS),
        )
        .map_err(fail)?
        .first(),
        None => None,
    };
    let hub = match hub.or(address) {
        Some(hub) => hub,
        None => {
            eprintln!(
                "the hub has not recorded its address in {} yet: replace {HUB_PLACEHOLDER} \
                 below, or give --hub HOST:PORT",
                rna::fsutil::folder_of(&doc_origin(backend, rna::state::ADDRESS)).display()
            );
            HUB_PLACEHOLDER.to_string()
        }
    };
    let mut new = NewJoin::new(tenant, name);
    if let Some(uses) = uses {
        new.uses = uses;
    }
    if let Some(ttl) = ttl {
        new.ttl = ttl;
    }
    let (line, record) =
        rna::enroll::join::create(new, pin, &hub, SystemTime::now()).map_err(fail)?;
    backend
        .update(|docs| {
            let mut book = join_book(backend, docs)?;
            book.insert(record.clone());
            docs.set(
                rna::state::JOIN_TOKENS,
                rna::enroll::to_state_text(&book).map_err(fail)?,
            );
            Ok::<_, CliError>(())
        })
        .await?;
    eprintln!(
        "created join token {} for agent {} in {} ({} use(s), expires {}); run this line on \
         the agent machine, it is shown only once:",
        record.id,
        record.name,
        record.tenant,
        record.uses_left,
        format_rfc3339(record.expires)
    );
    out!("{}", line.command.expose());
    Ok(())
}

/// Lists the join tokens, if there are any.
fn list_join_tokens(book: &JoinBook) -> Result<(), CliError> {
    let now = rna::auth::unix_now(SystemTime::now());
    let mut records = book.records().peekable();
    if records.peek().is_none() {
        return Ok(());
    }
    out!("");
    out!(
        "{:<12}  {:<24}  {:<24}  {:<9}  {:<20}  STATE",
        "JOIN ID",
        "TENANT",
        "AGENT NAME",
        "USES LEFT",
        "EXPIRES"
    );
    for r in records {
        let state = if r.is_expired(now) {
            "expired"
        } else if r.uses_left == 0 {
            "spent"
        } else {
            "active"
        };
        out!(
            "{:<12}  {:<24}  {:<24}  {:<9}  {:<20}  {}",
            r.id,
            r.tenant.to_string(),
            r.name.to_string(),
            r.uses_left,
            format_rfc3339(r.expires),
            state
        );
    }
    Ok(())
}

fn scope_list(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn list_tokens(tokens: &TokenStore) -> Result<(), CliError> {
    let now = rna::auth::unix_now(SystemTime::now());
    out!(
        "{:<12}  {:<24}  {:<44}  {:<20}  {:<8}  LABEL",
        "ID",
        "TENANT",
        "SCOPES",
        "EXPIRES",
        "STATE"
    );
    for r in tokens.records() {
        let state = if r.revoked {
            "revoked"
        } else if r.expires.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        out!(
            "{:<12}  {:<24}  {:<44}  {:<20}  {:<8}  {}",
            r.id,
            r.tenant.to_string(),
            scope_list(&r.scopes),
            r.expires.map_or_else(|| "never".into(), format_rfc3339),
            state,
            r.label.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
