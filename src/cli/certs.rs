//! `rna certs`: make a CA and the hub's certificate, or an agent's client certificate.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;

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
}

/// Runs one `rna certs` subcommand, printing each file written.
pub fn run(cmd: CertsCommand) -> Result<(), CliError> {
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
