//! The `rna` command: hub, agent, certificates, tokens and the embedded `dev` default.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use rna::agent::{Agent, AgentConfig, HubTarget, Policy, Rule};
use rna::auth::{format_rfc3339, parse_ttl, read_secret_file, Scope, Tenant, TokenStore};
use rna::dev::{DevState, DEV_AGENT};
use rna::hub::{Hub, HubConfig, HubHandle, NoAuthRoute};
use rna::transport::control::Heartbeat;
use rna::transport::{ClientTls, ServerTls};

/// rna: reach private networks through an agent that only dials out.
#[derive(Parser, Debug)]
#[command(name = "rna", version, about, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "RNA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing env-filter syntax, e.g. `info` or `rna=debug`); RUST_LOG also works.
    #[arg(long, global = true, env = "RNA_LOG_LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a hub and one agent named `local` in one process, with generated certificates and
    /// token (SOCKS5 on 127.0.0.1:1080).
    Dev(DevArgs),
    /// Run the hub: QUIC for agents, SOCKS5 for clients, the admin API.
    Hub(HubArgs),
    /// Run an agent: dial out to the hub and serve its streams.
    Agent(AgentArgs),
    /// Make a CA and certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Create, list and revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
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
}

#[derive(Args, Debug)]
struct HubArgs {
    /// UDP address agents connect to.
    #[arg(long, env = "RNA_LISTEN", default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// SOCKS5 address.
    #[arg(long, env = "RNA_SOCKS", default_value = "127.0.0.1:1080")]
    socks: SocketAddr,
    /// Admin API address.
    #[arg(long, env = "RNA_API", default_value = "127.0.0.1:8080")]
    api: SocketAddr,
    /// CA that agent certificates must chain to.
    #[arg(long, env = "RNA_CA")]
    ca: PathBuf,
    /// Hub certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    cert: PathBuf,
    /// Hub private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    key: PathBuf,
    /// Token store (see `rna token`).
    #[arg(long, env = "RNA_TOKENS")]
    tokens: PathBuf,
    /// Accept SOCKS5 clients without credentials and route them to AGENT@TENANT
    /// (only when --socks is a loopback address).
    #[arg(long, env = "RNA_SOCKS_NO_AUTH", value_name = "AGENT@TENANT")]
    socks_no_auth: Option<String>,
    #[command(flatten)]
    tuning: HubTuning,
}

#[derive(Args, Debug)]
struct HubTuning {
    /// Heartbeat interval announced to agents.
    #[arg(long, env = "RNA_HEARTBEAT_INTERVAL", value_parser = parse_duration, default_value = "10s")]
    heartbeat_interval: Duration,
    /// Silence after which an agent connection is closed.
    #[arg(long, env = "RNA_HEARTBEAT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    heartbeat_timeout: Duration,
    /// Time in-flight streams get to finish on shutdown.
    #[arg(long, env = "RNA_GRACE", value_parser = parse_duration, default_value = "30s")]
    grace: Duration,
    /// Time a SOCKS client has for greeting, authentication and request.
    #[arg(long, env = "RNA_SOCKS_GREETING_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    socks_greeting_timeout: Duration,
    /// SOCKS connections one client IP may have in the greeting at once.
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_PER_IP", default_value_t = 256)]
    socks_half_open_per_ip: usize,
    /// SOCKS connections in the greeting from all clients at once.
    #[arg(long, env = "RNA_SOCKS_HALF_OPEN_TOTAL", default_value_t = 4096)]
    socks_half_open_total: usize,
    /// Time an agent has to answer a tunnel request (it dials within its own timeout).
    #[arg(long, env = "RNA_OPEN_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    open_timeout: Duration,
    /// How often the token store file is checked for changes (SIGHUP reloads at once).
    #[arg(long, env = "RNA_TOKEN_POLL", value_parser = parse_duration, default_value = "2s")]
    token_poll: Duration,
}

#[derive(Args, Debug)]
struct AgentArgs {
    /// Hub address (host:port); repeat for several hubs. Every address a name resolves to
    /// gets its own connection.
    #[arg(long, env = "RNA_HUB", value_delimiter = ',', required = true)]
    hub: Vec<HubTarget>,
    /// TLS name to verify the hub as (default: the host of --hub).
    #[arg(long, env = "RNA_SERVER_NAME")]
    server_name: Option<String>,
    /// Agent identifier; must equal the certificate's common name.
    #[arg(long, env = "RNA_NAME")]
    name: String,
    /// CA to verify the hub with.
    #[arg(long, env = "RNA_CA")]
    ca: PathBuf,
    /// Agent certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    cert: PathBuf,
    /// Agent private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    key: PathBuf,
    /// File holding the agent's token (scope connect:agentHub).
    #[arg(long, env = "RNA_TOKEN_FILE")]
    token_file: PathBuf,
    /// Destinations the agent may dial: CIDR, IP, host or *.domain, optionally :port.
    /// Without --allow, everything but the default-denied ranges is allowed.
    #[arg(long, env = "RNA_ALLOW", value_delimiter = ',')]
    allow: Vec<Rule>,
    /// Destinations the agent refuses (checked first).
    #[arg(long, env = "RNA_DENY", value_delimiter = ',')]
    deny: Vec<Rule>,
    /// Time allowed to resolve and connect one destination.
    #[arg(long, env = "RNA_DIAL_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    dial_timeout: Duration,
    /// Tunnel streams the hub may have open on this agent's connection at once.
    #[arg(long, env = "RNA_MAX_STREAMS", default_value_t = 16_384)]
    max_streams: u32,
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
        /// Scope; repeat: connect:agentHub, proxy, read:infra:data, exec:infra:op, admin.
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
        /// Token id (from `rna token list`).
        #[arg(env = "RNA_TOKEN_ID")]
        id: String,
    },
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("invalid duration {s:?}"));
    }
    parse_ttl(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rna: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rna: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Dev(args) => dev(args).await,
        Command::Hub(args) => hub(args).await,
        Command::Agent(args) => agent(args).await,
        Command::Certs(cmd) => certs(cmd),
        Command::Token(cmd) => token(cmd),
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT; calls `on_hup` on SIGHUP.
fn watch_signals(shutdown: CancellationToken, hub: Option<HubHandle>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); shutdown.cancel(); }
                _ = int.recv() => {
                    if shutdown.is_cancelled() {
                        warn!("second interrupt: exiting now");
                        std::process::exit(130);
                    }
                    info!("SIGINT: shutting down");
                    shutdown.cancel();
                }
                _ = hup.recv() => match &hub {
                    Some(h) => {
                        info!("SIGHUP: reloading tokens");
                        let _ = h.reload_tokens();
                    }
                    None => info!("SIGHUP ignored: nothing to reload"),
                },
            }
        }
    });
    Ok(())
}

fn hub_config(args: HubArgs) -> Result<HubConfig> {
    let tls = ServerTls::load(&args.ca, &args.cert, &args.key)?;
    let mut config = HubConfig::new(args.listen, args.socks, tls, args.tokens);
    config.api = Some(args.api);
    if let Some(route) = args.socks_no_auth {
        let (agent, tenant) = route
            .split_once('@')
            .with_context(|| format!("--socks-no-auth {route:?}: expected AGENT@TENANT"))?;
        if !rna::certs::valid_agent_name(agent) {
            bail!("--socks-no-auth: {agent:?} is not a valid agent name");
        }
        config.socks_no_auth = Some(NoAuthRoute {
            agent: agent.to_string(),
            tenant: tenant.parse().context("--socks-no-auth")?,
        });
    }
    let t = args.tuning;
    if t.heartbeat_timeout <= t.heartbeat_interval {
        bail!("--heartbeat-timeout must be longer than --heartbeat-interval");
    }
    config.heartbeat = Heartbeat {
        interval: t.heartbeat_interval,
        timeout: t.heartbeat_timeout,
    };
    config.grace = t.grace;
    config.socks_limits.greeting_timeout = t.socks_greeting_timeout;
    config.socks_limits.half_open_per_ip = t.socks_half_open_per_ip;
    config.socks_limits.half_open_total = t.socks_half_open_total;
    config.open_timeout = t.open_timeout;
    config.token_poll = t.token_poll;
    Ok(config)
}

async fn hub(args: HubArgs) -> Result<()> {
    let hub = Hub::bind(hub_config(args)?).await?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), Some(hub.handle()))?;
    hub.run(shutdown).await?;
    Ok(())
}

async fn agent(args: AgentArgs) -> Result<()> {
    let tls = ClientTls::load(&args.ca, &args.cert, &args.key)?;
    let token = read_secret_file(&args.token_file)?;
    let mut config = AgentConfig::new(args.hub, args.name, tls, token);
    config.server_name = args.server_name;
    config.policy = Policy::new(args.allow, args.deny);
    config.dial_timeout = args.dial_timeout;
    config.limits.tunnel_streams = args.max_streams;
    let agent = Agent::new(config)?;
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), None)?;
    agent.run(shutdown).await?;
    Ok(())
}

async fn dev(args: DevArgs) -> Result<()> {
    let state = DevState::prepare(&args.dir)
        .with_context(|| format!("preparing {}", args.dir.display()))?;
    let tls = ServerTls::load(&state.ca(), &state.hub_cert(), &state.hub_key())?;
    let mut config = HubConfig::new("127.0.0.1:0".parse()?, args.socks, tls, state.tokens());
    config.api = Some(args.api);
    if args.socks_no_auth {
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
    let agent = Agent::new(agent_config)?;
    let agent_handle = agent.handle();

    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone(), Some(handle.clone()))?;
    let hub_task = tokio::spawn(hub.run(shutdown.clone()));
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));

    let ready = tokio::time::timeout(
        Duration::from_secs(15),
        agent_handle.wait_until(|s| s.connected > 0),
    )
    .await;
    if ready.is_err() {
        shutdown.cancel();
        bail!(
            "the local agent did not connect: {}",
            agent_handle
                .status()
                .last_error
                .map_or_else(|| "no answer".into(), |e| e.to_string())
        );
    }
    println!(
        "rna dev: hub and agent `{DEV_AGENT}` are up (state in {}).",
        state.dir.display()
    );
    if let Some(api) = api {
        println!("admin API: http://{api}/api/v1/agents (bearer token below)");
    }
    println!("Reach anything the agent can reach through SOCKS5 on {socks}, for example:");
    let url = api.map_or_else(
        || "http://example.internal/".to_string(),
        |a| format!("http://{a}/healthz"),
    );
    println!(
        "curl --proxy socks5h://{DEV_AGENT}:{}@{socks} {url}",
        state.token.expose()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let hub_result = hub_task.await.context("hub task")?;
    let agent_result = agent_task.await.context("agent task")?;
    hub_result?;
    agent_result?;
    Ok(())
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
                println!("wrote {}", path.display());
            }
        }
        CertsCommand::Agent { dir, name, force } => {
            let (cert, key) = rna::certs::issue_agent_files(&dir, &name, force)?;
            println!("wrote {}", cert.display());
            println!("wrote {}", key.display());
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
            println!("{}", secret.expose());
        }
        TokenCommand::List { store } => list_tokens(&store)?,
        TokenCommand::Revoke { store, id } => {
            let mut tokens = TokenStore::load(&store)?;
            tokens.revoke(&id)?;
            tokens.save(&store)?;
            println!("revoked {id}");
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
    println!(
        "{:<12}  {:<24}  {:<44}  {:<20}  {:<8}  LABEL",
        "ID", "TENANT", "SCOPES", "EXPIRES", "STATE"
    );
    for r in tokens.records() {
        let state = if r.revoked {
            "revoked"
        } else if r.expires.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        };
        println!(
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
