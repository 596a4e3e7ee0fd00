//! Routes a request to an agent: picks the session, opens a tunnel stream, sends `Open` and
//! waits for the agent's answer.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use quinn::{RecvStream, SendStream};

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

/// An open tunnel stream, connected on the agent's side.
#[derive(Debug)]
pub struct Tunnel {
    /// Keeps the session's open-stream count until dropped.
    pub slot: StreamSlot,
    /// Hub → agent half.
    pub send: SendStream,
    /// Agent → hub half.
    pub recv: RecvStream,
    /// The agent's local address of the TCP connection.
    pub bound: SocketAddr,
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
        let slot = match shared.registry.pick_excluding(tenant, name, &failed, fresh) {
            Some(slot) => slot,
            None if failed.is_empty() => return Err(RouteError::NoAgent),
            None => {
                return Err(RouteError::Stream(
                    "every session of the agent failed".into(),
                ))
            }
        };
        let cap = shared.config.caps.streams_per_agent;
        // The least loaded session was picked: if it is over the cap, every session is.
        if slot.session().open_streams() > cap {
            shared.metrics.cap_refused("streams_per_agent");
            return Err(RouteError::AtCapacity(cap));
        }
        match open_on(shared, slot, open).await {
            Ok(tunnel) => return Ok(tunnel),
            Err((id, RouteError::Stream(why))) => {
                tracing::debug!(
                    session = id,
                    "tunnel stream failed, trying another session: {why}"
                );
                failed.push(id);
            }
            Err((_, other)) => return Err(other),
        }
    }
}

async fn open_on(
    shared: &Shared,
    slot: StreamSlot,
    open: &Open,
) -> Result<Tunnel, (u64, RouteError)> {
    let id = slot.session().id;
    let timeout = shared.config.open_timeout;
    let connection = slot.session().connection.clone();
    let attempt = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        let frame = encode(&StreamHeader::Tunnel(open.clone()))
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| RouteError::Stream(e.to_string()))?;
        let reply = read_frame_limited::<OpenReply, _>(&mut recv, shared.config.caps.max_frame)
            .await
            .map_err(|e| {
                if e.is_too_large() {
                    shared.metrics.cap_refused("frame_size");
                }
                RouteError::Stream(e.to_string())
            })?;
        match reply {
            Some(OpenReply::Opened { bound }) => Ok((send, recv, bound)),
            Some(OpenReply::Failed { code, message }) => Err(RouteError::Dial { code, message }),
            None => Err(RouteError::Stream(
                "agent ended the stream without an answer".into(),
            )),
        }
    };
    let pending = PendingGauge::enter(shared.metrics.streams_pending());
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(timeout, attempt).await;
    drop(pending);
    if matches!(answer, Ok(Ok(_)) | Ok(Err(RouteError::Dial { .. }))) {
        shared.metrics.dial_took(started.elapsed().as_secs_f64());
    }
    match answer {
        Ok(Ok((send, recv, bound))) => Ok(Tunnel {
            slot,
            send,
            recv,
            bound,
        }),
        Ok(Err(e)) => Err((id, e)),
        Err(_) => Err((id, RouteError::Timeout(timeout))),
    }
}

/// Resets a half-used stream pair (used when the SOCKS client vanished mid-setup).
pub fn abort(mut send: SendStream, mut recv: RecvStream) {
    let _ = send.reset(StreamCode::Reset.into());
    let _ = recv.stop(StreamCode::Reset.into());
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
