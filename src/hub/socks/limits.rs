//! Per-client bounds of the SOCKS front: connections still in their greeting, per source and
//! in total (with eviction of the busiest source's oldest), and the connections of each token,
//! so they are reset when the token stops being valid.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::auth::TokenStore;

/// Where a half-open connection comes from, for its per-source count: the IPv4 address, or
/// the /64 network of an IPv6 address (one host usually holds a whole /64, so counting
/// single IPv6 addresses would give it millions of allowances).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Source(IpAddr);

impl Source {
    pub(super) fn of(ip: IpAddr) -> Source {
        Source(crate::hub::admission::source_block(ip))
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(net) => write!(f, "{net}/64"),
            IpAddr::V4(ip) => write!(f, "{ip}"),
        }
    }
}

/// Connections still in the greeting, per source and in total. A source at its own cap is
/// refused; when the total is full, the oldest half-open connection of the source holding
/// the most is dropped to make room, so a flood from a few sources cannot lock out a client
/// from anywhere else.
pub(super) struct HalfOpen {
    state: Mutex<HalfOpenState>,
    max_per_source: usize,
    max_total: usize,
}

#[derive(Default)]
struct HalfOpenState {
    /// Per source, its half-open connections by admission number (oldest first), each with
    /// the token that drops it.
    sources: HashMap<Source, BTreeMap<u64, CancellationToken>>,
    total: usize,
    next: u64,
}

impl HalfOpen {
    /// At most `max_per_source` half-open connections per source and `max_total` in all.
    pub(super) fn new(max_per_source: usize, max_total: usize) -> HalfOpen {
        HalfOpen {
            state: Mutex::new(HalfOpenState::default()),
            max_per_source,
            max_total,
        }
    }

    /// Admits a connection from `ip`, returning its guard and the source whose oldest
    /// half-open connection was dropped to make room, if one was.
    pub(super) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<(HalfOpenGuard, Option<Source>), &'static str> {
        let source = Source::of(ip);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let held = state.sources.get(&source).map_or(0, BTreeMap::len);
        if held >= self.max_per_source {
            return Err("half_open_per_ip");
        }
        let mut evicted = None;
        if state.total >= self.max_total {
            evicted = state.evict_busiest();
            if evicted.is_none() {
                return Err("half_open_total");
            }
        }
        let seq = state.next;
        state.next += 1;
        let drop_me = CancellationToken::new();
        state
            .sources
            .entry(source)
            .or_default()
            .insert(seq, drop_me.clone());
        state.total += 1;
        Ok((
            HalfOpenGuard {
                owner: self.clone(),
                source,
                seq,
                dropped: drop_me,
            },
            evicted,
        ))
    }
}

impl HalfOpenState {
    /// Drops the oldest half-open connection of the source holding the most (the oldest
    /// among equals) and returns that source.
    fn evict_busiest(&mut self) -> Option<Source> {
        let (&source, _) = self
            .sources
            .iter()
            .filter_map(|(source, held)| {
                held.keys()
                    .next()
                    .map(|&oldest| (source, (held.len(), oldest)))
            })
            .max_by(|(_, (a_len, a_oldest)), (_, (b_len, b_oldest))| {
                a_len.cmp(b_len).then(b_oldest.cmp(a_oldest))
            })?;
        let held = self.sources.get_mut(&source)?;
        let (_, drop_it) = held.pop_first()?;
        if held.is_empty() {
            self.sources.remove(&source);
        }
        self.total -= 1;
        drop_it.cancel();
        Some(source)
    }
}

/// One admitted half-open connection; leaves the count when dropped.
pub(super) struct HalfOpenGuard {
    owner: Arc<HalfOpen>,
    source: Source,
    seq: u64,
    /// Fired when the connection is dropped to make room for a newcomer.
    pub(super) dropped: CancellationToken,
}

impl Drop for HalfOpenGuard {
    fn drop(&mut self) {
        let mut state = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(held) = state.sources.get_mut(&self.source) else {
            return;
        };
        // An evicted connection was already taken out of the count.
        if held.remove(&self.seq).is_some() {
            if held.is_empty() {
                state.sources.remove(&self.source);
            }
            state.total -= 1;
        }
    }
}

/// SOCKS connections by the id of the token that authenticated them, so those of a token
/// that was revoked, removed or expired are reset (as agent sessions are closed).
#[derive(Debug, Default)]
pub(crate) struct TokenStreams {
    by_token: Mutex<HashMap<String, TokenEntry>>,
}

#[derive(Debug)]
struct TokenEntry {
    /// Cancelled to reset every connection of the token.
    cut: CancellationToken,
    /// Connections holding a [`TokenStreamGuard`] of this entry.
    holders: usize,
    /// Tells this entry from a later one of the same id (after a cut, a token made live
    /// again by editing the store starts afresh).
    generation: u64,
}

/// A connection's membership in [`TokenStreams`]; `cancelled()` fires when its token stops
/// being valid.
#[derive(Debug)]
pub(crate) struct TokenStreamGuard {
    owner: Arc<TokenStreams>,
    id: String,
    generation: u64,
    cut: CancellationToken,
}

impl TokenStreams {
    /// Joins a connection authenticated by token `id`.
    pub(crate) fn enter(self: &Arc<Self>, id: &str) -> TokenStreamGuard {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(id.to_string()).or_insert_with(|| TokenEntry {
            cut: CancellationToken::new(),
            holders: 0,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        });
        entry.holders += 1;
        TokenStreamGuard {
            owner: self.clone(),
            id: id.to_string(),
            generation: entry.generation,
            cut: entry.cut.clone(),
        }
    }

    /// Resets the connections of every token that `store` no longer accepts at `now`;
    /// returns how many connections that was.
    pub(crate) fn cut_without_token(&self, store: &TokenStore, now: SystemTime) -> usize {
        let mut map = self.by_token.lock().unwrap_or_else(|p| p.into_inner());
        let mut cut = 0;
        map.retain(|id, entry| {
            if store.is_live(id, now) {
                return true;
            }
            let why = match store.get(id) {
                Some(r) if !r.revoked => "token expired",
                Some(_) => "token revoked",
                None => "token removed from the store",
            };
            warn!(token_id = %id, connections = entry.holders,
                "resetting SOCKS connections: {why}");
            entry.cut.cancel();
            cut += entry.holders;
            false
        });
        cut
    }

    /// Tokens with connections now (for tests of the bookkeeping).
    #[cfg(test)]
    fn tokens(&self) -> usize {
        self.by_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl TokenStreamGuard {
    /// Completes when the token stops being valid. Cancel-safe.
    pub(crate) async fn cancelled(&self) {
        self.cut.cancelled().await
    }

    /// Whether the token already stopped being valid.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cut.is_cancelled()
    }
}

impl Drop for TokenStreamGuard {
    fn drop(&mut self) {
        let mut map = self
            .owner
            .by_token
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.id) {
            if entry.generation == self.generation {
                entry.holders -= 1;
                if entry.holders == 0 {
                    map.remove(&self.id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Scope, Tenant};

    #[test]
    fn ipv6_sources_are_counted_per_64() {
        let table = [
            ("10.1.2.3", "10.1.2.3"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
            ("::1", "::/64"),
        ];
        for (ip, want) in table {
            assert_eq!(Source::of(ip.parse().unwrap()).to_string(), want, "{ip}");
        }
    }

    fn half_open(per_source: usize, total: usize) -> Arc<HalfOpen> {
        Arc::new(HalfOpen {
            state: Mutex::new(HalfOpenState::default()),
            max_per_source: per_source,
            max_total: total,
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_full_half_open_set_drops_the_busiest_sources_oldest() {
        let limits = half_open(2, 4);
        // One /64 is one source: its third connection is refused whatever the address.
        let (a1, _) = limits.admit(ip("2001:db8::1")).unwrap();
        let (a2, _) = limits.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(
            limits.admit(ip("2001:db8::3")).err(),
            Some("half_open_per_ip")
        );
        let (b1, _) = limits.admit(ip("10.0.0.1")).unwrap();
        let (c1, evicted) = limits.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(evicted, None);
        // Full: a newcomer drops the oldest connection of the busiest source (the /64).
        let (d1, evicted) = limits.admit(ip("10.0.0.3")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("2001:db8::9"))));
        assert!(a1.dropped.is_cancelled());
        assert!(!a2.dropped.is_cancelled());
        // Among equals (one each), the oldest goes.
        let (_e1, evicted) = limits.admit(ip("10.0.0.4")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("2001:db8::2"))));
        assert!(a2.dropped.is_cancelled());
        let (_f1, evicted) = limits.admit(ip("10.0.0.5")).unwrap();
        assert_eq!(evicted, Some(Source::of(ip("10.0.0.1"))));
        assert!(b1.dropped.is_cancelled());
        // Dropping evicted guards changes nothing; dropping a live one frees its place.
        drop((a1, a2, b1));
        assert_eq!(limits.state.lock().unwrap().total, 4);
        drop(c1);
        let (_g1, evicted) = limits.admit(ip("10.0.0.6")).unwrap();
        assert_eq!(evicted, None);
        assert!(!d1.dropped.is_cancelled());
    }

    #[test]
    fn token_streams_are_cut_when_the_token_stops_being_valid() {
        let mut store = TokenStore::default();
        let now = SystemTime::now();
        let tenant: Tenant = "acme/prod".parse().unwrap();
        let (_, kept) = store
            .create(tenant.clone(), vec![Scope::Proxy], None, None, now)
            .unwrap();
        let (_, revoked) = store
            .create(tenant, vec![Scope::Proxy], None, None, now)
            .unwrap();
        let streams = Arc::new(TokenStreams::default());
        let k1 = streams.enter(&kept.id);
        let r1 = streams.enter(&revoked.id);
        let r2 = streams.enter(&revoked.id);
        assert_eq!(streams.cut_without_token(&store, now), 0);
        store.revoke(&revoked.id).unwrap();
        assert_eq!(streams.cut_without_token(&store, now), 2);
        assert!(r1.is_cancelled() && r2.is_cancelled());
        assert!(!k1.is_cancelled());
        assert_eq!(streams.tokens(), 1);
        // A later connection of the same id is a new entry; the old guards leave it alone.
        let r3 = streams.enter(&revoked.id);
        drop((r1, r2));
        assert_eq!(streams.tokens(), 2);
        drop((r3, k1));
        assert_eq!(streams.tokens(), 0);
        let gone = streams.enter("ffffffffffff");
        assert_eq!(streams.cut_without_token(&store, now), 1);
        assert!(gone.is_cancelled());
    }
}
