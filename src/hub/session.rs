//! One agent connection on the hub: the TLS handshake, the Hello/Welcome exchange with its
//! checks, registration, and heartbeats until the connection ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::admission::HandshakeSlot;
use super::registry::AgentSession;
use super::Shared;
use crate::auth::{AuthError, Scope};
use crate::certs;
use crate::proto::codec::{encode, read_frame_limited};
use crate::proto::{CloseCode, Control, Hello, Welcome, PROTOCOL_VERSION};
use crate::transport::control::{
    self, heartbeat_loop_with, ControlEnd, HeartbeatEvent, Role, CONTROL_PRIORITY,
};
use crate::transport::session::{SendStream, Session, SessionEnd, TransportKind};
use crate::transport::tcp::{TcpError, TcpHandshaker};

/// The close reason of a shutdown, as agents read it and both logs print it.
pub(crate) const SHUTDOWN_REASON: &str = "hub shutting down";

/// Why the hub refused an agent during the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// QUIC or TLS failed: wrong CA, no client certificate, expired certificate.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The QUIC and TLS handshake did not finish within its deadline.
    #[error("TLS handshake timed out")]
    TlsTimeout,
    /// The control stream and Hello did not arrive in time after TLS.
    #[error("no Hello in time")]
    Timeout,
    /// The agent never opened its control stream or sent Hello.
    #[error("no Hello: {0}")]
    NoHello(String),
    /// A check on Hello failed; the agent is told with this code.
    #[error("{reason}")]
    Refused {
        /// Close code sent to the agent.
        code: CloseCode,
        /// Readable reason, sent to the agent and logged.
        reason: String,
    },
}

impl HandshakeError {
    fn refused(code: CloseCode, reason: impl Into<String>) -> Self {
        HandshakeError::Refused {
            code,
            reason: reason.into(),
        }
    }

    /// The metric label for this failure.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Tls(_) => "tls",
            HandshakeError::TlsTimeout => "tls_timeout",
            HandshakeError::Timeout => "timeout",
            HandshakeError::NoHello(_) => "no_hello",
            HandshakeError::Refused { code, .. } => code.as_str(),
        }
    }
}

/// Serves one incoming QUIC agent connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
    cancel: CancellationToken,
    handshake_slot: HandshakeSlot,
) {
    let remote = incoming.remote_address();
    // The TLS phase has its own short deadline: a sender that starts handshakes and never
    // finishes them frees its slot soon, whatever time Hello is allowed.
    let tls_deadline = tokio::time::Instant::now() + shared.config.caps.tls_timeout;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            failed(
                &shared,
                remote,
                &HandshakeError::Tls(format!("refused before the handshake: {e}")),
            );
            return;
        }
    };
    let connection = match tokio::time::timeout_at(tls_deadline, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            match (&e, crate::transport::tls::tls_failure(&e)) {
                // The agent gave up (its own timeout, or it is stopping): not a refusal.
                (quinn::ConnectionError::ApplicationClosed(_), _) => {
                    shared.metrics.handshake_failed("tls");
                    info!("agent at {remote} ended its handshake: {e}");
                }
                (_, Some(failure)) => failed(
                    &shared,
                    remote,
                    &HandshakeError::Tls(crate::transport::tls::explain_for_hub(&failure, remote)),
                ),
                _ => failed(&shared, remote, &HandshakeError::Tls(e.to_string())),
            }
            return;
        }
        Err(_) => {
            // Dropping `connecting` abandons the connection: a peer that never finished TLS
            // gets one close packet and nothing more.
            failed(&shared, remote, &HandshakeError::TlsTimeout);
            return;
        }
    };
    if let Some(enroller) = shared.enroller.clone() {
        let alpn = crate::transport::tls::negotiated_alpn(&connection);
        if let Some(exchange) = alpn.as_deref().and_then(super::enroll::Exchange::of_alpn) {
            let session = Session::from(connection);
            // Boxed: an enrollment's state would otherwise size every session's task.
            Box::pin(super::enroll::serve(
                shared,
                enroller,
                session,
                handshake_slot,
                exchange,
            ))
            .await;
            return;
        }
    }
    serve_session(shared, Session::from(connection), cancel, handshake_slot).await;
}

/// Serves one incoming TLS/TCP agent connection to its end.
pub(crate) async fn serve_tcp(
    shared: Arc<Shared>,
    server: Arc<TcpHandshaker>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    cancel: CancellationToken,
    handshake_slot: HandshakeSlot,
) {
    let tls_deadline = tokio::time::Instant::now() + shared.config.caps.tls_timeout;
    let session = match tokio::time::timeout_at(tls_deadline, server.handshake(tcp, remote)).await {
        Ok(Ok(s)) => s,
        Ok(Err(TcpError::Tls { failure, .. })) => {
            let line = crate::transport::tls::explain_for_hub(&failure, remote);
            failed(&shared, remote, &HandshakeError::Tls(line));
            return;
        }
        Ok(Err(TcpError::Timeout { .. })) | Err(_) => {
            failed(&shared, remote, &HandshakeError::TlsTimeout);
            return;
        }
        Ok(Err(e)) => {
            failed(&shared, remote, &HandshakeError::Tls(e.to_string()));
            return;
        }
    };
    // Enrollment and renewal over the TLS/TCP fallback, as on QUIC.
    if let (Some(enroller), Some(exchange)) = (
        shared.enroller.clone(),
        super::enroll::Exchange::of_alpn(session.alpn()),
    ) {
        let session = Session::from(session);
        // Boxed, as on QUIC: only an enrollment pays for its state.
        Box::pin(super::enroll::serve(
            shared,
            enroller,
            session,
            handshake_slot,
            exchange,
        ))
        .await;
        return;
    }
    serve_session(shared, Session::from(session), cancel, handshake_slot).await;
}

/// Counts a failed handshake and logs it through the hub's rate limit: a flood of them must
/// not become a flood of log lines. The counters see every one.
fn failed(shared: &Shared, remote: SocketAddr, err: &HandshakeError) {
    shared.metrics.handshake_failed(err.label());
    shared
        .failure_log
        .failed(err.label(), format_args!("{err} (from {remote})"));
}

/// Hello, registration and heartbeats on a session whose TLS handshake is done, whichever
/// transport carries it.
async fn serve_session(
    shared: Arc<Shared>,
    connection: Session,
    cancel: CancellationToken,
    handshake_slot: HandshakeSlot,
) {
    let remote = connection.remote_address();
    let hello_deadline = tokio::time::Instant::now() + shared.config.caps.hello_timeout;
    // Boxed and gone once it returns: a future's state machine is as large as its largest
    // await point, and the handshake's (token and OIDC checks) is larger than that of the
    // heartbeat loop an idle session spends its life in, so unboxed it would size the task
    // every idle agent holds on the hub.
    let handshaken = Box::pin(handshake(&shared, &connection, hello_deadline)).await;
    drop(handshake_slot);
    let (session, mut send, mut reader) = match handshaken {
        Ok(ok) => ok,
        Err(err) => {
            failed(&shared, remote, &err);
            match &err {
                HandshakeError::Refused { code, reason } => {
                    connection.close(code.code(), reason);
                }
                HandshakeError::Timeout => {
                    connection.close(CloseCode::HandshakeTimeout.code(), "handshake timed out");
                }
                _ => {
                    connection.close(CloseCode::Protocol.code(), "no hello");
                }
            }
            return;
        }
    };
    let span = tracing::info_span!("agent", agent = %session.name, tenant = %session.tenant,
        session = session.id, transport = %connection.transport());
    run_session(shared, session, &mut send, &mut reader, cancel)
        .instrument(span)
        .await;
}

async fn run_session(
    shared: Arc<Shared>,
    session: Arc<AgentSession>,
    send: &mut SendStream,
    reader: &mut control::ControlReader,
    cancel: CancellationToken,
) {
    let metric_agent = shared
        .config
        .metrics_per_agent
        .then(|| session.name.clone());
    let transport = session.connection.transport().as_str();
    shared
        .metrics
        .session_opened(session.tenant.as_str(), metric_agent.as_deref(), transport);
    let tls = if session.connection.tls_resumed() {
        shared.metrics.tls_resumed();
        "resumed"
    } else {
        "full"
    };
    info!(version = %session.version, os = %session.os, arch = %session.arch,
        remote = %session.connection.remote_address(), transport = %session.connection.transport(),
        tls = %tls, "agent connected");

    // What the session was told in Welcome; `Pace` messages from the outbox update it.
    let heartbeat = super::pace::paced_heartbeat(
        session.heartbeat_interval(),
        shared.config.heartbeat.timeout,
    );
    let mut outbox = session.control_outbox();
    // A QUIC agent that takes the hub's acknowledgements as life gets no pongs: one datagram
    // fewer each way per ping (docs/protocol.md, "Heartbeats").
    let pongs = session.connection.transport() != TransportKind::Quic
        || !session
            .capabilities
            .iter()
            .any(|c| c == crate::proto::ACK_LIVENESS);
    let end = tokio::select! {
        end = heartbeat_loop_with(&session.connection, send, reader, heartbeat, Role::Hub { pongs }, &cancel, None, outbox.as_mut(), |event| match event {
            HeartbeatEvent::Seen => session.heard(),
            HeartbeatEvent::Pinged => {
                shared.metrics.heartbeat_received();
                // The hub no longer pings a live agent, so the transport's smoothed round
                // trip (QUIC's, or the TCP mux's) stands in for a ping's.
                if let Some(rtt) = session.connection.rtt().filter(|r| !r.is_zero()) {
                    session.set_rtt(rtt);
                    shared.metrics.heartbeat_rtt(rtt.as_secs_f64());
                }
            }
            HeartbeatEvent::PingSent => shared.metrics.heartbeat_sent(),
            HeartbeatEvent::Paced(_) => {}
            HeartbeatEvent::GoingAway => {
                info!("agent moves to a newer session: no new streams here");
                session.set_draining();
            }
            HeartbeatEvent::Rtt(rtt) => {
                session.set_rtt(rtt);
                shared.metrics.heartbeat_rtt(rtt.as_secs_f64());
            }
            HeartbeatEvent::Reauthenticate(token) => {
                // Verifying may fetch issuer keys: off the heartbeat loop.
                let (shared, session) = (shared.clone(), session.clone());
                tokio::spawn(
                    async move { super::credential::reauthenticate(&shared, &session, &token).await }
                        .in_current_span(),
                );
            }
            // Only the hub rotates tokens; one coming from an agent is ignored.
            HeartbeatEvent::RotateToken(_) => debug!("ignoring RotateToken sent by the agent"),
        }) => end,
        // The connection can end without the control stream noticing first (close frame).
        reason = session.connection.closed() => ControlEnd::Stream(reason.to_string()),
    };
    // A stopping hub cancels its sessions and then closes the QUIC endpoint with the same
    // `going_away`: a session that saw its connection end before it saw the cancellation
    // ended for the shutdown all the same, and reads so in this log and the metric.
    let end = match end {
        ControlEnd::Stream(_) if cancel.is_cancelled() => ControlEnd::Cancelled,
        end => end,
    };
    // Forget the session before anything else, so no new stream is routed to it.
    shared.registry.remove(&session);
    if matches!(end, ControlEnd::FrameTooLarge(_)) && session.closed_by_hub().is_none() {
        shared.metrics.cap_refused("frame_size");
    }
    let agent_closed = matches!(
        session.connection.close_reason(),
        Some(SessionEnd::ClosedByPeer { .. })
    );
    let (code, label) = session_end(&end, session.closed_by_hub(), agent_closed);
    // A shutdown reads the same to the agent, in this log and in the hub's own shutdown line;
    // the metric label stays `hub_shutdown`.
    let detail = match end {
        ControlEnd::Cancelled => SHUTDOWN_REASON.to_string(),
        other => other.to_string(),
    };
    session.close(
        code,
        if code == CloseCode::GoingAway {
            SHUTDOWN_REASON
        } else {
            label
        },
    );
    // A hub that is stopping exits right after: the close must reach a TCP agent first.
    session.connection.flush_close(Duration::from_secs(1)).await;
    shared.metrics.session_closed(
        session.tenant.as_str(),
        metric_agent.as_deref(),
        label,
        transport,
    );
    info!(reason = label, detail = %detail,
        streams = session.streams_total(), "agent disconnected");
}

/// How a session that ended with `end` is closed and counted: the close code and the metric
/// label. A close the hub already decided (`closed_by_hub`: revocation, a cap) wins;
/// `agent_closed` says the agent closed the connection itself, which tells an orderly end
/// from a lost connection when the control stream merely failed.
fn session_end(
    end: &ControlEnd,
    closed_by_hub: Option<CloseCode>,
    agent_closed: bool,
) -> (CloseCode, &'static str) {
    match (end, closed_by_hub) {
        (_, Some(code)) => (code, code.as_str()),
        (ControlEnd::Timeout(_), _) => (CloseCode::HeartbeatTimeout, "heartbeat_timeout"),
        (ControlEnd::Protocol(_) | ControlEnd::FrameTooLarge(_), _) => {
            (CloseCode::Protocol, "protocol_error")
        }
        (ControlEnd::Cancelled, _) => (CloseCode::GoingAway, "hub_shutdown"),
        (ControlEnd::PeerFinished | ControlEnd::Moved, _) => (CloseCode::Normal, "agent_closed"),
        (ControlEnd::Stream(_), _) if agent_closed => (CloseCode::Normal, "agent_closed"),
        (ControlEnd::Stream(_), _) => (CloseCode::Normal, "connection_lost"),
    }
}

async fn handshake(
    shared: &Arc<Shared>,
    connection: &Session,
    deadline: tokio::time::Instant,
) -> Result<(Arc<AgentSession>, SendStream, control::ControlReader), HandshakeError> {
    let chain = connection.peer_certificates().unwrap_or_default();
    // A full handshake checked the validity period; a resumed one took the chain from its
    // ticket, which may be older than the certificate's end, so only that one is checked.
    if connection.tls_resumed() {
        crate::certs::chain_valid_at(&chain, SystemTime::now())
            .map_err(|e| HandshakeError::refused(CloseCode::CertificateExpired, e))?;
    }
    let cert = chain.into_iter().next().ok_or_else(|| {
        HandshakeError::refused(CloseCode::CertificateMismatch, "no client certificate")
    })?;
    let cert_name = certs::common_name(cert.as_ref()).map_err(|e| {
        HandshakeError::refused(
            CloseCode::CertificateMismatch,
            format!("client certificate: {e}"),
        )
    })?;
    // An enrolled certificate is short-lived by design (30 days): it is warned about once it
    // is due for renewal, not from its first day as the 30-day rule would.
    let now = SystemTime::now();
    let due = crate::enroll::renewal_due(cert.as_ref(), now);
    if let (Ok(not_after), None | Some(true)) = (certs::not_after(cert.as_ref()), due) {
        let what = format!("the certificate of agent {cert_name}");
        if let Some(warning) = certs::expiry_warning(&what, not_after, now) {
            warn!("{warning}");
        }
    }

    let (mut send, mut recv) = tokio::time::timeout_at(deadline, connection.accept_bi())
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(|e| HandshakeError::NoHello(e.to_string()))?;
    // Heartbeats and control messages go out before any queued tunnel data.
    send.set_priority(CONTROL_PRIORITY);
    let max_frame = shared.config.caps.max_frame;
    let hello = match tokio::time::timeout_at(
        deadline,
        read_frame_limited::<Control, _>(&mut recv, max_frame),
    )
    .await
    {
        Err(_) => return Err(HandshakeError::Timeout),
        Ok(Err(e)) => {
            if e.is_too_large() {
                shared.metrics.cap_refused("frame_size");
            }
            let err = HandshakeError::refused(CloseCode::Protocol, format!("bad Hello frame: {e}"));
            if e.is_over_bound() {
                shared.metrics.cap_refused("decoded_size");
                // The frame was read whole: the agent can still be told why in-band.
                return Err(reject(connection, &mut send, err).await);
            }
            return Err(err);
        }
        Ok(Ok(None)) => return Err(HandshakeError::NoHello("control stream ended".into())),
        Ok(Ok(Some(Control::Hello(hello)))) => hello,
        Ok(Ok(Some(other))) => {
            return Err(HandshakeError::refused(
                CloseCode::Protocol,
                format!("expected Hello, got {}", control::kind(&other)),
            ))
        }
    };

    let caller = match check_hello(shared, &hello, &cert_name, cert.as_ref()).await {
        Ok(caller) => caller,
        Err(err) => return Err(reject(connection, &mut send, err).await),
    };
    let grant = caller.grant;

    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let session = Arc::new(AgentSession::new(
        id,
        grant.tenant,
        hello.name,
        hello.version,
        hello.os,
        hello.arch,
        hello.capabilities,
        grant.token_id,
        connection.clone(),
    ));
    if let Some(exp) = caller.expires_at {
        session.set_credential_expiry(exp);
    }
    // Streams the agent opens (inventory reports) end with its connection, also when it is
    // refused below. Started before the session is visible in the registry, so a
    // registered session is fully set up.
    tokio::spawn(
        super::kube_channel::accept_agent_streams(shared.clone(), session.clone())
            .instrument(tracing::info_span!("agent", agent = %session.name, tenant = %session.tenant, session = id)),
    );
    // Registered before Welcome, so the caps are checked and the slot taken in one step.
    let caps = &shared.config.caps;
    if let Err(cap) = shared.registry.admit(
        session.clone(),
        caps.sessions_per_agent,
        caps.sessions_per_token,
    ) {
        shared.metrics.cap_refused(cap.label());
        let err = HandshakeError::refused(
            CloseCode::TooManySessions,
            format!(
                "agent {:?} in {}: {cap}",
                session.name,
                session.tenant.as_str()
            ),
        );
        return Err(reject(connection, &mut send, err).await);
    }
    // Paced by the fleet this session just joined (it is counted).
    let pace = super::pace::current(shared);
    session.set_heartbeat_interval(pace.interval);
    let welcome = Welcome {
        session_id: id,
        heartbeat_interval_ms: duration_ms(pace.interval),
        heartbeat_timeout_ms: duration_ms(pace.timeout),
        tenant: session.tenant.to_string(),
    };
    let sent = match encode(&Control::Welcome(welcome)) {
        Ok(frame) => send
            .write_all(&frame)
            .await
            .map_err(|e| HandshakeError::NoHello(e.to_string())),
        Err(e) => Err(HandshakeError::NoHello(e.to_string())),
    };
    if let Err(e) = sent {
        shared.registry.remove(&session);
        return Err(e);
    }
    Ok((session, send, control::control_reader(recv, max_frame)))
}

/// Tells the agent in-band why it is refused (the close frame carries the same code), then
/// hands the error back for the caller to close the connection with.
async fn reject(
    connection: &Session,
    send: &mut SendStream,
    err: HandshakeError,
) -> HandshakeError {
    if let HandshakeError::Refused { code, reason } = &err {
        let msg = Control::Rejected {
            code: *code,
            reason: reason.clone(),
        };
        if let Ok(frame) = encode(&msg) {
            let _ = send.write_all(&frame).await;
            let _ = send.finish();
            // Give the frame a moment to reach the agent before the close.
            let _ = tokio::time::timeout(Duration::from_millis(500), connection.closed()).await;
        }
    }
    err
}

pub(super) fn duration_ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The checks on Hello, in order: protocol version, name, certificate subject, token (an
/// opaque token or a JWT from a trusted issuer).
async fn check_hello(
    shared: &Shared,
    hello: &Hello,
    cert_name: &str,
    cert_der: &[u8],
) -> Result<super::credential::Caller, HandshakeError> {
    check_identity(hello, cert_name)?;
    let caller = super::credential::authorize(shared, hello.token.expose(), Scope::ConnectAgentHub)
        .await
        .map_err(|e| {
            HandshakeError::refused(e.close_code(), format!("agent {:?}: {e}", hello.name))
        })?;
    check_bound_tenant(cert_der, &caller.grant.tenant, &hello.name)?;
    if let Some(serial) = revoked_serial(shared, cert_der) {
        return Err(HandshakeError::refused(
            CloseCode::CertificateRevoked,
            format!("agent {:?}: certificate {serial} is revoked", hello.name),
        ));
    }
    Ok(caller)
}

/// The serial of an enrolled certificate that is on the hub's revocation list.
pub(crate) fn revoked_serial(shared: &Shared, cert_der: &[u8]) -> Option<String> {
    let list = match &shared.shared_state {
        Some(state) => state.revocations(),
        None => shared.enroller.as_ref()?.revocations(),
    };
    let identity = crate::enroll::agent_identity(cert_der).ok()?;
    list.is_revoked(&identity.serial).then_some(identity.serial)
}

/// An enrolled agent's certificate carries its tenant (`rna://tenant/<org>/<env>/agent/…`),
/// and only a token of that tenant may go with it, so a certificate of tenant A never serves
/// tenant B. Certificates without that name (`rna certs agent`) have no tenant to check.
fn check_bound_tenant(
    cert_der: &[u8],
    tenant: &crate::auth::Tenant,
    agent: &str,
) -> Result<(), HandshakeError> {
    match crate::enroll::agent_identity(cert_der) {
        Ok(identity) if identity.tenant != *tenant => Err(HandshakeError::refused(
            CloseCode::TenantMismatch,
            format!(
                "agent {agent:?}: its certificate is bound to tenant {}, its token is for {tenant}",
                identity.tenant
            ),
        )),
        _ => Ok(()),
    }
}

/// The checks on Hello that need no token store: protocol version, name, certificate subject.
fn check_identity(hello: &Hello, cert_name: &str) -> Result<(), HandshakeError> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(HandshakeError::refused(
            CloseCode::VersionMismatch,
            format!(
                "agent speaks protocol {}, hub speaks {PROTOCOL_VERSION}",
                hello.protocol
            ),
        ));
    }
    if !crate::identity::valid_agent_name(&hello.name) {
        return Err(HandshakeError::refused(
            CloseCode::BadName,
            "agent name must match ^[A-Za-z0-9_-]{1,63}$",
        ));
    }
    if hello.name != cert_name {
        return Err(HandshakeError::refused(
            CloseCode::CertificateMismatch,
            format!(
                "agent calls itself {:?} but its certificate names {:?}",
                hello.name, cert_name
            ),
        ));
    }
    Ok(())
}

/// The close code an agent whose token failed with `e` is refused with.
pub(super) fn token_close(e: &AuthError) -> CloseCode {
    match e {
        AuthError::Malformed | AuthError::Unknown => CloseCode::BadToken,
        AuthError::Revoked => CloseCode::TokenRevoked,
        AuthError::Expired => CloseCode::TokenExpired,
        AuthError::MissingScope(_) => CloseCode::MissingScope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    #[test]
    fn a_session_end_maps_to_one_close_code_and_label() {
        let stream = || ControlEnd::Stream("connection lost".into());
        let cases: Vec<(ControlEnd, Option<CloseCode>, bool, CloseCode, &str)> = vec![
            // What the hub already decided wins over how the control stream ended.
            (
                stream(),
                Some(CloseCode::TokenRevoked),
                false,
                CloseCode::TokenRevoked,
                "token_revoked",
            ),
            (
                ControlEnd::Cancelled,
                Some(CloseCode::TooManySessions),
                false,
                CloseCode::TooManySessions,
                "too_many_sessions",
            ),
            (
                ControlEnd::Timeout(Duration::from_secs(8)),
                None,
                false,
                CloseCode::HeartbeatTimeout,
                "heartbeat_timeout",
            ),
            (
                ControlEnd::Protocol("bad frame".into()),
                None,
                false,
                CloseCode::Protocol,
                "protocol_error",
            ),
            (
                ControlEnd::FrameTooLarge("too long".into()),
                None,
                false,
                CloseCode::Protocol,
                "protocol_error",
            ),
            (
                ControlEnd::Cancelled,
                None,
                false,
                CloseCode::GoingAway,
                "hub_shutdown",
            ),
            (
                ControlEnd::PeerFinished,
                None,
                false,
                CloseCode::Normal,
                "agent_closed",
            ),
            // A failed control stream is an orderly end only if the agent closed the connection.
            (stream(), None, true, CloseCode::Normal, "agent_closed"),
            (stream(), None, false, CloseCode::Normal, "connection_lost"),
        ];
        for (end, by_hub, agent_closed, code, label) in cases {
            assert_eq!(
                session_end(&end, by_hub, agent_closed),
                (code, label),
                "{end:?} closed by hub {by_hub:?}, agent closed {agent_closed}"
            );
        }
    }

    fn hello(protocol: u16, name: &str) -> Hello {
        Hello {
            protocol,
            name: name.into(),
            version: "0.1.0".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            capabilities: Vec::new(),
            token: Secret::new("rna_x".into()),
        }
    }

    #[test]
    fn hello_checks_refuse_with_the_code_of_the_first_failure() {
        let v = PROTOCOL_VERSION;
        let long = "a".repeat(64);
        let cases: Vec<(Hello, &str, Option<CloseCode>)> = vec![
            (hello(v, "edge"), "edge", None),
            (
                hello(v + 1, "edge"),
                "edge",
                Some(CloseCode::VersionMismatch),
            ),
            // The version is checked before anything else.
            (
                hello(v + 1, "bad name"),
                "other",
                Some(CloseCode::VersionMismatch),
            ),
            (hello(v, "bad name"), "bad name", Some(CloseCode::BadName)),
            (hello(v, ""), "", Some(CloseCode::BadName)),
            (hello(v, &long), &long, Some(CloseCode::BadName)),
            (
                hello(v, "edge"),
                "other",
                Some(CloseCode::CertificateMismatch),
            ),
            (
                hello(v, "edge"),
                "Edge",
                Some(CloseCode::CertificateMismatch),
            ),
        ];
        for (hello, cert, want) in cases {
            let got = match check_identity(&hello, cert) {
                Ok(()) => None,
                Err(HandshakeError::Refused { code, .. }) => Some(code),
                Err(other) => panic!("{other:?}"),
            };
            assert_eq!(
                got, want,
                "Hello {:?} v{} with certificate {cert:?}",
                hello.name, hello.protocol
            );
        }
    }

    #[test]
    fn token_failures_map_to_their_close_codes() {
        let cases = [
            (AuthError::Malformed, CloseCode::BadToken),
            // Unknown and malformed look the same to the agent.
            (AuthError::Unknown, CloseCode::BadToken),
            (AuthError::Revoked, CloseCode::TokenRevoked),
            (AuthError::Expired, CloseCode::TokenExpired),
            (
                AuthError::MissingScope(Scope::ConnectAgentHub),
                CloseCode::MissingScope,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(token_close(&err), code, "{err}");
        }
    }

    #[test]
    fn handshake_failures_have_distinct_metric_labels() {
        let cases = [
            (HandshakeError::Tls("x".into()), "tls"),
            (HandshakeError::TlsTimeout, "tls_timeout"),
            (HandshakeError::Timeout, "timeout"),
            (HandshakeError::NoHello("x".into()), "no_hello"),
            (
                HandshakeError::refused(CloseCode::BadToken, "x"),
                CloseCode::BadToken.as_str(),
            ),
        ];
        for (err, label) in cases {
            assert_eq!(err.label(), label, "{err:?}");
        }
    }
}
