//! `rna dev`: flags only. The hub and agent it runs in one process are `rna::dev::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use clap::Args;
use tokio_util::sync::CancellationToken;

use rna::agent::Rule;
use rna::dev::DevOptions;
use rna::hub::HubHandle;

use super::CliError;

/// Flags of `rna dev`.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// State folder for certificates and the token, reused on the next run.
    #[arg(long, env = "RNA_DEV_DIR", default_value = "rna-dev")]
    dir: PathBuf,
    /// SOCKS5 address.
    #[arg(long, env = "RNA_SOCKS", default_value = "127.0.0.1:1080")]
    socks: SocketAddr,
    /// Admin API address.
    #[arg(long, env = "RNA_API", default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// Also accept SOCKS5 clients without credentials (routed to agent `local`).
    #[arg(long, env = "RNA_SOCKS_NO_AUTH")]
    socks_no_auth: bool,
    /// Extra destinations the agent may dial (its own loopback is allowed in dev).
    #[arg(long, env = "RNA_ALLOW", value_delimiter = ',')]
    allow: Vec<Rule>,
    /// Destinations the agent refuses.
    #[arg(long, env = "RNA_DENY", value_delimiter = ',')]
    deny: Vec<Rule>,
    /// Give the local agent cluster mode, acting with this kubeconfig.
    #[arg(long, env = "RNA_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig [default: its current context].
    #[arg(long, env = "RNA_KUBE_CONTEXT", requires = "kubeconfig")]
    kube_context: Option<String>,
}

/// Runs `rna dev` until SIGTERM or SIGINT; SIGHUP reloads the hub's tokens once it is bound.
pub async fn run(args: DevArgs) -> Result<(), CliError> {
    let options = DevOptions {
        dir: args.dir,
        socks: args.socks,
        api: args.api,
        socks_no_auth: args.socks_no_auth,
        allow: args.allow,
        deny: args.deny,
        kubeconfig: args.kubeconfig,
        kube_context: args.kube_context,
    };
    let shutdown = CancellationToken::new();
    // Signals are watched from the start; the hub's handle arrives once it is bound.
    let hub: Arc<OnceLock<HubHandle>> = Arc::default();
    let slot = hub.clone();
    let reload: crate::Reload = Box::new(move || {
        // The hub logs a failed reload itself, once.
        slot.get().is_some_and(|h| h.reload_tokens().is_ok())
    });
    crate::watch_signals(shutdown.clone(), Some(reload))?;
    rna::dev::run(
        shutdown,
        options,
        |handle| {
            // Set once: this callback runs once.
            let _ = hub.set(handle);
        },
        |ready| {
            for line in ready.lines() {
                out!("{line}");
            }
        },
    )
    .await?;
    Ok(())
}
