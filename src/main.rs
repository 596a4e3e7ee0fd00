//! The `rna` command: hub, agent, certificates, tokens and the embedded `dev` default.
//!
//! This file holds the top-level command line, logging, signals, exit codes and dispatch;
//! each subcommand's flags and what it runs are in `src/cli/`.
#![forbid(unsafe_code)]

#[macro_use]
mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use cli::{agent, agents, certs, dev, hub, kube, ship, token, CliError};
use rna::config::{LogFormat, LogOptions};
use rna::hub::HubConfig;

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
    Dev(dev::DevArgs),
    /// Run the hub: QUIC for agents, SOCKS5 for clients, the admin API and status page.
    Hub(Box<hub::HubArgs>),
    /// Run an agent: dial out to the hub and serve its streams.
    Agent(Box<agent::AgentArgs>),
    /// Make a CA and certificates.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// Create, list and revoke tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Kubernetes through the hub and an agent in cluster mode: apply, get, list, delete,
    /// wait, inventory. Exit codes: 0 success, 1 Kubernetes refused, 2 usage, 3 agent
    /// unavailable.
    Kube(kube::KubeArgs),
    /// List the agents connected to a hub (every page of its admin API's list). Exit codes:
    /// 0 listed, 1 refused, 2 usage, 3 hub unreachable.
    Agents(agents::AgentsArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completions(ship::CompletionsArgs),
    /// Write the man pages, generated from this command line, into a folder.
    #[command(hide = true)]
    Manpages(ship::ManpagesArgs),
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
    if let Work::Kube(_) | Work::Agents(_) = work {
        // A short-lived client: one thread is plenty.
        return match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => ExitCode::from(rt.block_on(async move {
                match work {
                    Work::Kube(args) => kube::run(args).await,
                    Work::Agents(args) => agents::run(args).await,
                    _ => EXIT_USAGE,
                }
            })),
            Err(e) => {
                eprintln!("rna: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let threads = match &work {
        Work::Hub(config) => config.worker_threads,
        Work::Agent(prepared) => prepared.settings.worker_threads,
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
            eprintln!("rna: {}", rna::fsutil::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// What to run once the configuration is valid and logging is set up.
enum Work {
    Dev(dev::DevArgs),
    Hub(Box<HubConfig>),
    Agent(Box<agent::Prepared>),
    Certs(certs::CertsCommand),
    Token(token::TokenCommand),
    Kube(kube::KubeArgs),
    Agents(agents::AgentsArgs),
}

enum Prepared {
    Done,
    Run(Box<Work>),
}

/// Turns flags, variables and files into validated configuration, and sets up logging.
fn prepare(command: Command, log: LogOptions) -> Result<Prepared> {
    let work = match command {
        Command::Hub(args) => match hub::prepare(*args, log)? {
            Some(config) => Work::Hub(Box::new(config)),
            None => return Ok(Prepared::Done),
        },
        Command::Agent(args) => match agent::prepare(*args, log)? {
            Some(prepared) => Work::Agent(Box::new(prepared)),
            None => return Ok(Prepared::Done),
        },
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
        Command::Agents(args) => Work::Agents(args),
        Command::Completions(args) => {
            let script = ship::completions(&args, &mut Cli::command());
            out!("{}", String::from_utf8_lossy(&script).trim_end());
            return Ok(Prepared::Done);
        }
        Command::Manpages(args) => {
            ship::manpages(&args, Cli::command()).map_err(|e| {
                CliError::io(
                    format!("cannot write the man pages into {}", args.dir.display()),
                    e,
                )
            })?;
            out!("wrote the man pages into {}", args.dir.display());
            return Ok(Prepared::Done);
        }
    };
    Ok(Prepared::Run(Box::new(work)))
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

async fn run(work: Work) -> Result<(), CliError> {
    match work {
        Work::Dev(args) => dev::run(args).await,
        Work::Hub(config) => hub::run(*config).await,
        Work::Agent(prepared) => agent::run(*prepared).await,
        Work::Certs(cmd) => certs::run(cmd).await,
        Work::Token(cmd) => token::run(cmd).await,
        Work::Kube(_) | Work::Agents(_) => Err(CliError::BadArgument(
            "rna kube and rna agents run before the server runtime starts".into(),
        )),
    }
}

/// What SIGHUP does; returns whether the reload succeeded.
type Reload = Box<dyn Fn() -> bool + Send + Sync>;

/// Cancels `shutdown` on SIGTERM or SIGINT (a second SIGINT exits at once); runs `reload`
/// on SIGHUP, telling systemd about it.
fn watch_signals(shutdown: CancellationToken, reload: Option<Reload>) -> Result<(), CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| CliError::io(format!("installing {name} handler"), e))
    };
    let mut term = install(SignalKind::terminate(), "SIGTERM")?;
    let mut int = install(SignalKind::interrupt(), "SIGINT")?;
    let mut hup = install(SignalKind::hangup(), "SIGHUP")?;
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
