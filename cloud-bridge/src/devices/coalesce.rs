//! Coalescing of fast-changing reported values before they reach the API.
//!
//! Reports mark a device dirty in a [`Coalescer`]: a first-in first-out set,
//! so a device that reports a thousand times while it waits is written once,
//! with its latest value (read when its turn comes), and devices are served
//! in the order they first became dirty. A [`TokenBucket`] spaces the API
//! writes: however many devices report, the writer never sends more than
//! `rate` writes a second on average, nor more than `burst` at once.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// A first-in first-out set of dirty keys.
#[derive(Debug)]
pub struct Coalescer<K> {
    order: VecDeque<K>,
    queued: HashSet<K>,
}

impl<K> Default for Coalescer<K> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            queued: HashSet::new(),
        }
    }
}

impl<K: Clone + Eq + Hash> Coalescer<K> {
    /// Marks `key` dirty; `false` when it already was (the change coalesces
    /// into the pending write).
    pub fn mark(&mut self, key: K) -> bool {
        if !self.queued.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        true
    }

    /// The key dirty the longest, no longer dirty.
    pub fn pop(&mut self) -> Option<K> {
        let key = self.order.pop_front()?;
        self.queued.remove(&key);
        Some(key)
    }

    /// Forgets `key` (its object is gone).
    pub fn remove(&mut self, key: &K) {
        if self.queued.remove(key) {
            self.order.retain(|k| k != key);
        }
    }

    /// How many keys are dirty.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is dirty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate that is not positive and finite becomes one
    /// token a second; the burst is at least one token.
    pub fn new(rate_per_s: f64, burst: f64, now: Instant) -> Self {
        let rate_per_s = if rate_per_s.is_finite() && rate_per_s > 0.0 {
            rate_per_s
        } else {
            1.0
        };
        let burst = if burst.is_finite() {
            burst.max(1.0)
        } else {
            1.0
        };
        Self {
            rate_per_s,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.rate_per_s,
            ))
        }
    }

    /// Waits for a token and takes it.
    pub async fn acquire(&mut self) {
        loop {
            match self.take(Instant::now()) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_coalesce_and_keep_first_dirty_order() {
        let mut c = Coalescer::default();
        assert!(c.mark("a"));
        assert!(c.mark("b"));
        for _ in 0..1000 {
            assert!(!c.mark("a"), "a pending write absorbs later changes");
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.pop(), Some("a"));
        assert!(c.mark("a"), "dirty again once taken");
        assert_eq!(c.pop(), Some("b"));
        c.remove(&"a");
        assert!(c.is_empty());
        assert_eq!(c.pop(), None);
    }

    #[test]
    fn the_bucket_bounds_writes_by_rate_and_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(20.0, 20.0, start);
        // The burst at once, then nothing.
        for _ in 0..20 {
            bucket.take(start).unwrap();
        }
        let wait = bucket.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.05).abs() < 1e-9, "{wait:?}");
        // Over ten simulated seconds of a caller taking as fast as it may:
        // at most rate x time (+ the burst).
        let mut now = start;
        let mut taken = 0;
        while now < start + Duration::from_secs(10) {
            match bucket.take(now) {
                Ok(()) => taken += 1,
                Err(wait) => now += wait,
            }
        }
        assert!((199..=201).contains(&taken), "{taken}");
        // Idle time saves up no more than the burst.
        now += Duration::from_secs(3600);
        let mut burst = 0;
        while bucket.take(now).is_ok() {
            burst += 1;
        }
        assert_eq!(burst, 20);
    }

    #[test]
    fn nonsense_rates_are_tamed() {
        let start = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut bucket = TokenBucket::new(rate, f64::NAN, start);
            bucket.take(start).unwrap();
            assert_eq!(bucket.take(start), Err(Duration::from_secs(1)), "{rate}");
        }
    }
}
