//! Admission of agent connection attempts before any TLS work: a QUIC Retry for addresses not
//! yet validated once the hub is busy, handshake slots per source and in total, and a
//! rate-limited log of failed handshakes.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::metrics::Metrics;

use crate::listen::{KeyedSlots, LogBudget, Slot};

/// The block of addresses one sender is assumed to control: one IPv4 address (/32), or one
/// IPv6 /64 (a single host usually has a whole /64, so counting /128s would be no cap).
/// IPv4-mapped IPv6 addresses (a hub on `[::]`) count as the IPv4 address they carry.
pub fn source_block(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
    }
}

/// What the hub does with a new QUIC connection attempt.
#[derive(Debug)]
pub(crate) enum Admission {
    /// Start the handshake, holding these slots until it ends.
    Accept(HandshakeSlot),
    /// Answer with a QUIC Retry (RFC 9000 §8.1.2): a real agent comes back at once with a
    /// token proving its address; a spoofed source never does, and costs one small packet.
    Retry,
    /// Every handshake slot is taken: wait in the hub's queue for one (a validated address
    /// only, holding its source block's slot meanwhile), as a listen backlog does. The agent's
    /// Initial is answered as soon as a slot frees, with no new attempt on either side.
    Wait(WaitingSlot),
    /// Refuse with `CONNECTION_REFUSED`; the label is the cap that was full.
    Refuse(&'static str),
}

/// The source block's slot of an attempt waiting for a handshake slot ([`Admission::Wait`]).
#[derive(Debug)]
pub(crate) struct WaitingSlot(Slot<IpAddr>);

/// Handshakes in progress per source block, only for addresses that proved they receive our
/// packets. Unvalidated attempts are left out on purpose: a spoofer could otherwise fill the
/// quota of a victim's address and lock its agents out; they are bounded by the Retry
/// threshold instead. The total is capped by [`Gate`]'s semaphore, not here.
type SourceCounts = KeyedSlots<IpAddr>;

/// The slots one handshake holds (in total, and of its source block when validated); both are
/// given back when it is dropped, at the end of the handshake.
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    _total: OwnedSemaphorePermit,
    _source: Option<Slot<IpAddr>>,
}

/// The admission rules, with the state they need.
#[derive(Debug)]
pub(crate) struct Gate {
    /// One permit per handshake in progress.
    total: Arc<Semaphore>,
    /// How many permits `total` started with.
    capacity: usize,
    per_source: usize,
    retry_threshold: usize,
    sources: SourceCounts,
    /// Attempts given a slot or a place in the queue so far.
    admitted: std::sync::atomic::AtomicU64,
}

impl Gate {
    /// `capacity` handshakes in total, `per_source` per validated source block; unvalidated
    /// addresses are asked for a Retry once `retry_threshold` handshakes are in progress.
    pub(crate) fn new(capacity: usize, per_source: usize, retry_threshold: usize) -> Gate {
        let capacity = capacity.min(Semaphore::MAX_PERMITS);
        Gate {
            total: Arc::new(Semaphore::new(capacity)),
            capacity,
            per_source,
            retry_threshold,
            sources: SourceCounts::default(),
            admitted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Handshakes in progress now.
    pub(crate) fn in_progress(&self) -> usize {
        self.capacity.saturating_sub(self.total.available_permits())
    }

    /// Attempts given a slot or a place in the queue since the hub started: agents that
    /// arrived (the recall of a restarted hub counts them against the resets it sent).
    pub(crate) fn admitted(&self) -> u64 {
        self.admitted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-source counts (for tests and the bound on their size).
    #[cfg(test)]
    pub(crate) fn sources(&self) -> &SourceCounts {
        &self.sources
    }

    /// A free handshake slot, once one is (for the oldest waiting attempt).
    pub(crate) async fn free_slot(&self) -> OwnedSemaphorePermit {
        match self.total.clone().acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed; should it be, no slot ever frees.
            Err(_) => std::future::pending().await,
        }
    }

    /// A waiting attempt given the free slot `total`: its handshake starts.
    pub(crate) fn seat(waiting: WaitingSlot, total: OwnedSemaphorePermit) -> HandshakeSlot {
        HandshakeSlot {
            _total: total,
            _source: Some(waiting.0),
        }
    }

    /// Decides for one attempt from `remote`; `validated` is whether its address is proven
    /// (it came back with a Retry token); `may_wait` whether the hub's queue of attempts
    /// waiting for a slot has room. Cheap and synchronous: it runs on the accept loop.
    pub(crate) fn admit(&self, remote: IpAddr, validated: bool, may_wait: bool) -> Admission {
        let admission = self.decide(remote, validated, may_wait);
        if matches!(admission, Admission::Accept(_) | Admission::Wait(_)) {
            self.admitted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        admission
    }

    fn decide(&self, remote: IpAddr, validated: bool, may_wait: bool) -> Admission {
        if !validated {
            // Past the threshold (or with no slot left), an address must first prove it is
            // real. Refusals therefore only ever go to validated addresses, and an unvalidated
            // one is never sent more than the Retry packet, smaller than its Initial.
            if self.in_progress() >= self.retry_threshold.min(self.capacity) {
                return Admission::Retry;
            }
            return match self.total.clone().try_acquire_owned() {
                Ok(total) => Admission::Accept(HandshakeSlot {
                    _total: total,
                    _source: None,
                }),
                Err(_) => Admission::Retry,
            };
        }
        let Ok(source) = self.sources.take(source_block(remote), self.per_source) else {
            return Admission::Refuse("quic_handshakes_per_source");
        };
        match self.total.clone().try_acquire_owned() {
            Ok(total) => Admission::Accept(HandshakeSlot {
                _total: total,
                _source: Some(source),
            }),
            Err(_) if may_wait => Admission::Wait(WaitingSlot(source)),
            Err(_) => Admission::Refuse("quic_handshakes"),
        }
    }
}

/// Validated QUIC attempts that may wait for a handshake slot at once; past it they are
/// refused as before. Below quinn's own bound on attempts not yet answered
/// (`Limits::max_incoming`, 1024), so the hub, not quinn, decides about every attempt.
pub(crate) const HANDSHAKE_QUEUE: usize = 512;

/// QUIC attempts waiting for a handshake slot ([`Admission::Wait`]), oldest first. Each holds
/// its source block's slot and the Initial packets quinn buffers for it (bounded by
/// `incoming_buffer_size`); the agent resends its Initial at its probe timeout meanwhile, and
/// quinn answers it once the attempt is accepted.
#[derive(Default)]
pub(crate) struct WaitQueue {
    queue: VecDeque<(quinn::Incoming, WaitingSlot, Instant)>,
}

impl WaitQueue {
    /// Attempts waiting now.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether none waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds an attempt at the back.
    pub(crate) fn push(&mut self, incoming: quinn::Incoming, slot: WaitingSlot) {
        self.queue.push_back((incoming, slot, Instant::now()));
    }

    /// When the oldest attempt will have waited `wait`.
    pub(crate) fn oldest_expiry(&self, wait: Duration) -> Option<Instant> {
        self.queue.front().map(|(_, _, since)| *since + wait)
    }

    /// The oldest attempt that has waited less than `wait`; older ones are refused.
    pub(crate) fn next(
        &mut self,
        wait: Duration,
        metrics: &Metrics,
    ) -> Option<(quinn::Incoming, WaitingSlot)> {
        self.refuse_expired(wait, metrics);
        self.queue
            .pop_front()
            .map(|(incoming, slot, _)| (incoming, slot))
    }

    /// Refuses, with `CONNECTION_REFUSED` (`cap="quic_handshakes"`), every attempt that has
    /// waited `wait`: its agent retries after its short backoff.
    pub(crate) fn refuse_expired(&mut self, wait: Duration, metrics: &Metrics) {
        let now = Instant::now();
        while let Some((_, _, since)) = self.queue.front() {
            if now < *since + wait {
                break;
            }
            if let Some((incoming, _, _)) = self.queue.pop_front() {
                metrics.cap_refused("quic_handshakes");
                debug!(remote = %incoming.remote_address(), waited = ?wait,
                    "agent connection refused: no handshake slot freed in time");
                incoming.refuse();
            }
        }
    }
}

/// Individual WARN lines for failed handshakes, at most `burst` per window; the rest are
/// counted and summed up in one line when the window ends. A flood of bad handshakes would
/// otherwise write a line per packet (megabytes per minute); the per-reason counters in
/// `rna_handshake_failures_total` still see every one.
#[derive(Debug)]
pub(crate) struct FailureLog {
    window: Duration,
    state: Mutex<FailureWindow>,
}

#[derive(Debug)]
struct FailureWindow {
    /// The line budget of the window and the count of failures it did not log.
    budget: LogBudget,
    /// Those failures again, by reason, for the summary.
    suppressed: BTreeMap<&'static str, u64>,
}

impl FailureLog {
    /// Up to `burst` lines per `window`.
    pub(crate) fn new(window: Duration, burst: u32) -> FailureLog {
        FailureLog {
            window,
            state: Mutex::new(FailureWindow {
                budget: LogBudget::new(window, burst),
                suppressed: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FailureWindow> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs one failed handshake (`reason` is its metric label) unless this window's burst is
    /// spent, in which case it is only counted for the summary.
    pub(crate) fn failed(&self, reason: &'static str, line: std::fmt::Arguments<'_>) {
        let mut state = self.lock();
        let summary = Self::roll(&mut state);
        // After the roll nothing is pending, so the count `event` hands back is always zero.
        let log = state.budget.event().is_some();
        if !log {
            *state.suppressed.entry(reason).or_insert(0) += 1;
        }
        drop(state);
        if let Some((total, reasons)) = summary {
            self.summarise(total, &reasons);
        }
        if log {
            warn!(reason, "agent refused: {line}");
        }
    }

    /// Ends the window if it is over, writing the summary of what it did not log. Called on
    /// a timer too, so the last window of a flood is reported when the flood stops.
    pub(crate) fn flush(&self) {
        let summary = Self::roll(&mut self.lock());
        if let Some((total, reasons)) = summary {
            self.summarise(total, &reasons);
        }
    }

    /// Ends the window if it is over; returns what it did not log, in total and by reason.
    fn roll(state: &mut FailureWindow) -> Option<(u64, String)> {
        let total = state.budget.roll()?;
        let reasons = std::mem::take(&mut state.suppressed)
            .iter()
            .map(|(reason, n)| format!("{reason}={n}"))
            .collect::<Vec<_>>()
            .join(" ");
        Some((total, reasons))
    }

    fn summarise(&self, total: u64, reasons: &str) {
        warn!(suppressed = total, reasons, window = ?self.window,
            "{total} more agent handshakes failed without a line each ({reasons}); \
             rna_handshake_failures_total counts them all");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_block_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let cases: [(&str, &str); 5] = [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"),
            ("2001:db8:1:2::1", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
        ];
        for (ip, block) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(source_block(ip), block.parse::<IpAddr>().unwrap(), "{ip}");
        }
    }

    fn accepted(a: Admission) -> HandshakeSlot {
        match a {
            Admission::Accept(slot) => slot,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    #[test]
    fn unvalidated_addresses_get_a_retry_past_the_threshold_and_never_a_refusal() {
        let gate = Gate::new(4, 1, 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        // Below the threshold, unvalidated attempts are accepted and not counted per source.
        let a = accepted(gate.admit(ip, false, false));
        let b = accepted(gate.admit(ip, false, false));
        assert_eq!(gate.sources().keys(), 0);
        assert!(matches!(gate.admit(ip, false, false), Admission::Retry));
        // A validated one still has room, in total and for its source.
        let c = accepted(gate.admit(ip, true, false));
        assert_eq!(gate.in_progress(), 3);
        // Its block holds its one handshake: a second from the same /32 is refused.
        assert!(matches!(
            gate.admit(ip, true, false),
            Admission::Refuse("quic_handshakes_per_source")
        ));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let d = accepted(gate.admit(other, true, false));
        // Full: validated attempts are refused, unvalidated ones still only get a Retry.
        let third: IpAddr = "192.0.2.3".parse().unwrap();
        assert!(matches!(
            gate.admit(third, true, false),
            Admission::Refuse("quic_handshakes")
        ));
        assert!(matches!(gate.admit(third, false, false), Admission::Retry));
        drop((a, b, c, d));
        assert_eq!(gate.in_progress(), 0);
        assert_eq!(gate.sources().keys(), 0, "empty source entries are removed");
    }

    #[test]
    fn a_zero_threshold_asks_every_unvalidated_address_for_a_retry() {
        let gate = Gate::new(4, 4, 0);
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(matches!(gate.admit(ip, false, false), Admission::Retry));
        let _slot = accepted(gate.admit(ip, true, false));
        // The same /64 shares the count.
        let sibling: IpAddr = "2001:db8::2".parse().unwrap();
        let _second = accepted(gate.admit(sibling, true, false));
        assert_eq!(gate.sources().keys(), 1);
    }

    #[tokio::test]
    async fn a_validated_attempt_waits_for_a_slot_when_the_queue_has_room() {
        let gate = Gate::new(1, 1, 0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = accepted(gate.admit(ip, true, true));
        // Full: with room in the queue a validated attempt waits, holding its source's slot.
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let Admission::Wait(waiting) = gate.admit(other, true, true) else {
            panic!("expected Wait");
        };
        assert_eq!(gate.sources().keys(), 2);
        // Its source's cap still counts the waiting attempt.
        assert!(matches!(
            gate.admit(other, true, true),
            Admission::Refuse("quic_handshakes_per_source")
        ));
        // Unvalidated attempts never wait: they are asked for a Retry.
        let third: IpAddr = "192.0.2.3".parse().unwrap();
        assert!(matches!(gate.admit(third, false, true), Admission::Retry));
        // No slot frees while the first handshake runs.
        let early = tokio::time::timeout(Duration::from_millis(20), gate.free_slot()).await;
        assert!(early.is_err(), "a slot was handed out while all were taken");
        drop(first);
        let total = tokio::time::timeout(Duration::from_secs(5), gate.free_slot())
            .await
            .expect("the freed slot");
        let seated = Gate::seat(waiting, total);
        assert_eq!(gate.in_progress(), 1);
        drop(seated);
        assert_eq!(gate.in_progress(), 0);
        assert_eq!(gate.sources().keys(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_lines_past_the_burst_are_summed_up_per_window() {
        let log = FailureLog::new(Duration::from_secs(10), 2);
        for _ in 0..5 {
            log.failed("tls", format_args!("x"));
        }
        log.failed("timeout", format_args!("y"));
        {
            let state = log.lock();
            assert_eq!(state.suppressed.get("tls"), Some(&3));
            assert_eq!(state.suppressed.get("timeout"), Some(&1));
        }
        // Nothing rolls before the window is over.
        log.flush();
        assert_eq!(log.lock().suppressed.len(), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        let mut state = log.lock();
        assert_eq!(
            FailureLog::roll(&mut state),
            Some((4, "timeout=1 tls=3".to_string()))
        );
        assert!(state.suppressed.is_empty());
        assert_eq!(FailureLog::roll(&mut state), None, "summed up once");
        drop(state);
        // The next window logs its own burst again.
        log.failed("tls", format_args!("z"));
        log.failed("tls", format_args!("z"));
        assert!(log.lock().suppressed.is_empty());
        log.failed("tls", format_args!("z"));
        assert_eq!(log.lock().suppressed.get("tls"), Some(&1));
    }
}
