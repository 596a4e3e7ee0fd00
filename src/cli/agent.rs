//! `rna agent`: validate the configuration (or print it with `--check-config`), then dial
//! out to the hubs until SIGTERM; SIGHUP re-reads the token file and the allow and deny rules.

use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use rna::agent::{Agent, AgentState, Policy};
use rna::config::{
    agent_file_text, agent_settings, merge_agent, AgentOptions, AgentSettings, LogOptions,
    MetricsListen,
};

use super::CliError;

/// Flags of `rna agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// TOML configuration file; flags and RNA_* variables override its values. SIGHUP
    /// re-reads its allow and deny rules.
    #[arg(long, env = "RNA_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (and read every file it names), then exit.
    #[arg(long)]
    check_config: bool,
    /// Enroll first with this join token (`rna token create --join` prints the whole line):
    /// make a key here, check the hub against the token's CA pin, and store the certificate,
    /// CA and connect token in --state-dir (./rna-agent unless given). Not used while that
    /// folder holds an enrollment in the first two thirds of its certificate's lifetime, so
    /// the same line also restarts the agent.
    #[arg(
        long,
        env = "RNA_JOIN",
        hide_env_values = true,
        value_name = "rna_join_…",
        conflicts_with = "check_config"
    )]
    join: Option<String>,
    #[command(flatten)]
    options: AgentOptions,
}

/// The agent's state folder when --join is given without --state-dir.
const DEFAULT_STATE_DIR: &str = "rna-agent";

/// Enrolls with `join` unless the state folder holds an enrollment whose certificate is in
/// the first two thirds of its life, and points the options at the state folder. A folder
/// whose certificate is due enrolls again; if that fails while the stored certificate is
/// still valid, the agent starts with it and says so.
fn enroll_first(mut options: AgentOptions, join: &str) -> Result<AgentOptions, CliError> {
    let dir = options
        .state_dir
        .get_or_insert_with(|| PathBuf::from(DEFAULT_STATE_DIR))
        .clone();
    let state = AgentState::new(&dir);
    let now = std::time::SystemTime::now();
    let stored = state.is_enrolled();
    if stored && state.renewal_due(now) == Some(false) {
        info!(state = %dir.display(), "already enrolled: --join is not used again");
        return Ok(options);
    }
    match enroll_now(&options, join, &state) {
        Err(e) if stored && state.still_valid(now) => {
            warn!(state = %dir.display(),
                "enrolling again failed, starting with the stored certificate: {e}");
            Ok(options)
        }
        Err(e) => Err(e),
        Ok(()) => Ok(options),
    }
}

/// One enrollment with `join` into `state`.
fn enroll_now(options: &AgentOptions, join: &str, state: &AgentState) -> Result<(), CliError> {
    let name = options
        .name
        .clone()
        .ok_or(rna::config::ConfigError::Missing {
            key: "name",
            flag: "name",
            env: "NAME",
        })?;
    if options.hub.is_empty() {
        return Err(rna::config::ConfigError::Missing {
            key: "hub",
            flag: "hub",
            env: "HUB",
        }
        .into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::io("starting the enrollment runtime", e))?;
    // Enrollment reaches the hub as the agent's sessions will: the same transport and proxy.
    let mut reach = rna::agent::enroll::Reach::default();
    if let Some(mode) = options.transport {
        reach.transport = mode;
    }
    if let Some(after) = options.quic_fallback_after {
        reach.quic_fallback_after = after;
    }
    reach.proxy = rna::transport::proxy::ProxySettings::resolve(options.proxy.as_deref(), |name| {
        std::env::var(name).ok()
    })
    .map_err(|e| rna::config::ConfigError::Invalid {
        origin: "--proxy or the proxy environment".into(),
        key: "proxy".into(),
        message: e.to_string(),
    })?;
    runtime.block_on(rna::agent::enroll::enroll(
        &options.hub,
        options.server_name.as_deref(),
        &name,
        join,
        state,
        &reach,
    ))?;
    Ok(())
}

/// A valid agent configuration, with what SIGHUP needs to merge it again.
pub struct Prepared {
    /// The settings in force.
    pub settings: AgentSettings,
    /// The configuration file, re-read on SIGHUP.
    file: Option<PathBuf>,
    /// Flags and variables as given: on SIGHUP they still win over the file.
    cli: AgentOptions,
}

/// Merges file, flags and variables into valid agent settings and sets up logging. `None`
/// when `--check-config` printed the configuration in force and nothing is left to do.
pub fn prepare(args: AgentArgs, log: LogOptions) -> Result<Option<Prepared>, CliError> {
    let cli = args.options.clone();
    let join = args.join.clone();
    let settings = super::in_force(
        &args.config,
        args.check_config,
        (args.options, log),
        merge_agent,
        |options, sources| -> Result<AgentSettings, CliError> {
            let options = match &join {
                Some(join) => enroll_first(options, join)?,
                None => options,
            };
            Ok(agent_settings(options, sources)?)
        },
        agent_file_text,
    )?;
    Ok(settings.map(|settings| Prepared {
        settings,
        file: args.config,
        cli,
    }))
}

/// Runs the agent until SIGTERM or SIGINT, with its health and metrics endpoint when asked.
pub async fn run(prepared: Prepared) -> Result<(), CliError> {
    let Prepared {
        settings: AgentSettings {
            config, metrics, ..
        },
        file,
        cli,
    } = prepared;
    let admin = match metrics {
        MetricsListen::On(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                CliError::io(format!("binding the agent's metrics endpoint on {addr}"), e)
            })?)
        }
        // Nobody asked for this address: another agent or exporter on the host must not stop
        // the agent from starting.
        MetricsListen::Default(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                warn!(
                    metrics = %addr,
                    "agent health and metrics endpoint not served: cannot bind the default \
                     address ({e}); give --metrics ADDRESS or --metrics off"
                );
                None
            }
        },
        MetricsListen::Off => None,
    };
    info!(
        name = %config.name,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "agent starting"
    );
    let agent = Agent::new(config)?;
    let handle = agent.handle();
    let shutdown = CancellationToken::new();
    if let Some(listener) = admin {
        info!(metrics = %listener.local_addr()?, "agent health and metrics endpoint");
        tokio::spawn(rna::agent::admin::serve(
            listener,
            handle.clone(),
            shutdown.clone(),
        ));
    }
    // SIGHUP re-reads the allow and deny rules (flags and variables still win over the file)
    // and the token file, and retries at once any hub the agent was waiting to retry.
    let reload_handle = handle.clone();
    let reload: crate::Reload = Box::new(move || {
        let token = match reload_handle.reload_token() {
            Ok(()) => {
                info!("SIGHUP: token file read; retrying hubs now");
                true
            }
            Err(e) => {
                warn!("SIGHUP: cannot read the token file: {e}");
                false
            }
        };
        let merged = merge_agent(file.as_deref(), cli.clone(), LogOptions::default());
        match merged {
            Ok((options, _, _)) => {
                let policy = Policy::new(options.allow, options.deny);
                info!(
                    allow = policy.allow_rules().len(),
                    deny = policy.deny_rules().len(),
                    "SIGHUP: policy reloaded"
                );
                reload_handle.set_policy(policy);
                token
            }
            Err(e) => {
                warn!("SIGHUP: keeping the previous policy: {e}");
                false
            }
        }
    });
    crate::watch_signals(shutdown.clone(), Some(reload))?;
    // Ready after local setup, not after a hub answers: a hub outage must not turn into a
    // restart storm of every agent.
    rna::notify::ready("started; connecting to hubs");
    rna::notify::spawn_watchdog(shutdown.clone());
    agent.run(shutdown).await?;
    rna::notify::stopping("stopped");
    Ok(())
}
