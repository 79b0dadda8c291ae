//! Scenario files: the fleet, the network, the workload, the checks and a
//! timeline of faults, in TOML.
//!
//! Every field has a default, so an empty file is a valid scenario (a small
//! healthy fleet). Durations are strings with a unit (`"250ms"`, `"30s"`,
//! `"10m"`, `"1h"`) or plain integers of milliseconds. Node selectors name
//! who a fault applies to:
//!
//! | selector | nodes |
//! |---|---|
//! | `"clouds"` | every cloud replica |
//! | `"edges"` | every edge |
//! | `"all"` | every node |
//! | `"site:NAME"` | the edges of site NAME (sites are `site-0`, `site-1`, ...) |
//! | `"fraction:0.3"` | that fraction of the edges, drawn from the seed |
//! | `"random-edge"` | one edge, drawn from the seed |
//! | `"cloud-0"`, `"edge-17"` | one node by name |
//!
//! ```toml
//! duration = "10m"
//! [fleet]
//! edges = 100
//! sites = 10
//! [network]
//! delay = { dist = "lognormal", median = "20ms", sigma = 0.5 }
//! loss = 0.001
//! [[event]]
//! kind = "partition"
//! at = "1m"
//! for = "2m"
//! a = "clouds"
//! b = "fraction:0.5"
//! ```
//!
//! See `simulation/scenarios/` for complete examples.

use std::path::{Path, PathBuf};

use outpost_sync::store::StoreOptions;
use serde::{Deserialize, Serialize};

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("scenario {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema.
    #[error("scenario {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where, as the TOML parser says it.
        message: String,
    },
    /// The file parses but a value makes no sense.
    #[error("scenario {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// A duration in milliseconds, written `"250ms"`, `"30s"`, `"10m"`, `"1h"` or as an integer of ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(try_from = "DurRepr", into = "String")]
pub struct Dur(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum DurRepr {
    Ms(u64),
    Text(String),
}

impl TryFrom<DurRepr> for Dur {
    type Error = String;

    fn try_from(r: DurRepr) -> Result<Self, Self::Error> {
        match r {
            DurRepr::Ms(ms) => Ok(Dur(ms)),
            DurRepr::Text(s) => s.parse(),
        }
    }
}

impl From<Dur> for String {
    fn from(d: Dur) -> Self {
        d.to_string()
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) && ms > 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl std::str::FromStr for Dur {
    type Err = String;

    /// `"250ms"`, `"30s"`, `"1.5s"`, `"10m"`, `"1h"`, and sums like `"1m30s"`; a bare number is seconds.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not a duration (write e.g. \"250ms\", \"30s\", \"1m30s\", \"10m\")")
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(bad());
        }
        let mut rest = text;
        let mut total = 0.0f64;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(rest.len());
            let (num, tail) = rest.split_at(num_end);
            let unit_end = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_end);
            let value: f64 = num.parse().map_err(|_| bad())?;
            let scale = match unit.trim() {
                "ms" => 1.0,
                "" if tail.is_empty() && total == 0.0 => 1000.0,
                "s" => 1000.0,
                "m" | "min" => 60_000.0,
                "h" => 3_600_000.0,
                other => {
                    return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)"));
                }
            };
            total += value * scale;
            rest = tail;
        }
        Ok(Dur(total.round() as u64))
    }
}

/// A delay distribution, per message, one way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "lowercase", deny_unknown_fields)]
pub enum Delay {
    /// Always the same.
    Fixed {
        /// The delay.
        value: Dur,
    },
    /// Uniform between `min` and `max`.
    Uniform {
        /// The smallest delay.
        min: Dur,
        /// The largest delay.
        max: Dur,
    },
    /// `min` plus an exponential tail of mean `mean`.
    Exponential {
        /// The floor.
        #[serde(default)]
        min: Dur,
        /// The mean of the tail.
        mean: Dur,
    },
    /// Log-normal around `median`, with the given sigma (of the log); capped at 100 x median.
    Lognormal {
        /// The median.
        median: Dur,
        /// Sigma of the underlying normal.
        sigma: f64,
    },
}

impl Default for Delay {
    fn default() -> Self {
        Delay::Uniform {
            min: Dur(5),
            max: Dur(40),
        }
    }
}

impl Delay {
    /// Draws one delay in ms.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u64 {
        match *self {
            Delay::Fixed { value } => value.0,
            Delay::Uniform { min, max } => rng.u64(min.0..=max.0.max(min.0)),
            Delay::Exponential { min, mean } => {
                let u = 1.0 - rng.f64(); // (0, 1]
                min.0 + (-(u.ln()) * mean.0 as f64).round() as u64
            }
            Delay::Lognormal { median, sigma } => {
                // Box-Muller.
                let (u1, u2) = (1.0 - rng.f64(), rng.f64());
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                let v = median.0 as f64 * (sigma * z).exp();
                (v.round() as u64).min(median.0.saturating_mul(100))
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        match *self {
            Delay::Uniform { min, max } if min > max => {
                Err(format!("network.delay: min {min} is above max {max}"))
            }
            Delay::Lognormal { sigma, .. } if !(0.0..=5.0).contains(&sigma) => {
                Err(format!("network.delay: sigma {sigma} is outside 0..=5"))
            }
            _ => Ok(()),
        }
    }
}

/// The fleet's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fleet {
    /// Cloud replicas (`cloud-0`...). Every edge syncs with every cloud; clouds sync with each other.
    pub clouds: usize,
    /// Edges present from the start (`edge-0`...).
    pub edges: usize,
    /// Sites (`site-0`...); edge i belongs to site i mod sites. 0: no sites, no edge-to-edge links.
    pub sites: usize,
    /// Pods per edge (a pod-spec written by the cloud, a pod-status by the edge).
    pub pods_per_edge: usize,
    /// Devices per edge (device-desired written by both, device-reported by the edge).
    pub devices_per_edge: usize,
    /// Edge-to-edge links per edge within its site: each edge dials the
    /// previous `site_peers` edges of its site (a ring; a full mesh when the
    /// site is small).
    pub site_peers: usize,
    /// Documents kept loaded per cloud replica (the cloud holds every edge's documents).
    pub cloud_cache_docs: usize,
    /// Documents kept loaded per edge replica.
    pub edge_cache_docs: usize,
    /// Change chunks a document's store record takes before they are folded
    /// into its snapshot (the store's option of that name). Small values
    /// make every replica compact often, on its receive path as on its own
    /// writes.
    pub compact_after_chunks: u32,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            clouds: 1,
            edges: 10,
            sites: 2,
            pods_per_edge: 2,
            devices_per_edge: 2,
            site_peers: 2,
            cloud_cache_docs: 16_384,
            edge_cache_docs: 64,
            compact_after_chunks: StoreOptions::default().compact_after_chunks,
        }
    }
}

/// The network between nodes, when no fault changes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// One-way delay of each message.
    pub delay: Delay,
    /// Probability that a message's packets are lost once: the transport
    /// retransmits it after `rto`, and the stream stalls behind it.
    pub loss: f64,
    /// Retransmission timeout added to a lost message.
    pub rto: Dur,
    /// Probability that a message breaks its connection: it and everything
    /// after it on that connection is lost; both ends notice after `idle_timeout`.
    pub reset: f64,
    /// Probability that a dial is duplicated: a second connection replaces
    /// the first at both ends shortly after it opened.
    pub duplicate: f64,
    /// Probability that a message is held back by `reorder_delay`, so that
    /// messages on other connections overtake it (a stream stays in order).
    pub reorder: f64,
    /// Extra delay of a held-back message.
    pub reorder_delay: Dur,
    /// How long a peer takes to notice a dead connection.
    pub idle_timeout: Dur,
    /// How long a failed dial takes to fail.
    pub connect_timeout: Dur,
    /// First redial back-off (doubles up to `backoff_max`, plus up to 50 % jitter).
    pub backoff_min: Dur,
    /// Largest redial back-off.
    pub backoff_max: Dur,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            delay: Delay::default(),
            loss: 0.0,
            rto: Dur(250),
            reset: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Dur(300),
            idle_timeout: Dur(10_000),
            connect_timeout: Dur(5_000),
            backoff_min: Dur(200),
            backoff_max: Dur(30_000),
        }
    }
}

/// What the nodes write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Each edge writes its reported values and heartbeat this often.
    pub report_interval: Dur,
    /// Probability, per report, that the edge also writes a pod status.
    pub pod_status_prob: f64,
    /// Probability, per report, that the edge edits a desired value of its own device.
    pub edge_desired_prob: f64,
    /// Probability, per report, that the edge edits its site's shared desired value.
    pub site_desired_prob: f64,
    /// Each cloud makes one API-side change this often (a pod spec or a desired value).
    pub api_interval: Dur,
    /// Share of API changes that are desired values (the rest are pod specs).
    pub api_desired_share: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            report_interval: Dur(10_000),
            pod_status_prob: 0.1,
            edge_desired_prob: 0.05,
            site_desired_prob: 0.02,
            api_interval: Dur(1_000),
            api_desired_share: 0.5,
        }
    }
}

/// Bounds the checkers hold the run to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Checks {
    /// After the faults heal the workload goes on this long; by its end
    /// every link must be connected again (liveness).
    pub liveness_bound: Dur,
    /// Then the workload stops, and every replica must converge within this.
    pub settle_timeout: Dur,
    /// Largest stored size of one twin document (device-desired, device-reported, node-status).
    pub max_twin_bytes: u64,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            liveness_bound: Dur(60_000),
            settle_timeout: Dur(120_000),
            max_twin_bytes: 64 << 10,
        }
    }
}

/// The random fault generator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Nemesis {
    /// Mean time between two faults.
    pub mean_interval: Dur,
    /// Shortest fault.
    pub min_length: Dur,
    /// Longest fault.
    pub max_length: Dur,
    /// Largest clock skew given to a node, either way.
    pub max_skew: Dur,
    /// Include nodes joining and leaving.
    pub churn: bool,
    /// Include crashes of cloud replicas (edges crash in any case).
    pub cloud_crashes: bool,
}

impl Default for Nemesis {
    fn default() -> Self {
        Self {
            mean_interval: Dur(20_000),
            min_length: Dur(2_000),
            max_length: Dur(60_000),
            max_skew: Dur(120_000),
            churn: true,
            cloud_crashes: true,
        }
    }
}

/// A network quality window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkChange {
    /// Replaces the delay distribution.
    pub delay: Option<Delay>,
    /// Replaces `network.loss`.
    pub loss: Option<f64>,
    /// Replaces `network.reset`.
    pub reset: Option<f64>,
    /// Replaces `network.duplicate`.
    pub duplicate: Option<f64>,
    /// Replaces `network.reorder`.
    pub reorder: Option<f64>,
}

/// One entry of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Event {
    /// Both directions between every node of `a` and every node of `b` are cut.
    Partition {
        /// Start.
        at: Dur,
        /// Length.
        #[serde(rename = "for")]
        length: Dur,
        /// One side.
        a: String,
        /// The other side.
        b: String,
    },
    /// Messages from `from` to `to` are dropped; the other way still flows
    /// (until the connection times out: QUIC needs both ways).
    OneWay {
        /// Start.
        at: Dur,
        /// Length.
        #[serde(rename = "for")]
        length: Dur,
        /// Senders whose messages are dropped.
        from: String,
        /// Their receivers.
        to: String,
    },
    /// A partition between `a` and `b` that comes and goes: `down` cut, `up` healed, repeated.
    Flap {
        /// Start.
        at: Dur,
        /// Length of the whole flapping period.
        #[serde(rename = "for")]
        length: Dur,
        /// One side.
        a: String,
        /// The other side.
        b: String,
        /// Length of each cut.
        down: Dur,
        /// Length of each healed spell.
        up: Dur,
    },
    /// A site's edges lose the clouds; their links to each other stay up.
    IsolateSite {
        /// Start.
        at: Dur,
        /// Length.
        #[serde(rename = "for")]
        length: Dur,
        /// The site (`site-0`...).
        site: String,
    },
    /// The selected nodes crash (the process dies; its store survives) and
    /// restart after `restart_after` (default: when the faults heal).
    Crash {
        /// When.
        at: Dur,
        /// Which nodes.
        node: String,
        /// Down time; absent: down until the faults heal.
        restart_after: Option<Dur>,
    },
    /// The selected nodes' clocks run `skew_ms` off (negative: behind) from then on.
    Skew {
        /// When.
        at: Dur,
        /// Which nodes.
        node: String,
        /// Offset in ms.
        skew_ms: i64,
    },
    /// The network's quality changes for a while.
    Network {
        /// Start.
        at: Dur,
        /// Length.
        #[serde(rename = "for")]
        length: Dur,
        /// What changes.
        #[serde(flatten)]
        change: NetworkChange,
    },
    /// New edges join the fleet (admitted, provisioned by the cloud, dialling).
    Join {
        /// When.
        at: Dur,
        /// How many.
        #[serde(default = "one")]
        count: usize,
    },
    /// Edges leave the fleet for good (decommissioned: they stop and never return).
    Leave {
        /// When.
        at: Dur,
        /// Which edges.
        node: String,
    },
}

fn one() -> usize {
    1
}

impl Event {
    /// When it starts.
    pub fn at(&self) -> Dur {
        match self {
            Event::Partition { at, .. }
            | Event::OneWay { at, .. }
            | Event::Flap { at, .. }
            | Event::IsolateSite { at, .. }
            | Event::Crash { at, .. }
            | Event::Skew { at, .. }
            | Event::Network { at, .. }
            | Event::Join { at, .. }
            | Event::Leave { at, .. } => *at,
        }
    }

    /// The kind's name, as in the file.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Partition { .. } => "partition",
            Event::OneWay { .. } => "one-way",
            Event::Flap { .. } => "flap",
            Event::IsolateSite { .. } => "isolate-site",
            Event::Crash { .. } => "crash",
            Event::Skew { .. } => "skew",
            Event::Network { .. } => "network",
            Event::Join { .. } => "join",
            Event::Leave { .. } => "leave",
        }
    }
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// How long the workload runs with faults; then the faults heal.
    pub duration: Dur,
    /// The fleet.
    pub fleet: Fleet,
    /// The network.
    pub network: Network,
    /// The workload.
    pub workload: Workload,
    /// The checkers' bounds.
    pub checks: Checks,
    /// Random faults on top of the timeline, when present (or with `--nemesis`).
    pub nemesis: Option<Nemesis>,
    /// The timeline of faults and membership changes.
    #[serde(rename = "event")]
    pub events: Vec<Event>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "default".into(),
            duration: Dur(120_000),
            fleet: Fleet::default(),
            network: Network::default(),
            workload: Workload::default(),
            checks: Checks::default(),
            nemesis: None,
            events: Vec::new(),
        }
    }
}

fn prob(name: &str, p: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{name} = {p} is not a probability (0..=1)"))
    }
}

/// Checks a node selector's syntax (names are checked against the fleet when it runs).
pub fn check_selector(sel: &str) -> Result<(), String> {
    if let Some(f) = sel.strip_prefix("fraction:") {
        let f: f64 = f
            .parse()
            .map_err(|_| format!("selector {sel:?}: {f:?} is not a number"))?;
        return prob(&format!("selector {sel:?}"), f);
    }
    if sel.is_empty() {
        return Err("empty node selector".into());
    }
    Ok(())
}

impl Scenario {
    /// Parses a scenario from TOML text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        scenario
            .validate()
            .map_err(|message| ScenarioError::Invalid {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(scenario)
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Checks values the schema cannot.
    pub fn validate(&self) -> Result<(), String> {
        let f = &self.fleet;
        if f.clouds == 0 {
            return Err("fleet.clouds must be at least 1".into());
        }
        if f.edges > 100_000 || f.clouds > 16 {
            return Err("fleet: at most 100000 edges and 16 clouds".into());
        }
        if f.sites > f.edges.max(1) {
            return Err(format!(
                "fleet.sites = {} is more than fleet.edges = {}",
                f.sites, f.edges
            ));
        }
        if f.cloud_cache_docs == 0 || f.edge_cache_docs == 0 {
            return Err("fleet: cache sizes must be at least 1".into());
        }
        if f.compact_after_chunks == 0 {
            return Err("fleet.compact_after_chunks must be at least 1".into());
        }
        let n = &self.network;
        n.delay.check()?;
        for (name, p) in [
            ("network.loss", n.loss),
            ("network.reset", n.reset),
            ("network.duplicate", n.duplicate),
            ("network.reorder", n.reorder),
            ("workload.pod_status_prob", self.workload.pod_status_prob),
            (
                "workload.edge_desired_prob",
                self.workload.edge_desired_prob,
            ),
            (
                "workload.site_desired_prob",
                self.workload.site_desired_prob,
            ),
            (
                "workload.api_desired_share",
                self.workload.api_desired_share,
            ),
        ] {
            prob(name, p)?;
        }
        if n.backoff_min.0 == 0 || n.backoff_min > n.backoff_max {
            return Err("network: backoff_min must be > 0 and <= backoff_max".into());
        }
        if self.workload.report_interval.0 == 0 || self.workload.api_interval.0 == 0 {
            return Err("workload: intervals must be > 0".into());
        }
        if self.duration.0 == 0 {
            return Err("duration must be > 0".into());
        }
        if let Some(nem) = &self.nemesis
            && (nem.mean_interval.0 == 0 || nem.min_length > nem.max_length)
        {
            {
                return Err(
                    "nemesis: mean_interval must be > 0 and min_length <= max_length".into(),
                );
            }
        }
        for (i, e) in self.events.iter().enumerate() {
            let ctx = |m: String| format!("event {} ({}): {m}", i + 1, e.kind());
            if e.at() >= self.duration {
                return Err(ctx(format!(
                    "starts at {} but the scenario lasts {}",
                    e.at(),
                    self.duration
                )));
            }
            match e {
                Event::Partition { a, b, .. } | Event::Flap { a, b, .. } => {
                    check_selector(a).map_err(ctx)?;
                    check_selector(b).map_err(ctx)?;
                }
                Event::OneWay { from, to, .. } => {
                    check_selector(from).map_err(ctx)?;
                    check_selector(to).map_err(ctx)?;
                }
                Event::Crash { node, .. }
                | Event::Skew { node, .. }
                | Event::Leave { node, .. } => check_selector(node).map_err(ctx)?,
                Event::Network { change, .. } => {
                    if let Some(d) = &change.delay {
                        d.check().map_err(ctx)?;
                    }
                    for (name, p) in [
                        ("loss", change.loss),
                        ("reset", change.reset),
                        ("duplicate", change.duplicate),
                        ("reorder", change.reorder),
                    ] {
                        if let Some(p) = p {
                            prob(name, p).map_err(ctx)?;
                        }
                    }
                }
                Event::IsolateSite { .. } | Event::Join { .. } => {}
            }
            if let Event::Flap { down, up, .. } = e
                && (down.0 == 0 || up.0 == 0)
            {
                return Err(ctx("down and up must be > 0".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!("250ms".parse::<Dur>(), Ok(Dur(250)));
        assert_eq!("30s".parse::<Dur>(), Ok(Dur(30_000)));
        assert_eq!("10m".parse::<Dur>(), Ok(Dur(600_000)));
        assert_eq!("1.5s".parse::<Dur>(), Ok(Dur(1_500)));
        assert_eq!("1m30s".parse::<Dur>(), Ok(Dur(90_000)));
        assert_eq!("2".parse::<Dur>(), Ok(Dur(2_000)));
        assert!("1m30".parse::<Dur>().is_err());
        assert!("10 parsecs".parse::<Dur>().is_err());
        assert!("".parse::<Dur>().is_err());
        assert_eq!(Dur(600_000).to_string(), "10m");
    }

    #[test]
    fn an_empty_file_is_the_default_scenario() {
        let s = Scenario::parse("", Path::new("empty.toml")).unwrap();
        assert_eq!(s, Scenario::default());
    }

    #[test]
    fn malformed_files_say_what_and_where() {
        let p = Path::new("bad.toml");
        let cases = [
            ("duration = \"ten minutes\"", "not a duration"),
            ("[fleet]\nedges = -1", "edges"),
            ("[fleet]\nwidgets = 3", "widgets"),
            ("[network]\nloss = 1.5", "network.loss"),
            ("[[event]]\nkind = \"meteor\"\nat = \"1s\"", "meteor"),
            (
                "[[event]]\nkind = \"partition\"\nat = \"1s\"\nfor = \"1s\"\na = \"clouds\"",
                "b",
            ),
            (
                "duration = \"1m\"\n[[event]]\nkind = \"crash\"\nat = \"2m\"\nnode = \"edge-1\"",
                "starts at 2m",
            ),
            (
                "[network.delay]\ndist = \"uniform\"\nmin = \"50ms\"\nmax = \"5ms\"",
                "above max",
            ),
            ("this is not toml", "bad.toml"),
        ];
        for (text, want) in cases {
            let err = Scenario::parse(text, p).unwrap_err().to_string();
            assert!(err.contains("bad.toml"), "{err}");
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn delays_follow_their_distribution() {
        let mut rng = fastrand::Rng::with_seed(7);
        let d = Delay::Exponential {
            min: Dur(10),
            mean: Dur(20),
        };
        let n = 20_000;
        let mean = (0..n).map(|_| d.sample(&mut rng)).sum::<u64>() as f64 / n as f64;
        assert!((28.0..32.0).contains(&mean), "{mean}");
        let l = Delay::Lognormal {
            median: Dur(20),
            sigma: 0.5,
        };
        let mut v: Vec<u64> = (0..n).map(|_| l.sample(&mut rng)).collect();
        v.sort_unstable();
        assert!((18..=22).contains(&v[n / 2]), "{}", v[n / 2]);
    }
}
