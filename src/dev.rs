//! `rna dev`: the embedded default. Prepares a state folder (CA, hub and agent certificates, a
//! token store and the token itself) once and reuses it on later runs, then runs a hub and
//! one agent in this process ([`run`]). The binary only parses flags, handles signals and
//! prints; the orchestration lives here so a test can run it in-process on port 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;

use crate::agent::kube::{KubeSettings, KubeSource};
use crate::agent::{Agent, AgentConfig, AgentError, HubTarget, Policy, Rule};
use crate::auth::{read_secret_file, Scope, Secret, StoreError, Tenant, TokenStore};
use crate::certs::{self, CertError};
use crate::hub::{Hub, HubConfig, HubError, HubHandle, NoAuthRoute};
use crate::transport::{ClientTls, ServerTls, TlsError};

/// The agent name `rna dev` runs.
pub const DEV_AGENT: &str = "local";

/// The tenant of the dev token and agent.
pub const DEV_TENANT: &str = "dev/local";

/// How long [`run`] waits for the local agent to connect (and, in cluster mode, to report
/// its inventory) before giving up with the agent's last error.
const READY_WITHIN: Duration = Duration::from_secs(15);

/// Errors preparing the state folder or running `rna dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// Certificates could not be made or read.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The token store could not be made or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The folder could not be created.
    #[error("creating {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state folder could not be prepared ([`DevState::prepare`]).
    #[error("preparing {}", dir.display())]
    Prepare {
        /// The state folder.
        dir: PathBuf,
        /// What went wrong in it.
        source: Box<DevError>,
    },
    /// The certificates of the state folder could not be loaded for TLS.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The hub could not bind or stopped with an error.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The agent could not be made or stopped with an error.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The local agent stopped with an error before it connected.
    // Displayed, not chained: the message has always read this way.
    #[error("the local agent stopped: {0}")]
    AgentStopped(AgentError),
    /// The local agent returned before it connected, without an error.
    #[error("the local agent stopped")]
    AgentEnded,
    /// The local agent's task panicked or was aborted before it connected.
    #[error("the local agent failed: {0}")]
    AgentFailed(JoinError),
    /// The local agent did not connect within the start-up bound; its last error.
    #[error("the local agent did not connect: {0}")]
    NotConnected(String),
    /// The hub's or the agent's task panicked or was aborted.
    #[error("{task} task")]
    Task {
        /// `hub` or `agent`.
        task: &'static str,
        /// The cause.
        source: JoinError,
    },
}

/// Paths and the token of a prepared state folder.
#[derive(Debug, Clone)]
pub struct DevState {
    /// The folder.
    pub dir: PathBuf,
    /// The token (all scopes but admin, tenant `dev/local`).
    pub token: Secret,
}

impl DevState {
    /// CA certificate path.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Hub certificate path.
    pub fn hub_cert(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    /// Hub key path.
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub-key.pem")
    }
    /// Agent certificate path.
    pub fn agent_cert(&self) -> PathBuf {
        self.dir.join(format!("agent-{DEV_AGENT}.pem"))
    }
    /// Agent key path.
    pub fn agent_key(&self) -> PathBuf {
        self.dir.join(format!("agent-{DEV_AGENT}-key.pem"))
    }
    /// Token store path.
    pub fn tokens(&self) -> PathBuf {
        self.dir.join("tokens.toml")
    }
    /// The tenant of the dev agent.
    pub fn tenant() -> Tenant {
        // A constant that is valid by construction.
        DEV_TENANT
            .parse()
            .unwrap_or_else(|_| unreachable!("dev tenant is valid"))
    }

    /// Creates what is missing in `dir` and reuses what is there.
    pub fn prepare(dir: &Path) -> Result<DevState, DevError> {
        std::fs::create_dir_all(dir).map_err(|source| DevError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !dir.join("ca.pem").exists() {
            let names = ["localhost", "127.0.0.1", "::1"].map(String::from);
            certs::init_dir(dir, &names, true)?;
        }
        if !dir.join(format!("agent-{DEV_AGENT}.pem")).exists() {
            certs::issue_agent_files(dir, DEV_AGENT, true)?;
        }
        let store_path = dir.join("tokens.toml");
        let token_path = dir.join("token.txt");
        let now = SystemTime::now();
        let existing = if token_path.exists() && store_path.exists() {
            let token = read_secret_file(&token_path)?;
            let store = TokenStore::load(&store_path)?;
            store
                .authorize(token.expose(), Scope::Proxy, now)
                .ok()
                .map(|_| token)
        } else {
            None
        };
        let token = match existing {
            Some(token) => token,
            None => {
                let mut store = TokenStore::load_or_empty(&store_path)?;
                let scopes = vec![
                    Scope::ConnectAgentHub,
                    Scope::Proxy,
                    Scope::ReadInfraData,
                    Scope::ExecInfraOp,
                    // So the same token also reads the hub's /metrics.
                    Scope::ReadMetrics,
                ];
                let (token, _) =
                    store.create(Self::tenant(), scopes, None, Some("dev".into()), now)?;
                store.save(&store_path)?;
                certs::write_private(
                    &token_path,
                    format!("{}\n", token.expose()).as_bytes(),
                    true,
                )?;
                token
            }
        };
        Ok(DevState {
            dir: dir.to_path_buf(),
            token,
        })
    }
}

/// What [`run`] starts: the flags of `rna dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// State folder for certificates and the token, reused on the next run.
    pub dir: PathBuf,
    /// SOCKS5 address (`rna dev` defaults to 127.0.0.1:1080; port 0 picks one).
    pub socks: SocketAddr,
    /// Admin API address (`rna dev` defaults to 127.0.0.1:8080; port 0 picks one).
    pub api: SocketAddr,
    /// Also accept SOCKS5 clients without credentials, routed to agent `local`.
    pub socks_no_auth: bool,
    /// Extra destinations the agent may dial (its own loopback is always allowed).
    pub allow: Vec<Rule>,
    /// Destinations the agent refuses.
    pub deny: Vec<Rule>,
    /// Gives the local agent cluster mode, acting with this kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    /// Context of `kubeconfig` (its current context when `None`).
    pub kube_context: Option<String>,
}

/// A running `rna dev`, once its agent is up: what [`run`] hands to its `ready` callback.
#[derive(Debug, Clone)]
pub struct DevReady {
    /// The state folder.
    pub dir: PathBuf,
    /// The bound SOCKS5 address.
    pub socks: SocketAddr,
    /// The bound admin API address.
    pub api: Option<SocketAddr>,
    /// The hub's QUIC address (always on 127.0.0.1, a port picked by the system).
    pub quic: SocketAddr,
    /// The dev token.
    pub token: Secret,
    /// Whether SOCKS5 clients without credentials are accepted.
    pub socks_no_auth: bool,
    /// The kubeconfig of cluster mode, if any.
    pub kubeconfig: Option<PathBuf>,
}

impl DevReady {
    /// The lines `rna dev` prints once it is up: where things are and a `curl` line that
    /// works as printed (it carries the token).
    pub fn lines(&self) -> Vec<String> {
        let socks = self.socks;
        let mut lines = vec![format!(
            "rna dev: hub and agent `{DEV_AGENT}` are up (state in {}).",
            self.dir.display()
        )];
        if let Some(api) = self.api {
            lines.push(format!(
                "admin API: http://{api}/api/v1/agents (bearer token below)"
            ));
        }
        lines.push(format!(
            "Reach anything the agent can reach through SOCKS5 on {socks}, for example:"
        ));
        let url = self.api.map_or_else(
            || "http://example.internal/".to_string(),
            |a| format!("http://{a}/healthz"),
        );
        lines.push(format!(
            "curl --proxy socks5h://{DEV_AGENT}:{}@{socks} {url}",
            self.token.expose()
        ));
        if self.socks_no_auth {
            lines.push(format!(
                "Without credentials (--socks-no-auth), to agent `{DEV_AGENT}`:"
            ));
            lines.push(format!("curl --proxy socks5h://{socks} {url}"));
        }
        if let (Some(kubeconfig), Some(api)) = (&self.kubeconfig, self.api) {
            lines.push(format!(
                "The agent has cluster mode (kubeconfig {}):",
                kubeconfig.display()
            ));
            lines.push(format!(
                "rna kube --api http://{api} --token-file {} --agent {DEV_AGENT} list namespaces",
                self.dir.join("token.txt").display()
            ));
        }
        lines
    }
}

/// Runs a hub and the agent `local` in this process on the state folder `options.dir` until
/// `shutdown` is cancelled.
///
/// `hub_started` gets the hub's handle as soon as it is bound (the binary reloads its tokens
/// on SIGHUP through it). `ready` is called once the agent is connected and, in cluster mode,
/// has reported its inventory, so `rna kube` can name types at once. An agent that cannot
/// connect within 15 seconds, or stops first, ends the run with its reason.
pub async fn run(
    shutdown: CancellationToken,
    options: DevOptions,
    hub_started: impl FnOnce(HubHandle),
    ready: impl FnOnce(&DevReady),
) -> Result<(), DevError> {
    let state = DevState::prepare(&options.dir).map_err(|source| DevError::Prepare {
        dir: options.dir.clone(),
        source: Box::new(source),
    })?;
    let tls = ServerTls::load(&state.ca(), &state.hub_cert(), &state.hub_key())?;
    let loopback_any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = HubConfig::new(loopback_any_port, options.socks, tls, state.tokens());
    config.api = Some(options.api);
    // The endpoint key lives with the rest of the dev state (hub and agent restart together,
    // so the "no state folder" advice would mean nothing here).
    config.state_dir = Some(state.dir.clone());
    if options.socks_no_auth {
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
    agent_config.policy = Policy::new(options.allow, options.deny).allow_loopback();
    let cluster_mode = options.kubeconfig.is_some();
    if let Some(path) = options.kubeconfig.clone() {
        agent_config.kube = Some(KubeSettings::new(KubeSource::Kubeconfig {
            path,
            context: options.kube_context,
        }));
    }
    let agent = Agent::new(agent_config)?;
    let agent_handle = agent.handle();

    let registry = handle.registry().clone();
    hub_started(handle);
    let hub_task = tokio::spawn(hub.run(shutdown.clone()));
    let mut agent_task = tokio::spawn(agent.run(shutdown.clone()));

    // Up when the agent is connected and, in cluster mode, has reported its inventory (so
    // `rna kube` can name types at once). An agent that cannot start says why.
    let up = async {
        agent_handle.wait_until(|s| s.connected > 0).await;
        if cluster_mode {
            registry
                .wait_until(|r| r.sessions().iter().any(|s| s.inventory_json().is_some()))
                .await;
        }
    };
    let waited = tokio::time::timeout(READY_WITHIN, async {
        tokio::select! {
            // A stop comes first: the agent returns because of it, which is no failure.
            biased;
            // Stopped while starting (SIGTERM): nothing to announce, the tasks end below.
            _ = shutdown.cancelled() => None,
            _ = up => Some(Ok(())),
            ended = &mut agent_task => Some(Err(ended)),
        }
    })
    .await;
    match waited {
        Ok(Some(Ok(()))) => ready(&DevReady {
            dir: state.dir.clone(),
            socks,
            api,
            quic,
            token: state.token.clone(),
            socks_no_auth: options.socks_no_auth,
            kubeconfig: options.kubeconfig,
        }),
        Ok(None) => {}
        Ok(Some(Err(ended))) => {
            shutdown.cancel();
            return Err(match ended {
                Ok(Err(e)) => DevError::AgentStopped(e),
                Ok(Ok(())) => DevError::AgentEnded,
                Err(e) => DevError::AgentFailed(e),
            });
        }
        Err(_) => {
            shutdown.cancel();
            return Err(DevError::NotConnected(
                agent_handle
                    .status()
                    .last_error
                    .map_or_else(|| "no answer".into(), |e| e.to_string()),
            ));
        }
    }

    let hub_result = hub_task.await.map_err(|source| DevError::Task {
        task: "hub",
        source,
    })?;
    let agent_result = agent_task.await.map_err(|source| DevError::Task {
        task: "agent",
        source,
    })?;
    hub_result?;
    agent_result?;
    Ok(())
}
