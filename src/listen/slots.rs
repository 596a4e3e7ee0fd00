//! Counts of things held per key (connections per client address, handshakes per source
//! block, Kubernetes waits per token), each under a cap per key and, optionally, a cap on the
//! total; a slot is given back when its guard is dropped.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which cap turned a [`KeyedSlots::take`] away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotsFull {
    /// The cap on slots held by all keys together.
    Total,
    /// The key's own cap.
    Key,
}

/// Slots held per key, with a cap per key and an optional cap on the total. Cloning gives
/// another handle to the same counts. Taking and giving back a slot is O(1): the total is
/// kept as a number, never summed over the keys, and a key whose count drops to zero is
/// removed, so the map is never larger than the slots held.
pub struct KeyedSlots<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    counts: Mutex<Counts<K>>,
    /// The cap on `Counts::total`, if any.
    max_total: Option<usize>,
}

struct Counts<K> {
    per_key: HashMap<K, usize>,
    /// The sum of `per_key`'s values, kept in step with it.
    total: usize,
}

impl<K> Clone for KeyedSlots<K> {
    fn clone(&self) -> Self {
        KeyedSlots {
            inner: self.inner.clone(),
        }
    }
}

impl<K: Eq + Hash> Default for KeyedSlots<K> {
    fn default() -> Self {
        KeyedSlots::new(None)
    }
}

impl<K> fmt::Debug for KeyedSlots<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self.lock();
        f.debug_struct("KeyedSlots")
            .field("keys", &counts.per_key.len())
            .field("total", &counts.total)
            .field("max_total", &self.inner.max_total)
            .finish()
    }
}

impl<K> KeyedSlots<K> {
    fn lock(&self) -> MutexGuard<'_, Counts<K>> {
        // A panic while holding the lock leaves counts that are still usable.
        self.inner.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Slots held now by all keys together.
    pub fn total(&self) -> usize {
        self.lock().total
    }

    /// Keys holding at least one slot now.
    pub fn keys(&self) -> usize {
        self.lock().per_key.len()
    }
}

impl<K: Eq + Hash> KeyedSlots<K> {
    /// Empty counts; `max_total` caps the slots of all keys together (`None`: no such cap).
    pub fn new(max_total: Option<usize>) -> Self {
        KeyedSlots {
            inner: Arc::new(Inner {
                counts: Mutex::new(Counts {
                    per_key: HashMap::new(),
                    total: 0,
                }),
                max_total,
            }),
        }
    }

    /// Slots `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        self.lock().per_key.get(key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash + Clone> KeyedSlots<K> {
    /// One more slot for `key`, unless the total cap is reached (checked first) or `key`
    /// already holds `max_per_key`. The slot is given back when the guard is dropped.
    pub fn take(&self, key: K, max_per_key: usize) -> Result<Slot<K>, SlotsFull> {
        let mut counts = self.lock();
        if self.inner.max_total.is_some_and(|max| counts.total >= max) {
            return Err(SlotsFull::Total);
        }
        if counts.per_key.get(&key).copied().unwrap_or(0) >= max_per_key {
            return Err(SlotsFull::Key);
        }
        *counts.per_key.entry(key.clone()).or_insert(0) += 1;
        counts.total += 1;
        drop(counts);
        Ok(Slot {
            owner: self.clone(),
            key,
        })
    }
}

/// One slot of a key in [`KeyedSlots`]; dropping it gives the slot back.
pub struct Slot<K: Eq + Hash> {
    owner: KeyedSlots<K>,
    key: K,
}

impl<K: Eq + Hash> fmt::Debug for Slot<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.owner.lock();
        let emptied = match counts.per_key.get_mut(&self.key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            // Not there: nothing of ours to give back (cannot happen while the guard lives).
            None => return,
        };
        counts.total = counts.total.saturating_sub(1);
        if emptied {
            // Empty entries are removed, so the map is bounded by the slots held.
            counts.per_key.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_key_and_in_total_and_slots_come_back_on_drop() {
        let slots = KeyedSlots::new(Some(3));
        let a1 = slots.take("a", 2).unwrap();
        let a2 = slots.take("a", 2).unwrap();
        assert_eq!(slots.take("a", 2).err(), Some(SlotsFull::Key));
        let b1 = slots.take("b", 2).unwrap();
        assert_eq!((slots.total(), slots.keys()), (3, 2));
        // The total is checked first: a key under its own cap is still refused.
        assert_eq!(slots.take("c", 2).err(), Some(SlotsFull::Total));
        drop(a1);
        assert_eq!(slots.held(&"a"), 1);
        let c1 = slots.take("c", 2).unwrap();
        drop((a2, b1, c1));
        assert_eq!((slots.total(), slots.keys()), (0, 0), "no empty entry kept");
    }

    #[test]
    fn without_a_total_cap_only_the_per_key_cap_applies_and_it_may_differ_per_call() {
        let slots = KeyedSlots::<String>::default();
        let held: Vec<_> = (0..100)
            .map(|i| slots.take(format!("k{i}"), 1).unwrap())
            .collect();
        assert_eq!(slots.total(), 100);
        assert_eq!(slots.take("k0".into(), 1).err(), Some(SlotsFull::Key));
        let more = slots.take("k0".into(), 2).unwrap();
        assert_eq!(slots.held(&"k0".to_string()), 2);
        drop(held);
        drop(more);
        assert_eq!((slots.total(), slots.keys()), (0, 0));
    }

    #[test]
    fn a_zero_cap_refuses_everything() {
        let slots = KeyedSlots::new(Some(0));
        assert_eq!(slots.take(1u8, 5).err(), Some(SlotsFull::Total));
        let slots = KeyedSlots::new(None);
        assert_eq!(slots.take(1u8, 0).err(), Some(SlotsFull::Key));
        assert_eq!(slots.keys(), 0, "a refusal leaves no entry");
    }

    #[test]
    fn clones_share_the_counts() {
        let slots = KeyedSlots::new(Some(1));
        let other = slots.clone();
        let held = slots.take('x', 1).unwrap();
        assert_eq!(other.take('y', 1).err(), Some(SlotsFull::Total));
        drop(held);
        assert!(other.take('y', 1).is_ok());
    }
}
