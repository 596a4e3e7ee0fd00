//! The subcommands of `rna`: each one's flags and what it runs. `main.rs` parses the command
//! line, sets up logging and signals, and dispatches here.

// First, so that `out!` is visible in the modules below.
#[macro_use]
pub mod output;

pub mod agent;
pub mod agents;
pub mod certs;
pub mod dev;
pub mod hub;
pub mod kube;
pub mod kube_output;
pub mod ship;
pub mod token;

use std::path::{Path, PathBuf};

use rna::agent::AgentError;
use rna::auth::StoreError;
use rna::certs::CertError;
use rna::config::{ConfigError, LogOptions, Sources};
use rna::dev::DevError;
use rna::hub::HubError;

/// Why a subcommand failed; `main` prints the whole chain after `rna: ` and picks the exit
/// code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Flags, variables or a configuration file are not valid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The hub could not start or stopped with an error.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The agent could not start or stopped with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// `rna dev` failed.
    #[error(transparent)]
    Dev(#[from] DevError),
    /// Certificates could not be made or written.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The token store could not be read, changed or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local operation failed; `doing` says which.
    #[error("{doing}")]
    Io {
        /// What was being done, e.g. `binding the agent's metrics endpoint on …`.
        doing: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A local operation that names itself in its message failed.
    #[error(transparent)]
    IoBare(#[from] std::io::Error),
    /// An argument is not usable; the message says how to fix it.
    #[error("{0}")]
    BadArgument(String),
    /// The shared state could not be read or written.
    #[error(transparent)]
    State(#[from] rna::state::StateError),
    /// The agent could not enroll with its join token.
    #[error(transparent)]
    Enroll(#[from] rna::agent::EnrollmentError),
}

impl CliError {
    /// `source` while `doing` something.
    pub fn io(doing: impl Into<String>, source: std::io::Error) -> CliError {
        CliError::Io {
            doing: doing.into(),
            source,
        }
    }
}

/// Merges the configuration `file` (if any) under the command line, sets up logging and
/// validates what is in force. With `check` (`--check-config`) it prints that as a file of
/// the role's keys and returns `None`: nothing is left to do.
fn in_force<O: Clone, C, E>(
    file: &Option<PathBuf>,
    check: bool,
    (cli, log): (O, LogOptions),
    merge: impl FnOnce(Option<&Path>, O, LogOptions) -> Result<(O, LogOptions, Sources), ConfigError>,
    validate: impl FnOnce(O, &Sources) -> Result<C, E>,
    print: impl FnOnce(&O, &C, &LogOptions) -> Result<String, ConfigError>,
) -> Result<Option<C>, CliError>
where
    CliError: From<E>,
{
    let (options, log, sources) = merge(file.as_deref(), cli, log)?;
    crate::init_logging(&log);
    let config = validate(options.clone(), &sources)?;
    if !check {
        return Ok(Some(config));
    }
    // A TOML comment, then the keys in force: the output is a valid file of the role.
    out!("# {}: configuration is valid", origin(file));
    out!("{}", print(&options, &config, &log)?.trim_end());
    Ok(None)
}

/// Where a configuration came from, for `--check-config`'s first line.
fn origin(config: &Option<PathBuf>) -> String {
    config.as_ref().map_or_else(
        || "flags and environment".to_string(),
        |p| p.display().to_string(),
    )
}
