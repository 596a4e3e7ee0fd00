//! One agent's connections to one hub name: resolve it, keep a connection per address it
//! resolves to, and reconnect each with backoff, saying in one line why an attempt failed and
//! what to do about it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use super::renewal::Credentials;
use super::{admin, kube, session, AgentConfig, AgentStatus, Dialer, Endpoints, HubTarget};
use super::{Retry, SessionError, TransportMode};
use crate::auth::{Secret, StoreError};
use crate::proto::CloseCode;
use crate::transport;
use crate::transport::proxy::ProxyUrl;
use crate::transport::session::{Session, TransportKind};

/// Window over which the reconnect after a hub said it is going away is spread: each agent
/// waits a uniformly drawn part of it. A draining hub tells its whole fleet at the same
/// instant; half a second keeps that from arriving at the next hub as one burst of Initials.
const RECONNECT_SPREAD: Duration = Duration::from_millis(500);

/// Window of the immediate reconnect after a stable session ended otherwise (a restarted
/// hub's stateless reset, an idle timeout). Those endings are already spread: each agent
/// learns of a restart at its own next ping, and the pings of a fleet are spread over one
/// heartbeat interval by their phases. A wider window here would only add to one agent's
/// time back (R1 measured p50 0.54 s with 500 ms here, against a 250 ms ping interval).
const RESET_SPREAD: Duration = Duration::from_millis(50);

/// Longest wait after a hub turned the agent away because it was busy (at its handshake cap,
/// or accepted but too slow to answer Hello). A busy hub is one that answers: after a restart
/// every agent of the fleet arrives at once and most are refused, and each must come back
/// within a couple of seconds, not climb to the 30 s of a lost hub. The jitter (half the
/// step) still spreads them, and a refusal costs the hub one packet and no cryptography.
const BUSY_MAX: Duration = Duration::from_secs(2);

/// What every connection of the agent to a hub shares; cloned into each hub name's task and
/// each address's connect loop.
#[derive(Clone)]
pub(super) struct Supervisor {
    /// The agent's configuration (with the cluster capability when cluster mode is on).
    pub(super) config: Arc<AgentConfig>,
    /// Runs Kubernetes commands, when cluster mode is on.
    pub(super) kube: Option<Arc<kube::KubeExecutor>>,
    /// Dials the destinations of tunnel streams, shared by every session.
    pub(super) dialer: Arc<Dialer>,
    /// What the agent's handle reports (sessions up, last error).
    pub(super) status: Arc<tokio::sync::watch::Sender<AgentStatus>>,
    /// The agent's metrics.
    pub(super) metrics: Arc<admin::AgentMetrics>,
    /// The QUIC endpoint of each hub address, so the handle can rebind them.
    pub(super) endpoints: Endpoints,
    /// Ends the waits between connection attempts (a token reload).
    pub(super) wake: Arc<tokio::sync::Notify>,
    /// The client certificate in force, replaced by each renewal.
    pub(super) tls: tokio::sync::watch::Receiver<Credentials>,
    /// The generation of [`Credentials`] that `config.tls` holds.
    pub(super) tls_generation: u64,
    /// The OIDC refresher's current token (`None` until the first), when the agent uses
    /// client credentials instead of a token file.
    pub(super) tokens: Option<OidcTokens>,
    /// Where each session hands a connect token the hub rotated.
    pub(super) rotations: tokio::sync::mpsc::UnboundedSender<Secret>,
}

/// What the OIDC refresher publishes.
pub(super) type OidcTokens = tokio::sync::watch::Receiver<Option<crate::oidc::CurrentToken>>;

impl Supervisor {
    /// Keeps one connection per address the hub name resolves to.
    pub(super) async fn follow(self, target: HubTarget, cancel: CancellationToken) {
        let server_name = self
            .config
            .server_name
            .clone()
            .unwrap_or_else(|| target.host.clone());
        let proxied = self.config.transport != TransportMode::Quic
            && self
                .config
                .proxy
                .for_hub(&target.host, target.port)
                .is_some();
        if proxied {
            // The proxy resolves the hub's name (`CONNECT host:port`), so the agent keeps one
            // session per hub name there; the address is only a label when it is not literal.
            let addr = target.host.parse::<std::net::IpAddr>().map_or_else(
                |_| SocketAddr::from(([0, 0, 0, 0], target.port)),
                |ip| SocketAddr::new(ip, target.port),
            );
            self.clone()
                .connect_loop(addr, target.host.clone(), server_name, cancel)
                .instrument(tracing::info_span!("conn", via = "proxy"))
                .await;
            return;
        }
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
                        tasks.spawn(
                            me.connect_loop(addr, target.host.clone(), server_name.clone(), token)
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

    /// Pacing after a busy hub turned us away: short, never past [`BUSY_MAX`].
    fn busy_backoff(&self) -> Retry {
        Retry::new(
            self.config.backoff.min,
            BUSY_MAX.min(self.config.backoff.max),
        )
    }

    /// Pacing after refusals an operator must fix (token, certificate).
    fn refused_backoff(&self) -> Retry {
        Retry::new(self.config.backoff.refused, self.config.backoff.refused_max)
    }

    /// The token for the next attempt: the token file as it is now, when there is one.
    fn current_token(&self) -> Result<Secret, StoreError> {
        // A rotated token that could not be stored wins over the file it could not replace.
        if let Some(token) = self.tls.borrow().token.clone() {
            return Ok(token);
        }
        match &self.config.token_file {
            Some(path) => crate::auth::load_secret_file(path),
            None => Ok(self.config.token.clone()),
        }
    }

    /// The OIDC token for the next attempt: the refresher's current one, or, before the
    /// first or after the current one expired, the next one it obtains (the refresher logs
    /// why it has none). Marks it as given to this loop's sessions. `None` when cancelled.
    async fn oidc_token(
        &self,
        tokens: &mut OidcTokens,
        cancel: &CancellationToken,
    ) -> Option<Secret> {
        let fresh = |t: &Option<crate::oidc::CurrentToken>| {
            t.as_ref()
                .is_some_and(|t| t.expires_at > tokio::time::Instant::now())
        };
        tokio::select! {
            _ = cancel.cancelled() => None,
            current = tokens.wait_for(fresh) => {
                current.ok().and_then(|t| t.as_ref().map(|t| t.token.clone()))
            }
        }
    }

    /// Connects to one hub address, serves the session, and reconnects with jittered
    /// backoff until cancelled. `host` is the hub's name as given (a proxy is asked for
    /// `host:port`); `addr` is one address it resolved to.
    async fn connect_loop(
        mut self,
        addr: SocketAddr,
        host: String,
        server_name: String,
        cancel: CancellationToken,
    ) {
        let mode = self.config.transport;
        let configured_proxy = self.config.proxy.for_hub(&host, addr.port()).cloned();
        let proxy = match mode {
            TransportMode::Quic => {
                if let Some(p) = &configured_proxy {
                    warn!(proxy = %p, "--transport quic sends UDP straight to the hub: the HTTP proxy is not used");
                }
                None
            }
            _ => configured_proxy,
        };
        if let Some(p) = &proxy {
            info!(proxy = %p, "reaching the hub over TCP through the HTTP proxy");
        }
        let wants_quic = match mode {
            TransportMode::Quic => true,
            TransportMode::Auto => proxy.is_none(),
            TransportMode::Tcp => false,
        };
        if let Some(bind) = self.config.bind_address {
            // Checked here, not at start: a hub name may resolve to both families, and the
            // addresses of the bind address's family are still served.
            if proxy.is_none() && bind.is_ipv4() != addr.is_ipv4() {
                error!(%bind, "not connecting to the hub at {addr}: --bind-address {bind} is of the \
                    other IP family; give a bind address of the hub's family, or a hub name that \
                    resolves to an address of the bind address's family");
                return;
            }
        }
        let endpoint = if wants_quic {
            let bind = self.config.bind_address;
            match transport::agent_endpoint_from(addr, bind, &self.config.tls, &self.config.limits)
            {
                Ok(e) => Some(e),
                Err(e) => {
                    error!("cannot create a QUIC endpoint: {e}");
                    return;
                }
            }
        } else {
            None
        };
        if let Some(endpoint) = &endpoint {
            self.endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, endpoint.clone());
        }
        let mut dial = Dial {
            addr,
            host,
            server_name,
            proxy,
            endpoint,
        };
        let mut retry = self.backoff();
        let mut refused = self.refused_backoff();
        let mut busy = self.busy_backoff();
        let mut first = true;
        // This loop's view of the OIDC token: marks which token its sessions were given, so
        // each session re-authenticates with every later one.
        let mut tokens = self.tokens.clone();
        // A session made while another was still up (a QUIC probe from TCP): served next.
        let mut ready: Option<session::Established> = None;
        loop {
            self.follow_renewal(dial.endpoint.as_mut());
            let attempt = match ready.take() {
                Some(established) => Ok(established),
                None => {
                    if !first {
                        self.metrics.reconnect();
                    }
                    first = false;
                    let token = match &mut tokens {
                        Some(tokens) => match self.oidc_token(tokens, &cancel).await {
                            Some(token) => Ok(token),
                            None => break,
                        },
                        None => self.current_token(),
                    };
                    let token = match token {
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
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        r = self.attempt(&dial, &token) => r,
                    }
                }
            };
            let delay = match attempt {
                Ok(established) => {
                    retry = self.backoff();
                    refused = self.refused_backoff();
                    busy = self.busy_backoff();
                    match self
                        .serve(established, &dial, tokens.clone(), &cancel)
                        .await
                    {
                        Served::Moved(next) => {
                            ready = Some(*next);
                            continue;
                        }
                        Served::Ended { .. } if cancel.is_cancelled() => break,
                        Served::Ended { end, up } => {
                            match reconnect_window(end.going_away, up, self.config.stable_session) {
                                Some(window) if end.going_away => {
                                    info!("hub is going away: {}; reconnecting", end.reason);
                                    retry.spread(window)
                                }
                                Some(window) => {
                                    // Failures after this one retry back off as usual.
                                    let delay = retry.spread(window);
                                    warn!(retry_in = ?delay, "session ended: {}; reconnecting now", end.reason);
                                    delay
                                }
                                None => {
                                    warn!("session ended: {}; reconnecting", end.reason);
                                    retry.next_delay()
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    let delay = match &e {
                        SessionError::Rejected { code, .. } if code.is_permanent() => {
                            refused.next_delay()
                        }
                        SessionError::Tls(_) => refused.next_delay(),
                        SessionError::Busy(_)
                        | SessionError::Unfinished { .. }
                        | SessionError::NoWelcome { .. } => busy.next_delay(),
                        _ => retry.next_delay(),
                    };
                    match (&e, refusal_hint(&e, &self.config)) {
                        // Routine during a hub restart: the hub refuses while it drains.
                        (SessionError::Busy(_) | SessionError::Unfinished { .. }, _) => {
                            info!(retry_in = ?delay, "{e}; retrying")
                        }
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
        if let Some(endpoint) = &dial.endpoint {
            self.endpoints
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&addr);
            endpoint.close(crate::proto::CloseCode::Normal.into(), b"agent stopping");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }

    /// One connection attempt on the transport `--transport` asks for; with `auto`, QUIC
    /// first and TCP when QUIC gets no answer in time or UDP cannot be sent at all.
    async fn attempt(
        &self,
        dial: &Dial,
        token: &Secret,
    ) -> Result<session::Established, SessionError> {
        let config = &self.config;
        let Dial {
            addr,
            host,
            server_name,
            proxy,
            endpoint,
        } = dial;
        let addr = *addr;
        let session = match (config.transport, endpoint) {
            (TransportMode::Quic, Some(endpoint)) => {
                let patience = config.limits.handshake_timeout;
                session::dial_quic(endpoint, addr, server_name, config, patience).await?
            }
            (TransportMode::Auto, Some(endpoint)) => {
                let quic = match udp_blocked(addr) {
                    Some(why) => Err(why),
                    None => {
                        let patience = config.quic_fallback_after;
                        match session::dial_quic(endpoint, addr, server_name, config, patience)
                            .await
                        {
                            Ok(s) => Ok(s),
                            Err(SessionError::Timeout { after, .. }) => {
                                Err(format!("no answer in {}", session::seconds(after)))
                            }
                            Err(SessionError::Connect(why)) => Err(why),
                            Err(other) => return Err(other),
                        }
                    }
                };
                match quic {
                    Ok(s) => s,
                    Err(quic) => {
                        info!("QUIC to {addr} (UDP): {quic}; trying TLS over TCP");
                        match session::dial_tcp(addr, host, server_name, config, None).await {
                            Ok(s) => s,
                            Err(SessionError::TcpConnect { reason, .. }) => {
                                return Err(SessionError::Unreachable {
                                    addr,
                                    quic,
                                    tcp: reason,
                                })
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            _ => session::dial_tcp(addr, host, server_name, config, proxy.as_ref()).await?,
        };
        session::register(session, addr, server_name, config, token).await
    }

    /// Serves an established session until it ends, or, for an `auto` agent on TCP, until a
    /// QUIC probe made a new session: the old one then drains in the background (the hub
    /// routes nothing new to it, its streams finish) and the new one is handed back.
    async fn serve(
        &self,
        mut established: session::Established,
        dial: &Dial,
        tokens: Option<OidcTokens>,
        cancel: &CancellationToken,
    ) -> Served {
        let transport = established.connection.transport();
        info!(session = established.welcome.session_id, tenant = %established.welcome.tenant,
            %transport, "connected to hub");
        self.check_hub_certificate(&established.connection);
        let up_since = std::time::Instant::now();
        let drain = CancellationToken::new();
        established.rotations = Some(self.rotations.clone());
        let mut run = {
            let me = self.clone();
            let cancel = cancel.clone();
            let drain = drain.clone();
            tokio::spawn(
                async move {
                    session::run(
                        established,
                        me.dialer.clone(),
                        me.kube.clone(),
                        &me.config.name,
                        tokens,
                        &cancel,
                        &drain,
                    )
                    .await
                }
                .in_current_span(),
            )
        };
        // Counted once the session's task runs, so whoever sees it connected sees its task.
        self.metrics.hub_connection(transport.as_str(), true);
        self.status.send_modify(|s| {
            s.connected += 1;
            s.sessions_total += 1;
            s.last_error = None;
        });
        let probe = async {
            match (&dial.endpoint, self.config.transport, transport) {
                (Some(endpoint), TransportMode::Auto, TransportKind::Tcp) => {
                    self.probe_quic(endpoint, dial).await
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(probe);
        let renewed = self.renewed_session(dial);
        tokio::pin!(renewed);
        // The moment the session turns stable is logged, so an operator (and a test) can
        // tell when a drop stops costing a backoff.
        let stable = tokio::time::sleep(self.config.stable_session);
        tokio::pin!(stable);
        let mut stable_seen = false;
        let (next, why) = loop {
            tokio::select! {
                end = &mut run => {
                    self.session_over(transport);
                    let end = end.unwrap_or_else(|e| session::SessionEnd {
                        reason: format!("session task failed: {e}"),
                        going_away: false,
                    });
                    return Served::Ended {
                        end,
                        up: up_since.elapsed(),
                    };
                }
                () = &mut stable, if !stable_seen => {
                    stable_seen = true;
                    debug!("session stable; a drop now reconnects at once");
                }
                next = &mut probe => break (
                    next,
                    "QUIC reaches the hub again: moving from TLS over TCP to QUIC; the TCP \
                     session closes once its streams have finished",
                ),
                next = &mut renewed => break (
                    next,
                    "a new session with the renewed certificate or rotated token is up: \
                     moving to it; the previous session closes once its streams have finished",
                ),
            }
        };
        info!(session = next.welcome.session_id, "{why}");
        drain.cancel();
        let me = self.clone();
        tokio::spawn(
            async move {
                let end = run.await;
                me.session_over(transport);
                match end {
                    Ok(end) => info!(%transport, "previous session closed: {}", end.reason),
                    Err(e) => warn!(%transport, "previous session task failed: {e}"),
                }
            }
            .in_current_span(),
        );
        Served::Moved(Box::new(next))
    }

    /// Makes the QUIC endpoint and the configuration use the newest renewed certificate, if
    /// the one in force is older.
    fn follow_renewal(&mut self, endpoint: Option<&mut quinn::Endpoint>) {
        let current = self.tls.borrow().clone();
        if current.generation == self.tls_generation {
            return;
        }
        if let Some(endpoint) = endpoint {
            match transport::agent_client_config(&current.tls, &self.config.limits) {
                Ok(client) => endpoint.set_default_client_config(client),
                Err(e) => {
                    error!("cannot use the renewed certificate for QUIC: {e}");
                    return;
                }
            }
        }
        let mut config = (*self.config).clone();
        config.tls = current.tls;
        self.config = Arc::new(config);
        self.tls_generation = current.generation;
    }

    /// Once a renewal replaced the certificate this session was made with (or the hub rotated
    /// its connect token), makes a new session with the renewed credentials, retrying with backoff while the current session serves;
    /// never returns otherwise. Cancel-safe.
    async fn renewed_session(&self, dial: &Dial) -> session::Established {
        let mut tls = self.tls.clone();
        if tls
            .wait_for(|c| c.generation > self.tls_generation)
            .await
            .is_err()
        {
            // The agent is stopping: the session ends through its own cancellation.
            return std::future::pending().await;
        }
        let mut me = self.clone();
        // quinn keeps the default client configuration per endpoint handle: this handle (the
        // same socket) gets the renewed one, and the connect loop's own when it takes over.
        let mut dial = dial.clone();
        let mut retry = self.backoff();
        loop {
            // The newest certificate each time: another renewal may have come meanwhile.
            me.follow_renewal(dial.endpoint.as_mut());
            let attempt = match me.current_token() {
                Ok(token) => me.attempt(&dial, &token).await,
                Err(e) => Err(SessionError::Connect(format!(
                    "cannot read the token file: {e}"
                ))),
            };
            match attempt {
                Ok(next) => return next,
                Err(e) => {
                    let delay = retry.next_delay();
                    warn!(retry_in = ?delay,
                        "a session with the renewed credentials failed: {e}; the current session goes on");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

impl Supervisor {
    /// Counts a session as ended.
    fn session_over(&self, transport: TransportKind) {
        self.metrics.hub_connection(transport.as_str(), false);
        self.status
            .send_modify(|s| s.connected = s.connected.saturating_sub(1));
    }

    /// Tries QUIC every `quic_probe_interval` until a session registers over it.
    async fn probe_quic(&self, endpoint: &quinn::Endpoint, dial: &Dial) -> session::Established {
        let config = &self.config;
        loop {
            tokio::time::sleep(config.quic_probe_interval).await;
            let token = match &self.tokens {
                Some(tokens) => tokens.borrow().as_ref().map(|t| t.token.clone()),
                None => self.current_token().ok(),
            };
            let Some(token) = token else {
                continue;
            };
            let dialed = session::dial_quic(
                endpoint,
                dial.addr,
                &dial.server_name,
                config,
                config.quic_fallback_after,
            )
            .await;
            let registered = match dialed {
                Ok(s) => session::register(s, dial.addr, &dial.server_name, config, &token).await,
                Err(e) => Err(e),
            };
            match registered {
                Ok(established) => return established,
                Err(e) => debug!("QUIC probe to {}: {e}; staying on TCP", dial.addr),
            }
        }
    }
}

/// Where and how one hub address is dialed.
#[derive(Clone)]
struct Dial {
    addr: SocketAddr,
    host: String,
    server_name: String,
    /// The HTTP proxy for TCP sessions, when one is in effect for this hub.
    proxy: Option<ProxyUrl>,
    /// The QUIC endpoint, unless the agent only uses TCP here.
    endpoint: Option<quinn::Endpoint>,
}

/// How serving a session ended.
enum Served {
    /// The session ended after being up for `up`.
    Ended {
        end: session::SessionEnd,
        up: Duration,
    },
    /// A QUIC probe made this newer session; the old one is draining. Boxed: a session
    /// with its streams is far larger than an end reason.
    Moved(Box<session::Established>),
}

/// Why UDP to `addr` cannot be sent at all, found at once (no route, a local firewall that
/// refuses with EPERM), or `None` when a datagram leaves. The datagram is empty: a QUIC
/// endpoint drops it unread.
fn udp_blocked(addr: SocketAddr) -> Option<String> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(local).ok()?;
    if let Err(e) = socket.connect(addr) {
        return Some(format!("cannot send UDP: {e}"));
    }
    match socket.send(&[]) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot send UDP: {e}")),
    }
}

impl Supervisor {
    /// Records the expiry of the hub's certificate on this connection as a metric, and warns
    /// from 30 days before it. The agent's own certificate and CA are checked by
    /// [`watch_own_certificates`], not per connection.
    fn check_hub_certificate(&self, connection: &Session) {
        let hub = connection
            .peer_certificates()
            .and_then(|chain| chain.into_iter().next())
            .and_then(|cert| crate::certs::not_after(&cert).ok());
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

/// How often a running agent looks at its own certificate and CA again: their expiry is read
/// once at start, and a warning must still appear for an agent that runs for months.
pub(super) const OWN_CERTIFICATE_CHECK: Duration = Duration::from_secs(24 * 60 * 60);

/// Records the expiry of the agent's own certificate and CA (`expiries`, read from its TLS
/// material at start, then from each renewed certificate `renewed` announces) as metrics and
/// warns from 30 days before either lapses: now, and again every `every` until `cancel`
/// fires. Cancel-safe.
pub(super) async fn watch_own_certificates(
    expiries: Vec<(&'static str, std::time::SystemTime)>,
    renew_at: Option<std::time::SystemTime>,
    mut renewed: tokio::sync::watch::Receiver<Credentials>,
    metrics: Arc<admin::AgentMetrics>,
    every: Duration,
    cancel: CancellationToken,
) {
    for &(role, not_after) in &expiries {
        metrics.certificate_expiry(role, not_after);
    }
    let (mut expiries, mut renew_at) = (expiries, renew_at);
    loop {
        // A renewed certificate replaces the one read at start (its metric is set by the
        // renewal itself).
        if renewed.has_changed().unwrap_or(false) {
            let current = renewed.borrow_and_update().tls.clone();
            expiries = current.expiries();
            renew_at = super::renewal::schedule(&current).map(|(at, _)| at);
        }
        // An enrolled certificate (`renew_at` known) is warned about from its renewal point,
        // not from 30 days before its end: it only lives 30 days by default.
        let quiet = renew_at.is_some_and(|at| std::time::SystemTime::now() < at);
        let warn: Vec<_> = expiries
            .iter()
            .filter(|(role, _)| !(quiet && *role == "agent"))
            .copied()
            .collect();
        crate::certs::warn_expiring(&warn, "this agent's");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// What an operator should do about a refusal, for its log line.
fn refusal_hint(e: &SessionError, config: &AgentConfig) -> Option<String> {
    let SessionError::Rejected { code, .. } = e else {
        return None;
    };
    if let Some(oidc) = &config.oidc {
        // The token came from an issuer, not a file: what to check is there and in the hub's
        // issuers file.
        let issuer = oidc.endpoint_text();
        let hint = match code {
            CloseCode::BadToken | CloseCode::TokenExpired => Some(format!(
                "the hub does not accept the JWTs of client {} from {issuer}: check that the \
                 hub's issuers file trusts this issuer with the audience the tokens carry \
                 (--oidc-audience) and maps its tenant claim",
                oidc.client_id
            )),
            CloseCode::MissingScope => Some(format!(
                "the JWTs of client {} lack connect:agentHub: ask for it with --oidc-scope and \
                 allow the client that scope at {issuer}",
                oidc.client_id
            )),
            CloseCode::TenantMismatch => Some(format!(
                "the tenant of client {}'s JWTs is not the tenant this agent's certificate was \
                 enrolled into",
                oidc.client_id
            )),
            // Certificate and version refusals read the same as with a token file.
            _ => None,
        };
        if hint.is_some() {
            return hint;
        }
    }
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
        CloseCode::TenantMismatch => format!(
            "the certificate was enrolled into another tenant than this token's; use the \
             token enrollment stored with it, or enroll again with a join token of the \
             token's tenant; {create}"
        ),
        CloseCode::CertificateRevoked => "the hub revoked this certificate; enroll again \
            with a new join token (rna token create --join on the hub)"
            .to_string(),
        CloseCode::CertificateExpired => "this certificate has expired (or is not valid \
            yet): issue a new one (rna certs agent), or enroll again with a join token"
            .to_string(),
        CloseCode::VersionMismatch => {
            "run the same rna release as the hub (its protocol version differs)".to_string()
        }
        _ => return None,
    };
    Some(hint)
}

/// The window the first reconnect after an ended session is drawn from, or `None` when the
/// ordinary backoff applies. A hub going away told its whole fleet at once: spread widely
/// (replicas restart together). A session that had been up is worth one prompt retry: a hub
/// that restarted (its stateless reset ended the session) answers at once, and its fleet
/// learns of the restart at the phases of their pings, already spread, so the window is
/// short. A session that ended young backs off, so a hub that accepts and then drops an
/// agent is not hammered.
fn reconnect_window(going_away: bool, up: Duration, stable: Duration) -> Option<Duration> {
    if going_away {
        Some(RECONNECT_SPREAD)
    } else if up >= stable {
        Some(RESET_SPREAD)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn a_reset_is_retried_within_a_short_window_and_a_going_away_hub_over_a_wide_one() {
        let stable = Duration::from_secs(2);
        let up = Duration::from_secs(60);
        assert_eq!(reconnect_window(true, up, stable), Some(RECONNECT_SPREAD));
        assert_eq!(
            reconnect_window(true, Duration::ZERO, stable),
            Some(RECONNECT_SPREAD)
        );
        assert_eq!(reconnect_window(false, up, stable), Some(RESET_SPREAD));
        assert_eq!(reconnect_window(false, stable, stable), Some(RESET_SPREAD));
        assert_eq!(
            reconnect_window(false, Duration::from_secs(1), stable),
            None
        );
        // The reset window stays well under R1's 0.5 s with the 250 ms ping floor on top.
        assert!(RESET_SPREAD + Duration::from_millis(250) < Duration::from_millis(400));
        assert!(RESET_SPREAD < RECONNECT_SPREAD);
    }

    #[test]
    fn udp_that_cannot_leave_is_found_at_once() {
        // A datagram to a loopback port leaves (nobody need listen).
        assert_eq!(udp_blocked("127.0.0.1:9".parse().unwrap()), None);
        // The broadcast address without SO_BROADCAST: the kernel refuses the send itself
        // (EACCES), as a local firewall refuses with EPERM.
        let why = udp_blocked("255.255.255.255:4433".parse().unwrap());
        assert!(
            why.as_deref()
                .is_some_and(|w| w.starts_with("cannot send UDP")),
            "{why:?}"
        );
    }

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

        // With client credentials the token comes from the issuer: the hint points there and
        // at the hub's issuers file, never at a token file; certificate hints stay.
        config.token_file = None;
        config.oidc = Some(crate::oidc::ClientCredentials::new(
            crate::oidc::TokenEndpoint::Issuer("https://login.example".into()),
            "edge-client",
            Secret::new("s".into()),
        ));
        for (code, part) in [
            (CloseCode::BadToken, "issuers file"),
            (CloseCode::TokenExpired, "issuers file"),
            (CloseCode::MissingScope, "--oidc-scope"),
            (CloseCode::TenantMismatch, "enrolled into"),
        ] {
            let hint = refusal_hint(&rejected(code), &config).unwrap();
            assert!(
                hint.contains(part)
                    && hint.contains("edge-client")
                    && !hint.contains("rna token create"),
                "{code}: {hint}"
            );
        }
        let hint = refusal_hint(&rejected(CloseCode::CertificateMismatch), &config).unwrap();
        assert!(hint.contains("rna certs agent --dir"), "{hint}");
    }
}
