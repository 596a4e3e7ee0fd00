//! The `rna` command: hub, agent, certificates, tokens and the embedded `dev` default.
#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod kube_cli;
mod ship;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use rna::agent::kube::{KubeSettings, KubeSource};
use rna::agent::{Agent, AgentConfig, HubTarget, Policy, Rule};
use rna::auth::{format_rfc3339, parse_ttl, Scope, Tenant, TokenStore};
use rna::config::{
    agent_file_text, agent_settings, hub_config, hub_file_text, merge_agent, merge_hub,
    AgentOptions, AgentSettings, HubOptions, LogFormat, LogOptions, MetricsListen,
};
use rna::dev::{DevState, DEV_AGENT};
use rna::hub::{Hub, HubConfig, NoAuthRoute};
use rna::transport::{ClientTls, ServerTls};

/// rna: reach private networks through an agent that only dials out.
#[derive(Parser, Debug)]
#[command(
    name = "rna",
    version,
    long_version = ship::LONG_VERSION,
    about,
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    log: LogOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a hub and one agent named `local` in one process, with generated certificates and
    /// token (SOCKS5 on 127.0.0.1:1080).
    Dev(DevArgs),
    /// Run the hub: QUIC for agents, SOCKS5 for clients, the admin API and status page.
    Hub(Box<HubArgs>),
    /// Run an agent: dial out to the hub and serve its streams.
    Agent(Box<AgentArgs>),
    /// Make a CA and certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Create, list and revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Kubernetes through the hub and an agent in cluster mode: apply, get, list, delete,
    /// wait, inventory. Exit codes: 0 success, 1 Kubernetes refused, 2 usage, 3 agent
    /// unavailable.
    Kube(kube_cli::KubeArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completions(ship::CompletionsArgs),
    /// Write the man pages, generated from this command line, into a folder.
    #[command(hide = true)]
    Manpages(ship::ManpagesArgs),
}

#[derive(Args, Debug)]
struct DevArgs {
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

#[derive(Args, Debug)]
struct HubArgs {
    /// TOML configuration file; flags and RNA_* variables override its values.
    #[arg(long, env = "RNA_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (and read every file it names), then exit.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    options: HubOptions,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// TOML configuration file; flags and RNA_* variables override its values. SIGHUP
    /// re-reads its allow and deny rules.
    #[arg(long, env = "RNA_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (and read every file it names), then exit.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    options: AgentOptions,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
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

#[derive(Subcommand, Debug)]
enum TokenCommand {
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

/// Exit code for configuration and usage errors (clap uses it too).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Configuration is validated before anything runs; its errors are usage errors.
    let prepared = match prepare(cli.command, cli.log) {
        Ok(p) => p,
        Err(e) => {
            // The whole chain, each cause once (many errors also print their cause).
            eprintln!("rna: {}", rna::fsutil::error_chain(e.as_ref()));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let work = match prepared {
        Prepared::Done => return ExitCode::SUCCESS,
        Prepared::Run(work) => *work,
    };
    if let Work::Kube(args) = work {
        // A short-lived client: one thread is plenty.
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => ExitCode::from(rt.block_on(kube_cli::run(args))),
            Err(e) => {
                eprintln!("rna: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let threads = match &work {
        Work::Hub(config) => config.worker_threads,
        Work::Agent(settings, ..) => settings.worker_threads,
        _ => rna::runtime::default_worker_threads(),
    };
    let runtime = match rna::runtime::build(threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rna: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(work)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rna: {}", rna::fsutil::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// What to run once the configuration is valid and logging is set up.
enum Work {
    Dev(DevArgs),
    Hub(Box<HubConfig>),
    Agent(Box<AgentSettings>, Option<PathBuf>, Box<AgentOptions>),
    Certs(CertsCommand),
    Token(TokenCommand),
    Kube(kube_cli::KubeArgs),
}

enum Prepared {
    Done,
    Run(Box<Work>),
}

/// Turns flags, variables and files into validated configuration, and sets up logging.
fn prepare(command: Command, log: LogOptions) -> Result<Prepared> {
    let work = match command {
        Command::Hub(args) => {
            let (options, log, sources) = merge_hub(args.config.as_deref(), args.options, log)?;
            init_logging(&log);
            let config = hub_config(options.clone(), &sources)?;
            if args.check_config {
                // A TOML comment, then the keys in force: the output is a valid hub file.
                out!("# {}: configuration is valid", origin(&args.config));
                out!("{}", hub_file_text(&options, &config, &log)?.trim_end());
                return Ok(Prepared::Done);
            }
            Work::Hub(Box::new(config))
        }
        Command::Agent(args) => {
            let cli_options = args.options.clone();
            let (options, log, sources) = merge_agent(args.config.as_deref(), args.options, log)?;
            init_logging(&log);
            let settings = agent_settings(options.clone(), &sources)?;
            if args.check_config {
                // A TOML comment, then the keys in force: the output is a valid agent file.
                out!("# {}: configuration is valid", origin(&args.config));
                out!("{}", agent_file_text(&options, &settings, &log)?.trim_end());
                return Ok(Prepared::Done);
            }
            Work::Agent(Box::new(settings), args.config, Box::new(cli_options))
        }
        Command::Dev(args) => {
            init_logging(&log);
            Work::Dev(args)
        }
        Command::Certs(cmd) => {
            init_logging(&log);
            Work::Certs(cmd)
        }
        Command::Token(cmd) => {
            init_logging(&log);
            Work::Token(cmd)
        }
        Command::Kube(args) => Work::Kube(args),
        Command::Completions(args) => {
            let script = ship::completions(&args, &mut Cli::command());
            out!("{}", String::from_utf8_lossy(&script).trim_end());
            return Ok(Prepared::Done);
        }
        Command::Manpages(args) => {
            ship::manpages(&args, Cli::command()).with_context(|| {
                format!("cannot write the man pages into {}", args.dir.display())
            })?;
            out!("wrote the man pages into {}", args.dir.display());
            return Ok(Prepared::Done);
        }
    };
    Ok(Prepared::Run(Box::new(work)))
}

fn origin(config: &Option<PathBuf>) -> String {
    config.as_ref().map_or_else(
        || "flags and environment".to_string(),
        |p| p.display().to_string(),
    )
}

fn init_logging(log: &LogOptions) {
    use tracing_subscriber::EnvFilter;
    let filter = match &log.log_level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let format = log
        .log_format
        .unwrap_or(if std::io::stdout().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

async fn run(work: Work) -> Result<()> {
    match work {
        Work::Dev(args) => dev(args).await,
        Work::Hub(config) => hub(*config).await,
        Work::Agent(settings, file, cli) => agent(*settings, file, *cli).await,
        Work::Certs(cmd) => certs(cmd),
        Work::Token(cmd) => token(cmd),
        Work::Kube(_) => bail!("rna kube runs before the server runtime starts"),
    }
}

/// What SIGHUP does; returns whether the reload succeeded.
type Reload = Box<dyn Fn() -> bool + Send + Sync>;

/// Cancels `shutdown` on SIGTERM or SIGINT (a second SIGINT exits at once); runs `reload`
/// on SIGHUP, telling systemd about it.
fn watch_signals(shutdown: CancellationToken, reload: Option<Reload>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    info!("SIGTERM: shutting down");
                    rna::notify::stopping("draining");
                    shutdown.cancel();
                }
                _ = int.recv() => {
                    if shutdown.is_cancelled() {
                        warn!("second interrupt: exiting now");
                        std::process::exit(130);
                    }
                    info!("SIGINT: shutting down");
                    rna::notify::stopping("draining");
                    shutdown.cancel();
                }
                _ = hup.recv() => match &reload {
                    Some(reload) => {
                        info!("SIGHUP: reloading");
                        rna::notify::reloading();
                        reload();
                        rna::notify::reloaded();
                    }
                    None => info!("SIGHUP ignored: nothing to reload"),
                },
            }
        }
    });
    Ok(())
}

async fn hub(config: HubConfig) -> Result<()> {
    let hub = Hub::bind(config).await?;
    let shutdown = CancellationToken::new();
    let handle = hub.handle();
    // The hub logs a failed reload itself ("keeping the previous tokens"), once.
    let reload: Reload = Box::new(move || handle.reload_tokens().is_ok());
    watch_signals(shutdown.clone(), Some(reload))?;
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

async fn agent(settings: AgentSettings, file: Option<PathBuf>, cli: AgentOptions) -> Result<()> {
    let AgentSettings {
        config, metrics, ..
    } = settings;
    let admin = match metrics {
        MetricsListen::On(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the agent's metrics endpoint on {addr}"))?,
        ),
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
    let reload: Reload = Box::new(move || {
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
    watch_signals(shutdown.clone(), Some(reload))?;
    // Ready after local setup, not after a hub answers: a hub outage must not turn into a
    // restart storm of every agent.
    rna::notify::ready("started; connecting to hubs");
    rna::notify::spawn_watchdog(shutdown.clone());
    agent.run(shutdown).await?;
    rna::notify::stopping("stopped");
    Ok(())
}

async fn dev(args: DevArgs) -> Result<()> {
    let state = DevState::prepare(&args.dir)
        .with_context(|| format!("preparing {}", args.dir.display()))?;
    let tls = ServerTls::load(&state.ca(), &state.hub_cert(), &state.hub_key())?;
    let mut config = HubConfig::new("127.0.0.1:0".parse()?, args.socks, tls, state.tokens());
    config.api = Some(args.api);
    // The endpoint key lives with the rest of the dev state (hub and agent restart together,
    // so the "no state folder" advice would mean nothing here).
    config.state_dir = Some(state.dir.clone());
    let socks_no_auth = args.socks_no_auth;
    if socks_no_auth {
        config.socks_no_auth = Some(NoAuthRoute {
            agent: DEV_AGENT.to_string(),
            tenant: DevState::tenant(),
        });
    }
    let hub = Hub::bind(config).await?;
    let quic = hub.quic_addr();
    let socks = hub.socks_addr();
    let api = hub.api_addr();
    let handle = hub.handle();

    let client_tls = ClientTls::load(&state.ca(), &state.agent_cert(), &state.agent_key())?;
    let target = HubTarget {
        host: "127.0.0.1".into(),
        port: quic.port(),
    };
    let mut agent_config = AgentConfig::new(
        vec![target],
        DEV_AGENT.into(),
        client_tls,
        state.token.clone(),
    );
    agent_config.policy = Policy::new(args.allow, args.deny).allow_loopback();
    let cluster_mode = args.kubeconfig.is_some();
    let kubeconfig_shown = args
        .kubeconfig
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    if let Some(path) = args.kubeconfig {
        agent_config.kube = Some(KubeSettings::new(KubeSource::Kubeconfig {
            path,
            context: args.kube_context,
        }));
    }
    let agent = Agent::new(agent_config)?;
    let agent_handle = agent.handle();

    let shutdown = CancellationToken::new();
    let registry = handle.registry().clone();
    let reload: Reload = Box::new(move || handle.reload_tokens().is_ok());
    watch_signals(shutdown.clone(), Some(reload))?;
    let hub_task = tokio::spawn(hub.run(shutdown.clone()));
    let mut agent_task = tokio::spawn(agent.run(shutdown.clone()));

    // Up when the agent is connected and, in cluster mode, has reported its inventory (so
    // `rna kube` can name types at once). An agent that cannot start says why.
    let up = async {
        agent_handle.wait_until(|s| s.connected > 0).await;
        if cluster_mode {
            registry
                .wait_until(|r| r.sessions().iter().any(|s| s.inventory().is_some()))
                .await;
        }
    };
    let ready = tokio::time::timeout(Duration::from_secs(15), async {
        tokio::select! {
            _ = up => Ok(()),
            ended = &mut agent_task => Err(ended),
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(ended)) => {
            shutdown.cancel();
            match ended {
                Ok(Err(e)) => bail!("the local agent stopped: {e}"),
                Ok(Ok(())) => bail!("the local agent stopped"),
                Err(e) => bail!("the local agent failed: {e}"),
            }
        }
        Err(_) => {
            shutdown.cancel();
            bail!(
                "the local agent did not connect: {}",
                agent_handle
                    .status()
                    .last_error
                    .map_or_else(|| "no answer".into(), |e| e.to_string())
            );
        }
    }
    out!(
        "rna dev: hub and agent `{DEV_AGENT}` are up (state in {}).",
        state.dir.display()
    );
    if let Some(api) = api {
        out!("admin API: http://{api}/api/v1/agents (bearer token below)");
    }
    out!("Reach anything the agent can reach through SOCKS5 on {socks}, for example:");
    let url = api.map_or_else(
        || "http://example.internal/".to_string(),
        |a| format!("http://{a}/healthz"),
    );
    out!(
        "curl --proxy socks5h://{DEV_AGENT}:{}@{socks} {url}",
        state.token.expose()
    );
    if socks_no_auth {
        out!("Without credentials (--socks-no-auth), to agent `{DEV_AGENT}`:");
        out!("curl --proxy socks5h://{socks} {url}");
    }
    if let (true, Some(api)) = (cluster_mode, api) {
        out!("The agent has cluster mode (kubeconfig {kubeconfig_shown}):");
        out!(
            "rna kube --api http://{api} --token-file {} --agent {DEV_AGENT} list namespaces",
            state.dir.join("token.txt").display()
        );
    }

    let hub_result = hub_task.await.context("hub task")?;
    let agent_result = agent_task.await.context("agent task")?;
    hub_result?;
    agent_result?;
    Ok(())
}

/// `wrote PATH`, with the expiry of a certificate, so nobody is surprised by it later.
fn print_written(path: &std::path::Path) {
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

fn certs(cmd: CertsCommand) -> Result<()> {
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

fn token(cmd: TokenCommand) -> Result<()> {
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
                        anyhow::anyhow!(
                            "{:?}…: not a token (rna_ followed by 12 and 48 hex digits); give \
                             the whole token or its id from `rna token list`",
                            id.get(..16).unwrap_or("rna_")
                        )
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

fn list_tokens(store: &Path) -> Result<()> {
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
