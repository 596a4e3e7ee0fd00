//! `rna certs`: make a CA and the hub's certificate, or an agent's client certificate; list
//! and revoke the certificates a hub issued by enrollment.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use rna::enroll::{CertState, HubState, IssuedLog, RevocationList};
use rna::state::{Backend, Documents, FileState, StateLocation};

use super::CliError;

/// Where `rna certs list|revoke` find the hub's state.
#[derive(clap::Args, Debug)]
pub struct StateArgs {
    /// The hub's state folder (as `rna hub --state-dir`).
    #[arg(long, env = "RNA_STATE_DIR", required_unless_present = "state")]
    state_dir: Option<PathBuf>,
    /// Where the hub keeps its state: `file` (the state folder) or
    /// `kubernetes://NAMESPACE/NAME`, the Secret hub replicas share [default: file].
    #[arg(
        long,
        env = "RNA_STATE",
        value_name = "file|kubernetes://NAMESPACE/NAME"
    )]
    state: Option<StateLocation>,
}

/// Subcommands of `rna certs`.
#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a CA and the hub's certificate.
    Init {
        /// Output folder.
        #[arg(long, env = "RNA_CERTS_DIR", default_value = "certs")]
        dir: PathBuf,
        /// Names (DNS or IP) agents use to reach the hub; repeat.
        #[arg(
            long = "hub-name",
            env = "RNA_HUB_NAMES",
            value_delimiter = ',',
            required = true
        )]
        hub_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long, env = "RNA_FORCE")]
        force: bool,
    },
    /// Make an agent's client certificate, signed by the CA in --dir.
    Agent {
        /// Folder with ca.pem and ca-key.pem.
        #[arg(long, env = "RNA_CERTS_DIR", default_value = "certs")]
        dir: PathBuf,
        /// Agent identifier.
        #[arg(env = "RNA_NAME")]
        name: String,
        /// Overwrite existing files.
        #[arg(long, env = "RNA_FORCE")]
        force: bool,
    },
    /// List the certificates the hub issued by enrollment, with expiry and state.
    List {
        #[command(flatten)]
        at: StateArgs,
    },
    /// Revoke enrolled certificates: one serial, or every certificate of an agent name. The
    /// running hub closes that agent's sessions within a second and refuses the certificate
    /// from then on, also after a restart; join tokens made before cannot enroll it again.
    Revoke {
        #[command(flatten)]
        at: StateArgs,
        /// Only this tenant's agent of that name.
        #[arg(long, env = "RNA_TENANT")]
        tenant: Option<rna::auth::Tenant>,
        /// A serial (from `rna certs list`) or an agent name.
        #[arg(value_name = "NAME|SERIAL")]
        target: String,
    },
}

/// Runs one `rna certs` subcommand, printing each file written.
pub async fn run(cmd: CertsCommand) -> Result<(), CliError> {
    match cmd {
        CertsCommand::Init {
            dir,
            hub_names,
            force,
        } => {
            let written = rna::certs::init_dir(&dir, &hub_names, force)?;
            for path in written {
                print_written(&path);
            }
        }
        CertsCommand::Agent { dir, name, force } => {
            let (cert, key) = rna::certs::issue_agent_files(&dir, &name, force)?;
            print_written(&cert);
            print_written(&key);
        }
        CertsCommand::List { at } => {
            let backend = open(at).await?;
            let docs = backend.read().await?;
            list_issued(&issued(&backend, &docs)?, &revoked(&backend, &docs)?)?;
        }
        CertsCommand::Revoke { at, tenant, target } => {
            let backend = open(at).await?;
            let now = rna::auth::unix_now(SystemTime::now());
            let (added, _) = backend
                .update(|docs| {
                    let log = issued(&backend, docs)?;
                    let mut list = revoked(&backend, docs)?;
                    let added = list
                        .revoke(&log, &target, tenant.as_ref(), now)
                        .map_err(fail)?;
                    docs.set(rna::state::REVOKED, list.to_text().map_err(fail)?);
                    Ok::<_, CliError>(added)
                })
                .await?;
            if added.is_empty() {
                out!("{target}: already revoked");
            }
            for entry in added {
                out!(
                    "revoked {} (agent {} of {})",
                    entry.serial,
                    entry.agent,
                    entry.tenant
                );
            }
        }
    }
    Ok(())
}

fn fail(e: rna::enroll::EnrollError) -> CliError {
    CliError::BadArgument(e.to_string())
}

/// The backend of `--state`: the state folder's files, or the shared Secret.
async fn open(at: StateArgs) -> Result<Backend, CliError> {
    let StateArgs { state_dir, state } = at;
    let folder = HubState::new(&state_dir.unwrap_or_else(|| PathBuf::from(".")));
    let files = FileState::new()
        .with(rna::state::ISSUED, folder.issued())
        .with(rna::state::REVOKED, folder.revoked());
    Ok(Backend::open(&state.unwrap_or_default(), files).await?)
}

/// The issued-certificate log; empty when none exists yet.
fn issued(backend: &Backend, docs: &Documents) -> Result<IssuedLog, CliError> {
    match docs.get(rna::state::ISSUED) {
        Some(text) => {
            IssuedLog::parse(text, &super::token::doc_origin(backend, rna::state::ISSUED))
                .map_err(fail)
        }
        None => Ok(IssuedLog::default()),
    }
}

/// The revocation list; empty when none exists yet.
fn revoked(backend: &Backend, docs: &Documents) -> Result<RevocationList, CliError> {
    match docs.get(rna::state::REVOKED) {
        Some(text) => RevocationList::parse(
            text,
            &super::token::doc_origin(backend, rna::state::REVOKED),
        )
        .map_err(fail),
        None => Ok(RevocationList::default()),
    }
}

/// `rna certs list`: every issued certificate with its state now.
fn list_issued(log: &IssuedLog, revoked: &RevocationList) -> Result<(), CliError> {
    let now = rna::auth::unix_now(SystemTime::now());
    out!(
        "{:<32}  {:<24}  {:<24}  {:<20}  STATE",
        "SERIAL",
        "TENANT",
        "AGENT",
        "EXPIRES"
    );
    for (record, cert_state) in log.list(revoked, now) {
        let cert_state = match cert_state {
            CertState::Valid => "valid",
            CertState::Expired => "expired",
            CertState::Revoked => "revoked",
        };
        out!(
            "{:<32}  {:<24}  {:<24}  {:<20}  {}",
            record.serial,
            record.tenant.to_string(),
            record.agent,
            rna::auth::format_rfc3339(record.not_after),
            cert_state
        );
    }
    Ok(())
}

/// `wrote PATH`, with the expiry of a certificate, so nobody is surprised by it later.
fn print_written(path: &Path) {
    match rna::certs::file_expiry(path) {
        Some(not_after) => {
            let secs = not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let days = not_after
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs() / 86_400);
            out!(
                "wrote {} (expires {}, in {days} days)",
                path.display(),
                rna::auth::format_rfc3339(secs)
            );
        }
        None => out!("wrote {}", path.display()),
    }
}
