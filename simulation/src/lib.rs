//! Outpost's network-chaos simulation harness.
//!
//! Runs many outpost-sync replicas over a simulated network with simulated
//! time, every choice drawn from one seed, applies faults (partitions, loss,
//! delay, reordering, duplication, crashes, clock skew) and checks after
//! healing that replicas converge and no acknowledged write was lost. Nothing
//! depends on this crate.
