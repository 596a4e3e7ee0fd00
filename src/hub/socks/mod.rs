//! The SOCKS5 front (RFC 1928 with RFC 1929 user/password): the user name names the agent
//! (`agent`, or `agent@organization/environment` for an `admin` token), the password is a
//! token with scope `proxy`; CONNECT is routed to the agent, whose answer becomes the SOCKS
//! reply. Parsing is fast-socks5's low-level protocol steps; the RFC 1929 sub-negotiation is
//! ours, so authentication is async, bounded and never logs the password. A connection lives
//! only as long as its token: revoking it (or its expiry) resets the connection.

mod auth;
mod limits;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use fast_socks5::server::{states, Socks5ServerProtocol, SocksServerError};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument};

use super::router::{self, RouteError};
use super::{NoAuthRoute, Shared};
use crate::auth::{Masked, TokenStore};
use crate::listen::Acceptor;
use crate::proto::{Host, Open};
use crate::transport::relay::{relay_after, Direction, RelayError};
use crate::transport::session::RecvStream;
pub use auth::describe_user;
use auth::{greet, Caller, Greeting};
pub(crate) use limits::TokenStreams;
use limits::{HalfOpen, HalfOpenGuard};

/// Why a SOCKS client was turned away before its request was routed.
#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    /// The bytes did not follow RFC 1928/1929.
    #[error("malformed SOCKS5 handshake: {0}")]
    Protocol(#[from] SocksServerError),
    /// RFC 1929 sub-negotiation was malformed.
    #[error("malformed RFC 1929 authentication: {0}")]
    Auth(&'static str),
    /// The credentials were refused.
    #[error("authentication refused for {who}: {reason}")]
    Refused {
        /// The user name as it may be logged ([`describe_user`]): quoted when it is an agent
        /// name, otherwise only its length.
        who: String,
        /// Why (never the password).
        reason: String,
    },
    /// Reading the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The SOCKS5 listener and its per-client bounds.
pub(crate) struct SocksFront {
    shared: Arc<Shared>,
    listener: Acceptor,
    half_open: Arc<HalfOpen>,
}

impl SocksFront {
    pub(crate) fn new(shared: Arc<Shared>, listener: TcpListener) -> Self {
        let limits = &shared.config.socks_limits;
        let half_open = Arc::new(HalfOpen::new(
            limits.half_open_per_ip,
            limits.half_open_total,
        ));
        SocksFront {
            shared,
            listener: Acceptor::new(listener, "SOCKS5"),
            half_open,
        }
    }

    /// Accepts until `stop` fires; every connection runs in `streams` so shutdown can drain
    /// them.
    pub(crate) async fn run(mut self, stop: CancellationToken, streams: TaskTracker) {
        loop {
            // Accept errors (EMFILE and the like) back off and are logged at most once a
            // second inside the acceptor, so the connections we have keep being served.
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (guard, evicted) = match self.half_open.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(reason) => {
                    self.shared.metrics.socks_refused(reason);
                    debug!(client = %peer, "SOCKS connection refused: {reason}");
                    drop(tcp);
                    continue;
                }
            };
            if let Some(source) = evicted {
                self.shared.metrics.socks_refused("half_open_total");
                debug!(client = %peer, evicted = %source,
                    "SOCKS greeting limit reached: dropped the oldest half-open connection of the busiest source");
            }
            let shared = self.shared.clone();
            streams.spawn(
                handle(shared, tcp, peer, guard)
                    .instrument(tracing::debug_span!("socks", client = %peer)),
            );
        }
    }
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, guard: HalfOpenGuard) {
    let timeout = shared.config.socks_limits.greeting_timeout;
    let no_auth = shared.config.socks_no_auth.as_ref();
    let greeting = tokio::time::timeout(timeout, greet(&*shared.tokens, no_auth, tcp));
    let greeted = tokio::select! {
        greeted = greeting => greeted,
        () = guard.dropped.cancelled() => {
            // Counted when it was chosen (`half_open_total`), where the newcomer is known.
            debug!(client = %peer, "SOCKS client dropped: oldest half-open connection of the busiest source, to make room");
            return;
        }
    };
    drop(guard);
    let (proto, caller, cmd, target) = match greeted {
        Err(_) => {
            shared.metrics.socks_refused("greeting_timeout");
            info!(client = %peer, "SOCKS client dropped: greeting not completed within {timeout:?}");
            return;
        }
        Ok(Err(e)) => {
            let reason = match &e {
                GreetError::Refused { .. } => "auth_refused",
                _ => "bad_greeting",
            };
            shared.metrics.socks_refused(reason);
            info!(client = %peer, "SOCKS client refused: {}", Masked(&e.to_string()));
            return;
        }
        Ok(Ok(request)) => request,
    };
    let agent = caller.agent.clone();
    let span = tracing::info_span!("stream", agent = %agent, tenant = %caller.tenant,
        stream = tracing::field::Empty);
    serve_request(shared, proto, caller, cmd, target, peer)
        .instrument(span)
        .await;
}

async fn serve_request(
    shared: Arc<Shared>,
    proto: Socks5ServerProtocol<Greeting<TcpStream>, states::CommandRead>,
    caller: Caller,
    cmd: Socks5Command,
    target: TargetAddr,
    peer: SocketAddr,
) {
    if cmd != Socks5Command::TCPConnect {
        shared.metrics.socks_reply(reply_name(0x07));
        info!(client = %peer, "SOCKS {cmd:?} refused: command not supported");
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        return;
    }
    let open = match to_open(target) {
        Ok(open) => open,
        Err((code, why)) => {
            shared.metrics.socks_reply(reply_name(code));
            info!(client = %peer, "SOCKS request refused: {}", Masked(&why));
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    let destination = format!("{}:{}", open.host, open.port);
    let destination = Masked(&destination);
    // Joined before the token is checked again, so a revocation landing between the check
    // and the end of the relay still resets this connection.
    let token_cut = caller
        .token_id
        .as_ref()
        .map(|id| shared.socks_tokens.enter(id));
    if let Some(id) = &caller.token_id {
        if !shared.tokens.current().is_live(id, SystemTime::now()) {
            shared.metrics.socks_reply(reply_name(0x02));
            info!(client = %peer, %destination, token_id = %id,
                "SOCKS request refused: token revoked or expired since authentication");
            let _ = proto.reply_error(&reply_error(0x02)).await;
            return;
        }
    }
    let routed = if caller.foreign {
        Err(RouteError::NoAgent)
    } else {
        router::open_tunnel(&shared, &caller.tenant, &caller.agent, &open).await
    };
    let tunnel = match routed {
        Ok(t) => t,
        Err(e) => {
            let code = e.socks_reply();
            shared.metrics.socks_reply(reply_name(code));
            match &e {
                RouteError::NoAgent => {
                    info!(client = %peer, %destination, "SOCKS request refused: agent not connected")
                }
                other => info!(client = %peer, %destination, "SOCKS request failed: {}",
                    Masked(&other.to_string())),
            }
            let _ = proto.reply_error(&reply_error(code)).await;
            return;
        }
    };
    if token_cut.as_ref().is_some_and(|cut| cut.is_cancelled()) {
        shared.metrics.socks_reply(reply_name(0x02));
        info!(client = %peer, %destination,
            "SOCKS request refused: token revoked or expired while the agent dialed");
        router::abort(tunnel.send, tunnel.recv);
        let _ = proto.reply_error(&reply_error(0x02)).await;
        return;
    }
    let router::Tunnel {
        slot,
        send,
        recv,
        answer,
    } = tunnel;
    // An early reply (the agent reached this destination lately) names no bound address,
    // as OpenSSH's dynamic forwarding does; the agent's answer is read before its first byte.
    let (bound, early_answer) = match answer {
        router::Answer::Opened(bound) => (bound, None),
        router::Answer::Pending(asked) => (SocketAddr::from(([0, 0, 0, 0], 0)), Some(asked)),
    };
    let client = match proto.reply_success(bound).await {
        Ok(client) => client,
        Err(e) => {
            debug!("SOCKS client gone before the reply: {e}");
            router::abort(send, recv);
            return;
        }
    };
    shared.metrics.socks_reply(reply_name(0x00));
    let metrics = shared.metrics.clone();
    let session = slot.session().clone();
    // Bytes the client sent right behind its request (without waiting for the reply) may
    // sit in the greeting buffer: they go first, so the agent sees the client's bytes in
    // order; the rest is read from the socket by the relay.
    let early = Bytes::copy_from_slice(client.buffer());
    let tcp = client.into_inner();
    let mut send = send;
    if !early.is_empty() {
        let n = early.len();
        if let Err(e) = send.write_chunk(early).await {
            debug!(%destination, "stream reset before the relay: {e}");
            if early_answer.is_some() {
                early_reply_failed(&shared, &slot, &open, peer, &e.to_string());
            }
            // As the relay does on an error: the client gets an RST, never a clean end.
            let _ = tcp.set_zero_linger();
            router::abort(send, recv);
            return;
        }
        metrics.relayed(true, n);
        session.add_to_agent(n);
    }
    metrics.streams_open().inc();
    let stream_id = send.id();
    tracing::Span::current().record("stream", tracing::field::display(stream_id));
    let idle = Some(shared.config.caps.stream_idle_timeout);
    let cut = async {
        match &token_cut {
            Some(token) => tokio::select! {
                () = shared.cut_streams.cancelled() => {}
                () = token.cancelled() => {}
            },
            None => shared.cut_streams.cancelled().await,
        }
    };
    // For an early reply: set once the agent's answer said it connected. A relay that ends
    // without it (a failed answer, or the stream failed first) is a failed guess.
    let opened_early = std::sync::OnceLock::new();
    let first = async |recv: &mut RecvStream| {
        let Some(asked) = early_answer else {
            return Ok(());
        };
        router::answer(&shared, &slot, &open, recv, asked)
            .await
            .map_err(|e| e.to_string())?;
        shared.metrics.socks_early_reply("opened");
        let _ = opened_early.set(());
        Ok(())
    };
    let outcome = relay_after(
        tcp,
        send,
        recv,
        idle,
        |direction, n| {
            let to_agent = direction == Direction::Sent;
            metrics.relayed(to_agent, n);
            if to_agent {
                session.add_to_agent(n);
            } else {
                session.add_from_agent(n);
            }
        },
        cut,
        first,
    )
    .await;
    metrics.streams_open().dec();
    if early_answer.is_some() && opened_early.get().is_none() {
        let why = outcome
            .error
            .as_ref()
            .map_or_else(|| "ended".to_string(), ToString::to_string);
        early_reply_failed(&shared, &slot, &open, peer, &why);
    }
    drop(slot);
    if let Some(RelayError::Idle(quiet)) = &outcome.error {
        metrics.cap_refused("stream_idle_timeout");
        info!(stream = %stream_id, %destination, "stream closed: idle for {quiet:?}");
    }
    let token_gone = token_cut.as_ref().is_some_and(|cut| cut.is_cancelled());
    match outcome.error {
        // The relay's own "cut" names the shutdown grace; this cut was the token's.
        Some(RelayError::Cut) if token_gone => info!(stream = %stream_id, %destination,
            sent = outcome.sent, received = outcome.received,
            "stream reset: its token was revoked or expired"),
        // Logged with the failed guess above.
        Some(RelayError::First(_)) => {}
        None => debug!(stream = %stream_id, %destination, sent = outcome.sent,
            received = outcome.received, "stream finished"),
        Some(e) => debug!(stream = %stream_id, %destination, sent = outcome.sent,
            received = outcome.received, "stream reset: {e}"),
    }
}

/// An early-answered request ended without the agent's answer that it connected (the
/// answer was a failure, or the stream failed first): the client was reset; the destination
/// is forgotten, so the next request for it waits for the agent and gets the exact code.
fn early_reply_failed(
    shared: &Shared,
    slot: &super::registry::StreamSlot,
    open: &Open,
    peer: SocketAddr,
    why: &str,
) {
    slot.session().reached.forget(&open.host, open.port);
    shared.metrics.socks_early_reply("failed");
    let destination = format!("{}:{}", open.host, open.port);
    info!(client = %peer, destination = %Masked(&destination),
        "SOCKS request answered early, then failed: {}; client reset (the next request for \
        this destination waits for the agent's answer)", Masked(why));
}

/// Checks the requested destination before it is sent to the agent.
fn to_open(target: TargetAddr) -> Result<Open, (u8, String)> {
    let (host, port) = match target {
        TargetAddr::Ip(addr) => (Host::Ip(addr.ip()), addr.port()),
        TargetAddr::Domain(name, port) => {
            if !valid_host_name(&name) {
                return Err((0x04, format!("invalid host name ({} bytes)", name.len())));
            }
            (Host::Domain(name), port)
        }
    };
    if port == 0 {
        return Err((0x02, format!("port 0 of {host} is not a destination")));
    }
    Ok(Open { host, port })
}

/// A DNS name an agent could resolve: at most 253 bytes, labels of 1–63 letters, digits,
/// `-` or `_` (RFC 1035 §2.3.4; `_` appears in service names).
pub fn valid_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn reply_error(code: u8) -> ReplyError {
    match code {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::ConnectionTimeout,
        0x07 => ReplyError::CommandNotSupported,
        0x08 => ReplyError::AddressTypeNotSupported,
        _ => ReplyError::GeneralFailure,
    }
}

/// Metric label of a SOCKS5 reply code.
fn reply_name(code: u8) -> &'static str {
    match code {
        0x00 => "succeeded",
        0x02 => "not_allowed",
        0x03 => "network_unreachable",
        0x04 => "host_unreachable",
        0x05 => "connection_refused",
        0x06 => "ttl_expired",
        0x07 => "command_not_supported",
        0x08 => "address_type_not_supported",
        _ => "general_failure",
    }
}

/// What an unauthenticated client's bytes become: the caller and its checked destination
/// (or the SOCKS reply code it was refused with). Only for fuzzing the front.
#[doc(hidden)]
#[derive(Debug)]
pub struct FuzzRequest {
    /// Tenant of the caller.
    pub tenant: String,
    /// Agent asked for.
    pub agent: String,
    /// Destination, or the refusal code.
    pub open: Result<Open, u8>,
}

/// Runs the front's pre-routing steps (greeting, RFC 1929 authentication against `tokens`,
/// request, destination checks, error reply) on any byte stream, exactly as a TCP client
/// gets them, and stops where routing would start. Exposed for the fuzz targets.
#[doc(hidden)]
pub async fn fuzz_front<S>(
    stream: S,
    tokens: &TokenStore,
    no_auth: Option<&NoAuthRoute>,
) -> Result<FuzzRequest, GreetError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (proto, caller, cmd, target) = greet(tokens, no_auth, stream).await?;
    let open = if caller.foreign {
        Err(0x04)
    } else if cmd == Socks5Command::TCPConnect {
        to_open(target).map_err(|(code, _)| code)
    } else {
        Err(0x07)
    };
    let code = match &open {
        Ok(_) => 0x04,
        Err(code) => *code,
    };
    let _ = proto.reply_error(&reply_error(code)).await;
    Ok(FuzzRequest {
        tenant: caller.tenant.to_string(),
        agent: caller.agent,
        open,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        let table = [
            ("jenkins.internal", true),
            ("a", true),
            ("_svc._tcp.example.com", true),
            ("example.com.", true),
            ("", false),
            (".", false),
            ("a..b", false),
            ("bad host", false),
            ("x\u{0}y", false),
        ];
        for (name, ok) in table {
            assert_eq!(valid_host_name(name), ok, "{name:?}");
        }
        assert!(!valid_host_name(&"a".repeat(64)));
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(!valid_host_name(&long));
    }

    #[test]
    fn destinations_are_checked_before_routing() {
        assert!(to_open(TargetAddr::Domain("a.b".into(), 80)).is_ok());
        assert_eq!(
            to_open(TargetAddr::Domain("a.b".into(), 0)).unwrap_err().0,
            0x02
        );
        assert_eq!(
            to_open(TargetAddr::Ip("10.0.0.1:0".parse().unwrap()))
                .unwrap_err()
                .0,
            0x02
        );
        assert_eq!(
            to_open(TargetAddr::Domain("a b".into(), 80)).unwrap_err().0,
            0x04
        );
    }
}
