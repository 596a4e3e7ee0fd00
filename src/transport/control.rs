//! The control stream's heartbeat loop, shared by hub and agent: both sides ping at an
//! interval, answer pings, measure round-trip time, and give up after a silence limit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use quinn::{RecvStream, SendStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::proto::codec::{encode, CodecError, FrameCodec};
use crate::proto::Control;

/// Send priority of the control stream; tunnel streams keep quinn's default of 0, so a bulk
/// transfer or a client that stops reading cannot hold heartbeats back.
pub const CONTROL_PRIORITY: i32 = 100;

/// A control stream's receiving half, framed (cancel-safe to poll).
pub type ControlReader = FramedRead<RecvStream, FrameCodec<Control>>;

/// Wraps a control stream's receiving half.
pub fn control_reader(recv: RecvStream) -> ControlReader {
    FramedRead::new(recv, FrameCodec::new())
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
    /// The stream or connection failed (includes the connection being closed).
    #[error("control stream: {0}")]
    Stream(String),
    /// Our side is shutting down.
    #[error("shutting down")]
    Cancelled,
}

/// What the loop observed, for the caller's records.
#[derive(Debug, Clone, Copy)]
pub enum HeartbeatEvent {
    /// A frame arrived from the peer.
    Seen,
    /// A pong answered our ping after this round trip.
    Rtt(Duration),
}

/// Runs heartbeats until the peer goes silent, breaks the protocol, or `cancel` fires.
///
/// Cancel-safe: it only awaits cancel-safe operations (`FramedRead::next`, interval ticks);
/// writes are small frames completed before the next await on the reader.
pub async fn heartbeat_loop<F>(
    send: &mut SendStream,
    reader: &mut ControlReader,
    heartbeat: Heartbeat,
    cancel: &CancellationToken,
    mut observe: F,
) -> ControlEnd
where
    F: FnMut(HeartbeatEvent),
{
    let mut ticker = tokio::time::interval(heartbeat.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut seq = 0u64;
    let mut outstanding: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return ControlEnd::Cancelled,
            frame = reader.next() => {
                let msg = match frame {
                    None => return ControlEnd::PeerFinished,
                    Some(Err(CodecError::Io(e))) => return ControlEnd::Stream(e.to_string()),
                    Some(Err(e)) => return ControlEnd::Protocol(e.to_string()),
                    Some(Ok(msg)) => msg,
                };
                last_seen = Instant::now();
                observe(HeartbeatEvent::Seen);
                match msg {
                    Control::Ping { seq } => {
                        if let Err(e) = write(send, &Control::Pong { seq }).await {
                            return e;
                        }
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
            _ = ticker.tick() => {
                let silent = last_seen.elapsed();
                if silent > heartbeat.timeout {
                    return ControlEnd::Timeout(silent);
                }
                seq += 1;
                if outstanding.is_none() {
                    outstanding = Some((seq, Instant::now()));
                }
                if let Err(e) = write(send, &Control::Ping { seq }).await {
                    return e;
                }
            }
        }
    }
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
    }
}
