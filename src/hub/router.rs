//! Routes a request to an agent: picks the session, opens a tunnel stream, sends `Open` and
//! waits for the agent's answer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::transport::session::{RecvStream, SendStream};

use super::registry::StreamSlot;
use super::Shared;
use crate::auth::Tenant;
use crate::proto::codec::{encode, read_frame_limited};
use crate::proto::kube::StreamHeader;
use crate::proto::{DialFailure, Open, OpenReply, StreamCode};

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No live session of that agent in the caller's tenant (also: an agent of another
    /// tenant, which must look exactly the same).
    #[error("no such agent")]
    NoAgent,
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    Draining,
    /// Every session of the agent has as many streams as the cap allows.
    #[error("agent has {0} streams open, the most allowed per connection")]
    AtCapacity(usize),
    /// The agent could not connect.
    #[error("agent could not connect: {message}")]
    Dial {
        /// The agent's failure code.
        code: DialFailure,
        /// Its readable detail.
        message: String,
    },
    /// The agent did not answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The stream or connection failed.
    #[error("tunnel stream: {0}")]
    Stream(String),
}

impl RouteError {
    /// The SOCKS5 reply code for this error (RFC 1928 §6).
    pub fn socks_reply(&self) -> u8 {
        match self {
            RouteError::NoAgent => 0x04,
            RouteError::Draining => 0x01,
            RouteError::AtCapacity(_) => 0x01,
            RouteError::Dial { code, .. } => code.socks_reply(),
            RouteError::Timeout(_) => 0x06,
            RouteError::Stream(_) => 0x01,
        }
    }
}

/// An open tunnel stream: connected on the agent's side, or with the agent's answer still
/// to come when the request is answered early.
#[derive(Debug)]
pub struct Tunnel {
    /// Keeps the session's open-stream count until dropped.
    pub slot: StreamSlot,
    /// Hub → agent half.
    pub send: SendStream,
    /// Agent → hub half.
    pub recv: RecvStream,
    /// The agent's answer to `Open`.
    pub answer: Answer,
}

/// Where the agent's answer to a tunnel's `Open` stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The agent connected; its local address of the TCP connection.
    Opened(SocketAddr),
    /// Not read yet: the agent connected to this destination within the early-reply window,
    /// so the request may be answered now and the answer read with [`answer`] before the
    /// first byte from the agent.
    Pending(Asked),
}

/// When a tunnel's `Open` was asked for, and when the agent's answer is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    /// When the stream was asked for (the dial time is measured from here).
    pub started: std::time::Instant,
    /// The deadline of the whole open: the request and the agent's answer.
    pub by: tokio::time::Instant,
}

/// Opens a tunnel to `open` through the agent `name` of `tenant`. When the chosen session
/// fails at the connection level (it died but was not yet noticed), the next live session of
/// the same agent is tried, so replicas cover for each other; the agent's own answers
/// (refused, not allowed, …) are final.
pub(crate) async fn open_tunnel(
    shared: &Shared,
    tenant: &Tenant,
    name: &str,
    open: &Open,
) -> Result<Tunnel, RouteError> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(RouteError::Draining);
    }
    // A session silent for two heartbeat intervals is only used when nothing fresher exists.
    let fresh = shared.config.heartbeat.interval * 2;
    let mut failed = Vec::new();
    loop {
        let slot = shared.registry.pick_excluding(tenant, name, &failed, fresh);
        let cap = shared.config.caps.streams_per_agent;
        let slot = match admit(slot, failed.len(), cap) {
            Ok(slot) => slot,
            Err(e) => {
                if matches!(e, RouteError::AtCapacity(_)) {
                    shared.metrics.cap_refused("streams_per_agent");
                }
                return Err(e);
            }
        };
        match open_on(shared, slot, open).await {
            Ok(tunnel) => return Ok(tunnel),
            Err((id, e)) if worth_another_session(&e) => {
                tracing::debug!(
                    session = id,
                    "tunnel stream failed, trying another session: {e}"
                );
                failed.push(id);
            }
            Err((_, other)) => return Err(other),
        }
    }
}

/// Something that holds a session's open-stream count: a registry slot, or in tests a plain
/// number.
trait Loaded {
    fn open_streams(&self) -> usize;
}

impl Loaded for StreamSlot {
    fn open_streams(&self) -> usize {
        self.session().open_streams()
    }
}

/// The routing decision on what the registry picked, after `failed` sessions of the agent
/// already failed at the connection level: open on the slot, or the final answer. The
/// registry picks the least loaded session, so one over the cap means every session is.
fn admit<S: Loaded>(picked: Option<S>, failed: usize, cap: usize) -> Result<S, RouteError> {
    match picked {
        None if failed == 0 => Err(RouteError::NoAgent),
        None => Err(RouteError::Stream(
            "every session of the agent failed".into(),
        )),
        Some(slot) if slot.open_streams() > cap => Err(RouteError::AtCapacity(cap)),
        Some(slot) => Ok(slot),
    }
}

/// Whether a failed open is tried again on another session of the agent: only a failure of
/// the stream or connection (a session that died unnoticed). The agent's own answers and a
/// timeout are final.
fn worth_another_session(e: &RouteError) -> bool {
    matches!(e, RouteError::Stream(_))
}

async fn open_on(
    shared: &Shared,
    slot: StreamSlot,
    open: &Open,
) -> Result<Tunnel, (u64, RouteError)> {
    let id = slot.session().id;
    let timeout = shared.config.open_timeout;
    let asked = Asked {
        started: std::time::Instant::now(),
        by: tokio::time::Instant::now() + timeout,
    };
    // Opening may wait for stream credit: the stream counts as pending from here, and while
    // its answer is read ([`answer`]).
    let pending = PendingGauge::enter(shared.metrics.streams_pending());
    let connection = slot.session().connection.clone();
    let request = async {
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        let frame = encode(&StreamHeader::Tunnel(open.clone()))
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        Ok::<_, RouteError>((send, recv))
    };
    let requested = tokio::time::timeout_at(asked.by, request).await;
    drop(pending);
    let (send, mut recv) = match requested {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err((id, e)),
        Err(_) => return Err((id, RouteError::Timeout(timeout))),
    };
    let early = shared.config.socks_early_reply.window();
    let reached = &slot.session().reached;
    let answer = if reached.within(&open.host, open.port, early, std::time::Instant::now()) {
        Answer::Pending(asked)
    } else {
        // A failed answer drops the stream unfinished, which resets it.
        match answer(shared, &slot, open, &mut recv, asked).await {
            Ok(bound) => Answer::Opened(bound),
            Err(e) => return Err((id, e)),
        }
    };
    Ok(Tunnel {
        slot,
        send,
        recv,
        answer,
    })
}

/// Reads the agent's answer to the `Open` sent on `recv`'s stream, by `asked.by`; the
/// stream counts as pending meanwhile. With early replies on, a connection is recorded for
/// them.
pub(crate) async fn answer(
    shared: &Shared,
    slot: &StreamSlot,
    open: &Open,
    recv: &mut RecvStream,
    asked: Asked,
) -> Result<SocketAddr, RouteError> {
    let _pending = PendingGauge::enter(shared.metrics.streams_pending());
    let read = async {
        let reply = read_frame_limited::<OpenReply, _>(recv, shared.config.caps.max_frame)
            .await
            .map_err(|e| {
                if e.is_too_large() {
                    shared.metrics.cap_refused("frame_size");
                }
                RouteError::Stream(e.to_string())
            })?;
        match reply {
            Some(OpenReply::Opened { bound }) => Ok(bound),
            Some(OpenReply::Failed { code, message }) => Err(RouteError::Dial { code, message }),
            None => Err(RouteError::Stream(
                "agent ended the stream without an answer".into(),
            )),
        }
    };
    let answered = tokio::time::timeout_at(asked.by, read).await;
    if matches!(answered, Ok(Ok(_)) | Ok(Err(RouteError::Dial { .. }))) {
        shared
            .metrics
            .dial_took(asked.started.elapsed().as_secs_f64());
    }
    let bound = answered.unwrap_or(Err(RouteError::Timeout(shared.config.open_timeout)))?;
    let window = shared.config.socks_early_reply.window();
    if !window.is_zero() {
        let now = std::time::Instant::now();
        slot.session()
            .reached
            .record(&open.host, open.port, window, now);
    }
    Ok(bound)
}

/// Resets a half-used stream pair (used when the SOCKS client vanished mid-setup).
pub fn abort(mut send: SendStream, mut recv: RecvStream) {
    send.reset(StreamCode::Reset.into());
    recv.stop(StreamCode::Reset.into());
}

/// Counts one stream in the pending gauge for as long as it lives, so a cancelled open
/// cannot leave the gauge high.
struct PendingGauge<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> PendingGauge<'a> {
    fn enter(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        PendingGauge(gauge)
    }
}

impl Drop for PendingGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Loaded for usize {
        fn open_streams(&self) -> usize {
            *self
        }
    }

    fn decision(picked: Option<usize>, failed: usize, cap: usize) -> String {
        match admit(picked, failed, cap) {
            Ok(open) => format!("open on the session with {open} streams"),
            Err(e) => format!("{e} (SOCKS {:#04x})", e.socks_reply()),
        }
    }

    #[test]
    fn routing_decisions() {
        let cases = [
            // Nothing of that name (or another tenant's agent): host unreachable.
            (None, 0, 8, "no such agent (SOCKS 0x04)"),
            // Every session failed at the connection level: general failure, not "no agent".
            (
                None,
                2,
                8,
                "tunnel stream: every session of the agent failed (SOCKS 0x01)",
            ),
            (Some(0), 0, 8, "open on the session with 0 streams"),
            // The stream being opened is counted already: at the cap is still allowed.
            (Some(8), 0, 8, "open on the session with 8 streams"),
            (
                Some(9),
                0,
                8,
                "agent has 8 streams open, the most allowed per connection (SOCKS 0x01)",
            ),
            (Some(3), 1, 8, "open on the session with 3 streams"),
        ];
        for (picked, failed, cap, want) in cases {
            assert_eq!(
                decision(picked, failed, cap),
                want,
                "picked {picked:?} after {failed} failures, cap {cap}"
            );
        }
    }

    /// The agent's refusal with `code`.
    fn dial(code: DialFailure) -> RouteError {
        RouteError::Dial {
            code,
            message: String::new(),
        }
    }

    #[test]
    fn only_stream_failures_are_tried_on_another_session() {
        let cases = [
            (RouteError::Stream("connection lost".into()), true),
            (RouteError::Timeout(Duration::from_secs(10)), false),
            (RouteError::NoAgent, false),
            (RouteError::Draining, false),
            (RouteError::AtCapacity(8), false),
            (dial(DialFailure::Refused), false),
            (dial(DialFailure::NotAllowed), false),
        ];
        for (err, retry) in cases {
            assert_eq!(worth_another_session(&err), retry, "{err:?}");
        }
    }

    #[test]
    fn route_errors_map_to_socks_replies() {
        let cases = [
            (RouteError::NoAgent, 0x04),
            (RouteError::Draining, 0x01),
            (RouteError::AtCapacity(1), 0x01),
            (RouteError::Timeout(Duration::from_secs(1)), 0x06),
            (RouteError::Stream("x".into()), 0x01),
            (dial(DialFailure::NotAllowed), 0x02),
            (dial(DialFailure::NetworkUnreachable), 0x03),
            (dial(DialFailure::HostUnreachable), 0x04),
            (dial(DialFailure::Refused), 0x05),
            (dial(DialFailure::TimedOut), 0x06),
            (dial(DialFailure::General), 0x01),
        ];
        for (err, reply) in cases {
            assert_eq!(err.socks_reply(), reply, "{err:?}");
        }
    }

    #[test]
    fn a_cancelled_open_leaves_the_pending_gauge_where_it_was() {
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let held = PendingGauge::enter(&gauge);
        let also = PendingGauge::enter(&gauge);
        assert_eq!(gauge.get(), 2);
        drop(held);
        assert_eq!(gauge.get(), 1);
        // A future dropped mid-open drops its guard the same way.
        let open = async move {
            let _pending = also;
            std::future::pending::<()>().await
        };
        drop(open);
        assert_eq!(gauge.get(), 0);
    }
}
