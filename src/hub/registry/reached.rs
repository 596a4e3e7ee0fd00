//! The destinations an agent session connected to lately, so the SOCKS front may answer a
//! request for one of them before the agent does (`--socks-early-reply`).
//!
//! A first request to a destination, or one whose last connection is older than the window,
//! waits for the agent's answer and gets its exact SOCKS reply code; a request to a
//! destination reached within the window is answered at once and its bytes travel behind
//! the `Open`, which saves the client one hub–agent round trip. The record is per session:
//! an agent that reconnects (possibly with another policy or in another network) starts
//! with none.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::agent::lock;
use crate::proto::Host;

/// Destinations remembered per session at most; a full record first drops what is older
/// than the window, then the oldest entry.
pub const REACHED_MAX: usize = 1024;

/// Destinations (host, port) and when the agent last connected to each.
#[derive(Debug, Default)]
pub struct Reached {
    // Allocates on the first successful connection only: idle sessions pay the empty map.
    last: Mutex<HashMap<(Host, u16), Instant>>,
}

impl Reached {
    /// Whether the agent connected to `host:port` within `window` of `now`.
    pub fn within(&self, host: &Host, port: u16, window: Duration, now: Instant) -> bool {
        if window.is_zero() {
            return false;
        }
        // The key is built only to look up; a lookup without a clone needs an owned key.
        lock(&self.last)
            .get(&(host.clone(), port))
            .is_some_and(|&at| now.saturating_duration_since(at) <= window)
    }

    /// Records a connection to `host:port` at `now`, within [`REACHED_MAX`] entries: a full
    /// record drops the entries older than `window`, and if none is, the oldest.
    pub fn record(&self, host: &Host, port: u16, window: Duration, now: Instant) {
        let mut last = lock(&self.last);
        let key = (host.clone(), port);
        if !last.contains_key(&key) && last.len() >= REACHED_MAX {
            last.retain(|_, at| now.saturating_duration_since(*at) <= window);
            if last.len() >= REACHED_MAX {
                let oldest = last
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    last.remove(&oldest);
                }
            }
        }
        last.insert(key, now);
    }

    /// Forgets `host:port` (the agent could not connect after an early reply), so the next
    /// request waits for the agent's answer and gets its exact reply code.
    pub fn forget(&self, host: &Host, port: u16) {
        lock(&self.last).remove(&(host.clone(), port));
    }

    /// Destinations remembered.
    pub fn remembered(&self) -> usize {
        lock(&self.last).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> Host {
        Host::Domain(name.into())
    }

    #[test]
    fn a_destination_counts_only_within_the_window_and_until_forgotten() {
        let reached = Reached::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        assert!(
            !reached.within(&host("db"), 5432, w, t0),
            "nothing recorded yet"
        );
        reached.record(&host("db"), 5432, w, t0);
        assert!(reached.within(&host("db"), 5432, w, t0 + w));
        assert!(!reached.within(&host("db"), 5432, w, t0 + w + Duration::from_millis(1)));
        assert!(!reached.within(&host("db"), 5433, w, t0), "another port");
        assert!(!reached.within(&host("db2"), 5432, w, t0), "another host");
        assert!(
            !reached.within(&host("db"), 5432, Duration::ZERO, t0),
            "a zero window turns early replies off"
        );
        reached.record(&host("db"), 5432, w, t0 + w);
        assert!(
            reached.within(&host("db"), 5432, w, t0 + 2 * w),
            "refreshed"
        );
        reached.forget(&host("db"), 5432);
        assert!(!reached.within(&host("db"), 5432, w, t0 + w));
    }

    #[test]
    fn a_full_record_drops_stale_entries_then_the_oldest() {
        let reached = Reached::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let ms = Duration::from_millis;
        let half = REACHED_MAX / 2;
        // The first half is stale by the time the record fills; the second is fresh, each
        // entry a millisecond younger than the one before.
        for i in 0..REACHED_MAX {
            let at = if i < half {
                t0
            } else {
                t0 + w * 2 + ms(i as u64)
            };
            reached.record(&host(&format!("h{i}")), 80, w, at);
        }
        assert_eq!(reached.remembered(), REACHED_MAX);
        let now = t0 + w * 2 + ms(REACHED_MAX as u64);
        reached.record(&host("new"), 80, w, now);
        assert_eq!(reached.remembered(), half + 1, "the stale half was dropped");
        assert!(reached.within(&host("new"), 80, w, now));
        assert!(reached.within(&host(&format!("h{half}")), 80, w, now));
        // Refill with fresh entries: now the oldest one goes, and only it.
        let mut i = 0;
        while reached.remembered() < REACHED_MAX {
            reached.record(&host(&format!("f{i}")), 80, w, now + ms(i + 1));
            i += 1;
        }
        // Nothing is stale yet at `later`.
        let later = now + ms(i + 1);
        reached.record(&host("newest"), 80, w, later);
        assert_eq!(reached.remembered(), REACHED_MAX);
        assert!(
            !reached.within(&host(&format!("h{half}")), 80, w, now),
            "the oldest was dropped"
        );
        assert!(reached.within(&host(&format!("h{}", half + 1)), 80, w, now));
        assert!(reached.within(&host("newest"), 80, w, later));
        // Recording a destination already there never evicts another.
        reached.record(&host("newest"), 80, w, later);
        assert_eq!(reached.remembered(), REACHED_MAX);
        assert!(reached.within(&host(&format!("h{}", half + 1)), 80, w, now));
    }
}
