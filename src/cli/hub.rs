//! `rna hub`: validate the configuration (or print it with `--check-config`), then serve
//! until SIGTERM; SIGHUP reloads the token store and the OIDC issuers file.

use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;

use rna::config::{hub_config, hub_file_text, merge_hub, HubOptions, LogOptions};
use rna::hub::{Hub, HubConfig};

use super::CliError;

/// Flags of `rna hub`.
#[derive(Args, Debug)]
pub struct HubArgs {
    /// TOML configuration file; flags and RNA_* variables override its values.
    #[arg(long, env = "RNA_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (and read every file it names), then exit.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    options: HubOptions,
}

/// Merges file, flags and variables into a valid hub configuration and sets up logging.
/// `None` when `--check-config` printed the configuration in force and nothing is left to do.
pub fn prepare(args: HubArgs, log: LogOptions) -> Result<Option<HubConfig>, CliError> {
    super::in_force(
        &args.config,
        args.check_config,
        (args.options, log),
        merge_hub,
        hub_config,
        hub_file_text,
    )
}

/// Serves until SIGTERM or SIGINT, telling systemd when it is ready and when it stops.
pub async fn run(config: HubConfig) -> Result<(), CliError> {
    let issuers_file = config.oidc_issuers_file.clone();
    let hub = Hub::bind(config).await?;
    let shutdown = CancellationToken::new();
    let handle = hub.handle();
    // The hub logs a failed token reload itself ("keeping the previous tokens"), once. The
    // issuers file is read again too; a broken one keeps the issuers in force.
    let reload: crate::Reload = Box::new(move || {
        let tokens = handle.reload_tokens().is_ok();
        let issuers = match &issuers_file {
            None => true,
            Some(path) => {
                let reloaded = rna::config::load_issuers(path)
                    .map_err(|e| e.to_string())
                    .and_then(|c| handle.reload_issuers(c).map_err(|e| e.to_string()));
                match reloaded {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::error!(
                            "OIDC issuers not reloaded, keeping the previous ones: {e}"
                        );
                        false
                    }
                }
            }
        };
        tokens && issuers
    });
    crate::watch_signals(shutdown.clone(), Some(reload))?;
    rna::notify::ready(&format!(
        "serving: QUIC {}, SOCKS5 {}",
        hub.quic_addr(),
        hub.socks_addr()
    ));
    rna::notify::spawn_watchdog(shutdown.clone());
    let result = hub.run(shutdown).await;
    rna::notify::stopping("stopped");
    result?;
    Ok(())
}
