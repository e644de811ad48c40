//! A map of values kept by key, bounded by entries and bytes: the caches of
//! serving that are per question (batch pieces, conversions, points, validated
//! questions).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Values kept by key within a number of entries and an estimate of their
/// bytes. When either would be passed, every entry is dropped (a cache of
/// questions has no better order to drop them in: a published run drops them all
/// anyway); a value larger than the whole budget is not kept.
pub struct Bounded<K, V> {
    entries: usize,
    bytes: usize,
    kept: Mutex<Weighed<K, V>>,
}

/// Values with their estimated bytes, and those bytes' sum.
struct Weighed<K, V> {
    values: HashMap<K, (Arc<V>, usize)>,
    bytes: usize,
}

impl<K, V> Default for Weighed<K, V> {
    fn default() -> Self {
        Self {
            values: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    pub fn new(entries: usize, bytes: usize) -> Self {
        Self {
            entries,
            bytes,
            kept: Mutex::default(),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let kept = self.kept.lock().expect("not poisoned");
        kept.values.get(key).map(|(value, _)| value.clone())
    }

    /// Keeps `value` (about `weight` bytes) under `key`, in place of the one before.
    pub fn keep(&self, key: K, value: Arc<V>, weight: usize) {
        let mut kept = self.kept.lock().expect("not poisoned");
        if let Some((_, old)) = kept.values.remove(&key) {
            kept.bytes -= old;
        }
        if kept.values.len() >= self.entries || kept.bytes + weight > self.bytes {
            *kept = Weighed::default();
        }
        if weight <= self.bytes {
            kept.bytes += weight;
            kept.values.insert(key, (value, weight));
        }
    }

    pub fn clear(&self) {
        *self.kept.lock().expect("not poisoned") = Weighed::default();
    }
}
