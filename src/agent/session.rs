//! One agent connection to one hub: the QUIC/TLS handshake, Hello and the hub's answer, then
//! heartbeats and the tunnel streams the hub opens, until the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::ConnectionError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use super::dialer::Dialer;
use super::kube::{serve_command, KubeExecutor};
use super::AgentConfig;
use crate::auth::{Masked, Secret};
use crate::proto::codec::{encode, encode_limited, read_frame, read_frame_limited};
use crate::proto::kube::{AgentStream, StreamHeader, MAX_INVENTORY};
use crate::proto::{
    CloseCode, Control, Hello, Open, OpenReply, StreamCode, Welcome, PROTOCOL_VERSION,
};
use crate::transport::control::{
    self, heartbeat_loop_with, ControlEnd, ControlReader, Heartbeat, HeartbeatEvent, Role,
    CONTROL_PRIORITY,
};
use crate::transport::proxy::ProxyUrl;
use crate::transport::relay::relay;
use crate::transport::session::{RecvStream, SendStream, Session};
use crate::transport::tcp::{self, TcpError};
use crate::transport::tls::{self, CertProblem};
use crate::transport::{self};

/// Time the hub has to send the stream header after opening a tunnel stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session could not be established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The connection could not be started (bad address, endpoint closed).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The hub refused new connections before the handshake: it is shutting down (a restart)
    /// or at its handshake cap. Transient, and routine during a restart.
    #[error("the hub at {0} refused new connections (it is shutting down or busy)")]
    Busy(SocketAddr),
    /// The TLS handshake failed; the message says which side refused which certificate and
    /// what to do.
    #[error("{0}")]
    Tls(String),
    /// Nothing came back from the address: no hub listening, or UDP blocked on the way.
    #[error(
        "no answer from the hub at {addr} within {after:?}: rna connects over QUIC, which is \
         UDP; check that the hub is running and listening on UDP port {port} of that address, \
         and that firewalls on the way allow UDP to {addr}",
        port = addr.port()
    )]
    Timeout {
        /// The address dialed.
        addr: SocketAddr,
        /// How long the agent waited.
        after: Duration,
    },
    /// The hub answered the QUIC handshake but did not complete it in time (overloaded, as
    /// in a reconnect storm). Transient, like [`SessionError::Busy`].
    #[error("the hub at {addr} answered but did not complete the handshake within {after:?}")]
    Unfinished {
        /// The address dialed.
        addr: SocketAddr,
        /// How long the agent waited.
        after: Duration,
    },
    /// The hub completed the QUIC handshake but did not answer Hello in time (overloaded).
    #[error("the hub at {addr} accepted the connection but did not answer Hello within {after:?}")]
    NoWelcome {
        /// The address dialed.
        addr: SocketAddr,
        /// How long the agent waited.
        after: Duration,
    },
    /// The hub refused this agent, with a typed code.
    #[error("hub refused this agent: {reason} (code {code})")]
    Rejected {
        /// The close code the hub used.
        code: CloseCode,
        /// The hub's reason.
        reason: String,
    },
    /// The hub broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No TCP connection to the hub's address (the TLS/TCP transport).
    #[error("TCP to {addr}: {reason}")]
    TcpConnect {
        /// The address dialed.
        addr: SocketAddr,
        /// Refused, unreachable, no answer in N s.
        reason: String,
    },
    /// The HTTP proxy did not open a tunnel: unreachable, refused the credentials (407), or
    /// answered with another status; never the hub's fault.
    #[error("{0}")]
    Proxy(String),
    /// Neither transport reached the hub (`--transport auto`): what each attempt met.
    #[error("cannot reach the hub: QUIC to {addr} (UDP): {quic}; TCP to {addr}: {tcp}")]
    Unreachable {
        /// The address dialed.
        addr: SocketAddr,
        /// Why QUIC failed, e.g. `no answer in 5 s`.
        quic: String,
        /// Why TCP failed, e.g. `connection refused`.
        tcp: String,
    },
}

/// What the agent knows about one connection attempt, for messages that say what to fix.
#[derive(Debug, Clone, Copy)]
struct Attempt<'a> {
    addr: SocketAddr,
    server_name: &'a str,
    agent: &'a str,
    /// How long the agent waits for the hub before it gives up on the attempt: the handshake
    /// timeout, or the QUIC idle timeout when that is shorter (quinn then ends the attempt
    /// first, as `TimedOut`). Reported in the "no answer" message, whichever path saw it.
    patience: Duration,
}

impl SessionError {
    /// Interprets how a connection that was being set up ended.
    fn from_connection(e: ConnectionError, at: &Attempt<'_>) -> Self {
        if let Some(failure) = tls::tls_failure(&e) {
            return SessionError::Tls(explain_tls(&failure, at));
        }
        match e {
            ConnectionError::ApplicationClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                match CloseCode::from_code(close.error_code.into_inner()) {
                    // The hub's deadline for the Hello passed: a hub catching up with a
                    // reconnect storm. As transient as a refusal at its handshake cap; the
                    // lost-hub backoff (up to 30 s) would keep this agent away for longer than
                    // the storm lasts.
                    Some(CloseCode::HandshakeTimeout) => SessionError::Busy(at.addr),
                    // Code 0 without a reason is quinn's own close of a connection its owner
                    // dropped: a hub that abandoned this handshake at its TLS deadline, after
                    // the agent's side had finished. As transient as the above.
                    Some(CloseCode::Normal) if close.reason.is_empty() => {
                        SessionError::Busy(at.addr)
                    }
                    Some(code) => SessionError::Rejected { code, reason },
                    None => SessionError::Protocol(format!(
                        "closed with unknown code {}: {reason}",
                        close.error_code
                    )),
                }
            }
            // Refused before the handshake: the hub is at its handshake cap or shutting down.
            // Transient, so the normal (short, jittered) backoff applies, not the long one.
            ConnectionError::ConnectionClosed(close)
                if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                SessionError::Busy(at.addr)
            }
            // The hub gave up on the handshake without a TLS alert: an application close
            // during the handshake travels as APPLICATION_ERROR (RFC 9000 §10.2.3), which is
            // what a hub sends when its handshake deadline passes (overloaded, as in a
            // reconnect storm) or it shuts down. Transient as well: nothing to fix here, and a
            // long backoff would only keep this agent away from a hub that is catching up.
            ConnectionError::ConnectionClosed(close)
                if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
            {
                SessionError::Busy(at.addr)
            }
            ConnectionError::ConnectionClosed(close) => SessionError::Tls(format!(
                "the hub at {} closed the handshake: {close}",
                at.addr
            )),
            ConnectionError::TransportError(e) => {
                SessionError::Tls(format!("handshake with the hub at {} failed: {e}", at.addr))
            }
            ConnectionError::TimedOut => SessionError::Timeout {
                addr: at.addr,
                after: at.patience,
            },
            other => SessionError::Connect(other.to_string()),
        }
    }
}

impl SessionError {
    /// Why a session that was being set up ended, or `None` while it is alive. QUIC tells
    /// TLS refusals and transport errors apart; a TLS/TCP session's refusals were read during
    /// its setup, so only the hub's close code is left to read here.
    fn from_session(session: &Session, at: &Attempt<'_>) -> Option<Self> {
        if let Session::Quic(c) = session {
            return c
                .close_reason()
                .map(|e| SessionError::from_connection(e, at));
        }
        Some(match session.close_reason()? {
            transport::session::SessionEnd::ClosedByPeer { code, reason } => {
                match CloseCode::from_code(code) {
                    Some(code) => SessionError::Rejected { code, reason },
                    None => {
                        SessionError::Protocol(format!("closed with unknown code {code}: {reason}"))
                    }
                }
            }
            transport::session::SessionEnd::TimedOut => SessionError::NoWelcome {
                addr: at.addr,
                after: at.patience,
            },
            other => SessionError::Connect(other.to_string()),
        })
    }
}

/// Which side refused which certificate, and the fix.
fn explain_tls(failure: &tls::TlsFailure, at: &Attempt<'_>) -> String {
    let detail = &failure.detail;
    let hub = at.addr;
    if failure.refused_here {
        match failure.problem {
            CertProblem::WrongName => format!(
                "this agent refused the certificate of the hub at {hub}: it is not valid for \
                 the name {name:?} ({detail}); set --server-name to a name the hub \
                 certificate carries, or remake it with rna certs init --hub-name {name}",
                name = at.server_name
            ),
            CertProblem::WrongCa => format!(
                "this agent refused the certificate of the hub at {hub}: it is not signed by \
                 the CA in this agent's --ca ({detail}); give the agent the ca.pem of the CA \
                 folder that made the hub's certificate"
            ),
            CertProblem::Expired => format!(
                "this agent refused the certificate of the hub at {hub}: it has expired or is \
                 not yet valid ({detail}); renew the hub's certificate (docs/operations.md, \
                 Certificates) or check both clocks"
            ),
            CertProblem::Missing | CertProblem::Other => {
                format!("this agent refused the certificate of the hub at {hub} ({detail})")
            }
        }
    } else {
        let agent = at.agent;
        match failure.problem {
            CertProblem::WrongCa | CertProblem::WrongName => format!(
                "the hub at {hub} refused this agent's certificate: it is not signed by the \
                 hub's CA ({detail}); make one with rna certs agent --dir <the hub's CA \
                 folder> {agent}"
            ),
            CertProblem::Expired => format!(
                "the hub at {hub} refused this agent's certificate: it has expired or is not \
                 yet valid ({detail}); make a new one with rna certs agent --dir <the hub's CA \
                 folder> {agent} --force, or check both clocks"
            ),
            CertProblem::Missing => format!(
                "the hub at {hub} refused this agent: it presented no certificate ({detail})"
            ),
            CertProblem::Other => format!("the hub at {hub} refused the TLS handshake ({detail})"),
        }
    }
}

/// An established session, ready to [`run`].
#[derive(Debug)]
pub struct Established {
    /// The session with the hub (QUIC or TLS/TCP).
    pub connection: Session,
    /// The hub's Welcome.
    pub welcome: Welcome,
    send: SendStream,
    reader: ControlReader,
    /// Largest frame accepted from the hub.
    max_frame: usize,
    /// Tunnel streams the hub may have open at once, at most (`max_streams`); a QUIC
    /// connection starts with a smaller grant that grows towards it.
    tunnel_streams: u32,
    /// Where a connect token the hub rotates on this session is handed (`None`: ignored).
    pub rotations: Option<tokio::sync::mpsc::UnboundedSender<Secret>>,
}

/// Connects to the hub at `addr` over QUIC and registers with `config.token`. Fails with the
/// hub's reason when refused.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    config: &AgentConfig,
) -> Result<Established, SessionError> {
    connect_with_token(endpoint, addr, server_name, config, &config.token).await
}

/// Like [`connect`], registering with `token` (the token file as read for this attempt).
pub async fn connect_with_token(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    config: &AgentConfig,
    token: &Secret,
) -> Result<Established, SessionError> {
    let session = dial_quic(
        endpoint,
        addr,
        server_name,
        config,
        config.limits.handshake_timeout,
    )
    .await?;
    register(session, addr, server_name, config, token).await
}

/// The QUIC and TLS handshake with the hub at `addr`, given up after `patience` when nothing
/// came back from the hub by then, or after the longer of `patience` and the handshake
/// timeout when the hub answered but has not finished.
pub async fn dial_quic(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    config: &AgentConfig,
    patience: Duration,
) -> Result<Session, SessionError> {
    let at = Attempt {
        addr,
        server_name,
        agent: &config.name,
        patience: patience.min(config.limits.idle_timeout),
    };
    let started = tokio::time::Instant::now();
    let mut connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    // The deadline and quinn's own idle timeout both end an attempt nobody answers; both
    // become the same error through `from_connection`.
    match tokio::time::timeout(patience, &mut connecting).await {
        Ok(Err(e)) => return Err(SessionError::from_connection(e, &at)),
        Ok(Ok(c)) => return Ok(Session::from(c)),
        Err(_) => {}
    }
    let heard = connecting.stats().is_some_and(|s| s.udp_rx.datagrams > 0);
    if !heard {
        return Err(SessionError::from_connection(
            ConnectionError::TimedOut,
            &at,
        ));
    }
    // The hub answered (a Retry, its first flight): UDP works both ways and the hub is at
    // work on this handshake. The rest may take up to the handshake timeout even where
    // `patience` is the shorter wait before `auto` tries TCP: a hub catching up with a
    // reconnect storm finishes late, and TCP would not be faster.
    let whole = patience.max(config.limits.handshake_timeout);
    let rest = whole.saturating_sub(started.elapsed());
    match tokio::time::timeout(rest, connecting).await {
        // Answered, then not finished: a busy hub, not a blocked network.
        Err(_) => Err(SessionError::Unfinished { addr, after: whole }),
        Ok(Err(e)) => Err(SessionError::from_connection(e, &at)),
        Ok(Ok(c)) => Ok(Session::from(c)),
    }
}

/// The TLS handshake with the hub over TCP: straight to `addr`, or through `proxy` with
/// `CONNECT host:port` (the proxy resolves the name), within the handshake timeout.
pub async fn dial_tcp(
    addr: SocketAddr,
    host: &str,
    server_name: &str,
    config: &AgentConfig,
    proxy: Option<&ProxyUrl>,
) -> Result<Session, SessionError> {
    let at = Attempt {
        addr,
        server_name,
        agent: &config.name,
        patience: config.limits.handshake_timeout,
    };
    let limits = &config.limits;
    let dialed = match proxy {
        None => {
            tcp::connect_from(addr, config.bind_address, server_name, &config.tls, limits).await
        }
        Some(proxy) => {
            let tunnel = crate::transport::proxy::connect(
                proxy,
                host,
                addr.port(),
                limits.handshake_timeout,
            )
            .await
            .map_err(|e| SessionError::Proxy(e.to_string()))?;
            let work = tcp::connect_over(tunnel, addr, server_name, &config.tls, limits);
            tokio::time::timeout(limits.handshake_timeout, work)
                .await
                .unwrap_or(Err(TcpError::Timeout {
                    addr,
                    limit: limits.handshake_timeout,
                }))
        }
    };
    match dialed {
        Ok(session) => Ok(Session::from(session)),
        Err(TcpError::Tls { failure, .. }) => Err(SessionError::Tls(explain_tls(&failure, &at))),
        // Dropped before TLS said anything: the hub is at its handshake cap or shutting down.
        Err(TcpError::Closed { .. }) => Err(SessionError::Busy(addr)),
        Err(TcpError::Connect { source, .. }) => Err(SessionError::TcpConnect {
            addr,
            reason: io_reason(&source),
        }),
        Err(TcpError::Timeout { limit, .. }) => Err(SessionError::TcpConnect {
            addr,
            reason: format!("no answer in {}", seconds(limit)),
        }),
        Err(e) => Err(SessionError::Connect(e.to_string())),
    }
}

/// A connection failure in the words of the messages: `connection refused`.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused".into(),
        ErrorKind::ConnectionReset => "connection reset".into(),
        ErrorKind::TimedOut => "timed out".into(),
        ErrorKind::PermissionDenied => "not permitted (a local firewall?)".into(),
        ErrorKind::HostUnreachable => "host unreachable".into(),
        ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

/// `5 s`, `1.5 s`: a duration as the fallback messages print it.
pub(crate) fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

/// Hello and the hub's answer on a session whose TLS handshake is done, whichever transport
/// carries it. Fails with the hub's reason when refused.
pub async fn register(
    connection: Session,
    addr: SocketAddr,
    server_name: &str,
    config: &AgentConfig,
    token: &Secret,
) -> Result<Established, SessionError> {
    let timeout = config.limits.handshake_timeout;
    let at = Attempt {
        addr,
        server_name,
        agent: &config.name,
        patience: timeout.min(config.limits.idle_timeout),
    };
    let hello = Control::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        name: config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        capabilities: config.capabilities.clone(),
        token: token.clone(),
    });
    let attempt = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(std::io::Error::other)?;
        // Heartbeats and control messages go out before any queued tunnel data.
        send.set_priority(CONTROL_PRIORITY);
        let frame = encode(&hello).map_err(|e| std::io::Error::other(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(std::io::Error::other)?;
        let reply = read_frame::<Control, _>(&mut recv).await;
        Ok::<_, std::io::Error>((send, recv, reply))
    };
    let outcome = tokio::time::timeout(timeout, attempt).await;
    // In TLS 1.3 the client finishes its handshake before the hub has checked the client
    // certificate, so a refusal often shows up only here, as the connection's close reason.
    let closed = |connection: &Session| SessionError::from_session(connection, &at);
    match outcome {
        Err(_) => {
            connection.close(CloseCode::HandshakeTimeout.code(), "no answer to hello");
            Err(SessionError::NoWelcome {
                addr,
                after: timeout,
            })
        }
        Ok(Err(e)) => Err(closed(&connection).unwrap_or(SessionError::Connect(e.to_string()))),
        Ok(Ok((send, recv, reply))) => match reply {
            Ok(Some(Control::Welcome(welcome))) => Ok(Established {
                connection,
                welcome,
                send,
                reader: control::control_reader(recv, config.max_frame),
                max_frame: config.max_frame,
                tunnel_streams: config.limits.tunnel_streams,
                rotations: None,
            }),
            Ok(Some(Control::Rejected { code, reason })) => {
                connection.close(code.code(), "rejected");
                Err(SessionError::Rejected { code, reason })
            }
            Ok(Some(other)) => {
                connection.close(CloseCode::Protocol.code(), "expected welcome");
                Err(SessionError::Protocol(format!(
                    "expected Welcome, got {}",
                    control::kind(&other)
                )))
            }
            Ok(None) | Err(_) => {
                // The hub closed: wait (briefly) for the close frame to learn why.
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.closed()).await;
                Err(closed(&connection).unwrap_or_else(|| {
                    SessionError::Protocol("control stream ended before Welcome".into())
                }))
            }
        },
    }
}

/// How an established session ended.
#[derive(Debug)]
pub struct SessionEnd {
    /// Readable reason.
    pub reason: String,
    /// The hub asked us to go away (shutdown): reconnect at once.
    pub going_away: bool,
}

/// How long a draining session waits after telling the hub `GoingAway` before it counts its
/// streams: a stream the hub opened just before it read the message still arrives.
const DRAIN_SETTLE: Duration = Duration::from_millis(500);

/// Serves an established session: heartbeats, tunnel streams and Kubernetes commands (and
/// inventory reports in cluster mode), until the connection ends or `cancel` fires.
///
/// When `drain` fires (the agent has made a newer session to the same hub), the session
/// tells the hub `GoingAway` so no new stream comes to it, lets the streams in flight finish,
/// then closes normally: make-before-break, no running transfer breaks.
///
/// With `tokens` (an agent holding OIDC client credentials), every token the refresher
/// publishes after the one this session registered with is sent to the hub as
/// `Reauthenticate`, so the session outlives each token without a reconnect.
pub async fn run(
    established: Established,
    dialer: Arc<Dialer>,
    kube: Option<Arc<KubeExecutor>>,
    agent: &str,
    tokens: Option<super::supervisor::OidcTokens>,
    cancel: &CancellationToken,
    drain: &CancellationToken,
) -> SessionEnd {
    let Established {
        connection,
        welcome,
        mut send,
        mut reader,
        max_frame,
        tunnel_streams,
        rotations,
    } = established;
    let heartbeat =
        Heartbeat::announced(welcome.heartbeat_interval_ms, welcome.heartbeat_timeout_ms);
    let streams = TaskTracker::new();
    let inventory = kube.as_ref().map(|kube| {
        tokio::spawn(
            report_inventory(connection.clone(), kube.clone())
                .instrument(tracing::info_span!("inventory")),
        )
    });
    let accept = async {
        // What the connection was set up with (`Limits::initial_tunnel_window`).
        let mut window = tunnel_streams.min(transport::INITIAL_TUNNEL_WINDOW);
        loop {
            match connection.accept_bi().await {
                Ok((send, recv)) => {
                    // The stream being accepted counts as open: `streams` does not hold it yet.
                    let open = streams.len() + 1;
                    if let Some(grown) =
                        transport::grown_tunnel_window(open, window, tunnel_streams)
                    {
                        window = grown;
                        connection.grant_streams(window);
                        debug!(open, window, "more tunnel streams granted to the hub");
                    }
                    let dialer = dialer.clone();
                    let kube = kube.clone();
                    let agent = agent.to_string();
                    let span = tracing::debug_span!("stream", stream = %send.id());
                    streams.spawn(
                        serve_stream(send, recv, dialer, kube, agent, max_frame).instrument(span),
                    );
                }
                Err(e) => return e,
            }
        }
    };
    let drained = async {
        drain.cancelled().await;
        tokio::time::sleep(DRAIN_SETTLE + connection.rtt().unwrap_or_default()).await;
        streams.close();
        streams.wait().await;
    };
    let (outbox, mut renewals) = crate::transport::outbox::channel(2);
    let reauthenticate = async {
        let Some(mut tokens) = tokens else {
            return std::future::pending().await;
        };
        // Ends only when the refresher is gone (the agent is stopping) or the session is.
        while tokens.changed().await.is_ok() {
            let current = tokens.borrow_and_update().clone();
            let Some(current) = current else { continue };
            let renewal = Control::Reauthenticate {
                token: current.token,
            };
            if outbox.send(renewal).await.is_err() {
                break;
            }
            debug!(token = current.number, "renewed OIDC token sent to the hub");
        }
        std::future::pending().await
    };
    let end = tokio::select! {
        end = heartbeat_loop_with(&connection, &mut send, &mut reader, heartbeat, Role::Agent, cancel, Some(drain), Some(&mut renewals), |event| match event {
            HeartbeatEvent::RotateToken(token) => {
                if let Some(rotations) = &rotations {
                    let _ = rotations.send(token);
                }
            }
            HeartbeatEvent::Paced(paced) => {
                debug!(interval = ?paced.interval, timeout = ?paced.timeout, "hub paced heartbeats");
            }
            _ => {}
        }) => end,
        // Never taken: the future above does not end.
        () = reauthenticate => ControlEnd::Cancelled,
        e = accept => ControlEnd::Stream(e.to_string()),
        () = drained => ControlEnd::Moved,
    };
    if let Some(path) = connection.path() {
        // Path facts for diagnosing throughput: MTU discovery's result and loss.
        debug!(
            mtu = path.mtu,
            lost_packets = path.lost_packets,
            "hub connection path"
        );
    }
    let closed = connection.close_reason();
    let going_away = matches!(
        closed,
        Some(transport::session::SessionEnd::ClosedByPeer { code, .. })
            if code == u64::from(CloseCode::GoingAway.code())
    );
    let reason = match closed {
        Some(transport::session::SessionEnd::ClosedByPeer { code, reason }) => {
            let code =
                CloseCode::from_code(code).map_or_else(|| code.to_string(), |c| c.to_string());
            format!("hub closed the session: {code}: {reason}")
        }
        Some(other) => other.to_string(),
        None => end.to_string(),
    };
    let code = match end {
        ControlEnd::Timeout(_) => CloseCode::HeartbeatTimeout,
        ControlEnd::Protocol(_) => CloseCode::Protocol,
        ControlEnd::FrameTooLarge(_) => {
            dialer.cap_refused("frame_size");
            CloseCode::Protocol
        }
        _ => CloseCode::Normal,
    };
    connection.close(code.code(), "agent closing");
    // An agent that is stopping exits right after: the close must reach the hub first.
    connection.flush_close(Duration::from_secs(1)).await;
    streams.close();
    if let Some(task) = inventory {
        task.abort();
    }
    SessionEnd { reason, going_away }
}

/// Reports the inventory when the session starts, then every interval and whenever a
/// command changed what it lists, until the connection ends.
async fn report_inventory(connection: Session, kube: Arc<KubeExecutor>) {
    let mut changes = kube.inventory_changes();
    loop {
        let inventory = kube.inventory().await;
        let sent = async {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            let frame = encode_limited(&AgentStream::Inventory(inventory), MAX_INVENTORY)
                .map_err(|e| e.to_string())?;
            send.write_all(&frame).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            // The hub finishes its side once it has stored the report.
            let _ = recv.read_to_end(16).await;
            Ok::<_, String>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), sent).await {
            Ok(Ok(())) => debug!("inventory reported"),
            Ok(Err(e)) => info!("inventory not reported: {e}"),
            Err(_) => info!("inventory not reported: hub did not take it in time"),
        }
        tokio::select! {
            _ = connection.closed() => return,
            _ = tokio::time::sleep(kube.inventory_interval()) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                kube.invalidate_inventory().await;
            }
        }
    }
}

/// One stream the hub opened: a tunnel (read `Open`, dial, answer, relay) or a Kubernetes
/// command.
async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    dialer: Arc<Dialer>,
    kube: Option<Arc<KubeExecutor>>,
    agent: String,
    max_frame: usize,
) {
    let header = match tokio::time::timeout(
        HEADER_TIMEOUT,
        read_frame_limited::<StreamHeader, _>(&mut recv, max_frame),
    )
    .await
    {
        Ok(Ok(Some(header))) => header,
        Ok(Ok(None)) => return,
        other => {
            let why = match other {
                Err(_) => "no stream header in time".to_string(),
                Ok(Err(e)) => {
                    if e.is_too_large() {
                        dialer.cap_refused("frame_size");
                    }
                    e.to_string()
                }
                Ok(Ok(_)) => "no header".to_string(),
            };
            info!("stream refused: {why}");
            send.reset(StreamCode::BadHeader.into());
            recv.stop(StreamCode::BadHeader.into());
            return;
        }
    };
    match header {
        StreamHeader::Tunnel(open) => serve_tunnel(send, recv, dialer, open).await,
        StreamHeader::Kube(header) => serve_command(send, recv, header, kube, &agent).await,
    }
}

/// One tunnel stream after its header: dial, answer, relay.
async fn serve_tunnel(mut send: SendStream, mut recv: RecvStream, dialer: Arc<Dialer>, open: Open) {
    // The host name is the SOCKS client's text: token-shaped parts are masked in logs, and
    // only when a line is written (`Masked` masks as it formats).
    let destination = format!("{}:{}", open.host, open.port);
    let tcp = match dialer.dial(&open).await {
        Ok(tcp) => tcp,
        Err(e) => {
            info!(destination = %Masked(&destination), code = ?e.code, "dial failed: {}", Masked(&e.message));
            let reply = OpenReply::Failed {
                code: e.code,
                message: e.message,
            };
            if let Ok(frame) = encode(&reply) {
                let _ = send.write_all(&frame).await;
            }
            let _ = send.finish();
            return;
        }
    };
    let bound = tcp
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let frame = match encode(&OpenReply::Opened { bound }) {
        Ok(f) => f,
        Err(_) => return,
    };
    if send.write_all(&frame).await.is_err() {
        recv.stop(StreamCode::Reset.into());
        return;
    }
    let outcome = relay(tcp, send, recv, None, |_, _| {}, std::future::pending()).await;
    match outcome.error {
        None => {
            debug!(destination = %Masked(&destination), sent = outcome.sent, received = outcome.received, "stream finished")
        }
        Some(e) => {
            debug!(destination = %Masked(&destination), sent = outcome.sent, received = outcome.received, "stream reset: {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_nothing_works_the_line_names_both_attempts() {
        let err = SessionError::Unreachable {
            addr: "203.0.113.7:443".parse().unwrap(),
            quic: format!("no answer in {}", seconds(Duration::from_secs(5))),
            tcp: io_reason(&std::io::ErrorKind::ConnectionRefused.into()),
        };
        assert_eq!(
            err.to_string(),
            "cannot reach the hub: QUIC to 203.0.113.7:443 (UDP): no answer in 5 s; \
             TCP to 203.0.113.7:443: connection refused"
        );
        assert_eq!(seconds(Duration::from_millis(1500)), "1.5 s");
    }

    #[test]
    fn a_busy_hub_is_a_transient_refusal_and_tls_failures_are_not() {
        let close = |code| {
            ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: bytes::Bytes::new(),
            })
        };
        let at = Attempt {
            addr: "127.0.0.1:4433".parse().unwrap(),
            server_name: "hub.example.com",
            agent: "edge",
            patience: Duration::from_secs(10),
        };
        let busy = SessionError::from_connection(
            close(quinn::TransportErrorCode::CONNECTION_REFUSED),
            &at,
        );
        assert!(matches!(busy, SessionError::Busy(_)), "{busy:?}");
        let abandoned =
            SessionError::from_connection(close(quinn::TransportErrorCode::APPLICATION_ERROR), &at);
        assert!(matches!(abandoned, SessionError::Busy(_)), "{abandoned:?}");
        let tls = SessionError::from_connection(close(quinn::TransportErrorCode::crypto(42)), &at);
        assert!(matches!(tls, SessionError::Tls(_)), "{tls:?}");
        // An application close: the hub's Hello deadline passed (busy), or a real refusal.
        let app = |code: CloseCode, reason: &'static [u8]| {
            ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: bytes::Bytes::from_static(reason),
            })
        };
        let late = SessionError::from_connection(
            app(CloseCode::HandshakeTimeout, b"no Hello in time"),
            &at,
        );
        assert!(matches!(late, SessionError::Busy(_)), "{late:?}");
        let dropped = SessionError::from_connection(app(CloseCode::Normal, b""), &at);
        assert!(matches!(dropped, SessionError::Busy(_)), "{dropped:?}");
        let revoked = SessionError::from_connection(
            app(CloseCode::CertificateRevoked, b"certificate revoked"),
            &at,
        );
        assert!(
            matches!(
                revoked,
                SessionError::Rejected {
                    code: CloseCode::CertificateRevoked,
                    ..
                }
            ),
            "{revoked:?}"
        );
    }

    #[test]
    fn a_quic_timeout_reports_how_long_the_agent_waited() {
        let at = Attempt {
            addr: "192.0.2.7:4433".parse().unwrap(),
            server_name: "hub.example.com",
            agent: "edge",
            patience: Duration::from_millis(1500),
        };
        let err = SessionError::from_connection(ConnectionError::TimedOut, &at);
        assert_eq!(
            err,
            SessionError::Timeout {
                addr: at.addr,
                after: Duration::from_millis(1500),
            }
        );
        assert!(
            err.to_string()
                .contains("no answer from the hub at 192.0.2.7:4433 within 1.5s"),
            "{err}"
        );
    }

    #[test]
    fn no_answer_says_quic_over_udp_and_what_to_check() {
        let err = SessionError::Timeout {
            addr: "192.0.2.7:4433".parse().unwrap(),
            after: Duration::from_secs(10),
        };
        let text = err.to_string();
        for part in [
            "no answer from the hub at 192.0.2.7:4433 within 10s",
            "QUIC, which is UDP",
            "hub is running and listening on UDP port 4433",
            "firewalls on the way allow UDP to 192.0.2.7:4433",
        ] {
            assert!(text.contains(part), "{part:?} in {text}");
        }
    }
}
