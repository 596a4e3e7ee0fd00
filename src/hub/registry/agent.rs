//! One live agent connection as the registry keeps it: who the agent is, its counters, its
//! last inventory report, and the slots that count its streams and Kubernetes commands.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::Serialize;

use crate::auth::Tenant;
use crate::proto::kube::Inventory;
use crate::transport::session::Session;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One live agent connection, as the hub knows it.
#[derive(Debug)]
pub struct AgentSession {
    /// Unique on this hub for its lifetime.
    pub id: u64,
    /// The tenant the agent's token placed it in.
    pub tenant: Tenant,
    /// Agent identifier (certificate subject and Hello name, which must agree).
    pub name: String,
    /// The agent's build version.
    pub version: String,
    /// Agent operating system.
    pub os: String,
    /// Agent CPU architecture.
    pub arch: String,
    /// Capabilities the agent announced.
    pub capabilities: Vec<String>,
    /// Id of the token the agent registered with, so a revocation can close the session.
    pub token_id: String,
    /// Wall-clock time the session was established.
    pub connected_since: SystemTime,
    /// The session (QUIC or TLS/TCP); tunnel streams are opened on it.
    pub connection: Session,
    /// When a frame was last heard on the control stream.
    pub(super) last_heartbeat: Mutex<Instant>,
    /// Last heartbeat round trip, microseconds (0 until measured).
    rtt_micros: AtomicU64,
    /// The agent said `GoingAway`: it moved to a newer session, and this one only finishes
    /// the streams it has.
    draining: AtomicBool,
    /// Why the hub closed this session itself, if it did (for the disconnect log and metric).
    closed_by_hub: Mutex<Option<crate::proto::CloseCode>>,
    /// Tunnel streams currently open.
    pub(super) open_streams: AtomicUsize,
    /// Tunnel streams ever opened (tie-breaker so idle replicas share new streams).
    pub(super) streams_total: AtomicU64,
    /// Bytes relayed from the agent towards clients.
    bytes_from_agent: AtomicU64,
    /// Bytes relayed from clients towards the agent.
    bytes_to_agent: AtomicU64,
    /// When the credential the session registered with stops being valid, Unix seconds, for
    /// a JWT (`exp`); `i64::MAX` for an opaque token, whose validity the token store follows.
    credential_expiry: std::sync::atomic::AtomicI64,
    /// The agent's last inventory report on this connection, as the JSON the admin API
    /// serves (made once on receipt and shared by every reader), and when it arrived.
    pub(super) inventory: Mutex<Option<(Bytes, SystemTime)>>,
    /// The turn of the one inventory report being waited for or read (a second one meanwhile
    /// is refused), holding when the last report was taken, so the next waits out the
    /// interval. One lock for both: the time is only read and written by the turn's holder.
    inventory_turns: InventoryTurns,
    /// Kubernetes commands in flight on this connection (the least busy session gets the next).
    pub(super) kube_commands: AtomicUsize,
    /// Messages for the agent on the control stream (a rotated token), written by the
    /// session's heartbeat loop; set once that loop runs.
    control: std::sync::OnceLock<crate::transport::outbox::OutboxSender>,
    /// The heartbeat interval this session was last told (`Welcome` or `Pace`), milliseconds,
    /// so the pacer knows whom to tell again when the fleet changed.
    heartbeat_interval_ms: AtomicU64,
    /// Destinations the agent connected to lately, for early SOCKS replies.
    pub reached: super::Reached,
}

impl AgentSession {
    /// Records when the session's JWT expires (Unix seconds); the hub closes it after that.
    pub fn set_credential_expiry(&self, unix: i64) {
        self.credential_expiry.store(unix, Ordering::Relaxed);
    }

    /// When the session's credential expires (Unix seconds; `i64::MAX`: it follows the
    /// token store).
    pub fn credential_expiry(&self) -> i64 {
        self.credential_expiry.load(Ordering::Relaxed)
    }

    /// A new session record.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        tenant: Tenant,
        name: String,
        version: String,
        os: String,
        arch: String,
        capabilities: Vec<String>,
        token_id: String,
        connection: Session,
    ) -> Self {
        AgentSession {
            id,
            tenant,
            name,
            version,
            os,
            arch,
            capabilities,
            token_id,
            connected_since: SystemTime::now(),
            connection,
            last_heartbeat: Mutex::new(Instant::now()),
            closed_by_hub: Mutex::new(None),
            rtt_micros: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            streams_total: AtomicU64::new(0),
            bytes_from_agent: AtomicU64::new(0),
            bytes_to_agent: AtomicU64::new(0),
            credential_expiry: std::sync::atomic::AtomicI64::new(i64::MAX),
            inventory: Mutex::new(None),
            inventory_turns: InventoryTurns::default(),
            kube_commands: AtomicUsize::new(0),
            control: std::sync::OnceLock::new(),
            heartbeat_interval_ms: AtomicU64::new(0),
            reached: super::Reached::default(),
        }
    }

    /// Makes the channel of messages for the agent's control stream; the receiver goes to
    /// the session's heartbeat loop. A second call gets `None`.
    pub fn control_outbox(&self) -> Option<crate::transport::outbox::OutboxReceiver> {
        // Rare messages (a rotated token): a few slots, never a growing queue, and none
        // allocated until the first message (most sessions never get one).
        let (tx, rx) = crate::transport::outbox::channel(4);
        self.control.set(tx).ok().map(|()| rx)
    }

    /// Queues `msg` for the agent's control stream; `false` when the session's heartbeat
    /// loop does not run (not yet, or no longer).
    pub fn send_control(&self, msg: crate::proto::Control) -> bool {
        self.control
            .get()
            .is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    /// The heartbeat interval this session was last told (zero before its `Welcome`).
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.load(Ordering::Relaxed))
    }

    /// Records the heartbeat interval the session was told (`Welcome` or `Pace`).
    pub fn set_heartbeat_interval(&self, interval: Duration) {
        self.heartbeat_interval_ms.store(
            interval.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Whether the agent announced `capability` in its Hello.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// Stores an inventory report, already serialized as JSON.
    pub fn set_inventory_json(&self, json: Bytes) {
        *lock(&self.inventory) = Some((json, SystemTime::now()));
    }

    /// The last inventory report as JSON, shared (no copy), and when it arrived.
    pub fn inventory_json(&self) -> Option<(Bytes, SystemTime)> {
        lock(&self.inventory).clone()
    }

    /// The last inventory report, parsed back from its JSON, and when it arrived. For tools
    /// and tests: the admin API serves [`inventory_json`](Self::inventory_json) as is.
    pub fn inventory(&self) -> Option<(Inventory, SystemTime)> {
        let (json, at) = self.inventory_json()?;
        serde_json::from_slice(&json).ok().map(|inv| (inv, at))
    }

    /// The right to read the next inventory report of this session, if no other report
    /// holds it; the caller then waits [`InventoryTurn::due`] and calls
    /// [`InventoryTurn::taken`].
    pub fn inventory_turn(&self) -> Option<InventoryTurn> {
        self.inventory_turns.try_take()
    }

    /// Counts a Kubernetes command on this session until the guard is dropped.
    pub fn kube_command(self: &Arc<Self>) -> CommandSlot {
        self.kube_commands.fetch_add(1, Ordering::Relaxed);
        CommandSlot {
            session: self.clone(),
        }
    }

    /// Closes the session from the hub's side with `code`, remembering why.
    pub fn close(&self, code: crate::proto::CloseCode, reason: &str) {
        lock(&self.closed_by_hub).get_or_insert(code);
        self.connection.close(code.code(), reason);
    }

    /// The code the hub closed this session with, if it did.
    pub fn closed_by_hub(&self) -> Option<crate::proto::CloseCode> {
        *lock(&self.closed_by_hub)
    }

    /// Marks the session as draining: no new stream or command is routed to it.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether new streams and commands may go to this session: it is open and not draining.
    pub fn takes_new_streams(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.connection.close_reason().is_none()
    }

    /// Records that the control stream heard from the agent.
    pub fn heard(&self) {
        *lock(&self.last_heartbeat) = Instant::now();
    }

    /// Records a heartbeat round trip.
    pub fn set_rtt(&self, rtt: Duration) {
        self.rtt_micros.store(
            rtt.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Counts bytes relayed towards the agent.
    pub fn add_to_agent(&self, n: usize) {
        self.bytes_to_agent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes relayed from the agent.
    pub fn add_from_agent(&self, n: usize) {
        self.bytes_from_agent.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Tunnel streams open right now.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Tunnel streams opened since the session started.
    pub fn streams_total(&self) -> u64 {
        self.streams_total.load(Ordering::Relaxed)
    }

    /// What the admin API shows about this session.
    pub fn info(&self) -> AgentInfo {
        let since = self
            .connected_since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        AgentInfo {
            session_id: self.id,
            name: self.name.clone(),
            tenant: self.tenant.to_string(),
            version: self.version.clone(),
            os: self.os.clone(),
            arch: self.arch.clone(),
            capabilities: self.capabilities.clone(),
            remote_address: self.connection.remote_address(),
            connected_since_unix: since.as_secs(),
            last_heartbeat_seconds_ago: lock(&self.last_heartbeat).elapsed().as_secs_f64(),
            rtt_ms: self.rtt_micros.load(Ordering::Relaxed) as f64 / 1000.0,
            heartbeat_interval_ms: self.heartbeat_interval_ms.load(Ordering::Relaxed),
            transport: self.connection.transport().as_str(),
            lost_packets: self.connection.path().map(|p| p.lost_packets),
            path_mtu: self.connection.path().map(|p| p.mtu),
            open_streams: self.open_streams(),
            streams_total: self.streams_total(),
            bytes_in: self.bytes_from_agent.load(Ordering::Relaxed),
            bytes_out: self.bytes_to_agent.load(Ordering::Relaxed),
            certificate_not_after_unix: self
                .connection
                .peer_certificates()
                .and_then(|chain| chain.into_iter().next())
                .and_then(|cert| crate::certs::not_after(&cert).ok())
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }
}

/// A snapshot of one agent connection, as served by `GET /api/v1/agents`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentInfo {
    /// Session id on this hub.
    pub session_id: u64,
    /// Agent identifier.
    pub name: String,
    /// Tenant (`organization/environment`).
    pub tenant: String,
    /// Agent build version.
    pub version: String,
    /// Agent OS.
    pub os: String,
    /// Agent architecture.
    pub arch: String,
    /// Announced capabilities.
    pub capabilities: Vec<String>,
    /// The agent's current address as the hub sees it (UDP for QUIC, TCP for the fallback;
    /// a proxied agent shows its proxy's address).
    pub remote_address: SocketAddr,
    /// Which transport carries the session: `quic` or `tcp` (TLS over TCP, directly or
    /// through an HTTP proxy).
    pub transport: &'static str,
    /// Session start, unix seconds.
    pub connected_since_unix: u64,
    /// Seconds since the control stream last heard from the agent.
    pub last_heartbeat_seconds_ago: f64,
    /// Last heartbeat round trip in milliseconds.
    pub rtt_ms: f64,
    /// The interval the agent pings at, milliseconds: what the hub last told it, which grows
    /// with the number of agents connected (`heartbeat_min` … `heartbeat_interval`).
    pub heartbeat_interval_ms: u64,
    /// Packets QUIC declared lost on this connection so far (`null` over TCP, whose kernel
    /// hides loss).
    pub lost_packets: Option<u64>,
    /// Largest UDP payload the hub currently sends on this connection (MTU discovery;
    /// `null` over TCP).
    pub path_mtu: Option<u16>,
    /// Tunnel streams open now.
    pub open_streams: usize,
    /// Tunnel streams opened in this session.
    pub streams_total: u64,
    /// Bytes from the agent to clients.
    pub bytes_in: u64,
    /// Bytes from clients to the agent.
    pub bytes_out: u64,
    /// When the client certificate of this session expires, unix seconds: an enrolled agent
    /// renews it at two thirds of its lifetime and moves to a new session.
    pub certificate_not_after_unix: Option<u64>,
}

/// Whose turn it is to read a session's inventory report, and when the last was taken.
#[derive(Debug, Default)]
struct InventoryTurns(Arc<tokio::sync::Mutex<Option<Instant>>>);

impl InventoryTurns {
    /// The turn, unless another report holds it.
    fn try_take(&self) -> Option<InventoryTurn> {
        let last = self.0.clone().try_lock_owned().ok()?;
        Some(InventoryTurn { last })
    }
}

/// The turn to read a session's next inventory report; the next report may start when this
/// is dropped.
#[derive(Debug)]
pub struct InventoryTurn {
    /// When the last report was taken (`None`: never on this session).
    last: tokio::sync::OwnedMutexGuard<Option<Instant>>,
}

impl InventoryTurn {
    /// When this report may be read: `interval` after the last one taken; `None` at once.
    pub fn due(&self, interval: Duration) -> Option<Instant> {
        self.last.map(|t| t + interval)
    }

    /// Records that the report is taken now (read, whatever its fate).
    pub fn taken(&mut self) {
        *self.last = Some(Instant::now());
    }
}

/// Holds one Kubernetes command against its session's count.
#[derive(Debug)]
pub struct CommandSlot {
    session: Arc<AgentSession>,
}

impl Drop for CommandSlot {
    fn drop(&mut self) {
        self.session.kube_commands.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Holds one open tunnel stream against its session's count; dropping it releases the slot.
#[derive(Debug)]
pub struct StreamSlot {
    pub(super) session: Arc<AgentSession>,
}

impl StreamSlot {
    /// The session the stream belongs to.
    pub fn session(&self) -> &Arc<AgentSession> {
        &self.session
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.session.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_inventory_turn_at_a_time_and_the_next_waits_out_the_interval() {
        let turns = InventoryTurns::default();
        let interval = Duration::from_secs(30);
        let mut first = turns.try_take().unwrap();
        assert_eq!(
            first.due(interval),
            None,
            "the first report is read at once"
        );
        assert!(
            turns.try_take().is_none(),
            "a second report meanwhile is refused"
        );
        first.taken();
        let taken_at = Instant::now();
        drop(first);
        let second = turns.try_take().unwrap();
        let due = second.due(interval).unwrap();
        // `taken` ran just before `taken_at` was read: due is the interval after it.
        assert!(due <= taken_at + interval, "{due:?} {taken_at:?}");
        assert!(due + Duration::from_secs(1) > taken_at + interval);
        // A turn that ends without taking a report keeps the last time.
        drop(second);
        assert_eq!(turns.try_take().unwrap().due(interval), Some(due));
    }
}
