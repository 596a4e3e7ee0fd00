//! The control stream's heartbeat loop, shared by hub and agent: the agent pings at the
//! interval the hub paces it to, the hub answers (and pings only a silent agent), both
//! measure round-trip time and give up after a silence limit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::session::{RecvStream, SendStream, Session};
use crate::proto::codec::{encode, CodecError, FrameCodec};
use crate::proto::Control;

/// Send priority of the control stream; tunnel streams keep quinn's default of 0, so a bulk
/// transfer or a client that stops reading cannot hold heartbeats back.
pub const CONTROL_PRIORITY: i32 = 100;

/// A control stream's receiving half, framed (cancel-safe to poll).
pub type ControlReader<R = RecvStream> = FramedRead<R, FrameCodec<Control>>;

/// First read buffer of a control stream. Control frames are tens of bytes (pings) to a few
/// hundred (hello, inventory notices); `FramedRead`'s default of 8 KiB, held by every idle
/// agent session for its whole life, was a sixth of the hub's memory per agent. The buffer
/// still grows on demand to the largest frame allowed.
const CONTROL_READ_BUFFER: usize = 256;

/// Wraps a control stream's receiving half; frames longer than `max_frame` end the session.
pub fn control_reader<R: tokio::io::AsyncRead>(recv: R, max_frame: usize) -> ControlReader<R> {
    FramedRead::with_capacity(recv, FrameCodec::with_max(max_frame), CONTROL_READ_BUFFER)
}

/// Heartbeat timing, agreed in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between two pings.
    pub interval: Duration,
    /// Silence (no frame at all from the peer) longer than this ends the session.
    pub timeout: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
        }
    }
}

/// The shortest interval and timeout an agent accepts from a hub, so a hub's mistake cannot
/// make it spin.
const AGENT_MIN_INTERVAL: Duration = Duration::from_millis(50);
const AGENT_MIN_TIMEOUT: Duration = Duration::from_millis(150);

impl Heartbeat {
    /// The timing an agent keeps after its hub announced `interval_ms` and `timeout_ms`
    /// (`Welcome` or `Pace`): the timeout is at least three intervals, so two lost pings
    /// (or pongs) never end a session, whatever the hub announced.
    pub fn announced(interval_ms: u64, timeout_ms: u64) -> Heartbeat {
        let interval = Duration::from_millis(interval_ms).max(AGENT_MIN_INTERVAL);
        let timeout = Duration::from_millis(timeout_ms)
            .max(interval.saturating_mul(3))
            .max(AGENT_MIN_TIMEOUT);
        Heartbeat { interval, timeout }
    }
}

/// Which side of the control stream a heartbeat loop runs, which decides who pings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent: its ping every interval is its liveness probe (a restarted hub answers
    /// the packet with a stateless reset), and it follows the hub's [`Control::Pace`]. On
    /// QUIC, the hub's acknowledgement of its packets counts as the hub's sign of life, so
    /// it needs no `Pong` (see [`crate::proto::ACK_LIVENESS`]).
    Agent,
    /// The hub: it pings an agent itself only after an interval and a half of silence, and
    /// answers the agent's pings with `Pong` when `pongs` (agents without
    /// [`crate::proto::ACK_LIVENESS`], and every TCP session). Without pongs, one liveness
    /// round of a live QUIC agent is one ping in and one ACK out. The `Pace` messages it
    /// writes from the outbox also set its own interval and timeout.
    Hub {
        /// Whether the agent's pings are answered with `Pong`.
        pongs: bool,
    },
}

/// Why a heartbeat loop ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlEnd {
    /// The peer finished the control stream.
    #[error("peer ended the control stream")]
    PeerFinished,
    /// Nothing heard from the peer within the timeout.
    #[error("no heartbeat for {0:?}")]
    Timeout(Duration),
    /// The peer sent a malformed or unexpected frame.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer announced a frame longer than the cap.
    #[error("protocol error: {0}")]
    FrameTooLarge(String),
    /// The stream or connection failed (includes the connection being closed).
    #[error("control stream: {0}")]
    Stream(String),
    /// Our side is shutting down.
    #[error("shutting down")]
    Cancelled,
    /// Our side moved to a newer session and this one has drained.
    #[error("moved to a newer session")]
    Moved,
}

/// What the loop observed, for the caller's records.
#[derive(Debug, Clone)]
pub enum HeartbeatEvent {
    /// A frame arrived from the peer.
    Seen,
    /// A pong answered our ping after this round trip.
    Rtt(Duration),
    /// The peer said `GoingAway`: open no new stream on this session.
    GoingAway,
    /// The agent sent a renewed credential for this session.
    Reauthenticate(crate::identity::Secret),
    /// The hub sent the agent a rotated connect token.
    RotateToken(crate::identity::Secret),
    /// A ping arrived from the peer (and was answered).
    Pinged,
    /// The loop sent a ping of its own.
    PingSent,
    /// The loop follows new timing: a `Pace` the agent received or the hub sent.
    Paced(Heartbeat),
}

/// Runs heartbeats until the peer goes silent, breaks the protocol, or `cancel` fires, and
/// writes every message arriving on `outbox` to the peer between heartbeats on the same
/// stream (the agent's `Reauthenticate`, the hub's `RotateToken` and `Pace`). A closed outbox
/// is simply no longer read.
///
/// `role` decides who pings (see [`Role`]): the agent every interval, the hub only a silent
/// agent. An agent that receives `Pace` restarts its ticker and silence limit with the new
/// timing; a hub receiving one closes the session as a protocol error.
///
/// Silence means: no control frame and no stream data at all from the peer on
/// `connection`. Stream data counts because quinn's send window is shared by every stream of
/// a connection: on a lossy, busy link a peer's ping can wait behind its own unacknowledged
/// bulk data for longer than the timeout, while that data keeps arriving. QUIC keep-alive
/// PINGs do not count, so a peer whose session logic is stuck is still noticed.
///
/// When `going_away` fires, the loop tells the peer [`Control::GoingAway`] once and goes on.
///
/// Cancel-safe: it only awaits cancel-safe operations (`FramedRead::next`, interval ticks,
/// `OutboxReceiver::recv`); writes are small frames completed before the next await on the
/// reader.
#[allow(clippy::too_many_arguments)]
pub async fn heartbeat_loop_with<F>(
    connection: &Session,
    send: &mut SendStream,
    reader: &mut ControlReader,
    mut heartbeat: Heartbeat,
    role: Role,
    cancel: &CancellationToken,
    going_away: Option<&CancellationToken>,
    mut outbox: Option<&mut super::outbox::OutboxReceiver>,
    mut observe: F,
) -> ControlEnd
where
    F: FnMut(HeartbeatEvent),
{
    let mut ticker = ticker(heartbeat.interval, false);
    let mut stream_frames = connection.activity();
    // The agent also takes the hub's acknowledgements as life: a hub that sends no pongs
    // (ACK_LIVENESS) acknowledges each ping within its ACK delay. The hub does not: it wants
    // to hear the agent's session logic, not only its QUIC stack.
    let acknowledgements = || match role {
        Role::Agent => connection.acknowledgements(),
        Role::Hub { .. } => None,
    };
    let mut acks = acknowledgements();
    // The agent's last ping while no acknowledgement has come since: the count of ACKs when it
    // was sent, when to ping again, and the gap after that one.
    let mut reprobe: Option<(u64, Instant, Duration)> = None;
    let mut last_seen = Instant::now();
    let mut seq = 0u64;
    let mut outstanding: Option<(u64, Instant)> = None;
    let mut told = going_away.is_none();
    let never = CancellationToken::new();
    let going_away = going_away.unwrap_or(&never);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return ControlEnd::Cancelled,
            _ = going_away.cancelled(), if !told => {
                told = true;
                if let Err(e) = write(send, &Control::GoingAway).await {
                    return e;
                }
            }
            msg = async {
                match outbox.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            }, if outbox.is_some() => match msg {
                Some(msg) => {
                    if let Err(e) = write(send, &msg).await {
                        return e;
                    }
                    if let (Role::Hub { .. }, Control::Pace { heartbeat_interval_ms, heartbeat_timeout_ms }) = (role, &msg) {
                        // The hub's silence check follows what it told the agent.
                        heartbeat = Heartbeat {
                            interval: Duration::from_millis(*heartbeat_interval_ms),
                            timeout: Duration::from_millis(*heartbeat_timeout_ms),
                        };
                        ticker = self::ticker(heartbeat.interval, true);
                        observe(HeartbeatEvent::Paced(heartbeat));
                    }
                }
                None => outbox = None,
            },
            frame = reader.next() => {
                let msg = match frame {
                    None => return ControlEnd::PeerFinished,
                    Some(Err(CodecError::Io(e))) => return ControlEnd::Stream(e.to_string()),
                    Some(Err(e)) if e.is_too_large() => {
                        return ControlEnd::FrameTooLarge(e.to_string())
                    }
                    Some(Err(e)) => return ControlEnd::Protocol(e.to_string()),
                    Some(Ok(msg)) => msg,
                };
                last_seen = Instant::now();
                observe(HeartbeatEvent::Seen);
                match msg {
                    Control::Ping { seq } => {
                        if !matches!(role, Role::Hub { pongs: false }) {
                            if let Err(e) = write(send, &Control::Pong { seq }).await {
                                return e;
                            }
                        }
                        observe(HeartbeatEvent::Pinged);
                    }
                    Control::GoingAway => observe(HeartbeatEvent::GoingAway),
                    Control::Reauthenticate { token } => {
                        observe(HeartbeatEvent::Reauthenticate(token))
                    }
                    Control::RotateToken { token } => observe(HeartbeatEvent::RotateToken(token)),
                    Control::Pace { heartbeat_interval_ms, heartbeat_timeout_ms } if role == Role::Agent => {
                        heartbeat = Heartbeat::announced(heartbeat_interval_ms, heartbeat_timeout_ms);
                        // The next ping goes out one new interval from now.
                        ticker = self::ticker(heartbeat.interval, true);
                        observe(HeartbeatEvent::Paced(heartbeat));
                    }
                    Control::Pong { seq: answered } => {
                        if let Some((sent_seq, at)) = outstanding {
                            if sent_seq == answered {
                                observe(HeartbeatEvent::Rtt(at.elapsed()));
                                outstanding = None;
                            }
                        }
                    }
                    other => {
                        return ControlEnd::Protocol(format!(
                            "unexpected {} on an established control stream",
                            kind(&other)
                        ))
                    }
                }
            }
            _ = sleep_until(reprobe.map(|(_, at, _)| at)), if reprobe.is_some() => {
                // A ping nothing acknowledged within its gap is followed by another, at
                // doubling gaps until the next tick. QUIC resends the first one itself, but
                // its probe timeout doubles with every loss, so when a restarted hub's
                // stateless reset (or the ping) is dropped by a saturated socket the resend
                // can come after the next tick; each new ping draws a reset of its own.
                let Some((acked_then, _, gap)) = reprobe else { continue };
                if acknowledgements() != Some(acked_then) {
                    reprobe = None;
                    continue;
                }
                seq += 1;
                if let Err(e) = write(send, &Control::Ping { seq }).await {
                    return e;
                }
                observe(HeartbeatEvent::PingSent);
                let next = gap.saturating_mul(2);
                reprobe = (next < heartbeat.interval)
                    .then(|| (acked_then, Instant::now() + gap, next));
            }
            _ = ticker.tick() => {
                let received = connection.activity();
                let acked = acknowledgements();
                if received != stream_frames || acked != acks {
                    stream_frames = received;
                    acks = acked;
                    last_seen = Instant::now();
                    observe(HeartbeatEvent::Seen);
                }
                let silent = last_seen.elapsed();
                if silent > heartbeat.timeout {
                    return ControlEnd::Timeout(silent);
                }
                // The agent's own ping answers for it; half an interval more allows for its
                // ticker and ours drifting apart on a loaded machine.
                if matches!(role, Role::Hub { .. })
                    && silent < heartbeat.interval + heartbeat.interval / 2
                {
                    continue;
                }
                seq += 1;
                if outstanding.is_none() {
                    outstanding = Some((seq, Instant::now()));
                }
                if let Err(e) = write(send, &Control::Ping { seq }).await {
                    return e;
                }
                observe(HeartbeatEvent::PingSent);
                if role == Role::Agent && REPROBE < heartbeat.interval {
                    // The count read at this tick: any ACK from now on is the hub's life.
                    reprobe = acked.map(|n| (n, Instant::now() + REPROBE, REPROBE * 2));
                }
            }
        }
    }
}

/// How long an agent's ping may go unacknowledged (on a transport that shows its ACKs)
/// before it pings again; the gap doubles with each ping until the next tick.
const REPROBE: Duration = Duration::from_secs(1);

/// Sleeps until `deadline`, or forever without one (a `select!` branch whose timer may be
/// unset).
pub(crate) async fn sleep_until(deadline: Option<impl Into<tokio::time::Instant>>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// A heartbeat ticker: its first tick at once (`delayed` false) or one interval from now.
/// A zero interval (tokio refuses one) ticks every millisecond.
fn ticker(interval: Duration, delayed: bool) -> tokio::time::Interval {
    let interval = interval.max(Duration::from_millis(1));
    let start = tokio::time::Instant::now() + if delayed { interval } else { Duration::ZERO };
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

async fn write(send: &mut SendStream, msg: &Control) -> Result<(), ControlEnd> {
    let frame = encode(msg).map_err(|e| ControlEnd::Protocol(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| ControlEnd::Stream(e.to_string()))
}

/// The name of a control message kind, for error messages.
pub fn kind(msg: &Control) -> &'static str {
    match msg {
        Control::Hello(_) => "Hello",
        Control::Welcome(_) => "Welcome",
        Control::Rejected { .. } => "Rejected",
        Control::Ping { .. } => "Ping",
        Control::Pong { .. } => "Pong",
        Control::GoingAway => "GoingAway",
        Control::Reauthenticate { .. } => "Reauthenticate",
        Control::RotateToken { .. } => "RotateToken",
        Control::Pace { .. } => "Pace",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn an_agent_keeps_at_least_three_intervals_of_timeout() {
        let ms = Duration::from_millis;
        let table = [
            // (announced interval, announced timeout) → (interval, timeout) kept
            ((500, 30_000), (ms(500), ms(30_000))),
            ((5_000, 8_000), (ms(5_000), ms(15_000))),
            ((10_000, 30_000), (ms(10_000), ms(30_000))),
            ((0, 0), (ms(50), ms(150))),
            ((20, 100), (ms(50), ms(150))),
        ];
        for ((interval, timeout), want) in table {
            let got = Heartbeat::announced(interval, timeout);
            assert_eq!((got.interval, got.timeout), want, "{interval} {timeout}");
        }
    }

    #[tokio::test]
    async fn frames_larger_than_the_first_buffer_are_read_whole() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut reader = control_reader(rx, 64 * 1024);
        assert_eq!(reader.read_buffer().capacity(), CONTROL_READ_BUFFER);
        let long = "x".repeat(20_000);
        let frames = [
            Control::Ping { seq: 1 },
            Control::Rejected {
                code: crate::proto::CloseCode::Protocol,
                reason: long,
            },
            Control::Pong { seq: 2 },
        ];
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in sent {
                tx.write_all(&encode(&f).unwrap()).await.unwrap();
            }
        });
        for want in frames {
            let got = reader.next().await.unwrap().unwrap();
            assert_eq!(format!("{got:?}"), format!("{want:?}"));
        }
        writer.await.unwrap();
        assert!(reader.next().await.is_none());
    }

    #[tokio::test]
    async fn a_frame_over_the_cap_is_refused_before_it_is_buffered() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut reader = control_reader(rx, 1024);
        let frame = encode(&Control::Rejected {
            code: crate::proto::CloseCode::Protocol,
            reason: "y".repeat(5000),
        })
        .unwrap();
        tokio::spawn(async move {
            let _ = tx.write_all(&frame).await;
        });
        let err = reader.next().await.unwrap().unwrap_err();
        assert!(err.is_too_large(), "{err}");
        assert!(reader.read_buffer().capacity() < 5000);
    }
}
