//! A restarted hub recalls the agents of its previous run at once, at the pace it can serve
//! them.
//!
//! An agent whose hub was killed (`kill -9`, a crash, an OOM kill) learns of it only when it
//! next sends: the restarted hub answers that packet with a stateless reset, and the agent
//! reconnects. At 10,000 agents the hub paces their pings about 10 s apart, so the last agent
//! would learn of a restart that long after it, and the fleet's pings arrive in step (the hub
//! paces all sessions at one moment), so most learn of it in one burst.
//!
//! Instead the hub keeps a roster of its QUIC sessions in its state folder ([`FILE`]): each
//! agent's address and the connection ID the hub gave it in the handshake, written every few
//! seconds when it changed (and every two minutes when not, so its time stamp says when the
//! hub stopped). A restarted hub with the same endpoint key (the same state
//! folder) reads it before it serves and sends each listed agent a stateless reset made for
//! that connection ID, from the port the agent sends to. The agent accepts it as the reset
//! quinn itself would have sent for its next packet and reconnects within
//! `RESET_SPREAD` (50 ms). The resets go out while fewer than a quarter of the hub's
//! handshake slots are taken, counting resets sent in the last [`ARRIVAL`] whose agents were
//! not yet admitted as on their way:
//! the hub calls its fleet back as fast as it finishes handshakes, not faster, so a restart
//! under 10,000 agents starts as many handshakes as the hub can finish, and no more.
//!
//! What the roster holds is no secret: addresses, and connection IDs that travel in the
//! clear in every packet. A reset made for an ID reaches only an agent still holding a session
//! with it; an agent that reconnected since holds new IDs and ignores it. An agent whose
//! address changed after the last write (NAT rebinding) or that connected after it learns of
//! the restart at its next ping, as before.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Shared;
use crate::transport::{self, EndpointKey};

/// The roster's file in the hub's state folder.
pub const FILE: &str = "quic-sessions";

/// How often the roster is written, when the sessions changed.
const EVERY: Duration = Duration::from_secs(5);

/// Every this many rounds the roster is compared with the sessions even when none came or
/// went (an agent's address may have changed).
const RECHECK: u32 = 12;

/// A roster older than this is not used: its agents' sessions have long timed out.
const MAX_AGE: Duration = Duration::from_secs(600);

/// An unchanged roster is written again after this long, so the time in it tells when the
/// hub stopped (within this much), not when its fleet last changed.
const REFRESH: Duration = Duration::from_secs(120);

/// Largest roster file read (about 40 bytes per session: a million sessions).
const READ_LIMIT: u64 = 64 << 20;

/// The format written; a roster of another format is ignored.
const FORMAT: u32 = 1;

/// How long a sent reset counts as an agent on its way: its reconnect (within 50 ms), the
/// QUIC Retry round trip, and the Initial that then takes a handshake slot.
const ARRIVAL: Duration = Duration::from_millis(250);

/// How often the recall looks for room.
const TICK: Duration = Duration::from_millis(10);

/// One QUIC session of the roster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Peer {
    /// The agent's address as the hub last saw it.
    pub remote: SocketAddr,
    /// The hub's address the agent sends to (for a hub bound to a wildcard address).
    pub local_ip: Option<IpAddr>,
    /// The connection ID the hub gave in the handshake.
    pub cid: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Roster {
    format: u32,
    /// When it was written, in Unix seconds.
    written: u64,
    peers: Vec<Peer>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Encodes a roster of `peers` written at `written` (Unix seconds).
fn encode(peers: &[Peer], written: u64) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(&Roster {
        format: FORMAT,
        written,
        peers: peers.to_vec(),
    })
}

/// The peers of the roster in `bytes`, if it is one this build wrote no more than
/// [`MAX_AGE`] before `now` (Unix seconds); why not otherwise.
fn decode(bytes: &[u8], now: u64) -> Result<Vec<Peer>, String> {
    let roster: Roster =
        postcard::from_bytes(bytes).map_err(|e| format!("not a session roster ({e})"))?;
    if roster.format != FORMAT {
        return Err(format!(
            "roster format {} (this build writes {FORMAT})",
            roster.format
        ));
    }
    let age = now.saturating_sub(roster.written);
    if age > MAX_AGE.as_secs() {
        return Err(format!("written {age} s ago: its sessions have timed out"));
    }
    Ok(roster.peers)
}

/// Reads the roster the previous run left in `dir`: empty when there is none or it is of no
/// use (one line says why).
fn load(dir: &Path) -> Vec<Peer> {
    let path = dir.join(FILE);
    let bytes = match crate::fsutil::read_bytes(&path, READ_LIMIT) {
        Ok(bytes) => bytes,
        Err(e) if matches!(&e.problem, crate::fsutil::FileProblem::Io(io) if io.kind() == std::io::ErrorKind::NotFound) => {
            return Vec::new()
        }
        Err(e) => {
            warn!("the previous run's session roster is unreadable; its agents reconnect at their next ping: {e}");
            return Vec::new();
        }
    };
    match decode(&bytes, unix_now()) {
        Ok(peers) => peers,
        Err(why) => {
            info!(path = %path.display(), "the previous run's session roster is not used: {why}");
            Vec::new()
        }
    }
}

/// What keeping the roster and recalling the previous run's agents need: the state folder,
/// a second handle of the endpoint's socket, its key, and the roster that run left.
#[derive(Debug)]
pub(super) struct Recall {
    dir: PathBuf,
    socket: UdpSocket,
    key: EndpointKey,
    peers: Vec<Peer>,
}

impl Recall {
    /// Reads the roster the previous run left in `dir` (before anything writes a new one).
    pub(super) fn load(dir: PathBuf, socket: UdpSocket, key: EndpointKey) -> Recall {
        Recall {
            peers: load(&dir),
            dir,
            socket,
            key,
        }
    }

    /// Starts keeping the roster, and the recall of the previous run's agents, until `stop`.
    /// Resets go out while fewer than a quarter of the handshake slots are taken.
    pub(super) fn spawn(self, shared: &Arc<Shared>, stop: &CancellationToken) {
        let Recall {
            dir,
            socket,
            key,
            peers,
        } = self;
        tokio::spawn(keep(shared.clone(), dir, stop.clone()));
        let window = shared.config.caps.handshakes.div_ceil(4);
        tokio::spawn(recall(
            shared.clone(),
            socket,
            key,
            peers,
            window,
            stop.clone(),
        ));
    }
}

/// The roster entries of the hub's live QUIC sessions, sorted.
fn snapshot(shared: &Shared) -> Vec<Peer> {
    let mut peers: Vec<Peer> = shared
        .registry
        .sessions()
        .iter()
        .filter_map(|s| s.connection.quic())
        .map(|c| Peer {
            remote: c.remote_address(),
            local_ip: c.local_ip(),
            cid: c.handshake_cid().to_vec(),
        })
        .collect();
    peers.sort();
    peers.dedup();
    peers
}

/// Writes the roster of the live QUIC sessions to `dir` every [`EVERY`] when it changed (and
/// every [`REFRESH`] when not), until `stop` fires. The registry is looked at only when a
/// session came or went, or every [`RECHECK`] rounds. A failed write is logged once until one
/// succeeds again.
async fn keep(shared: Arc<Shared>, dir: PathBuf, stop: CancellationToken) {
    let path = dir.join(FILE);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick writes (an empty roster at start: the previous one was read already).
    let mut last: Option<Vec<Peer>> = None;
    let mut failing = false;
    // The registry's generation the last roster was taken at, and rounds since.
    let mut taken_at: Option<u64> = None;
    let mut rounds = 0u32;
    let mut written_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // An idle fleet costs nothing here: no session came or went, no look.
        let generation = shared.registry.generation();
        rounds += 1;
        if taken_at == Some(generation) && rounds < RECHECK {
            continue;
        }
        rounds = 0;
        let peers = snapshot(&shared);
        // Unchanged, and written recently enough that a restart would still use it.
        let fresh = written_at.is_some_and(|at: Instant| at.elapsed() < REFRESH);
        if last.as_ref() == Some(&peers) && fresh {
            taken_at = Some(generation);
            continue;
        }
        let bytes = match encode(&peers, unix_now()) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!("encoding the session roster failed: {e}");
                continue;
            }
        };
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::fsutil::replace_file(&target, &bytes, crate::fsutil::FileMode::Exactly(0o600))
        })
        .await;
        match written {
            Ok(Ok(())) => {
                if failing {
                    info!(path = %path.display(), "session roster written again");
                }
                failing = false;
                last = Some(peers);
                taken_at = Some(generation);
                written_at = Some(Instant::now());
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!("writing the session roster failed; after a restart agents reconnect at their next ping: {e}");
                }
                failing = true;
            }
            Err(e) => warn!("writing the session roster failed: {e}"),
        }
    }
}

/// Agents on their way to the hub: the resets sent in the last [`ARRIVAL`] (`recent`, each
/// with the hub's admitted count when it was sent) less the attempts admitted since the oldest
/// of them, `admitted` being the count now. An agent that arrived holds a handshake slot and
/// is counted there.
fn on_their_way(recent: &VecDeque<(Instant, u64)>, admitted: u64) -> usize {
    let arrived = recent
        .front()
        .map_or(0, |(_, at)| admitted.saturating_sub(*at));
    (recent.len() as u64).saturating_sub(arrived) as usize
}

/// Sends each of `peers` a stateless reset for its connection ID through `socket` (the hub
/// endpoint's own port), while fewer than `window` handshakes are in progress or on their way
/// (sent in the last [`ARRIVAL`] and not yet admitted).
/// Ends when all were sent or `stop` fires.
async fn recall(
    shared: Arc<Shared>,
    socket: UdpSocket,
    key: EndpointKey,
    peers: Vec<Peer>,
    window: usize,
    stop: CancellationToken,
) {
    if peers.is_empty() {
        return;
    }
    let state = match quinn::udp::UdpSocketState::new((&socket).into()) {
        Ok(state) => state,
        Err(e) => {
            warn!("recalling the previous run's agents failed: {e}");
            return;
        }
    };
    let total = peers.len();
    info!(
        sessions = total,
        "recalling the agents of the previous run: a stateless reset to each, as fast as handshakes finish"
    );
    let started = Instant::now();
    let window = window.max(1);
    // Resets sent in the last ARRIVAL, and the hub's admitted count when each was sent.
    let mut recent: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut pending = peers.into_iter().peekable();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = 0usize;
    let mut failed = 0usize;
    'recall: while pending.peek().is_some() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= ARRIVAL)
        {
            recent.pop_front();
        }
        let admitted = shared.gate.admitted();
        let busy = shared.gate.in_progress() + on_their_way(&recent, admitted);
        for _ in busy..window {
            let Some(peer) = pending.peek() else {
                break 'recall;
            };
            let token = key.reset_token(&peer.cid);
            let packet = match transport::stateless_reset(&token) {
                Ok(packet) => packet,
                Err(e) => {
                    warn!("recalling the previous run's agents stopped: {e}");
                    break 'recall;
                }
            };
            let transmit = quinn::udp::Transmit {
                destination: peer.remote,
                ecn: None,
                contents: &packet,
                segment_size: None,
                src_ip: peer.local_ip,
            };
            match state.send((&socket).into(), &transmit) {
                Ok(()) => {
                    sent += 1;
                    shared.metrics.recall_reset();
                    recent.push_back((now, admitted));
                }
                // The socket's send buffer is full: the rest go at the next tick.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    failed += 1;
                    debug!(remote = %peer.remote, "stateless reset not sent: {e}");
                }
            }
            pending.next();
        }
    }
    info!(
        sent,
        failed,
        of = total,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "recall of the previous run's agents done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16) -> Peer {
        Peer {
            remote: SocketAddr::from(([127, 0, 0, 1], port)),
            local_ip: Some(IpAddr::from([127, 0, 0, 1])),
            cid: vec![port as u8; 12],
        }
    }

    #[test]
    fn agents_count_as_on_their_way_until_as_many_were_admitted() {
        let now = Instant::now();
        let mut recent = VecDeque::new();
        assert_eq!(on_their_way(&recent, 7), 0);
        // Three resets sent with 10 attempts admitted so far, two more with 11.
        recent.extend([(now, 10), (now, 10), (now, 10), (now, 11), (now, 11)]);
        assert_eq!(on_their_way(&recent, 10), 5);
        assert_eq!(on_their_way(&recent, 12), 3);
        assert_eq!(on_their_way(&recent, 15), 0);
        assert_eq!(on_their_way(&recent, 100), 0);
    }

    #[test]
    fn a_roster_reads_back_what_was_written() {
        let peers = vec![peer(1000), peer(2000)];
        let bytes = encode(&peers, 1_000_000).unwrap();
        assert_eq!(decode(&bytes, 1_000_010).unwrap(), peers);
    }

    #[test]
    fn an_old_or_foreign_roster_is_not_used() {
        let bytes = encode(&[peer(1000)], 1_000_000).unwrap();
        let err = decode(&bytes, 1_000_000 + MAX_AGE.as_secs() + 1).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        let err = decode(b"\x07garbage", 1_000_000).unwrap_err();
        assert!(
            err.contains("format 7") || err.contains("not a session roster"),
            "{err}"
        );
        assert!(decode(&[], 0).is_err());
    }
}
