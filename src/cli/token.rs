//! `rna token`: create, list and revoke tokens in a token store file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use rna::auth::{format_rfc3339, parse_ttl, Scope, Tenant, TokenStore};
use rna::enroll::{HubState, NameRule, NewJoin};

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
    },
    /// List tokens (never their secrets), and the join tokens of the same folder.
    List {
        /// Token store file [default: tokens.toml, or tokens.toml of --state-dir].
        #[arg(long, env = "RNA_TOKENS")]
        store: Option<PathBuf>,
        /// The hub's state folder (as `rna hub --state-dir`).
        #[arg(long, env = "RNA_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Revoke a token by id.
    Revoke {
        /// Token store file [default: tokens.toml].
        #[arg(long, env = "RNA_TOKENS")]
        store: Option<PathBuf>,
        /// Token id (from `rna token list`), or the whole token (`rna_…`).
        #[arg(env = "RNA_TOKEN_ID", value_name = "ID|TOKEN")]
        id: String,
    },
}

/// Runs one `rna token` subcommand.
pub fn run(cmd: TokenCommand) -> Result<(), CliError> {
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
            ..
        } => {
            let state = join_state(store.as_deref(), state_dir.as_deref());
            let rule = match (name, name_prefix) {
                (Some(name), _) => NameRule::Exact(name),
                (None, Some(prefix)) => NameRule::Prefix(prefix),
                (None, None) => {
                    return Err(CliError::BadArgument(
                        "--join needs --name or --name-prefix".into(),
                    ))
                }
            };
            create_join(&state, tenant, rule, uses, ttl, hub)?;
        }
        TokenCommand::Create {
            store,
            state_dir,
            tenant,
            scopes,
            ttl,
            label,
            ..
        } => {
            let store = store_path(store, state_dir.as_deref());
            let mut tokens = TokenStore::load_or_empty(&store)?;
            let (secret, record) = tokens.create(tenant, scopes, ttl, label, SystemTime::now())?;
            tokens.save(&store)?;
            eprintln!(
                "created token {} for {} ({}); it is shown only once:",
                record.id,
                record.tenant,
                scope_list(&record.scopes)
            );
            out!("{}", secret.expose());
        }
        TokenCommand::List { store, state_dir } => {
            let state = join_state(store.as_deref(), state_dir.as_deref());
            list_tokens(&store_path(store, state_dir.as_deref()))?;
            list_join_tokens(&state)?;
        }
        TokenCommand::Revoke { store, id } => {
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
            let mut tokens = TokenStore::load(&store)?;
            tokens.revoke(&id)?;
            tokens.save(&store)?;
            out!("revoked {id}");
        }
    }
    Ok(())
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
fn create_join(
    state: &HubState,
    tenant: Tenant,
    name: NameRule,
    uses: Option<u32>,
    ttl: Option<Duration>,
    hub: Option<String>,
) -> Result<(), CliError> {
    let fail = |e: rna::enroll::EnrollError| CliError::BadArgument(e.to_string());
    let ca = rna::certs::load_certs(&state.ca())?;
    let ca = ca.first().ok_or_else(|| {
        CliError::BadArgument(format!("{}: no CA certificate", state.ca().display()))
    })?;
    let pin = rna::enroll::ca_pin(ca).map_err(fail)?;
    let hub = match hub {
        Some(hub) => hub,
        None => match state.load_address().map_err(fail)?.and_then(|a| a.first()) {
            Some(hub) => hub,
            None => {
                eprintln!(
                    "the hub has not recorded its address in {} yet: replace {HUB_PLACEHOLDER} \
                     below, or give --hub HOST:PORT",
                    state.dir().display()
                );
                HUB_PLACEHOLDER.to_string()
            }
        },
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
    let mut book = state.load_join_tokens().map_err(fail)?;
    book.insert(record.clone());
    state.save_join_tokens(&book).map_err(fail)?;
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

/// Lists the join tokens of `state`, if it has any.
fn list_join_tokens(state: &HubState) -> Result<(), CliError> {
    let book = state
        .load_join_tokens()
        .map_err(|e| CliError::BadArgument(e.to_string()))?;
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

fn list_tokens(store: &Path) -> Result<(), CliError> {
    let tokens = TokenStore::load(store)?;
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
