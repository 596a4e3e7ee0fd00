//! The hub: accepts agent connections over QUIC, serves the SOCKS5 front and the admin API,
//! and routes each SOCKS connection to a stream on the named agent's connection.
//!
//! Hub path: SOCKS front → router → registry → tunnel stream → relay.

mod admission;
pub mod api;
pub mod kube_api;
pub mod kube_channel;
pub mod metrics;
pub mod registry;
pub mod router;
pub mod session;
pub mod socks;
mod status;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{ReloadingStore, StoreError, Tenant};
use crate::listen::{Acceptor, ConnectionCap, HttpLimits};
use crate::proto::CloseCode;
use crate::transport::control::Heartbeat;
use crate::transport::{self, Limits, ServerTls, TransportError};

pub use metrics::Metrics;
pub use registry::{AgentInfo, AgentSession, Registry};

/// Window of the rate limit on WARN lines for failed handshakes.
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Failed handshakes logged one by one per window; the rest are summed up in one line.
const FAILURE_LOG_BURST: u32 = 10;

/// Errors starting or running the hub.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The QUIC endpoint could not be created.
    #[error("QUIC listener: {0}")]
    Transport(#[from] TransportError),
    /// A TCP listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The token store could not be read.
    #[error("token store: {0}")]
    Tokens(#[from] StoreError),
    /// Unauthenticated SOCKS was asked for on an address other machines can reach.
    #[error("--socks-no-auth is only allowed when SOCKS listens on a loopback address, not {0}")]
    NoAuthNotLoopback(SocketAddr),
}

/// Where unauthenticated SOCKS clients go (loopback-only `--socks-no-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoAuthRoute {
    /// The agent to route to.
    pub agent: String,
    /// The agent's tenant.
    pub tenant: Tenant,
}

/// Bounds on SOCKS clients before they are authenticated.
#[derive(Debug, Clone)]
pub struct SocksLimits {
    /// The greeting, authentication and request must complete within this.
    pub greeting_timeout: Duration,
    /// Connections from one client still in the greeting; IPv6 clients are counted per
    /// /64. A newcomer over it is refused.
    pub half_open_per_ip: usize,
    /// Connections in the greeting from all clients. When full, a newcomer is admitted and
    /// the oldest half-open connection of the client holding the most is closed.
    pub half_open_total: usize,
}

impl Default for SocksLimits {
    fn default() -> Self {
        SocksLimits {
            greeting_timeout: Duration::from_secs(10),
            half_open_per_ip: 256,
            half_open_total: 4096,
        }
    }
}

/// Resource caps of the hub beyond the SOCKS pre-authentication bounds. Each refusal is
/// counted in `rna_cap_refusals_total{cap=...}`.
#[derive(Debug, Clone)]
pub struct HubCaps {
    /// Agent connections in the handshake (QUIC, TLS, Hello) at once; more are refused
    /// before any cryptographic work (`cap="quic_handshakes"`).
    pub handshakes: usize,
    /// Handshakes at once from one source block (an IPv4 address, an IPv6 /64) whose address
    /// is validated; more are refused (`cap="quic_handshakes_per_source"`), so one sender
    /// cannot take every slot.
    pub handshakes_per_source: usize,
    /// Handshakes in progress from which on a connection attempt from an address not yet
    /// validated is answered with a QUIC Retry (counted in `rna_quic_retries_total`); 0 asks
    /// every new address. Spoofed sources never answer a Retry, so they hold at most this
    /// many slots and are sent less than they send.
    pub retry_threshold: usize,
    /// Time for the QUIC and TLS handshake, from the first packet; short, so attempts that
    /// never finish free their slot soon (`rna_handshake_failures_total{reason="tls_timeout"}`).
    pub tls_timeout: Duration,
    /// Time, after TLS, for the agent to open its control stream and send Hello; an agent
    /// sends it at once, so this is only reached by a client that holds a certificate and no
    /// intent to register (closed `handshake_timeout`, `reason="timeout"`).
    pub hello_timeout: Duration,
    /// Tunnel streams open or being opened on one agent connection; a SOCKS request beyond
    /// it is answered 0x01 (`cap="streams_per_agent"`).
    pub streams_per_agent: usize,
    /// Largest frame body accepted from an agent (Hello, control frames, Open replies); a
    /// longer one closes the connection with a protocol error (`cap="frame_size"`).
    pub max_frame: usize,
    /// A tunnel stream with no byte moving either way for this long is reset on both sides
    /// (`cap="stream_idle_timeout"`).
    pub stream_idle_timeout: Duration,
    /// Largest body of a Kubernetes apply request through the admin API, at most the
    /// protocol's 4 MiB; a larger one is answered 413 `RequestTooLarge`
    /// (`cap="kube_request"`).
    pub kube_request: usize,
    /// Kubernetes waits one token may have running at once; one more is answered 429
    /// `TooManyWaits` (`cap="kube_waits_per_token"`), so a read-only token cannot hold an
    /// agent's command slots for hours.
    pub kube_waits_per_token: usize,
    /// Sessions one agent name may hold in its tenant at once (replicas, reconnects not yet
    /// noticed); one more is refused `too_many_sessions (0x23)`
    /// (`cap="sessions_per_agent"`).
    pub sessions_per_agent: usize,
    /// Sessions registered with one token at once; one more is refused
    /// `too_many_sessions (0x23)` (`cap="sessions_per_token"`).
    pub sessions_per_token: usize,
    /// Least time between two inventory reports the hub reads from one session: a report
    /// sent sooner waits for its turn, and one sent while another waits is refused with
    /// stream code 0x102 (`cap="inventory_interval"`).
    pub inventory_interval: Duration,
    /// Inventory reads through the admin API served at once per tenant; more wait for a
    /// turn up to 10 s, then get 429 (`cap="heavy_requests_per_tenant"`).
    pub heavy_requests_per_tenant: usize,
    /// Bytes per second the answers of those reads are sent at, per tenant together (a
    /// 3 MB inventory takes about 0.1 s at the default 32 MiB/s).
    pub heavy_bytes_per_second: u64,
}

impl Default for HubCaps {
    fn default() -> Self {
        HubCaps {
            handshakes: 256,
            handshakes_per_source: 16,
            retry_threshold: 32,
            tls_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            // As many as an agent grants by default (`Limits::tunnel_streams`), so one agent
            // carries 10,000 and more concurrent streams out of the box.
            streams_per_agent: 16_384,
            max_frame: crate::proto::codec::MAX_FRAME,
            stream_idle_timeout: Duration::from_secs(3600),
            kube_request: crate::proto::kube::MAX_KUBE_REQUEST,
            kube_waits_per_token: 8,
            // Replicas sharing a name, doubled during a rolling update, plus sessions of
            // reconnected agents the hub has not yet noticed are gone.
            sessions_per_agent: 16,
            // One token is often shared by all agents of a tenant.
            sessions_per_token: 1024,
            inventory_interval: Duration::from_secs(5),
            heavy_requests_per_tenant: 4,
            heavy_bytes_per_second: 32 * 1024 * 1024,
        }
    }
}

/// Everything the hub needs, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// UDP address agents connect to.
    pub listen: SocketAddr,
    /// TCP address of the SOCKS5 front.
    pub socks: SocketAddr,
    /// TCP address of the admin API, if served.
    pub api: Option<SocketAddr>,
    /// Deadlines and connection caps of the admin API.
    pub api_limits: HttpLimits,
    /// The hub's certificate and the CA agents must chain to.
    pub tls: ServerTls,
    /// The token store file.
    pub tokens: PathBuf,
    /// Route for unauthenticated SOCKS clients (loopback only).
    pub socks_no_auth: Option<NoAuthRoute>,
    /// QUIC limits of agent connections.
    pub limits: Limits,
    /// Heartbeat timing announced to agents.
    pub heartbeat: Heartbeat,
    /// Pre-authentication SOCKS bounds.
    pub socks_limits: SocksLimits,
    /// Caps on handshakes, streams, frames and idle streams.
    pub caps: HubCaps,
    /// How long the agent may take to answer `Open` (it dials within its own timeout).
    pub open_timeout: Duration,
    /// On shutdown, how long in-flight streams may continue.
    pub grace: Duration,
    /// How often the token store file is checked for changes.
    pub token_poll: Duration,
    /// Label session metrics with the agent name too (opt in: one series per agent).
    pub metrics_per_agent: bool,
    /// Folder for state that must survive restarts (the endpoint key). Without it every start
    /// makes a new key, and agents of a restarted hub notice only at their idle timeout.
    pub state_dir: Option<PathBuf>,
    /// How long a Kubernetes command (other than wait, which has its own) may take.
    pub kube_timeout: Duration,
    /// Worker threads of the process's runtime (read by `main` before the hub starts).
    pub worker_threads: usize,
}

impl HubConfig {
    /// A configuration with the defaults for everything but addresses, TLS and tokens.
    pub fn new(listen: SocketAddr, socks: SocketAddr, tls: ServerTls, tokens: PathBuf) -> Self {
        HubConfig {
            listen,
            socks,
            api: None,
            api_limits: HttpLimits::default(),
            tls,
            tokens,
            socks_no_auth: None,
            limits: Limits::default(),
            heartbeat: Heartbeat::default(),
            socks_limits: SocksLimits::default(),
            caps: HubCaps::default(),
            open_timeout: Duration::from_secs(15),
            grace: Duration::from_secs(30),
            token_poll: Duration::from_secs(2),
            metrics_per_agent: false,
            state_dir: None,
            kube_timeout: Duration::from_secs(60),
            worker_threads: crate::runtime::default_worker_threads(),
        }
    }
}

/// State shared by the hub's tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tokens: Arc<ReloadingStore>,
    pub(crate) next_session: AtomicU64,
    /// Set on shutdown: `/readyz` answers 503 and no new streams are opened.
    pub(crate) draining: AtomicBool,
    /// Bumped after every successful token reload, so callers can wait for one.
    pub(crate) reloads: tokio::sync::watch::Sender<u64>,
    /// Fired when the shutdown grace is over: streams still open are reset, so their clients
    /// see an RST rather than a clean end of a truncated transfer.
    pub(crate) cut_streams: CancellationToken,
    /// Kubernetes waits running per token ([`HubCaps::kube_waits_per_token`]).
    pub(crate) kube_waits: Arc<kube_channel::WaitSlots>,
    /// SOCKS connections by token, reset when their token stops being valid.
    pub(crate) socks_tokens: Arc<socks::TokenStreams>,
    /// Handshake slots in total and per source, and the Retry rule ([`HubCaps`]).
    pub(crate) gate: admission::Gate,
    /// Rate limit of the WARN lines for failed handshakes.
    pub(crate) failure_log: admission::FailureLog,
    /// Turns for large admin API answers per tenant
    /// ([`HubCaps::heavy_requests_per_tenant`]).
    pub(crate) heavy: kube_channel::HeavyRequests,
}

impl Shared {
    /// Closes every agent session, and resets every SOCKS connection, whose token was
    /// revoked, removed or has expired. Runs after each reload and on every poll tick, so
    /// expiry needs no file change.
    pub(crate) fn close_sessions_without_token(&self) {
        let store = self.tokens.current();
        let now = std::time::SystemTime::now();
        self.socks_tokens.cut_without_token(&store, now);
        for session in self.registry.sessions() {
            if store.is_live(&session.token_id, now) || session.closed_by_hub().is_some() {
                continue;
            }
            let (code, why) = match store.get(&session.token_id) {
                Some(r) if !r.revoked => (CloseCode::TokenExpired, "token expired"),
                Some(_) => (CloseCode::TokenRevoked, "token revoked"),
                None => (CloseCode::TokenRevoked, "token removed from the store"),
            };
            warn!(agent = %session.name, tenant = %session.tenant, token_id = %session.token_id,
                "closing agent session: {why}");
            session.close(code, why);
        }
    }

    /// Re-reads the token store and closes sessions whose token stopped being valid.
    pub(crate) fn reload_tokens(&self, force: bool) -> Result<bool, StoreError> {
        let reloaded = if force {
            self.tokens.reload().map(|_| true)
        } else {
            self.tokens.reload_if_changed()
        };
        match &reloaded {
            Ok(true) => {
                self.metrics.token_reload(true);
                self.reloads.send_modify(|n| *n += 1);
                info!(tokens = self.tokens.current().len(), "token store reloaded");
                self.close_sessions_without_token();
            }
            Ok(false) => {}
            Err(e) => {
                self.metrics.token_reload(false);
                warn!("token store reload failed, keeping the previous tokens: {e}");
            }
        }
        reloaded
    }
}

/// A handle to a running hub's state: registry, metrics, token reload.
#[derive(Debug, Clone)]
pub struct HubHandle {
    shared: Arc<Shared>,
}

impl HubHandle {
    /// Connected agents.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.shared.registry
    }

    /// Metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Successful token reloads so far; `changed()` on the receiver waits for the next.
    pub fn token_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.reloads.subscribe()
    }

    /// Re-reads the token store now (SIGHUP); sessions of revoked tokens are closed.
    pub fn reload_tokens(&self) -> Result<(), StoreError> {
        self.shared.reload_tokens(true).map(|_| ())
    }

    /// The admin API's router with its request deadlines, as served on `--api`; tests call
    /// it without a socket.
    pub fn api_router(&self) -> axum::Router {
        api::app(self.shared.clone())
    }
}

/// A hub with every socket bound, ready to [`run`](Hub::run).
#[derive(Debug)]
pub struct Hub {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    socks: TcpListener,
    api: Option<TcpListener>,
}

impl Hub {
    /// Binds every socket (QUIC, SOCKS, API) and loads the token store. Nothing is served
    /// until [`run`](Hub::run).
    pub async fn bind(config: HubConfig) -> Result<Hub, HubError> {
        transport::tls::install_provider();
        if config.socks_no_auth.is_some() && !config.socks.ip().is_loopback() {
            return Err(HubError::NoAuthNotLoopback(config.socks));
        }
        let tokens = Arc::new(ReloadingStore::open(&config.tokens)?);
        let key = match &config.state_dir {
            Some(dir) => transport::EndpointKey::load_or_create(dir)?,
            None => {
                info!(
                    "no state folder: agents of a restarted hub notice only at their idle timeout"
                );
                transport::EndpointKey::random()?
            }
        };
        let endpoint = transport::hub_endpoint(config.listen, &config.tls, &config.limits, &key)?;
        // Keep the port actually bound (`:0` picks one), for the status page's connect line.
        let mut config = config;
        if let Ok(bound) = endpoint.local_addr() {
            config.listen = bound;
        }
        let socks = TcpListener::bind(config.socks)
            .await
            .map_err(|source| HubError::Bind {
                what: "SOCKS5",
                addr: config.socks,
                source,
            })?;
        let api = match config.api {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| HubError::Bind {
                        what: "admin API",
                        addr,
                        source,
                    })?,
            ),
            None => None,
        };
        let gate = admission::Gate::new(
            config.caps.handshakes,
            config.caps.handshakes_per_source,
            config.caps.retry_threshold,
        );
        let heavy = kube_channel::HeavyRequests::new(
            config.caps.heavy_requests_per_tenant,
            config.caps.heavy_bytes_per_second,
        );
        let shared = Arc::new(Shared {
            config,
            registry: Arc::new(Registry::new()),
            metrics: Arc::new(Metrics::new()),
            tokens,
            next_session: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            reloads: tokio::sync::watch::Sender::new(0),
            cut_streams: CancellationToken::new(),
            kube_waits: Arc::default(),
            socks_tokens: Arc::default(),
            gate,
            failure_log: admission::FailureLog::new(FAILURE_LOG_WINDOW, FAILURE_LOG_BURST),
            heavy,
        });
        Ok(Hub {
            shared,
            endpoint,
            socks,
            api,
        })
    }

    /// The UDP address agents connect to.
    pub fn quic_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .unwrap_or(self.shared.config.listen)
    }

    /// The SOCKS5 address.
    pub fn socks_addr(&self) -> SocketAddr {
        self.socks.local_addr().unwrap_or(self.shared.config.socks)
    }

    /// The admin API address, if served.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle for registry, metrics and reloads.
    pub fn handle(&self) -> HubHandle {
        HubHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` fires, then drains: stops accepting, lets in-flight SOCKS
    /// streams finish within the grace period, and closes agent connections with
    /// [`CloseCode::GoingAway`] so agents reconnect elsewhere at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), HubError> {
        let Hub {
            shared,
            endpoint,
            socks,
            api,
        } = self;
        let stop_accepting = shutdown.child_token();
        let sessions = TaskTracker::new();
        let streams = TaskTracker::new();
        // Sessions watch this token so they end only after the streams drained.
        let sessions_stop = CancellationToken::new();

        info!(quic = %endpoint.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            socks = %socks.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            api = %api.as_ref().and_then(|l| l.local_addr().ok()).map_or_else(|| "off".into(), |a| a.to_string()),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "hub serving");

        // Agent connections.
        let accept_agents = {
            let shared = shared.clone();
            let endpoint = endpoint.clone();
            let stop = stop_accepting.clone();
            let sessions = sessions.clone();
            let sessions_stop = sessions_stop.clone();
            tokio::spawn(async move {
                // Writes the summary of failure lines held back by the rate limit; checked ten
                // times per window so it comes out soon after its window ends.
                let mut flush = tokio::time::interval(FAILURE_LOG_WINDOW / 10);
                flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let incoming = tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = flush.tick() => {
                            shared.failure_log.flush();
                            continue;
                        }
                        incoming = endpoint.accept() => match incoming {
                            Some(i) => i,
                            None => break,
                        },
                    };
                    let remote = incoming.remote_address();
                    let validated = incoming.remote_address_validated();
                    let permit = match shared.gate.admit(remote.ip(), validated) {
                        admission::Admission::Accept(slot) => slot,
                        admission::Admission::Retry => {
                            shared.metrics.quic_retry();
                            if let Err(e) = incoming.retry() {
                                // Only possible for a validated address, which admit never
                                // sends here; drop it without an answer.
                                e.into_incoming().ignore();
                            }
                            continue;
                        }
                        admission::Admission::Refuse(cap) => {
                            shared.metrics.cap_refused(cap);
                            debug!(%remote, cap, in_progress = shared.gate.in_progress(),
                                "agent connection refused: handshake cap reached");
                            incoming.refuse();
                            continue;
                        }
                    };
                    let shared = shared.clone();
                    let cancel = sessions_stop.clone();
                    sessions.spawn(
                        session::serve(shared, incoming, cancel, permit)
                            .instrument(tracing::info_span!("agent_conn", %remote)),
                    );
                }
            })
        };

        // SOCKS5 front.
        let front = socks::SocksFront::new(shared.clone(), socks);
        let front_task = {
            let stop = stop_accepting.clone();
            let streams = streams.clone();
            tokio::spawn(async move { front.run(stop, streams).await })
        };

        // Admin API: kept up while draining, so `/readyz` can say 503.
        let api_stop = CancellationToken::new();
        let api_task = api.map(|listener| {
            let app = api::app(shared.clone());
            let stop = api_stop.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let limits = shared.config.api_limits.clone();
                let metrics = shared.metrics.clone();
                crate::listen::serve_http(
                    Acceptor::new(listener, "admin API"),
                    app,
                    &limits,
                    stop,
                    move |cap| {
                        metrics.cap_refused(match cap {
                            ConnectionCap::Total => "api_connections",
                            ConnectionCap::PerIp => "api_connections_per_ip",
                        })
                    },
                )
                .await
            })
        });

        // Certificate expiry: a warning from 30 days before, checked at start and daily.
        for (role, not_after) in shared.config.tls.expiries() {
            shared.metrics.certificate_expiry(role, not_after);
        }
        {
            let shared = shared.clone();
            let stop = stop_accepting.clone();
            tokio::spawn(async move {
                loop {
                    crate::certs::warn_expiring(&shared.config.tls.expiries(), "this hub's");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(24 * 60 * 60)) => {}
                    }
                }
            });
        }

        // Token store follower: a save is seen at once through the folder watch; the poll
        // stays as a fallback (no inotify, network file systems) and closes expired sessions.
        let watcher = {
            let shared = shared.clone();
            let stop = stop_accepting.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.config.token_poll);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut watch = shared.tokens.watch();
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                        _ = watch.changed() => {}
                    }
                    if let Ok(false) = shared.reload_tokens(false) {
                        shared.close_sessions_without_token();
                    }
                }
            })
        };

        shutdown.cancelled().await;
        shared.draining.store(true, Ordering::SeqCst);
        info!(grace = ?shared.config.grace, open_streams = shared.metrics.streams_open().get(),
            "hub shutting down: no new connections, draining streams");
        let _ = accept_agents.await;
        let _ = front_task.await;
        let _ = watcher.await;
        streams.close();
        if tokio::time::timeout(shared.config.grace, streams.wait())
            .await
            .is_err()
        {
            warn!(
                open_streams = shared.metrics.streams_open().get(),
                "grace period over: resetting the remaining streams"
            );
            shared.cut_streams.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), streams.wait()).await;
        }
        sessions_stop.cancel();
        endpoint.close(
            CloseCode::GoingAway.into(),
            session::SHUTDOWN_REASON.as_bytes(),
        );
        sessions.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), sessions.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        api_stop.cancel();
        if let Some(task) = api_task {
            let _ = task.await;
        }
        info!("hub stopped");
        Ok(())
    }
}
