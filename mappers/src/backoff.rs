//! Reconnect delays: exponential backoff with jitter.
//!
//! Every failed attempt doubles the ceiling, from `base` up to `max`; the delay
//! drawn is uniform in the upper half of the ceiling ("equal jitter"), so a
//! fleet of devices that lost the same network does not reconnect in lockstep,
//! yet no device retries faster than half the ceiling. The random source is
//! seeded, so a test can replay a sequence.

use std::time::Duration;

/// Backoff state for one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    /// A backoff from `base` to `max`, with jitter drawn from `seed`.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The delay before the next attempt; each call counts one failure.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Forgets past failures (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row have been counted.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_jitter_and_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(2));
            assert!(*d >= ceiling / 2 && *d <= ceiling, "attempt {i}: {d:?}");
        }
        let mut other = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 8);
        let others: Vec<Duration> = (0..10).map(|_| other.next_delay()).collect();
        assert_ne!(delays, others, "different seeds draw different jitter");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        let mut again = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 7);
        assert_eq!(again.next_delay(), delays[0], "a seed replays");
    }
}
