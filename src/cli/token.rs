//! `rna token`: create, list and revoke tokens in a token store file.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;

use rna::auth::{format_rfc3339, parse_ttl, Scope, Tenant, TokenStore};

use super::CliError;

/// Subcommands of `rna token`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token; it is printed once, the store keeps its hash.
    Create {
        /// Token store file.
        #[arg(long, env = "RNA_TOKENS", default_value = "tokens.toml")]
        store: PathBuf,
        /// Tenant, organization/environment.
        #[arg(long, env = "RNA_TENANT")]
        tenant: Tenant,
        /// Scope; repeat: connect:agentHub, proxy, read:infra:data, exec:infra:op, read:metrics,
        /// admin.
        #[arg(
            long = "scope",
            env = "RNA_SCOPES",
            value_delimiter = ',',
            required = true
        )]
        scopes: Vec<Scope>,
        /// Lifetime, e.g. 30d, 12h (default: no expiry).
        #[arg(long, env = "RNA_TTL", value_parser = parse_ttl)]
        ttl: Option<Duration>,
        /// A label to recognise the token by.
        #[arg(long, env = "RNA_LABEL")]
        label: Option<String>,
    },
    /// List tokens (never their secrets).
    List {
        /// Token store file.
        #[arg(long, env = "RNA_TOKENS", default_value = "tokens.toml")]
        store: PathBuf,
    },
    /// Revoke a token by id.
    Revoke {
        /// Token store file.
        #[arg(long, env = "RNA_TOKENS", default_value = "tokens.toml")]
        store: PathBuf,
        /// Token id (from `rna token list`), or the whole token (`rna_…`).
        #[arg(env = "RNA_TOKEN_ID", value_name = "ID|TOKEN")]
        id: String,
    },
}

/// Runs one `rna token` subcommand.
pub fn run(cmd: TokenCommand) -> Result<(), CliError> {
    match cmd {
        TokenCommand::Create {
            store,
            tenant,
            scopes,
            ttl,
            label,
        } => {
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
        TokenCommand::List { store } => list_tokens(&store)?,
        TokenCommand::Revoke { store, id } => {
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
