//! What a run reports: figures for people (a table) and for programs (JSON),
//! and the checkers' failures with what it takes to replay them.
//!
//! Besides the totals, a report keeps what it takes to draw the run (see
//! [`crate::plot`]): the sync lag over time in fixed bins, the window of
//! every fault as the run applied it, and each heal with how long the
//! fleet took to catch up after it. All of it comes from simulated time, so
//! the same seed gives the same figures and the same plot.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

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

/// One fault of the timeline (the scenario's events and the nemesis's), as
/// the run applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// The event's kind, as in scenario files (`partition`, `crash`, ...).
    pub kind: String,
    /// What it did, for people: `partition clouds | site:site-0`.
    pub label: String,
    /// Start, simulated ms.
    pub start_ms: u64,
    /// End (the fault healed), simulated ms; equal to `start_ms` for events
    /// that are a moment rather than a window (`skew`, `join`, `leave`).
    pub end_ms: u64,
}

impl FaultWindow {
    /// Does it last a while (as opposed to happening at a moment)?
    pub fn is_window(&self) -> bool {
        self.end_ms > self.start_ms
    }
}

/// A moment at which one or more faults ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heal {
    /// When, simulated ms.
    pub at_ms: u64,
    /// The labels of the faults that ended then.
    pub healed: Vec<String>,
    /// Links (pairs of nodes that sync) the heal gave back: cut by the
    /// faults that ended, or ending at a restarted node, and cut by no other
    /// fault still in force. The final heal gives back every link.
    pub links_restored: u64,
    /// Time from the heal until the last change committed before it that
    /// crossed a link the heal gave back was applied on the far side: the
    /// backlog the faults held is drained, ms. `None` when the heal gave back
    /// no link or the run never converged.
    pub caught_up_after_ms: Option<u64>,
}

/// The sync lag of the changes applied within one bin of simulated time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LagBin {
    /// Start of the bin, simulated ms (it lasts [`Report::lag_bin_ms`]).
    pub start_ms: u64,
    /// Changes applied in the bin (at any replica).
    pub count: u64,
    /// Median lag, ms.
    pub p50: u64,
    /// 99th percentile lag, ms.
    pub p99: u64,
    /// Largest lag, ms.
    pub max: u64,
}

/// One applied change: when it was applied (simulated ms), its lag (ms),
/// and the link it came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSample {
    /// When the replica applied it, simulated ms.
    pub applied_ms: u64,
    /// Commit at the origin to persisted at the replica, ms.
    pub lag_ms: u64,
    /// The link it came over: the two nodes (the run's node indices), lower first.
    pub link: Link,
}

/// A link between two nodes, by the run's node indices, lower first.
pub type Link = (usize, usize);

/// The links a heal gave back: some, or every link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// These links.
    Links(BTreeSet<Link>),
    /// Every link (the final heal, or the end of a network-wide fault).
    All {
        /// How many links the fleet has.
        count: u64,
    },
}

impl Restored {
    /// Both together.
    pub fn merge(self, other: Restored) -> Restored {
        match (self, other) {
            (Restored::All { count }, _) | (_, Restored::All { count }) => Restored::All { count },
            (Restored::Links(mut a), Restored::Links(b)) => {
                a.extend(b);
                Restored::Links(a)
            }
        }
    }

    fn contains(&self, link: &Link) -> bool {
        match self {
            Restored::Links(set) => set.contains(link),
            Restored::All { .. } => true,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Restored::Links(set) => set.len() as u64,
            Restored::All { count } => *count,
        }
    }
}

impl LagSample {
    /// When it was committed at its origin, simulated ms.
    pub fn committed_ms(&self) -> u64 {
        self.applied_ms.saturating_sub(self.lag_ms)
    }
}

/// Bins wanted across a run, about one per 4 pixels of an 800-pixel-wide plot.
const LAG_BINS: u64 = 180;

/// A bin width that cuts `span_ms` into about [`LAG_BINS`] bins, rounded up
/// to a round number (100 ms, 200 ms, 250 ms, 500 ms, 1 s, 2 s, 5 s, ...).
pub fn lag_bin_ms(span_ms: u64) -> u64 {
    let want = span_ms.div_ceil(LAG_BINS).max(1);
    let mut decade = 100;
    loop {
        for step in [1, 2, 5] {
            let width = decade * step;
            if width >= want {
                return width;
            }
        }
        if decade.checked_mul(10).is_none() {
            return want;
        }
        decade *= 10;
    }
}

/// The lag over time: percentiles of the changes applied in each bin of
/// `bin_ms` (bins without changes are left out), in order of time.
pub fn lag_over_time(samples: &[LagSample], bin_ms: u64) -> Vec<LagBin> {
    let mut bins: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in samples {
        bins.entry(s.applied_ms / bin_ms.max(1))
            .or_default()
            .push(s.lag_ms);
    }
    bins.into_iter()
        .map(|(i, mut lags)| {
            let p = Percentiles::of(&mut lags);
            LagBin {
                start_ms: i * bin_ms.max(1),
                count: p.count,
                p50: p.p50,
                p99: p.p99,
                max: p.max,
            }
        })
        .collect()
}

/// The heals of `windows` (every moment at which a fault window ended),
/// each with the links it gave back (`restored`, by moment) and the time the
/// fleet took to catch up over them, measured on `samples`; `converged` says
/// whether the run converged at all.
pub fn heals(
    windows: &[FaultWindow],
    restored: &BTreeMap<u64, Restored>,
    samples: &[LagSample],
    converged: bool,
) -> Vec<Heal> {
    let mut by_time: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for w in windows.iter().filter(|w| w.is_window()) {
        by_time.entry(w.end_ms).or_default().push(w.label.clone());
    }
    let none = Restored::Links(BTreeSet::new());
    by_time
        .into_iter()
        .map(|(at_ms, healed)| {
            let links = restored.get(&at_ms).unwrap_or(&none);
            let caught_up_after_ms = (converged && links.count() > 0).then(|| {
                samples
                    .iter()
                    .filter(|s| s.committed_ms() <= at_ms && links.contains(&s.link))
                    .map(|s| s.applied_ms.saturating_sub(at_ms))
                    .max()
                    .unwrap_or(0)
            });
            Heal {
                at_ms,
                healed,
                links_restored: links.count(),
                caught_up_after_ms,
            }
        })
        .collect()
}

/// The figures and verdict of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
    /// When the workload stopped (the faults healed `duration_ms` before), simulated ms.
    pub workload_stop_ms: u64,
    /// Every fault and membership change of the timeline, in order of start.
    pub fault_windows: Vec<FaultWindow>,
    /// Every moment faults ended, with the time to catch up after it.
    pub heals: Vec<Heal>,
    /// Width of the bins of [`Report::lag_over_time`], ms.
    pub lag_bin_ms: u64,
    /// Sync lag over time, by bins of simulated time in which changes were applied.
    pub lag_over_time: Vec<LagBin>,
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
        row("caught up after each heal", self.heals_summary());
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

impl Report {
    /// The heals and the time to catch up after each, on one line:
    /// `at 75.0 s in 2140 ms, at 120.0 s in 31 ms`; the first few and the slowest when there are many.
    pub fn heals_summary(&self) -> String {
        const SHOWN: usize = 4;
        if self.heals.is_empty() {
            return "no faults healed".into();
        }
        let one = |h: &Heal| {
            let after = h
                .caught_up_after_ms
                .map_or("no link given back".to_string(), |ms| format!("in {ms} ms"));
            format!("at {:.1} s {after}", h.at_ms as f64 / 1e3)
        };
        let mut parts: Vec<String> = self.heals.iter().take(SHOWN).map(one).collect();
        if self.heals.len() > SHOWN {
            let slowest = self.heals.iter().max_by_key(|h| {
                (
                    h.caught_up_after_ms.map_or(u64::MAX, |v| v),
                    Reverse(h.at_ms),
                )
            });
            if let Some(h) = slowest {
                parts.push(format!(
                    "+{} more; slowest {}",
                    self.heals.len() - SHOWN,
                    one(h)
                ));
            }
        }
        parts.join(", ")
    }
}

/// A duration for people: `850 ms`, `2 s`, `2.1 s`.
pub fn human_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1_000) {
        format!("{} s", ms / 1_000)
    } else {
        format!("{:.1} s", ms as f64 / 1e3)
    }
}

/// A probability for people, as a percentage: `10%`, `0.5%`.
pub fn human_prob(p: f64) -> String {
    let pct = format!("{:.1}", p * 100.0);
    format!("{}%", pct.trim_end_matches(".0"))
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

    #[test]
    fn bins_are_round_and_about_180_to_a_run() {
        assert_eq!(lag_bin_ms(1), 100);
        assert_eq!(lag_bin_ms(18_000), 100);
        assert_eq!(lag_bin_ms(18_001), 200);
        assert_eq!(lag_bin_ms(150_000), 1_000);
        assert_eq!(lag_bin_ms(600_000), 5_000);
        let samples =
            [(150, 20), (180, 40), (950, 7), (420, 3000)].map(|(applied_ms, lag_ms)| LagSample {
                applied_ms,
                lag_ms,
                link: (0, 1),
            });
        let bins = lag_over_time(&samples, 200);
        let got: Vec<(u64, u64, u64)> = bins.iter().map(|b| (b.start_ms, b.count, b.max)).collect();
        assert_eq!(got, [(0, 2, 40), (400, 1, 3000), (800, 1, 7)]);
    }

    #[test]
    fn a_heal_is_caught_up_when_the_last_change_from_before_it_arrives() {
        let window = |label: &str, start_ms, end_ms| FaultWindow {
            kind: "partition".into(),
            label: label.into(),
            start_ms,
            end_ms,
        };
        let windows = [
            window("a", 1_000, 5_000),
            window("b", 2_000, 5_000),
            window("skew", 3_000, 3_000),
            window("c", 6_000, 8_000),
        ];
        let samples = [
            // Committed at 1,500, held by the partition, applied 700 ms after the heal.
            (5_700, 4_200, (0, 1)),
            // The same, over a link another fault still cut at 5,000.
            (8_100, 6_800, (0, 2)),
            // Committed after the heal: not part of its backlog.
            (5_900, 100, (0, 1)),
            // Committed before the second heal, arriving 40 ms after it.
            (8_040, 60, (0, 2)),
        ]
        .map(|(applied_ms, lag_ms, link)| LagSample {
            applied_ms,
            lag_ms,
            link,
        });
        let restored = BTreeMap::from([
            (5_000, Restored::Links(BTreeSet::from([(0, 1)]))),
            (8_000, Restored::All { count: 2 }),
        ]);
        let h = heals(&windows, &restored, &samples, true);
        let got: Vec<(u64, usize, u64, Option<u64>)> = h
            .iter()
            .map(|h| {
                (
                    h.at_ms,
                    h.healed.len(),
                    h.links_restored,
                    h.caught_up_after_ms,
                )
            })
            .collect();
        assert_eq!(got, [(5_000, 2, 1, Some(700)), (8_000, 1, 2, Some(100))]);
        assert!(
            heals(&windows, &restored, &samples, false)
                .iter()
                .all(|h| h.caught_up_after_ms.is_none())
        );
        // A heal that gave back no link has no catching up to measure.
        let h = heals(&windows, &BTreeMap::new(), &samples, true);
        assert!(h.iter().all(|h| h.caught_up_after_ms.is_none()));
    }
}
