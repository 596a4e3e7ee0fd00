//! The agent: dials out to every hub address, registers, and serves the tunnel streams the
//! hub opens by dialing destinations inside its network. Nothing listens here.
//!
//! Agent path: session → policy → dialer → relay.

pub mod admin;
pub mod backoff;
pub mod dialer;
pub mod kube;
pub mod policy;
pub mod session;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::auth::{Secret, StoreError};
use crate::proto::CloseCode;
use crate::transport::{self, ClientTls, Limits, TransportError};

pub use backoff::Retry;
pub use dialer::{DialError, Dialer};
pub use policy::{Policy, Rule};
pub use session::SessionError;

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
            capabilities: Vec::new(),
            backoff: Backoff::default(),
            stable_session: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(30),
            max_pending_dials: 256,
            max_frame: crate::proto::codec::MAX_FRAME,
            kube: None,
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
    pub fn new(config: AgentConfig) -> Result<Agent, AgentError> {
        transport::tls::install_provider();
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
        let expiries = self.config.tls.expiries();
        for &(role, not_after) in &expiries {
            self.metrics.certificate_expiry(role, not_after);
        }
        crate::certs::warn_expiring(&expiries, "this agent's");
        let (config, kube) = self.start_kube().await?;
        let tasks = TaskTracker::new();
        for target in config.hubs.clone() {
            let me = Supervisor {
                config: config.clone(),
                kube: kube.clone(),
                dialer: self.dialer.clone(),
                status: self.status.clone(),
                metrics: self.metrics.clone(),
                endpoints: self.endpoints.clone(),
                wake: self.wake.clone(),
            };
            let cancel = shutdown.clone();
            let span = tracing::info_span!("hub", agent = %me.config.name, hub = %target);
            tasks.spawn(me.follow(target, cancel).instrument(span));
        }
        tasks.close();
        tasks.wait().await;
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

/// Delay of that immediate reconnect.
const IMMEDIATE_RECONNECT: Duration = Duration::from_millis(10);

#[derive(Clone)]
struct Supervisor {
    config: Arc<AgentConfig>,
    kube: Option<Arc<kube::KubeExecutor>>,
    dialer: Arc<Dialer>,
    status: Arc<tokio::sync::watch::Sender<AgentStatus>>,
    metrics: Arc<admin::AgentMetrics>,
    endpoints: Endpoints,
    /// Ends the waits between connection attempts (a token reload).
    wake: Arc<tokio::sync::Notify>,
}

impl Supervisor {
    /// Keeps one connection per address the hub name resolves to.
    async fn follow(self, target: HubTarget, cancel: CancellationToken) {
        let mut connectors: HashMap<SocketAddr, CancellationToken> = HashMap::new();
        let tasks = TaskTracker::new();
        let mut retry = self.backoff();
        loop {
            let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
            let delay = match tokio::time::timeout(Duration::from_secs(10), lookup).await {
                Ok(Ok(addrs)) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    connectors.retain(|addr, token| {
                        let keep = addrs.contains(addr);
                        if !keep {
                            info!(%addr, "hub address no longer resolves; closing its session");
                            token.cancel();
                        }
                        keep
                    });
                    for addr in addrs {
                        if connectors.contains_key(&addr) {
                            continue;
                        }
                        let token = cancel.child_token();
                        connectors.insert(addr, token.clone());
                        let me = self.clone();
                        let name = self
                            .config
                            .server_name
                            .clone()
                            .unwrap_or_else(|| target.host.clone());
                        tasks.spawn(
                            me.connect_loop(addr, name, token)
                                .instrument(tracing::info_span!("conn", %addr)),
                        );
                    }
                    retry = self.backoff();
                    self.config.resolve_interval
                }
                Ok(Err(e)) => {
                    warn!("cannot resolve hub {target}: {e}");
                    retry.next_delay()
                }
                Err(_) => {
                    warn!("resolving hub {target} timed out");
                    retry.next_delay()
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    /// Pacing after connection failures and lost sessions.
    fn backoff(&self) -> Retry {
        Retry::new(self.config.backoff.min, self.config.backoff.max)
    }

    /// Pacing after refusals an operator must fix (token, certificate).
    fn refused_backoff(&self) -> Retry {
        Retry::new(self.config.backoff.refused, self.config.backoff.refused_max)
    }

    /// The token for the next attempt: the token file as it is now, when there is one.
    fn current_token(&self) -> Result<Secret, StoreError> {
        match &self.config.token_file {
            Some(path) => crate::auth::load_secret_file(path),
            None => Ok(self.config.token.clone()),
        }
    }

    /// Connects to one hub address, serves the session, and reconnects with jittered
    /// backoff until cancelled.
    async fn connect_loop(self, addr: SocketAddr, server_name: String, cancel: CancellationToken) {
        let endpoint = match transport::agent_endpoint(addr, &self.config.tls, &self.config.limits)
        {
            Ok(e) => e,
            Err(e) => {
                error!("cannot create a QUIC endpoint: {e}");
                return;
            }
        };
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, endpoint.clone());
        let mut retry = self.backoff();
        let mut refused = self.refused_backoff();
        let mut first = true;
        loop {
            if !first {
                self.metrics.reconnect();
            }
            first = false;
            let token = match self.current_token() {
                Ok(token) => token,
                Err(e) => {
                    let delay = refused.next_delay();
                    error!(retry_in = ?delay,
                        "cannot read the token file: {e}; the agent reads it again before each attempt");
                    if self.pause(delay, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            let attempt = tokio::select! {
                _ = cancel.cancelled() => break,
                r = session::connect_with_token(&endpoint, addr, &server_name, &self.config, &token) => r,
            };
            let delay = match attempt {
                Ok(established) => {
                    retry = self.backoff();
                    refused = self.refused_backoff();
                    info!(session = established.welcome.session_id, tenant = %established.welcome.tenant,
                        "connected to hub");
                    self.check_certificates(&established.connection);
                    self.metrics.hub_connection(true);
                    self.status.send_modify(|s| {
                        s.connected += 1;
                        s.sessions_total += 1;
                        s.last_error = None;
                    });
                    let up_since = std::time::Instant::now();
                    let run = session::run(
                        established,
                        self.dialer.clone(),
                        self.kube.clone(),
                        &self.config.name,
                        &cancel,
                    );
                    tokio::pin!(run);
                    // The moment the session turns stable is logged, so an operator (and a
                    // test) can tell when a drop stops costing a backoff.
                    let end = tokio::select! {
                        end = &mut run => end,
                        () = tokio::time::sleep(self.config.stable_session) => {
                            debug!("session stable; a drop now reconnects at once");
                            run.await
                        }
                    };
                    self.metrics.hub_connection(false);
                    self.status
                        .send_modify(|s| s.connected = s.connected.saturating_sub(1));
                    if cancel.is_cancelled() {
                        break;
                    }
                    if end.going_away {
                        info!("hub is going away: {}; reconnecting", end.reason);
                        // Replicas restart together: spread the reconnects a little.
                        Duration::from_millis(50)
                    } else if up_since.elapsed() >= self.config.stable_session {
                        // A session that had been up is worth one immediate retry: a hub that
                        // restarted (its stateless reset ends our session) answers at once.
                        // Failures after that back off as usual.
                        warn!("session ended: {}; reconnecting now", end.reason);
                        IMMEDIATE_RECONNECT
                    } else {
                        warn!("session ended: {}; reconnecting", end.reason);
                        retry.next_delay()
                    }
                }
                Err(e) => {
                    let delay = match &e {
                        SessionError::Rejected { code, .. } if code.is_permanent() => {
                            refused.next_delay()
                        }
                        SessionError::Tls(_) => refused.next_delay(),
                        _ => retry.next_delay(),
                    };
                    match (&e, refusal_hint(&e, &self.config)) {
                        // Routine during a hub restart: the hub refuses while it drains.
                        (SessionError::Busy(_), _) => info!(retry_in = ?delay, "{e}; retrying"),
                        (SessionError::Rejected { .. } | SessionError::Tls(_), hint) => {
                            match hint {
                                Some(hint) => error!(retry_in = ?delay, "{e}; {hint}"),
                                None => error!(retry_in = ?delay, "{e}"),
                            }
                        }
                        _ => warn!(retry_in = ?delay, "{e}"),
                    }
                    self.status.send_modify(|s| s.last_error = Some(e.clone()));
                    delay
                }
            };
            if self.pause(delay, &cancel).await {
                break;
            }
        }
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
        endpoint.close(crate::proto::CloseCode::Normal.into(), b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
}

impl Supervisor {
    /// Warns from 30 days before the agent's certificate, the CA or the hub's certificate
    /// expires (checked at every connection, so a long-running agent warns too), and records
    /// the hub's expiry as a metric.
    fn check_certificates(&self, connection: &quinn::Connection) {
        crate::certs::warn_expiring(&self.config.tls.expiries(), "this agent's");
        let hub = connection
            .peer_identity()
            .and_then(|id| {
                id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().and_then(|c| crate::certs::not_after(c).ok()));
        if let Some(not_after) = hub {
            self.metrics.certificate_expiry("hub", not_after);
            let warning = crate::certs::expiry_warning(
                "the hub's certificate",
                not_after,
                std::time::SystemTime::now(),
            );
            if let Some(warning) = warning {
                warn!("{warning}");
            }
        }
    }

    /// Waits `delay`, or less when a token reload wakes the agent; true when cancelled.
    async fn pause(&self, delay: Duration, cancel: &CancellationToken) -> bool {
        tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
            _ = self.wake.notified() => false,
        }
    }
}

/// What an operator should do about a refusal, for its log line.
fn refusal_hint(e: &SessionError, config: &AgentConfig) -> Option<String> {
    let SessionError::Rejected { code, .. } = e else {
        return None;
    };
    let file = config
        .token_file
        .as_ref()
        .map_or_else(|| "the token file".to_string(), |p| p.display().to_string());
    let create = format!(
        "create one with: rna token create --tenant <organization/environment> \
         --scope connect:agentHub --label {} and write it to {file} (read again before \
         every attempt; no restart needed)",
        config.name
    );
    let hint = match code {
        CloseCode::BadToken => format!("the hub does not know this token; {create}"),
        CloseCode::TokenRevoked => format!("this token was revoked; {create}"),
        CloseCode::TokenExpired => format!("this token has expired; {create}"),
        CloseCode::MissingScope => format!("this token may not register agents; {create}"),
        CloseCode::CertificateMismatch => format!(
            "the certificate names another agent: issue one for this name with \
             rna certs agent --dir <the hub's CA folder> {}, or run with the --name the \
             certificate names",
            config.name
        ),
        CloseCode::VersionMismatch => {
            "run the same rna release as the hub (its protocol version differs)".to_string()
        }
        _ => return None,
    };
    Some(hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_says_what_to_do() {
        let ca = crate::certs::Ca::generate("hint CA").unwrap();
        let cert = ca.issue_agent("edge").unwrap();
        let tls =
            crate::transport::ClientTls::from_pem(&ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
                .unwrap();
        let target: HubTarget = "127.0.0.1:4433".parse().unwrap();
        let mut config =
            AgentConfig::new(vec![target], "edge".into(), tls, Secret::new("t".into()));
        config.token_file = Some(PathBuf::from("/etc/rna/token"));
        let rejected = |code| SessionError::Rejected {
            code,
            reason: "why".into(),
        };
        for code in [
            CloseCode::BadToken,
            CloseCode::TokenRevoked,
            CloseCode::TokenExpired,
            CloseCode::MissingScope,
        ] {
            let hint = refusal_hint(&rejected(code), &config).unwrap();
            assert!(
                hint.contains("create one with: rna token create --tenant")
                    && hint.contains("--scope connect:agentHub --label edge")
                    && hint.contains("/etc/rna/token"),
                "{code}: {hint}"
            );
        }
        let hint = refusal_hint(&rejected(CloseCode::CertificateMismatch), &config).unwrap();
        assert!(hint.contains("rna certs agent --dir"), "{hint}");
        assert!(refusal_hint(&rejected(CloseCode::HeartbeatTimeout), &config).is_none());
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
