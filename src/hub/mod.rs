//! The hub: accepts agent connections over QUIC, serves the SOCKS5 front and the admin API,
//! and routes each SOCKS connection to a stream on the named agent's connection.
//!
//! Hub path: SOCKS front → router → registry → tunnel stream → relay.

mod admission;
pub mod api;
mod credential;
mod enroll;
pub mod kube_api;
pub mod kube_channel;
pub mod metrics;
mod pace;
mod page;
mod recall;
pub mod registry;
mod rotation;
pub mod router;
pub mod session;
mod settings;
mod shared_state;
pub mod socks;
mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::auth::{ReloadingStore, StoreError};
use crate::listen::{Acceptor, ConnectionCap};
use crate::proto::CloseCode;
use crate::transport::tcp::TcpServer;
use crate::transport::{self, TransportError};

pub use metrics::Metrics;
pub use registry::{AgentInfo, AgentSession, Registry};
pub use settings::{EarlyReply, HubCaps, HubConfig, NoAuthRoute, SocksLimits, TcpListen};

/// Window of the rate limit on WARN lines for failed handshakes.
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Failed handshakes logged one by one per window; the rest are summed up in one line.
const FAILURE_LOG_BURST: u32 = 10;
/// How often the revocation list's file is checked for changes.
const REVOCATION_POLL: Duration = Duration::from_millis(250);

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
    /// The TLS/TCP agent listener could not be set up.
    #[error("TCP agent listener: {0}")]
    Tcp(String),
    /// Enrollment could not be set up from the state folder (its CA or key).
    #[error("enrollment: {0}")]
    Enroll(#[from] crate::enroll::EnrollError),
    /// A trusted OIDC issuer's settings cannot work.
    #[error("{0}")]
    Oidc(#[from] crate::oidc::IssuerConfigError),
    /// The shared state (`--state kubernetes://…`) could not be loaded.
    #[error("shared state: {0}")]
    State(#[from] crate::state::StateError),
    /// Issuers were reloaded on a hub started without an issuers file.
    #[error(
        "the hub was started without --oidc-issuers-file: restart it with one to trust issuers"
    )]
    NoIssuersFile,
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
    /// Enrollment of agents with join tokens, when the state folder holds the CA key.
    pub(crate) enroller: Option<Arc<enroll::Enroller>>,
    /// The trusted OIDC issuers and their cached keys; `None` when none is configured.
    pub(crate) oidc: Option<Arc<crate::oidc::Verifier>>,
    /// The state shared with other replicas in a Kubernetes Secret; `None`: files.
    pub(crate) shared_state: Option<Arc<shared_state::SharedState>>,
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
            if credential::is_oidc_id(&session.token_id) {
                // A JWT session lives until its `exp`; the store knows nothing of it.
                if session.closed_by_hub().is_none()
                    && session.credential_expiry() < crate::auth::unix_now(now) as i64
                {
                    warn!(agent = %session.name, tenant = %session.tenant, token_id = %session.token_id,
                        "closing agent session: JWT expired");
                    session.close(CloseCode::TokenExpired, "JWT expired");
                }
                continue;
            }
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

    /// Closes every session whose certificate is on the revocation list.
    pub(crate) fn close_revoked_sessions(&self) {
        for session in self.registry.sessions() {
            let Some(cert) = session
                .connection
                .peer_certificates()
                .and_then(|chain| chain.into_iter().next())
            else {
                continue;
            };
            if let Some(serial) = session::revoked_serial(self, cert.as_ref()) {
                warn!(agent = %session.name, tenant = %session.tenant, %serial,
                    "closing agent session: certificate revoked");
                session.close(CloseCode::CertificateRevoked, "certificate revoked");
            }
        }
    }

    /// Re-reads the token store and closes sessions whose token stopped being valid.
    pub(crate) fn reload_tokens(&self, force: bool) -> Result<bool, StoreError> {
        if let Some(state) = &self.shared_state {
            // No file: the Secret's watch applies every change as it comes; what this replica
            // wrote itself (an enrollment's connect token) is applied now.
            state.apply_pending(self);
            return Ok(false);
        }
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

    /// Replaces the trusted OIDC issuers (SIGHUP, with the issuers file read again): all or
    /// nothing, so a list that breaks a rule leaves the current one in force. Unchanged
    /// issuers keep their cached keys; new and changed ones have their keys fetched now, in
    /// the background. Tokens of a removed issuer are refused from now on (sessions they
    /// registered end at their `exp` as before). One log line says what changed.
    pub fn reload_issuers(
        &self,
        configs: Vec<crate::oidc::IssuerConfig>,
    ) -> Result<crate::oidc::issuer::Reloaded, HubError> {
        let verifier = self.shared.oidc.clone().ok_or(HubError::NoIssuersFile)?;
        let reloaded = verifier.reload(configs)?;
        info!(added = ?reloaded.added, removed = ?reloaded.removed,
            changed = ?reloaded.changed, kept = reloaded.kept.len(), "OIDC issuers reloaded");
        if !(reloaded.added.is_empty() && reloaded.changed.is_empty()) {
            tokio::spawn(async move {
                for (issuer, result) in verifier.refresh_all().await {
                    if let Err(e) = result {
                        warn!(%issuer, "OIDC issuer keys not fetched after the reload: {e}");
                    }
                }
            });
        }
        Ok(reloaded)
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
    /// The roster of QUIC sessions kept in the state folder, and the recall of the previous
    /// run's agents, when the hub has a state folder.
    recall: Option<recall::Recall>,
    /// The TLS/TCP side of the agent listener, unless turned off.
    tcp: Option<Arc<TcpServer>>,
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
        let (tokens, shared_state) = shared_state::open_tokens(&config).await?;
        let key = match &config.state_dir {
            Some(dir) => transport::EndpointKey::load_or_create(dir)?,
            None => {
                info!(
                    "no state folder: agents of a restarted hub notice only at their idle timeout"
                );
                transport::EndpointKey::random()?
            }
        };
        let mut config = config;
        let enroller = match &config.enrollment {
            Some(state) => {
                config.tls = config
                    .tls
                    .with_enrollment(&[crate::enroll::ENROLL_ALPN, crate::enroll::RENEW_ALPN]);
                let mut enroller = enroll::Enroller::open(
                    state.clone(),
                    config.tokens.clone(),
                    config.agent_cert_lifetime,
                )?;
                enroller.shared_state = shared_state.clone();
                Some(Arc::new(enroller))
            }
            None => None,
        };
        let (endpoint, socket, tcp) = bind_agent_sockets(&config, &key).await?;
        // Read before anything is written: the roster the previous run left.
        let recall = config
            .state_dir
            .clone()
            .map(|dir| recall::Recall::load(dir, socket, key.clone()));
        // Keep the port actually bound (`:0` picks one), for the status page's connect line.
        if let Ok(bound) = endpoint.local_addr() {
            config.listen = bound;
        }
        if let Some(state) = &config.enrollment {
            // `rna token create --join` prints this address in the line agents paste.
            let address = crate::enroll::HubAddress {
                names: crate::enroll::state::certificate_names(&state.hub_cert()),
                port: config.listen.port(),
            };
            if let Err(e) = state.save_address(&address) {
                warn!("join lines will need --hub: {e}");
            }
            shared_state::publish_hub(shared_state.as_deref(), state, &address).await;
        }
        let tcp = match tcp {
            Some(listener) => Some(Arc::new(
                TcpServer::new(listener, &config.tls, &config.limits)
                    .map_err(|e| HubError::Tcp(e.to_string()))?,
            )),
            None => None,
        };
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
        // With an issuers file the verifier exists even when the file lists none yet, so a
        // SIGHUP after adding one takes effect without a restart.
        let oidc = if config.oidc_issuers.is_empty() && config.oidc_issuers_file.is_none() {
            None
        } else {
            Some(Arc::new(crate::oidc::Verifier::new(
                config.oidc_issuers.clone(),
                config.oidc_tuning,
            )?))
        };
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
            enroller,
            oidc,
            shared_state,
        });
        Ok(Hub {
            shared,
            endpoint,
            recall,
            tcp,
            socks,
            api,
        })
    }

    /// The TCP address agents connect to over TLS/TCP, unless that is off.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|t| t.local_addr().ok())
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
            recall,
            tcp,
            socks,
            api,
        } = self;
        let stop_accepting = shutdown.child_token();
        let sessions = TaskTracker::new();
        let streams = TaskTracker::new();
        // Sessions watch this token so they end only after the streams drained.
        let sessions_stop = CancellationToken::new();

        info!(quic = %endpoint.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
            tcp = %tcp.as_ref().and_then(|t| t.local_addr().ok()).map_or_else(|| "off".into(), |a| a.to_string()),
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
                let wait = shared.config.caps.handshake_wait;
                let mut waiting = admission::WaitQueue::default();
                // Starts the handshake of an admitted attempt, holding its slots until it ends.
                let serve = |incoming: quinn::Incoming, permit: admission::HandshakeSlot| {
                    let remote = incoming.remote_address();
                    sessions.spawn(
                        session::serve(shared.clone(), incoming, sessions_stop.clone(), permit)
                            .instrument(tracing::info_span!("agent_conn", %remote)),
                    );
                };
                loop {
                    let expiry = waiting.oldest_expiry(wait);
                    let incoming = tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = flush.tick() => {
                            shared.failure_log.flush();
                            continue;
                        }
                        total = shared.gate.free_slot(), if !waiting.is_empty() => {
                            // The oldest attempt still within its wait gets the slot.
                            if let Some((incoming, slot)) = waiting.next(wait, &shared.metrics) {
                                serve(incoming, admission::Gate::seat(slot, total));
                            }
                            continue;
                        }
                        _ = crate::transport::control::sleep_until(expiry) => {
                            waiting.refuse_expired(wait, &shared.metrics);
                            continue;
                        }
                        accepted = accept_tcp(tcp.as_deref()) => {
                            if let Some(tcp) = &tcp {
                                admit_tcp(&shared, tcp, accepted, &sessions, &sessions_stop).await;
                            }
                            continue;
                        }
                        incoming = endpoint.accept() => match incoming {
                            Some(i) => i,
                            None => break,
                        },
                    };
                    let remote = incoming.remote_address();
                    let validated = incoming.remote_address_validated();
                    let may_wait = !wait.is_zero() && waiting.len() < admission::HANDSHAKE_QUEUE;
                    let permit = match shared.gate.admit(remote.ip(), validated, may_wait) {
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
                        admission::Admission::Wait(slot) => {
                            shared.metrics.handshake_queued();
                            waiting.push(incoming, slot);
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
                    serve(incoming, permit);
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

        // OIDC issuer keys: fetched once at start (an issuer that is down is one warning and
        // is asked again on the first token naming an unknown key), then hourly; cached keys
        // keep verifying while an issuer is unreachable.
        if let Some(verifier) = shared.oidc.clone() {
            let stop = stop_accepting.clone();
            tokio::spawn(async move {
                for (issuer, result) in verifier.refresh_all().await {
                    match result {
                        Ok(keys) => info!(%issuer, keys, "OIDC issuer keys fetched"),
                        Err(e) => warn!(%issuer, "OIDC issuer keys not fetched at start: {e}"),
                    }
                }
                verifier.run_refresher(stop).await;
            });
        }

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

        // Heartbeat pace: the announced interval follows the number of agents.
        tokio::spawn(pace::run(shared.clone(), stop_accepting.clone()));
        if let Some(recall) = recall {
            recall.spawn(&shared, &stop_accepting);
        }

        // Shared state: every change another replica or `rna token|certs --state` makes.
        shared_state::spawn_follower(&shared, &stop_accepting);

        // Revocations: `rna certs revoke` writes the list; a revoked agent's sessions close
        // within a quarter second of the file changing.
        if let Some(enroller) = shared
            .enroller
            .clone()
            .filter(|_| shared.shared_state.is_none())
        {
            let shared = shared.clone();
            let stop = stop_accepting.clone();
            enroller.refresh_revocations();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REVOCATION_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if enroller.refresh_revocations() {
                        shared.close_revoked_sessions();
                    }
                }
            });
        }

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

/// The agent listener's sockets: the QUIC endpoint, and the TCP listener on the same port
/// (or where `--tcp-listen` says). With port 0 the TCP side takes the port UDP was given;
/// when another program holds that TCP port, both are bound again on a new one.
async fn bind_agent_sockets(
    config: &HubConfig,
    key: &transport::EndpointKey,
) -> Result<(quinn::Endpoint, std::net::UdpSocket, Option<TcpListener>), HubError> {
    let bind_tcp = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| HubError::Bind {
                what: "agent TCP",
                addr,
                source,
            })
    };
    let mut tries = 0;
    loop {
        let (endpoint, socket) =
            transport::hub_endpoint_and_socket(config.listen, &config.tls, &config.limits, key)?;
        let tcp = match config.tcp_listen {
            TcpListen::Off => return Ok((endpoint, socket, None)),
            TcpListen::At(addr) => return Ok((endpoint, socket, Some(bind_tcp(addr).await?))),
            TcpListen::SameAsQuic => {
                let port = endpoint
                    .local_addr()
                    .map_or(config.listen.port(), |a| a.port());
                bind_tcp(SocketAddr::new(config.listen.ip(), port)).await
            }
        };
        match tcp {
            Ok(listener) => return Ok((endpoint, socket, Some(listener))),
            Err(e) if config.listen.port() == 0 && tries < 16 => {
                debug!("{e}; binding both on another port");
                tries += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The next TCP connection of the agent listener; never, when it is off. Cancel-safe.
async fn accept_tcp(
    tcp: Option<&TcpServer>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some(tcp) => tcp.accept().await,
        None => std::future::pending().await,
    }
}

/// Admits an accepted agent TCP connection through the same handshake caps as QUIC (a TCP
/// peer's address is validated by its handshake) and serves it in its own task.
async fn admit_tcp(
    shared: &Arc<Shared>,
    tcp: &Arc<TcpServer>,
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    sessions: &TaskTracker,
    sessions_stop: &CancellationToken,
) {
    let (stream, remote) = match accepted {
        Ok(a) => a,
        Err(e) => {
            // Out of file descriptors, usually: wait a little instead of spinning.
            warn!("accepting an agent TCP connection failed: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
    };
    match shared.gate.admit(remote.ip(), true, false) {
        admission::Admission::Accept(slot) => {
            sessions.spawn(
                session::serve_tcp(
                    shared.clone(),
                    tcp.handshaker(),
                    stream,
                    remote,
                    sessions_stop.clone(),
                    slot,
                )
                .instrument(tracing::info_span!("agent_conn", %remote, transport = "tcp")),
            );
        }
        admission::Admission::Refuse(cap) => {
            shared.metrics.cap_refused(cap);
            debug!(%remote, cap, in_progress = shared.gate.in_progress(),
                "agent TCP connection refused: handshake cap reached");
        }
        // Only unvalidated addresses are asked for a retry, and only QUIC attempts wait.
        admission::Admission::Retry | admission::Admission::Wait(_) => {}
    }
}
