//! A hybrid logical clock: wall time in milliseconds plus a counter, so that
//! timestamps order writes the way a user expects even when clocks drift a
//! little, and never go backwards on one node.

use serde::{Deserialize, Serialize};

/// A hybrid logical timestamp. Ordered by wall time, then counter, then
/// writer (the tie-break that makes the order total).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the largest seen, not the local clock).
    pub wall_ms: u64,
    /// Orders events within one millisecond.
    pub counter: u32,
}

/// A node's hybrid logical clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// A clock that starts after `last` (persisted by the caller across restarts).
    pub fn starting_after(last: Hlc) -> Self {
        Self { last }
    }

    /// The timestamp for a local event at physical time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.wall_ms {
            Hlc {
                wall_ms: now_ms,
                counter: 0,
            }
        } else {
            Hlc {
                wall_ms: self.last.wall_ms,
                counter: self.last.counter.saturating_add(1),
            }
        };
        self.last
    }

    /// Folds in a timestamp seen from another node, so that the next local
    /// event is ordered after it.
    pub fn observe(&mut self, seen: Hlc) {
        if seen > self.last {
            self.last = seen;
        }
    }

    /// The latest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_and_orders_after_observed() {
        let mut c = Clock::default();
        let a = c.tick(1000);
        let b = c.tick(900); // the wall clock stepped back
        assert!(b > a);
        c.observe(Hlc {
            wall_ms: 5000,
            counter: 7,
        });
        let d = c.tick(1001);
        assert!(
            d > Hlc {
                wall_ms: 5000,
                counter: 7
            }
        );
    }
}
