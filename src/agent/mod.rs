//! The agent: dials out to every hub address, registers, and serves the tunnel streams the
//! hub opens by dialing destinations inside its network. Nothing listens here.
//!
//! Agent path: session → policy → dialer → relay.

pub mod admin;
pub mod backoff;
pub mod dialer;
pub mod enroll;
pub mod kube;
pub mod policy;
mod renewal;
pub mod session;
mod supervisor;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::auth::{Secret, StoreError};
use crate::transport::proxy::ProxySettings;
use crate::transport::{self, ClientTls, Limits, TransportError};

pub use backoff::Retry;
pub use dialer::{DialError, Dialer};
pub use enroll::{AgentState, EnrollmentError};
pub use policy::{Policy, Rule};
pub use session::SessionError;
use supervisor::Supervisor;

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error("agent configuration: {0}")]
    Config(String),
    /// A QUIC endpoint could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Cluster mode was asked for but its identity could not be loaded.
    #[error(transparent)]
    Kube(#[from] kube::KubeError),
}

/// A hub address as given on the command line: `host:port` or `[v6]:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubTarget {
    /// Host name or IP literal; also the TLS server name unless overridden.
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl FromStr for HubTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid hub address {s:?}: expected host or host:port");
        // No port (`hub.example.com`, `10.0.0.5`, `[::1]`): the hub's default port.
        let bracketed = s.starts_with('[') && s.ends_with(']');
        let (host, port) = match s.rsplit_once(':') {
            Some(split) if !bracketed => split,
            _ => (s, ""),
        };
        let port = if port.is_empty() && !s.ends_with(':') {
            crate::proto::DEFAULT_HUB_PORT.to_string()
        } else {
            port.to_string()
        };
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            // An IPv6 literal needs brackets, or its last group would read as the port.
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(bad()),
            None if host.is_empty() || host.contains(':') => return Err(bad()),
            None => host,
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(HubTarget {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for HubTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Reconnect pacing (see [`Retry`]: every maximum includes the jitter).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay after a failure.
    pub min: Duration,
    /// Longest delay after transient failures.
    pub max: Duration,
    /// First delay after the hub refused us for a reason an operator must fix (token,
    /// certificate). Short, because the fix (a new token written to the token file, a token
    /// just added to the hub's store) should take effect at once.
    pub refused: Duration,
    /// Longest delay after refusals, so a forgotten agent does not hammer the hub.
    pub refused_max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
            refused: Duration::from_secs(1),
            refused_max: Duration::from_secs(60),
        }
    }
}

/// Everything the agent needs, validated.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Hubs to connect to; every address each name resolves to gets its own connection.
    pub hubs: Vec<HubTarget>,
    /// TLS name to verify the hub as, if not the host of each hub address.
    pub server_name: Option<String>,
    /// Agent identifier (must equal the certificate's common name).
    pub name: String,
    /// CA, certificate and key.
    pub tls: ClientTls,
    /// Machine credential with scope `connect:agentHub`, as read at start.
    pub token: Secret,
    /// The file the token came from: read again before every connection attempt and on
    /// [`AgentHandle::reload_token`], so a rotated token needs no restart (`None`: the token
    /// above is used as is).
    pub token_file: Option<PathBuf>,
    /// Which destinations may be dialed.
    pub policy: Policy,
    /// Resolution plus connection time allowed per destination.
    pub dial_timeout: Duration,
    /// QUIC limits.
    pub limits: Limits,
    /// Capabilities announced in Hello.
    pub capabilities: Vec<String>,
    /// Reconnect pacing.
    pub backoff: Backoff,
    /// A session up this long earns an immediate reconnect when it ends; shorter ones back
    /// off, so a hub that accepts and then drops the agent is never hammered.
    pub stable_session: Duration,
    /// How often hub names are resolved again (new replicas, moved hubs).
    pub resolve_interval: Duration,
    /// Dials (resolution plus connect) in progress at once; a tunnel request beyond it is
    /// answered at once with a failure (`rna_agent_cap_refusals_total{cap="pending_dials"}`).
    pub max_pending_dials: usize,
    /// Largest frame body accepted from the hub (control frames, Open headers); a longer one
    /// ends the stream or session (`cap="frame_size"`).
    pub max_frame: usize,
    /// Cluster mode: run the hub's Kubernetes commands (`None`: off).
    pub kube: Option<kube::KubeSettings>,
    /// QUIC, TLS over TCP, or QUIC with a fallback to TCP (`--transport`).
    pub transport: TransportMode,
    /// With `auto`: how long a QUIC handshake may take before TCP is tried.
    pub quic_fallback_after: Duration,
    /// With `auto`, while on TCP: how often QUIC is tried again.
    pub quic_probe_interval: Duration,
    /// The HTTP proxy for TCP sessions, and the hubs reached without it.
    pub proxy: ProxySettings,
    /// The local address of the agent's sockets to its hubs (QUIC's UDP socket and the
    /// TLS/TCP fallback's), for hosts with several addresses where the hub or a firewall
    /// expects one of them (`None`: the kernel picks by route). The port is always ephemeral.
    pub bind_address: Option<IpAddr>,
    /// The state folder an enrolled certificate was read from: the agent renews it there at
    /// two thirds of its lifetime, over the renewal exchange, without a restart (`None`:
    /// certificates are managed by hand).
    pub state: Option<AgentState>,
    /// OIDC client credentials: when set, the agent presents JWTs from this issuer instead of
    /// `token` and re-authenticates its live sessions with each renewed one.
    pub oidc: Option<crate::oidc::ClientCredentials>,
}

/// How the agent reaches its hubs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportMode {
    /// QUIC; TLS over TCP when no QUIC handshake completes within
    /// [`AgentConfig::quic_fallback_after`] or UDP cannot be sent, and back to QUIC when a
    /// probe finds it working. Straight to TCP when a proxy is in effect.
    #[default]
    Auto,
    /// QUIC only (UDP).
    Quic,
    /// TLS over TCP only (directly or through the proxy); never UDP.
    Tcp,
}

impl TransportMode {
    /// `auto`, `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportMode::Auto => "auto",
            TransportMode::Quic => "quic",
            TransportMode::Tcp => "tcp",
        }
    }
}

impl fmt::Display for TransportMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TransportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportMode::Auto),
            "quic" => Ok(TransportMode::Quic),
            "tcp" => Ok(TransportMode::Tcp),
            other => Err(format!(
                "unknown transport {other:?}: use auto, quic or tcp"
            )),
        }
    }
}

impl AgentConfig {
    /// A configuration with defaults for everything but identity and hubs.
    pub fn new(hubs: Vec<HubTarget>, name: String, tls: ClientTls, token: Secret) -> Self {
        AgentConfig {
            hubs,
            server_name: None,
            name,
            tls,
            token,
            token_file: None,
            policy: Policy::default(),
            dial_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            capabilities: vec![crate::proto::ACK_LIVENESS.to_string()],
            backoff: Backoff::default(),
            stable_session: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(30),
            max_pending_dials: 256,
            max_frame: crate::proto::codec::MAX_FRAME,
            kube: None,
            transport: TransportMode::Auto,
            quic_fallback_after: Duration::from_secs(5),
            quic_probe_interval: Duration::from_secs(600),
            proxy: ProxySettings::default(),
            bind_address: None,
            state: None,
            oidc: None,
        }
    }
}

/// Live status of the agent, for readiness and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Hub sessions established now.
    pub connected: usize,
    /// Sessions established since start.
    pub sessions_total: u64,
    /// The last refusal from a hub, if any.
    pub last_error: Option<SessionError>,
}

/// A handle to watch a running agent and change its policy.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    status: tokio::sync::watch::Receiver<AgentStatus>,
    dialer: Arc<Dialer>,
    metrics: Arc<admin::AgentMetrics>,
    endpoints: Endpoints,
    token_file: Option<PathBuf>,
    wake: Arc<tokio::sync::Notify>,
}

/// The QUIC endpoints of the agent's hub connections, by hub address.
type Endpoints = Arc<std::sync::Mutex<HashMap<SocketAddr, quinn::Endpoint>>>;

impl AgentHandle {
    /// Replaces the dial policy (SIGHUP); streams already connected are not touched.
    pub fn set_policy(&self, policy: Policy) {
        self.dialer.set_policy(policy);
    }

    /// Reads the token file again (SIGHUP) and ends every wait between connection attempts,
    /// so a rotated token is tried at once. Returns whether the file could be read; each
    /// attempt reads it again anyway. Sessions already established keep their session.
    pub fn reload_token(&self) -> Result<(), StoreError> {
        let read = match &self.token_file {
            Some(path) => crate::auth::load_secret_file(path).map(|_| ()),
            None => Ok(()),
        };
        self.wake.notify_waiters();
        read
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> &Arc<admin::AgentMetrics> {
        &self.metrics
    }

    /// Moves every hub connection to a fresh local UDP port, as a network change would;
    /// QUIC migrates the connections and the sessions stay. Returns the new local addresses.
    pub fn rebind(&self) -> Result<Vec<SocketAddr>, TransportError> {
        let endpoints: Vec<quinn::Endpoint> = self
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        endpoints
            .iter()
            .map(transport::rebind_agent_endpoint)
            .collect()
    }

    /// Dials in progress now.
    pub fn pending_dials(&self) -> usize {
        self.dialer.pending()
    }

    /// The status now.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// Waits until `pred` holds for the status. Cancel-safe.
    pub async fn wait_until<F: Fn(&AgentStatus) -> bool>(&self, pred: F) -> AgentStatus {
        let mut rx = self.status.clone();
        let seen = match rx.wait_for(|s| pred(s)).await {
            Ok(s) => Some(s.clone()),
            Err(_) => None,
        };
        seen.unwrap_or_else(|| self.status())
    }
}

/// An agent, ready to [`run`](Agent::run).
#[derive(Debug)]
pub struct Agent {
    config: Arc<AgentConfig>,
    dialer: Arc<Dialer>,
    status: Arc<tokio::sync::watch::Sender<AgentStatus>>,
    metrics: Arc<admin::AgentMetrics>,
    endpoints: Endpoints,
    wake: Arc<tokio::sync::Notify>,
}

impl Agent {
    /// Validates the configuration.
    pub fn new(mut config: AgentConfig) -> Result<Agent, AgentError> {
        transport::tls::install_provider();
        // Several agents of one process (replicas, the bench's fleet) keep their own tickets.
        config.tls = config.tls.with_own_tickets();
        if config.hubs.is_empty() {
            return Err(AgentError::Config("at least one --hub is needed".into()));
        }
        if !crate::identity::valid_agent_name(&config.name) {
            return Err(AgentError::Config(format!(
                "agent name {:?} must match ^[A-Za-z0-9_-]{{1,63}}$",
                config.name
            )));
        }
        if let Some(name) = &config.server_name {
            transport::tls::server_name(name).map_err(|e| AgentError::Config(e.to_string()))?;
        }
        let metrics = Arc::new(admin::AgentMetrics::new());
        let dialer = Arc::new(
            Dialer::new(config.policy.clone(), config.dial_timeout)
                .with_max_pending(config.max_pending_dials)
                .with_metrics(metrics.clone()),
        );
        Ok(Agent {
            config: Arc::new(config),
            dialer,
            status: Arc::new(tokio::sync::watch::Sender::new(AgentStatus::default())),
            metrics,
            endpoints: Endpoints::default(),
            wake: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// A handle to watch the agent's status.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            status: self.status.subscribe(),
            dialer: self.dialer.clone(),
            metrics: self.metrics.clone(),
            endpoints: self.endpoints.clone(),
            token_file: self.config.token_file.clone(),
            wake: self.wake.clone(),
        }
    }

    /// Connects to every hub address and serves until `shutdown` fires, then closes each
    /// session with a normal code.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        // Parsed once: the material does not change while the agent runs. An enrolled
        // certificate is short-lived by design: its expiry is warned about once it is due for
        // renewal, not from its first day (the metric is always set).
        let expiries = self.config.tls.expiries();
        let renew_at = self.config.tls.certificate().and_then(|cert| {
            let identity = crate::enroll::agent_identity(cert).ok()?;
            let at = |secs| std::time::UNIX_EPOCH.checked_add(Duration::from_secs(secs));
            Some(crate::enroll::renew_at(
                at(identity.not_before)?,
                at(identity.not_after)?,
            ))
        });
        let (config, kube) = self.start_kube().await?;
        // OIDC tokens are obtained before any connection and kept fresh while the agent runs.
        let refresher = shutdown.child_token();
        let oidc = match config.oidc.clone() {
            Some(creds) => {
                let endpoint = creds.endpoint_text().to_owned();
                let mut creds = creds;
                if creds.egress.is_none() {
                    creds.egress = oidc_egress(&config.proxy);
                }
                let (tokens, task) = creds.keep_fresh(refresher.clone()).map_err(|e| {
                    AgentError::Config(format!("OIDC client credentials ({endpoint}): {e}"))
                })?;
                Some((tokens, task))
            }
            None => None,
        };
        let tasks = TaskTracker::new();
        let own_certificates = shutdown.child_token();
        let tls = Arc::new(renewal::TlsWatch::new(renewal::Credentials {
            generation: 0,
            tls: config.tls.clone(),
            token: None,
        }));
        let (rotations, rotated) = tokio::sync::mpsc::unbounded_channel();
        let storing = tokio::spawn(renewal::store_rotated_tokens(
            rotated,
            config.token_file.clone(),
            tls.clone(),
        ));
        let watch = tokio::spawn(supervisor::watch_own_certificates(
            expiries,
            renew_at,
            tls.subscribe(),
            self.metrics.clone(),
            supervisor::OWN_CERTIFICATE_CHECK,
            own_certificates.clone(),
        ));
        // An enrolled certificate from a state folder renews itself while the agent runs.
        let renewing = match (&config.state, renew_at) {
            (Some(state), Some(_)) => Some(tokio::spawn(
                renewal::renew_certificates(
                    config.clone(),
                    state.clone(),
                    tls.clone(),
                    self.metrics.clone(),
                    own_certificates.clone(),
                )
                .instrument(tracing::info_span!("renewal", agent = %config.name)),
            )),
            _ => None,
        };
        for target in config.hubs.clone() {
            let me = Supervisor {
                config: config.clone(),
                kube: kube.clone(),
                dialer: self.dialer.clone(),
                status: self.status.clone(),
                metrics: self.metrics.clone(),
                endpoints: self.endpoints.clone(),
                wake: self.wake.clone(),
                tls: tls.subscribe(),
                tls_generation: 0,
                tokens: oidc.as_ref().map(|(tokens, _)| tokens.clone()),
                rotations: rotations.clone(),
            };
            let cancel = shutdown.clone();
            let span = tracing::info_span!("hub", agent = %me.config.name, hub = %target);
            tasks.spawn(me.follow(target, cancel).instrument(span));
        }
        drop(rotations);
        tasks.close();
        tasks.wait().await;
        let _ = storing.await;
        own_certificates.cancel();
        let _ = watch.await;
        refresher.cancel();
        if let Some((_, task)) = oidc {
            let _ = task.await;
        }
        if let Some(renewing) = renewing {
            let _ = renewing.await;
        }
        Ok(())
    }

    /// Loads the cluster identity when cluster mode is on, and announces the capability. A
    /// failure stops the agent when cluster mode was asked for, and only turns it off when it
    /// was merely detected.
    async fn start_kube(
        &self,
    ) -> Result<(Arc<AgentConfig>, Option<Arc<kube::KubeExecutor>>), AgentError> {
        let Some(settings) = &self.config.kube else {
            return Ok((self.config.clone(), None));
        };
        match kube::KubeExecutor::connect(settings).await {
            Ok(executor) => {
                let mut config = (*self.config).clone();
                if !config
                    .capabilities
                    .iter()
                    .any(|c| c == crate::proto::kube::CAPABILITY)
                {
                    config
                        .capabilities
                        .push(crate::proto::kube::CAPABILITY.to_string());
                }
                info!(source = ?settings.source, namespaces = ?settings.allow.namespaces,
                    resources = settings.allow.resources.len(), "cluster mode on");
                Ok((Arc::new(config), Some(Arc::new(executor))))
            }
            Err(e) if settings.required => Err(e.into()),
            Err(e) => {
                warn!("cluster mode off: {e}");
                Ok((self.config.clone(), None))
            }
        }
    }
}

/// Token requests leave through the agent's HTTP proxy, with the same `NO_PROXY` rules as its
/// hub sessions (an issuer inside the private network is usually listed there), or directly
/// when no proxy is in effect.
fn oidc_egress(proxy: &ProxySettings) -> Option<crate::oidc::fetch::Egress> {
    proxy.proxy.as_ref()?;
    let proxy = proxy.clone();
    Some(crate::oidc::fetch::Egress::new(
        move |host: &str, port: u16| {
            let via = proxy.for_hub(host, port)?.clone();
            let host = host.to_owned();
            let dialing: crate::oidc::fetch::Dialing = Box::pin(async move {
                transport::proxy::connect(&via, &host, port, PROXY_CONNECT_LIMIT)
                    .await
                    .map_err(std::io::Error::other)
            });
            Some(dialing)
        },
    ))
}

/// Time a proxy has to open a tunnel to the token endpoint; the request's own deadline
/// bounds the whole exchange as well.
const PROXY_CONNECT_LIMIT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_by_name() {
        for mode in [TransportMode::Auto, TransportMode::Quic, TransportMode::Tcp] {
            assert_eq!(mode.as_str().parse::<TransportMode>(), Ok(mode));
        }
        assert_eq!(TransportMode::default(), TransportMode::Auto);
        let e = "udp".parse::<TransportMode>().unwrap_err();
        assert!(e.contains("use auto, quic or tcp"), "{e}");
    }

    #[test]
    fn hub_targets_parse() {
        let ok = [
            ("hub.example.com:4433", "hub.example.com", 4433),
            ("127.0.0.1:1", "127.0.0.1", 1),
            ("[::1]:4433", "::1", 4433),
        ];
        for (s, host, port) in ok {
            let t: HubTarget = s.parse().unwrap();
            assert_eq!((t.host.as_str(), t.port), (host, port), "{s}");
            assert_eq!(t.to_string(), s);
        }
        // Without a port: the hub's default port.
        let default = crate::proto::DEFAULT_HUB_PORT;
        for (s, host) in [("hub", "hub"), ("10.0.0.5", "10.0.0.5"), ("[::1]", "::1")] {
            let t: HubTarget = s.parse().unwrap();
            assert_eq!((t.host.as_str(), t.port), (host, default), "{s}");
        }
        for bad in [
            ":4433",
            "hub:0",
            "hub:x",
            "::1:4433",
            "hub:70000",
            "hub:",
            "",
            "[]",
            "[hub]",
        ] {
            assert!(bad.parse::<HubTarget>().is_err(), "{bad}");
        }
    }
}
