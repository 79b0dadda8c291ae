//! What a run reports: figures for people (a table) and for programs (JSON),
//! and the checkers' failures with what it takes to replay them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One checker's failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The checker: `convergence`, `lost-write`, `conflict`, `storage`,
    /// `liveness`, `protocol`, `access`, `write`, `crash`, `membership`.
    pub checker: String,
    /// Simulated time of the failure, ms.
    pub at_ms: u64,
    /// What went wrong.
    pub explanation: String,
}

/// Percentiles of a distribution of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Percentiles of `samples` (sorted in place).
    pub fn of(samples: &mut [u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        Self {
            count: samples.len() as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// The figures and verdict of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario's name.
    pub scenario: String,
    /// Cloud replicas.
    pub clouds: usize,
    /// Edges at the end (joined ones included, departed ones too).
    pub edges: usize,
    /// Sites.
    pub sites: usize,
    /// Simulated time with faults, ms.
    pub duration_ms: u64,
    /// Simulated time at the end of the run, ms.
    pub simulated_ms: u64,
    /// Host time the run took, ms (not part of the history).
    pub wall_ms: u64,
    /// Peak resident memory of the process, KiB (VmHWM; Linux only).
    pub peak_rss_kib: Option<u64>,
    /// Events processed.
    pub events: u64,
    /// Writes acknowledged to their writers, by document kind.
    pub writes: BTreeMap<String, u64>,
    /// Messages sent.
    pub messages: u64,
    /// Bytes sent (encoded messages plus a 4-byte frame header each).
    pub bytes: u64,
    /// Messages and bytes by message kind.
    pub by_message: BTreeMap<String, (u64, u64)>,
    /// Messages per acknowledged write.
    pub messages_per_write: f64,
    /// Bytes per acknowledged write.
    pub bytes_per_write: f64,
    /// Messages lost to partitions, crashes and dead connections.
    pub messages_dropped: u64,
    /// Messages retransmitted (loss), held back (reorder), or that broke their connection (reset).
    pub retransmitted: u64,
    /// Messages held back by reordering.
    pub held_back: u64,
    /// Messages that broke their connection.
    pub resets: u64,
    /// Connections opened (sessions started).
    pub connections_opened: u64,
    /// Opened connections that died.
    pub connections_broken: u64,
    /// Dials that failed (peer down or unreachable).
    pub dials_failed: u64,
    /// Duplicated dials.
    pub duplicated_dials: u64,
    /// Faults and membership changes injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Crashes.
    pub crashes: u64,
    /// Restarts.
    pub restarts: u64,
    /// Desired properties whose merged state shows a losing concurrent write.
    pub conflicts_visible: u64,
    /// Host time by activity, ms (not part of the history; for tuning).
    pub host_ms: BTreeMap<String, u64>,
    /// Sync lag: commit at the origin to persisted at a replica (simulated ms).
    pub lag_ms: Percentiles,
    /// Sync lag of changes applied after the faults healed.
    pub lag_after_heal_ms: Percentiles,
    /// Time from the end of the workload to convergence, ms (`None`: no convergence).
    pub converged_after_ms: Option<u64>,
    /// Largest stored size of one document, by kind (bytes, any replica).
    pub max_doc_bytes: BTreeMap<String, u64>,
    /// Documents at the first cloud replica.
    pub cloud_docs: u64,
    /// Digest of the history: every delivered message, write, fault and the final heads.
    pub digest: String,
    /// Failures (at most a few per checker).
    pub failures: Vec<Failure>,
    /// Failures per checker, all of them.
    pub failure_counts: BTreeMap<String, u64>,
}

impl Report {
    /// Did every checker pass?
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report as a table, for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k:<34} | {v:<52} |");
        };
        let lag = |p: &Percentiles| {
            format!(
                "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
                p.p50, p.p90, p.p99, p.p999, p.max, p.count
            )
        };
        row(
            "scenario / seed",
            format!("{} / {}", self.scenario, self.seed),
        );
        row(
            "fleet",
            format!(
                "{} clouds, {} edges, {} sites",
                self.clouds, self.edges, self.sites
            ),
        );
        row(
            "simulated / host time",
            format!(
                "{:.1} s / {:.2} s",
                self.simulated_ms as f64 / 1e3,
                self.wall_ms as f64 / 1e3
            ),
        );
        if let Some(kib) = self.peak_rss_kib {
            row(
                "peak memory (VmHWM)",
                format!("{:.0} MiB", kib as f64 / 1024.0),
            );
        }
        row("events", self.events.to_string());
        let host: Vec<String> = self
            .host_ms
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row("host ms by activity", host.join(", "));
        let total: u64 = self.writes.values().sum();
        row("writes acknowledged", total.to_string());
        row(
            "messages / bytes",
            format!(
                "{} / {} ({:.1} msg, {:.0} B per write)",
                self.messages, self.bytes, self.messages_per_write, self.bytes_per_write
            ),
        );
        row("sync lag ms", lag(&self.lag_ms));
        row("sync lag ms after heal", lag(&self.lag_after_heal_ms));
        row(
            "converged after workload stop",
            self.converged_after_ms
                .map_or("no".into(), |ms| format!("{ms} ms")),
        );
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row("faults injected", faults.join(", "));
        row(
            "crashes / restarts",
            format!("{} / {}", self.crashes, self.restarts),
        );
        row(
            "desired conflicts kept visible",
            self.conflicts_visible.to_string(),
        );
        row(
            "connections opened / broken",
            format!(
                "{} / {} ({} dials failed, {} duplicated)",
                self.connections_opened,
                self.connections_broken,
                self.dials_failed,
                self.duplicated_dials
            ),
        );
        row(
            "messages dropped / resets",
            format!(
                "{} / {} ({} retransmitted, {} held back)",
                self.messages_dropped, self.resets, self.retransmitted, self.held_back
            ),
        );
        let biggest: Vec<String> = self
            .max_doc_bytes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        row("largest document, bytes", biggest.join(", "));
        row("digest", self.digest[..16].to_string());
        row(
            "verdict",
            if self.passed() {
                "all checkers passed".into()
            } else {
                let c: Vec<String> = self
                    .failure_counts
                    .iter()
                    .map(|(k, v)| format!("{k} x{v}"))
                    .collect();
                format!("FAILED: {}", c.join(", "))
            },
        );
        s
    }
}

/// Peak resident memory of this process, KiB, from `/proc/self/status`.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let mut v: Vec<u64> = (1..=1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.count, p.p50, p.p99, p.max), (1000, 501, 990, 1000));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
