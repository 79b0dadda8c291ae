//! The simulated world: nodes with real replicas on an in-memory disk, the
//! sans-IO sessions between them, a network of connections, a queue of
//! timed events, the workload and the faults.
//!
//! # Time
//! Simulated milliseconds from 0; a discrete-event queue ordered by
//! (time, sequence number), so two events at the same time run in the order
//! they were scheduled. Nothing reads the host's clock. A node's wall clock
//! (what it passes as `now_ms` to its replica) is `EPOCH_MS + time + skew`.
//!
//! # Connections
//! Sessions run over connections that behave like one QUIC stream: messages
//! arrive in order, each after a delay drawn from the network's
//! distribution, never behind an earlier one (`arrival = max(now + delay,
//! previous arrival)`). Faults act on connections, never on the order of a
//! stream, because a real transport never hands a session a reordered,
//! duplicated or gappy stream:
//! - **loss**: a lost message is retransmitted after `rto`; the stream stalls behind it;
//! - **reset**: the connection breaks at that message; it and everything
//!   after it is lost, both ends notice after `idle_timeout`, drop their
//!   session, and the dialler redials with back-off;
//! - **reorder**: a message is held back by `reorder_delay`, so messages on
//!   other connections (from other peers) overtake it;
//! - **duplicate**: a dial is duplicated: a second connection opens and
//!   replaces the first at both ends, whose messages in flight are lost
//!   (what a retried handshake does to the engine's one-session-per-peer rule);
//! - **partitions** cut directions between nodes: messages across a cut are
//!   lost, and a connection with a cut direction is dead: its ends notice
//!   after `idle_timeout` (QUIC needs both directions), while the direction
//!   that is not cut keeps delivering until then. Dials need both directions.
//!
//! # Crashes
//! A crash drops the node's process state: the replica (its loaded
//! documents, clock in memory), every session (dirty sets, unacknowledged
//! watermarks), its messages in flight. The store survives: the memory
//! disk keeps what RocksDB wrote. That is a process crash with
//! `sync_writes` off: RocksDB's write-ahead log is in the OS page cache and
//! survives the process, so a process crash loses nothing whose write
//! returned. A machine crash, which can lose the unsynced tail of the log,
//! is not modelled: the memory environment has no notion of unsynced data.
//! A restart reopens the replica (a new incarnation, a new automerge actor).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::num::NonZeroUsize;
use std::path::PathBuf;

use automerge::ChangeHash;
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::desired::{DesiredWrite, set_desired, writes};
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::protocol::{Event as SessionEvent, Message, Session, decode, encode};
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::store::{MemoryDisk, StoreOptions};
use serde_json::Value;
use tracing::{debug, info};

use crate::checks;
use crate::report::{
    Failure, FaultWindow, LagSample, Link as LinkPair, Percentiles, Report, Restored, human_ms,
    human_prob,
};
use crate::scenario::{Dur, Event as Timeline, Network, NetworkChange, Scenario};
use crate::workload::{self, Writes};

/// The wall clock of a node without skew at simulated time 0 (2026-01-01).
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Events processed at most, a guard against a run that never settles.
const MAX_EVENTS: u64 = 200_000_000;
/// Failures recorded per checker in detail (the rest are counted).
const FAILURES_PER_CHECKER: usize = 5;

/// Why a run could not be carried out (as opposed to a checker failing).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The scenario names a node or site the fleet does not have.
    #[error("scenario: {0}")]
    Scenario(String),
    /// A replica could not be opened.
    #[error("cannot open the replica of {node}: {source}")]
    Open {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: outpost_sync::replica::ReplicaError,
    },
    /// The memory disk could not be created.
    #[error("cannot create the memory disk: {0}")]
    Disk(#[from] outpost_sync::store::StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not joined yet.
    Absent,
    Up,
    Down,
    /// Left the fleet for good.
    Departed,
}

struct Node {
    name: String,
    id: PeerId,
    cloud: bool,
    site: Option<usize>,
    dir: PathBuf,
    replica: Option<Replica>,
    sessions: BTreeMap<usize, Slot>,
    skew_ms: i64,
    state: State,
    /// Report ticks so far (edges), API changes so far (clouds).
    seq: u64,
}

struct Slot {
    conn: u64,
    session: Session,
    /// Simulated time of the first acknowledgement not saved yet: the
    /// engine saves them a second later (and when the session ends).
    acks_since: Option<u64>,
}

/// How long a session's received acknowledgements stay unsaved, as in the
/// engine.
const ACK_SAVE_DELAY_MS: u64 = 1000;

impl Slot {
    /// Saves the acknowledgements the session holds, in node `node`'s
    /// replica; a failure comes back worded for the report.
    fn save_acks(&mut self, replica: &Replica, node: &str) -> Result<(), String> {
        self.acks_since = None;
        self.session
            .save_acks(replica)
            .map_err(|e| format!("{node} cannot save acknowledgements: {e}"))
    }
}

struct Conn {
    /// The dialler and the acceptor.
    ends: [usize; 2],
    /// Direction 0 is dialler to acceptor.
    cut: [bool; 2],
    doomed: bool,
    opened: bool,
    last_arrival: [u64; 2],
    /// Ends told of the close so far (the connection is forgotten at 2).
    told: u8,
}

struct Link {
    conn: Option<u64>,
    backoff_ms: u64,
}

#[derive(Debug)]
enum Ev {
    Dial(usize, usize),
    DupDial(usize, usize),
    Open(u64),
    Closed {
        conn: u64,
        node: usize,
    },
    Deliver {
        conn: u64,
        dir: usize,
        bytes: Vec<u8>,
    },
    Report(usize),
    Api(usize),
    Timeline(usize),
    FaultEnd(usize),
    FlapToggle(usize, bool),
    Restart(usize),
    /// Node `node` saves the acknowledgements its session of `conn` with
    /// `peer` holds, as the engine's writer does a second after the first.
    SaveAcks {
        node: usize,
        peer: usize,
        conn: u64,
    },
    Heal,
    Liveness,
    Check,
}

/// An event due at `at` (ms); `seq` orders the events due at one time by
/// when they were scheduled. Both modes' event queues hold these.
pub(crate) struct Scheduled<E> {
    pub(crate) at: u64,
    pub(crate) seq: u64,
    pub(crate) ev: E,
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Scheduled<E> {}
impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A fault in force: the directed cuts it added, or the override it set.
enum Active {
    /// Directed cuts, and whether they are in force now (a flap lifts them for a while).
    Cuts(Vec<(usize, usize)>, bool),
    Network,
}

/// What the checkers know of the writes.
#[derive(Default)]
struct Oracle {
    /// Changes of history-keeping documents acknowledged to their writer.
    kept: Vec<(DocId, usize, ChangeHash)>,
    /// The last value written to each rolling (single-writer) document, and its writer.
    rolling: BTreeMap<DocId, (usize, Value)>,
    /// The last desired write of each (document, property, writer node).
    desired: BTreeMap<(DocId, String, usize), DesiredWrite>,
    /// True time of each commit, by (document, commit ms), for lag.
    commits: BTreeMap<(DocId, i64), u64>,
    writes_by_kind: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Stats {
    events: u64,
    messages: u64,
    bytes: u64,
    by_kind: BTreeMap<&'static str, (u64, u64)>,
    dropped: u64,
    lost_to_reset: u64,
    retransmitted: u64,
    held_back: u64,
    conns_opened: u64,
    conns_broken: u64,
    dials_failed: u64,
    duplicated_dials: u64,
    faults: BTreeMap<&'static str, u64>,
    crashes: u64,
    restarts: u64,
    session_errors: u64,
    rejected: u64,
    /// Every applied change with a known commit time: when, and its lag.
    lag: Vec<LagSample>,
    lag_after_heal_ms: Vec<u64>,
    /// Desired properties whose final state shows losing writes.
    conflicts: u64,
    /// Host time by activity, ns (not part of the history).
    host_ns: BTreeMap<&'static str, u64>,
}

/// Times a block of host work into `Stats::host_ns` (measurement only; never part of the history).
macro_rules! timed {
    ($self:ident, $what:literal, $body:expr) => {{
        let t = tokio::time::Instant::now();
        let r = $body;
        *$self.stats.host_ns.entry($what).or_insert(0) += t.elapsed().as_nanos() as u64;
        r
    }};
}

/// One simulation run.
pub struct World {
    seed: u64,
    scenario: Scenario,
    rng: fastrand::Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled<Ev>>>,
    disk: MemoryDisk,
    nodes: Vec<Node>,
    by_name: BTreeMap<String, usize>,
    clouds: Vec<usize>,
    site_edges: Vec<Vec<usize>>,
    roster: Roster,
    links: BTreeMap<(usize, usize), Link>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    cuts: BTreeMap<(usize, usize), u32>,
    active: BTreeMap<usize, Active>,
    overrides: BTreeMap<usize, NetworkChange>,
    net: Network,
    timeline: Vec<Timeline>,
    /// The timeline's events as applied, for the report.
    windows: Vec<FaultWindow>,
    /// The links each heal gave back, by moment.
    restored: BTreeMap<u64, Restored>,
    oracle: Oracle,
    stats: Stats,
    failures: Vec<Failure>,
    failure_counts: BTreeMap<&'static str, u64>,
    digest: blake3::Hasher,
    heal_at: u64,
    stop_at: u64,
    give_up_at: u64,
    healed: bool,
    converged_at: Option<u64>,
    done: bool,
    in_flight: u64,
    storage: BTreeMap<&'static str, u64>,
}

fn peer_id(name: &str) -> PeerId {
    PeerId(*blake3::hash(format!("outpost-sim peer {name}").as_bytes()).as_bytes())
}

fn doc(s: String) -> DocId {
    // Built from names the simulation makes: always valid. A bad one would be a bug here.
    s.parse()
        .unwrap_or_else(|e| panic!("the simulation built an invalid document id: {e}"))
}

pub(crate) fn pod_spec(edge: &str, k: usize) -> DocId {
    doc(format!("pod-spec/{edge}/default/app-{k}/uid-{k}"))
}
pub(crate) fn pod_status(edge: &str, k: usize) -> DocId {
    doc(format!("pod-status/{edge}/default/app-{k}/uid-{k}"))
}
pub(crate) fn device_desired(edge: &str, d: usize) -> DocId {
    doc(format!("device-desired/{edge}/default/dev-{d}"))
}
pub(crate) fn device_reported(edge: &str, d: usize) -> DocId {
    doc(format!("device-reported/{edge}/default/dev-{d}"))
}
pub(crate) fn node_status(edge: &str) -> DocId {
    doc(format!("node-status/{edge}"))
}
pub(crate) fn site_config(site: usize) -> DocId {
    doc(format!("configmap/site:site-{site}/default/shared"))
}
pub(crate) fn site_desired(site: usize) -> DocId {
    doc(format!("device-desired/site:site-{site}/default/line"))
}

impl Writes for World {
    fn draws(&mut self) -> &mut fastrand::Rng {
        &mut self.rng
    }
    fn put_docs(&mut self, n: usize, docs: Vec<(DocId, Value)>) {
        self.write_docs(n, docs);
    }
    fn put_desired(&mut self, n: usize, d: &DocId, property: &str, value: String) {
        self.write_desired(n, d, property, value);
    }
    fn remove_doc(&mut self, n: usize, d: &DocId) {
        self.delete_doc(n, d);
    }
}

impl World {
    /// Builds the world for `seed` and `scenario`: the initial fleet, the
    /// cloud's provisioning writes, and the timeline (with the nemesis's
    /// faults when the scenario has a nemesis).
    pub fn new(seed: u64, scenario: Scenario) -> Result<Self, RunError> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut timeline = scenario.events.clone();
        if let Some(nemesis) = &scenario.nemesis {
            timeline.extend(crate::nemesis::generate(
                &mut rng,
                nemesis,
                &scenario.fleet,
                scenario.duration,
            ));
        }
        // Stable: events at the same time keep their file order.
        timeline.sort_by_key(Timeline::at);
        let heal_at = scenario.duration.0;
        let stop_at = heal_at + scenario.checks.liveness_bound.0;
        let give_up_at = stop_at + scenario.checks.settle_timeout.0;
        let mut world = World {
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            disk: MemoryDisk::new()?,
            nodes: Vec::new(),
            by_name: BTreeMap::new(),
            clouds: Vec::new(),
            site_edges: vec![Vec::new(); scenario.fleet.sites],
            roster: Roster::new(),
            links: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            cuts: BTreeMap::new(),
            active: BTreeMap::new(),
            overrides: BTreeMap::new(),
            net: scenario.network.clone(),
            timeline,
            windows: Vec::new(),
            restored: BTreeMap::new(),
            oracle: Oracle::default(),
            stats: Stats::default(),
            failures: Vec::new(),
            failure_counts: BTreeMap::new(),
            digest: blake3::Hasher::new(),
            heal_at,
            stop_at,
            give_up_at,
            healed: false,
            converged_at: None,
            done: false,
            in_flight: 0,
            storage: BTreeMap::new(),
            scenario,
        };
        world.digest.update(&seed.to_le_bytes());
        for c in 0..world.scenario.fleet.clouds {
            world.add_node(format!("cloud-{c}"), true, None)?;
        }
        for e in 0..world.scenario.fleet.edges {
            world.add_edge()?;
            let _ = e;
        }
        world.check_names()?;
        world.provision_sites();
        let edges: Vec<usize> = (0..world.nodes.len())
            .filter(|&n| !world.nodes[n].cloud)
            .collect();
        for n in edges {
            world.provision_edge(n);
        }
        // Clouds dial each other (lower index dials).
        let clouds = world.clouds.clone();
        for (i, &a) in clouds.iter().enumerate() {
            for &b in &clouds[i + 1..] {
                world.add_link(a, b);
            }
        }
        for c in clouds {
            let at = world.rng.u64(0..world.scenario.workload.api_interval.0);
            world.schedule(at, Ev::Api(c));
        }
        for i in 0..world.timeline.len() {
            let at = world.timeline[i].at().0;
            world.schedule(at, Ev::Timeline(i));
        }
        world.schedule(heal_at, Ev::Heal);
        world.schedule(stop_at, Ev::Liveness);
        world.schedule(stop_at, Ev::Check);
        Ok(world)
    }

    fn check_names(&self) -> Result<(), RunError> {
        for e in &self.timeline {
            let sels: Vec<&String> = match e {
                Timeline::Partition { a, b, .. } | Timeline::Flap { a, b, .. } => vec![a, b],
                Timeline::OneWay { from, to, .. } => vec![from, to],
                Timeline::Crash { node, .. }
                | Timeline::Skew { node, .. }
                | Timeline::Leave { node, .. } => vec![node],
                Timeline::IsolateSite { site, .. } => {
                    let ok = site
                        .strip_prefix("site-")
                        .and_then(|s| s.parse::<usize>().ok())
                        .is_some_and(|s| s < self.site_edges.len());
                    if !ok {
                        return Err(RunError::Scenario(format!(
                            "isolate-site: no site {site:?} (sites are site-0..site-{})",
                            self.site_edges.len().saturating_sub(1)
                        )));
                    }
                    vec![]
                }
                Timeline::Network { .. } | Timeline::Join { .. } => vec![],
            };
            for sel in sels {
                let known = matches!(sel.as_str(), "clouds" | "edges" | "all" | "random-edge")
                    || sel.starts_with("fraction:")
                    || self.by_name.contains_key(sel)
                    || sel.strip_prefix("site:site-").is_some_and(|s| {
                        s.parse::<usize>().is_ok_and(|s| s < self.site_edges.len())
                    })
                    // Edges that join later are named after the initial ones.
                    || sel.strip_prefix("edge-").is_some_and(|s| s.parse::<usize>().is_ok());
                if !known {
                    return Err(RunError::Scenario(format!(
                        "{} at {}: no node or group {sel:?}",
                        e.kind(),
                        e.at()
                    )));
                }
            }
        }
        Ok(())
    }

    fn add_node(
        &mut self,
        name: String,
        cloud: bool,
        site: Option<usize>,
    ) -> Result<usize, RunError> {
        let id = peer_id(&name);
        let n = self.nodes.len();
        let dir = PathBuf::from(format!("/sim/{name}"));
        self.roster.insert(
            id,
            if cloud {
                Role::Cloud
            } else {
                Role::Edge {
                    node: name.clone(),
                    site: site.map(|s| format!("site-{s}")),
                }
            },
        );
        self.nodes.push(Node {
            name: name.clone(),
            id,
            cloud,
            site,
            dir,
            replica: None,
            sessions: BTreeMap::new(),
            skew_ms: 0,
            state: State::Absent,
            seq: 0,
        });
        self.by_name.insert(name, n);
        if cloud {
            self.clouds.push(n);
        }
        self.open(n)?;
        self.nodes[n].state = State::Up;
        Ok(n)
    }

    fn options(&self, n: usize) -> ReplicaOptions {
        let f = &self.scenario.fleet;
        let cache = if self.nodes[n].cloud {
            f.cloud_cache_docs
        } else {
            f.edge_cache_docs
        };
        ReplicaOptions {
            store: StoreOptions {
                memory: Some(self.disk.clone()),
                compact_after_chunks: f.compact_after_chunks,
                ..StoreOptions::default()
            },
            cache_docs: NonZeroUsize::new(cache).unwrap_or(NonZeroUsize::MIN),
            ..ReplicaOptions::default()
        }
    }

    fn open(&mut self, n: usize) -> Result<(), RunError> {
        let options = self.options(n);
        let node = &mut self.nodes[n];
        let replica =
            Replica::open(&node.dir, node.id, options).map_err(|source| RunError::Open {
                node: node.name.clone(),
                source,
            })?;
        node.replica = Some(replica);
        Ok(())
    }

    /// Adds an edge (initial or joining), its links, and its report ticks.
    fn add_edge(&mut self) -> Result<usize, RunError> {
        let i = self.nodes.len() - self.clouds.len();
        let sites = self.site_edges.len();
        let site = (sites > 0).then(|| i % sites);
        let n = self.add_node(format!("edge-{i}"), false, site)?;
        for c in self.clouds.clone() {
            self.add_link(n, c);
        }
        if let Some(s) = site {
            // A ring within the site: each edge links to the previous
            // `site_peers` edges of its site (the earlier one accepts).
            let mates = &self.site_edges[s];
            let k = self.scenario.fleet.site_peers;
            let earlier: Vec<usize> = mates.iter().rev().take(k).copied().collect();
            for m in earlier {
                self.add_link(n, m);
            }
            self.site_edges[s].push(n);
        }
        let at = self.now + self.rng.u64(0..self.scenario.workload.report_interval.0);
        self.schedule(at, Ev::Report(n));
        Ok(n)
    }

    fn add_link(&mut self, dialler: usize, acceptor: usize) {
        self.links.insert(
            (dialler, acceptor),
            Link {
                conn: None,
                backoff_ms: self.net.backoff_min.0,
            },
        );
        let at = self.now + self.rng.u64(0..1000);
        self.schedule(at, Ev::Dial(dialler, acceptor));
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn note(&mut self, tag: &[u8], data: &[u8]) {
        self.digest.update(&self.now.to_le_bytes());
        self.digest.update(tag);
        self.digest.update(data);
    }

    fn fail(&mut self, checker: &'static str, explanation: String) {
        let count = self.failure_counts.entry(checker).or_insert(0);
        *count += 1;
        if *count as usize <= FAILURES_PER_CHECKER {
            info!(checker, %explanation, "check failed");
            self.failures.push(Failure {
                checker: checker.to_owned(),
                at_ms: self.now,
                explanation,
            });
        }
    }

    fn wall_ms(&self, n: usize) -> u64 {
        (EPOCH_MS as i64 + self.now as i64 + self.nodes[n].skew_ms).max(0) as u64
    }

    fn live(&self, n: usize) -> bool {
        matches!(self.nodes[n].state, State::Up | State::Down)
    }

    // ---- workload -------------------------------------------------------

    fn record_write(
        &mut self,
        n: usize,
        d: &DocId,
        hash: Option<ChangeHash>,
        value: &Value,
        wall: u64,
    ) {
        *self
            .oracle
            .writes_by_kind
            .entry(d.kind().as_str())
            .or_insert(0) += 1;
        if let Some(h) = hash {
            self.note(b"write", &h.0);
            self.oracle
                .commits
                .entry((d.clone(), wall as i64))
                .or_insert(self.now);
            if !d.kind().rolls_over() {
                self.oracle.kept.push((d.clone(), n, h));
            }
        }
        if d.kind().rolls_over() {
            self.oracle.rolling.insert(d.clone(), (n, value.clone()));
        }
    }

    /// Writes whole documents at node `n` and pushes them to its sessions.
    fn write_docs(&mut self, n: usize, docs: Vec<(DocId, Value)>) {
        let wall = self.wall_ms(n);
        let Some(replica) = self.nodes[n].replica.as_mut() else {
            return;
        };
        let t = tokio::time::Instant::now();
        let result = replica.write_many(docs.iter().map(|(d, v)| (d, v)), wall);
        *self.stats.host_ns.entry("write_many").or_insert(0) += t.elapsed().as_nanos() as u64;
        match result {
            Ok(hashes) => {
                for ((d, v), h) in docs.iter().zip(hashes) {
                    self.record_write(n, d, h, v, wall);
                }
                let changed: Vec<DocId> = docs.into_iter().map(|(d, _)| d).collect();
                self.changed(n, &changed, None);
            }
            Err(e) => {
                let name = self.nodes[n].name.clone();
                self.fail("write", format!("{name}: a write failed: {e}"));
            }
        }
    }

    /// Deletes a document at node `n` and pushes the tombstone. The changes
    /// acknowledged before are superseded: what must hold afterwards is that
    /// every reader has the tombstone (or a later write), which convergence
    /// checks.
    fn delete_doc(&mut self, n: usize, d: &DocId) {
        let wall = self.wall_ms(n);
        let Some(replica) = self.nodes[n].replica.as_mut() else {
            return;
        };
        match replica.delete(d, wall) {
            Ok(true) => {
                self.note(b"delete", d.as_str().as_bytes());
                self.oracle.kept.retain(|(doc, _, _)| doc != d);
                *self.oracle.writes_by_kind.entry("delete").or_insert(0) += 1;
                self.changed(n, std::slice::from_ref(d), None);
            }
            Ok(false) => {}
            Err(e) => {
                let name = self.nodes[n].name.clone();
                self.fail("write", format!("{name}: deleting {d} failed: {e}"));
            }
        }
    }

    fn write_desired(&mut self, n: usize, d: &DocId, property: &str, value: String) {
        let wall = self.wall_ms(n);
        let Some(replica) = self.nodes[n].replica.as_mut() else {
            return;
        };
        let me = replica.me().to_string();
        let before = replica.entry(d).ok().flatten().map(|e| e.heads);
        let t = tokio::time::Instant::now();
        let result = set_desired(replica, d, property, &value, wall);
        *self.stats.host_ns.entry("set_desired").or_insert(0) += t.elapsed().as_nanos() as u64;
        let slot = replica
            .read_json(d)
            .ok()
            .flatten()
            .and_then(|v| resolve_slot(&v, property, &me));
        let after = replica.entry(d).ok().flatten().map(|e| e.heads);
        match result {
            Ok(at) => {
                let name = self.nodes[n].name.clone();
                let Some(slot) = slot else {
                    self.fail(
                        "write",
                        format!("{name}: set_desired({d}, {property}) returned Ok but the slot is not readable"),
                    );
                    return;
                };
                if slot.at != at || slot.value != value {
                    self.fail("write", format!("{name}: set_desired({d}, {property}) returned {at:?} but reads back {slot:?}"));
                }
                if at <= slot.seen {
                    self.fail(
                        "conflict",
                        format!("{name}: desired write {value:?} to {d}/{property} stamped {at:?}, not after the {:?} it had seen", slot.seen),
                    );
                }
                let key = (d.clone(), property.to_owned(), n);
                if let Some(prev) = self.oracle.desired.get(&key)
                    && at <= prev.at
                {
                    {
                        self.fail(
                            "conflict",
                            format!("{name}: desired write to {d}/{property} stamped {at:?}, not after its own previous {:?}", prev.at),
                        );
                    }
                }
                self.oracle.desired.insert(key, slot);
                *self
                    .oracle
                    .writes_by_kind
                    .entry("desired-value")
                    .or_insert(0) += 1;
                if before != after {
                    // The change set_desired committed carries the wall time we gave it.
                    self.oracle
                        .commits
                        .entry((d.clone(), wall as i64))
                        .or_insert(self.now);
                    if let Some(heads) = after {
                        for h in heads {
                            if !before.as_ref().is_some_and(|b| b.contains(&h)) {
                                self.note(b"desired", &h);
                                self.oracle.kept.push((d.clone(), n, ChangeHash(h)));
                            }
                        }
                    }
                }
                self.changed(n, std::slice::from_ref(d), None);
            }
            Err(e) => {
                let name = self.nodes[n].name.clone();
                self.fail("write", format!("{name}: set_desired failed: {e}"));
            }
        }
    }

    fn provision_sites(&mut self) {
        let Some(&cloud) = self.clouds.first() else {
            return;
        };
        for s in 0..self.site_edges.len() {
            workload::provision_site(self, cloud, s);
        }
    }

    fn provision_edge(&mut self, n: usize) {
        let Some(&cloud) = self.clouds.first() else {
            return;
        };
        let edge = self.nodes[n].name.clone();
        let f = self.scenario.fleet.clone();
        workload::provision_edge(self, cloud, &edge, &f);
    }

    fn report_tick(&mut self, n: usize) {
        if self.now >= self.stop_at || self.nodes[n].state == State::Departed {
            return;
        }
        let next = self.now + self.scenario.workload.report_interval.0;
        self.schedule(next, Ev::Report(n));
        if self.nodes[n].state != State::Up {
            return;
        }
        self.nodes[n].seq += 1;
        let seq = self.nodes[n].seq;
        let edge = self.nodes[n].name.clone();
        let wall = self.wall_ms(n);
        let w = self.scenario.workload.clone();
        let f = self.scenario.fleet.clone();
        let site = self.nodes[n].site;
        workload::report_tick(self, n, &edge, seq, wall, site, &f, &w);
    }

    fn api(&mut self, c: usize) {
        if self.now >= self.stop_at {
            return;
        }
        let next = self.now + self.scenario.workload.api_interval.0;
        self.schedule(next, Ev::Api(c));
        if self.nodes[c].state != State::Up {
            return;
        }
        let edges: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].cloud && self.live(n))
            .collect();
        if edges.is_empty() {
            return;
        }
        self.nodes[c].seq += 1;
        let seq = self.nodes[c].seq;
        let e = edges[self.rng.usize(0..edges.len())];
        let edge = self.nodes[e].name.clone();
        let site = self.nodes[e].site;
        let f = self.scenario.fleet.clone();
        let w = self.scenario.workload.clone();
        let cloud = self.nodes[c].name.clone();
        let one_cloud = self.clouds.len() == 1;
        workload::api_write(self, c, &cloud, seq, &edge, site, &f, &w, one_cloud);
    }

    // ---- sessions and the network ---------------------------------------

    /// Peers of `n` that may read `d`: the clouds and the owning edges.
    fn readers(&self, d: &DocId) -> Vec<usize> {
        let mut out = self.clouds.clone();
        match d.owner() {
            Owner::Node(name) => {
                if let Some(&e) = self.by_name.get(name) {
                    out.push(e);
                }
            }
            Owner::Site(site) => {
                if let Some(s) = site
                    .strip_prefix("site-")
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|&s| s < self.site_edges.len())
                {
                    out.extend(self.site_edges[s].iter().copied());
                }
            }
        }
        out
    }

    /// Documents changed at `n` (written, or applied from `from`): mark them
    /// in every other session whose peer may read them, and pump those.
    fn changed(&mut self, n: usize, docs: &[DocId], from: Option<usize>) {
        let mut touched = BTreeSet::new();
        let me = self.nodes[n].id;
        for d in docs {
            for peer in self.readers(d) {
                if peer == n || Some(peer) == from {
                    continue;
                }
                if let Some(slot) = self.nodes[n].sessions.get_mut(&peer) {
                    slot.session.local_change(&me, &self.roster, d);
                    touched.insert(peer);
                }
            }
        }
        for peer in touched {
            self.pump(n, peer);
        }
    }

    fn pump(&mut self, n: usize, peer: usize) {
        let node = &mut self.nodes[n];
        let Some(replica) = node.replica.as_mut() else {
            return;
        };
        let Some(slot) = node.sessions.get_mut(&peer) else {
            return;
        };
        let conn = slot.conn;
        let mut out = Vec::new();
        let mut error = None;
        let t = tokio::time::Instant::now();
        loop {
            match slot.session.poll_transmit(replica, &self.roster) {
                Ok(Some(m)) => out.push(m),
                // Nothing to send: the engine compacts what receiving
                // left due, as many documents a turn.
                Ok(None) => {
                    if let Err(e) = replica.compact_deferred(outpost_sync::engine::COMPACT_PER_TURN)
                    {
                        error = Some(e.into());
                    }
                    break;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        *self.stats.host_ns.entry("poll_transmit").or_insert(0) += t.elapsed().as_nanos() as u64;
        for m in out {
            timed!(self, "send (encode, schedule)", self.send(conn, n, m));
        }
        if let Some(e) = error {
            self.session_error(n, peer, conn, e.to_string());
        }
    }

    fn session_error(&mut self, n: usize, peer: usize, conn: u64, reason: String) {
        self.stats.session_errors += 1;
        let (a, b) = (self.nodes[n].name.clone(), self.nodes[peer].name.clone());
        self.fail(
            "protocol",
            format!("session of {a} with {b} failed: {reason}"),
        );
        self.end_session(n, peer);
        self.doom(conn, [true, true], 0);
    }

    /// The timer of [`Ev::SaveAcks`]: saves the session's acknowledgements
    /// if it is still the one of `conn`.
    fn save_acks(&mut self, n: usize, peer: usize, conn: u64) {
        let node = &mut self.nodes[n];
        let (Some(replica), Some(slot)) = (node.replica.as_ref(), node.sessions.get_mut(&peer))
        else {
            return;
        };
        if slot.conn != conn {
            return;
        }
        if let Err(failure) = slot.save_acks(replica, &node.name) {
            self.fail("store", failure);
        }
    }

    /// Removes node `n`'s session with `peer`, saving the acknowledgements
    /// it holds, as the engine does when a session ends.
    fn end_session(&mut self, n: usize, peer: usize) {
        let node = &mut self.nodes[n];
        let (Some(mut slot), Some(replica)) = (node.sessions.remove(&peer), node.replica.as_ref())
        else {
            return;
        };
        if let Err(failure) = slot.save_acks(replica, &node.name) {
            self.fail("store", failure);
        }
    }

    fn send(&mut self, conn_id: u64, from: usize, msg: Message) {
        let kind = match &msg {
            Message::Hello { .. } => "hello",
            Message::Buckets(_) => "buckets",
            Message::Items { .. } => "items",
            Message::Changes(_) => "changes",
            Message::Ack(_) => "ack",
            Message::Need(_) => "need",
        };
        let bytes = encode(&msg);
        self.stats.messages += 1;
        self.stats.bytes += bytes.len() as u64 + 4;
        let e = self.stats.by_kind.entry(kind).or_insert((0, 0));
        e.0 += 1;
        e.1 += bytes.len() as u64 + 4;
        let Some(conn) = self.conns.get(&conn_id) else {
            self.stats.dropped += 1;
            return;
        };
        let dir = usize::from(conn.ends[0] != from);
        if conn.cut[dir] {
            self.stats.dropped += 1;
            return;
        }
        if self.rng.f64() < self.net.reset {
            self.stats.lost_to_reset += 1;
            self.doom(conn_id, [true, true], self.net.idle_timeout.0);
            return;
        }
        let mut delay = self.net.delay.sample(&mut self.rng);
        if self.rng.f64() < self.net.loss {
            self.stats.retransmitted += 1;
            delay += self.net.rto.0;
        }
        if self.rng.f64() < self.net.reorder {
            self.stats.held_back += 1;
            delay += self.net.reorder_delay.0;
        }
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let at = (now + delay).max(conn.last_arrival[dir]);
        conn.last_arrival[dir] = at;
        self.in_flight += 1;
        self.schedule(
            at,
            Ev::Deliver {
                conn: conn_id,
                dir,
                bytes,
            },
        );
    }

    fn deliver(&mut self, conn_id: u64, dir: usize, bytes: Vec<u8>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(conn) = self.conns.get(&conn_id) else {
            self.stats.dropped += 1;
            return;
        };
        if conn.cut[dir] {
            self.stats.dropped += 1;
            return;
        }
        let (from, to) = (conn.ends[dir], conn.ends[1 - dir]);
        if self.nodes[to].state != State::Up
            || self.nodes[to].sessions.get(&from).map(|s| s.conn) != Some(conn_id)
        {
            self.stats.dropped += 1;
            return;
        }
        self.note(b"deliver", &bytes);
        let msg = match decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                self.session_error(to, from, conn_id, format!("cannot decode: {e}"));
                return;
            }
        };
        let node = &mut self.nodes[to];
        let (Some(replica), Some(slot)) = (node.replica.as_mut(), node.sessions.get_mut(&from))
        else {
            return;
        };
        let t = tokio::time::Instant::now();
        let handled = slot.session.handle(msg, replica, &self.roster);
        let save_due = if slot.session.unsaved_acks() == 0 {
            slot.acks_since = None;
            None
        } else if slot.acks_since.is_none() {
            slot.acks_since = Some(self.now);
            Some(self.now + ACK_SAVE_DELAY_MS)
        } else {
            None
        };
        *self.stats.host_ns.entry("handle").or_insert(0) += t.elapsed().as_nanos() as u64;
        if let Some(at) = save_due {
            self.schedule(
                at,
                Ev::SaveAcks {
                    node: to,
                    peer: from,
                    conn: conn_id,
                },
            );
        }
        let events = match handled {
            Ok(events) => events,
            Err(e) => {
                self.session_error(to, from, conn_id, e.to_string());
                return;
            }
        };
        let mut applied = Vec::new();
        for event in events {
            match event {
                SessionEvent::Applied { doc, lag_ms } => {
                    for t in lag_ms {
                        if let Some(&origin) = self.oracle.commits.get(&(doc.clone(), t)) {
                            let lag = self.now.saturating_sub(origin);
                            if self.healed {
                                self.stats.lag_after_heal_ms.push(lag);
                            }
                            self.stats.lag.push(LagSample {
                                applied_ms: self.now,
                                lag_ms: lag,
                                link: (from.min(to), from.max(to)),
                            });
                        }
                    }
                    applied.push(doc);
                }
                SessionEvent::Rejected { doc, reason } => {
                    self.stats.rejected += 1;
                    let (a, b) = (self.nodes[to].name.clone(), self.nodes[from].name.clone());
                    self.fail(
                        "access",
                        format!("{a} rejected changes of {doc} from {b}: {reason}"),
                    );
                }
                SessionEvent::Round => {}
            }
        }
        self.pump(to, from);
        if !applied.is_empty() {
            self.changed(to, &applied, Some(from));
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cuts.contains_key(&(a, b)) && !self.cuts.contains_key(&(b, a))
    }

    fn backoff(&mut self, link: (usize, usize), reset: bool) -> u64 {
        let (min, max) = (self.net.backoff_min.0, self.net.backoff_max.0);
        let Some(l) = self.links.get_mut(&link) else {
            return min;
        };
        if reset {
            l.backoff_ms = min;
        }
        let b = l.backoff_ms;
        l.backoff_ms = (b * 2).min(max);
        b + self.rng.u64(0..=b / 2)
    }

    fn dial(&mut self, d: usize, a: usize, duplicate: bool) {
        let Some(link) = self.links.get(&(d, a)) else {
            return;
        };
        if self.nodes[d].state != State::Up || (link.conn.is_some() && !duplicate) {
            return;
        }
        if self.nodes[a].state != State::Up || !self.reachable(d, a) {
            self.stats.dials_failed += 1;
            let wait = self.net.connect_timeout.0 + self.backoff((d, a), false);
            let at = self.now + wait;
            self.schedule(at, Ev::Dial(d, a));
            return;
        }
        self.next_conn += 1;
        let id = self.next_conn;
        self.conns.insert(
            id,
            Conn {
                ends: [d, a],
                cut: [false; 2],
                doomed: false,
                opened: false,
                last_arrival: [0; 2],
                told: 0,
            },
        );
        let old = self.links.get_mut(&(d, a)).and_then(|l| l.conn.replace(id));
        if let Some(old) = old.filter(|_| duplicate) {
            // The duplicate replaces the first connection at both ends.
            let close = self.net.delay.sample(&mut self.rng);
            self.doom(old, [true, true], close);
        }
        let rtt = self.net.delay.sample(&mut self.rng) + self.net.delay.sample(&mut self.rng);
        let at = self.now + rtt;
        self.schedule(at, Ev::Open(id));
        if !duplicate && self.rng.f64() < self.net.duplicate {
            self.stats.duplicated_dials += 1;
            let at = self.now + rtt + self.rng.u64(1..=rtt.max(1) * 4);
            self.schedule(at, Ev::DupDial(d, a));
        }
    }

    fn open_conn(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.doomed {
            return;
        }
        conn.opened = true;
        let [d, a] = conn.ends;
        if self.nodes[d].state != State::Up || self.nodes[a].state != State::Up {
            self.doom(id, [true, true], 0);
            return;
        }
        self.stats.conns_opened += 1;
        self.note(b"open", &id.to_le_bytes());
        for (me, peer, initiate) in [(d, a, true), (a, d, false)] {
            let peer_id = self.nodes[peer].id;
            let node = &mut self.nodes[me];
            let Some(replica) = node.replica.as_ref() else {
                continue;
            };
            let t = tokio::time::Instant::now();
            let started = Session::new(peer_id, &self.roster).and_then(|mut s| {
                s.start(replica, &self.roster, initiate)?;
                Ok(s)
            });
            *self.stats.host_ns.entry("session start").or_insert(0) +=
                t.elapsed().as_nanos() as u64;
            match started {
                Ok(session) => {
                    // A new connection replaces the previous session with that peer.
                    let old = node.sessions.insert(
                        peer,
                        Slot {
                            conn: id,
                            session,
                            acks_since: None,
                        },
                    );
                    if let Some(mut old) = old {
                        if let Err(failure) = old.save_acks(replica, &node.name) {
                            self.fail("store", failure);
                        }
                        if old.conn != id {
                            self.doom(old.conn, [true, true], 0);
                        }
                    }
                }
                Err(e) => {
                    self.session_error(me, peer, id, e.to_string());
                    return;
                }
            }
        }
        self.pump(d, a);
        self.pump(a, d);
    }

    /// Kills a connection: `cut` directions lose their messages from now on;
    /// each end that is up notices after `notice_ms`.
    fn doom(&mut self, id: u64, cut: [bool; 2], notice_ms: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.cut[0] |= cut[0];
        conn.cut[1] |= cut[1];
        if conn.doomed {
            return;
        }
        conn.doomed = true;
        self.stats.conns_broken += u64::from(conn.opened);
        let ends = conn.ends;
        for node in ends {
            let at = self.now + notice_ms;
            self.schedule(at, Ev::Closed { conn: id, node });
        }
    }

    fn closed(&mut self, id: u64, n: usize) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let [d, a] = conn.ends;
        conn.told += 1;
        if conn.told >= 2 {
            self.conns.remove(&id);
        }
        let peer = if n == d { a } else { d };
        if self.nodes[n].sessions.get(&peer).map(|s| s.conn) == Some(id) {
            self.end_session(n, peer);
        }
        if n == d && self.nodes[d].state == State::Up {
            let mine = self.links.get(&(d, a)).and_then(|l| l.conn) == Some(id);
            if mine {
                if let Some(l) = self.links.get_mut(&(d, a)) {
                    l.conn = None;
                }
                let wait = self.backoff((d, a), true);
                let at = self.now + wait;
                self.schedule(at, Ev::Dial(d, a));
            }
        }
    }

    // ---- faults ---------------------------------------------------------

    fn select(&mut self, sel: &str) -> Vec<usize> {
        let edges: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].cloud && self.live(n))
            .collect();
        let all: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.live(n)).collect();
        select_targets(
            sel,
            &mut self.rng,
            edges,
            all,
            &self.clouds,
            &self.site_edges,
            &self.by_name,
        )
    }

    fn cut(&mut self, pairs: &[(usize, usize)]) {
        for &p in pairs {
            *self.cuts.entry(p).or_insert(0) += 1;
        }
        // Connections with a cut direction are dead.
        let mut doomed = Vec::new();
        for (&id, conn) in &self.conns {
            let [d, a] = conn.ends;
            let cut = [
                self.cuts.contains_key(&(d, a)),
                self.cuts.contains_key(&(a, d)),
            ];
            if (cut[0] || cut[1]) && !(conn.cut[0] && conn.cut[1]) {
                doomed.push((id, cut));
            }
        }
        let idle = self.net.idle_timeout.0;
        for (id, cut) in doomed {
            self.doom(id, cut, idle);
        }
    }

    fn uncut(&mut self, pairs: &[(usize, usize)]) {
        for p in pairs {
            if let Some(c) = self.cuts.get_mut(p) {
                *c -= 1;
                if *c == 0 {
                    self.cuts.remove(p);
                }
            }
        }
    }

    fn pairs(a: &[usize], b: &[usize], both: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &x in a {
            for &y in b {
                if x != y {
                    out.push((x, y));
                    if both {
                        out.push((y, x));
                    }
                }
            }
        }
        out
    }

    fn count_fault(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_insert(0) += 1;
    }

    fn timeline(&mut self, i: usize) {
        if self.healed {
            return;
        }
        let event = self.timeline[i].clone();
        self.count_fault(event.kind());
        self.note(b"fault", event.kind().as_bytes());
        debug!(at = self.now, kind = event.kind(), "fault");
        let (start, heal_at) = (event.at().0, self.heal_at);
        let end = move |length: Dur| (start + length.0).min(heal_at);
        self.windows.push(window(&event, self.now, heal_at));
        match &event {
            Timeline::Partition { length, a, b, .. } => {
                let (a, b) = (self.select(a), self.select(b));
                let pairs = Self::pairs(&a, &b, true);
                self.cut(&pairs);
                self.active.insert(i, Active::Cuts(pairs, true));
                self.schedule(end(*length), Ev::FaultEnd(i));
            }
            Timeline::OneWay {
                length, from, to, ..
            } => {
                let (a, b) = (self.select(from), self.select(to));
                let pairs = Self::pairs(&a, &b, false);
                self.cut(&pairs);
                self.active.insert(i, Active::Cuts(pairs, true));
                self.schedule(end(*length), Ev::FaultEnd(i));
            }
            Timeline::Flap {
                length, a, b, down, ..
            } => {
                let (a, b) = (self.select(a), self.select(b));
                let pairs = Self::pairs(&a, &b, true);
                self.cut(&pairs);
                self.active.insert(i, Active::Cuts(pairs, true));
                let until = end(*length);
                self.schedule((self.now + down.0).min(until), Ev::FlapToggle(i, false));
                self.schedule(until, Ev::FaultEnd(i));
            }
            Timeline::IsolateSite { length, site, .. } => {
                let edges = self.select(&format!("site:{site}"));
                let pairs = Self::pairs(&edges, &self.clouds.clone(), true);
                self.cut(&pairs);
                self.active.insert(i, Active::Cuts(pairs, true));
                self.schedule(end(*length), Ev::FaultEnd(i));
            }
            Timeline::Crash {
                node,
                restart_after,
                ..
            } => {
                for n in self.select(node) {
                    self.crash(n, false);
                    if let Some(d) = restart_after {
                        let at = self.now + d.0;
                        if at < self.heal_at {
                            self.schedule(at, Ev::Restart(n));
                        }
                    }
                }
            }
            Timeline::Skew { node, skew_ms, .. } => {
                for n in self.select(node) {
                    self.nodes[n].skew_ms = *skew_ms;
                }
            }
            Timeline::Network { length, change, .. } => {
                self.overrides.insert(i, change.clone());
                self.active.insert(i, Active::Network);
                self.recompute_network();
                self.schedule(end(*length), Ev::FaultEnd(i));
            }
            Timeline::Join { count, .. } => {
                for _ in 0..*count {
                    match self.add_edge() {
                        Ok(n) => self.provision_edge(n),
                        Err(e) => self.fail("membership", format!("a joining edge failed: {e}")),
                    }
                }
            }
            Timeline::Leave { node, .. } => {
                for n in self.select(node) {
                    if self.nodes[n].cloud {
                        continue;
                    }
                    self.crash(n, true);
                    self.nodes[n].state = State::Departed;
                }
            }
        }
    }

    fn recompute_network(&mut self) {
        let mut net = self.scenario.network.clone();
        for change in self.overrides.values() {
            if let Some(d) = &change.delay {
                net.delay = d.clone();
            }
            if let Some(p) = change.loss {
                net.loss = p;
            }
            if let Some(p) = change.reset {
                net.reset = p;
            }
            if let Some(p) = change.duplicate {
                net.duplicate = p;
            }
            if let Some(p) = change.reorder {
                net.reorder = p;
            }
        }
        self.net = net;
    }

    fn fault_end(&mut self, i: usize) {
        match self.active.remove(&i) {
            Some(Active::Cuts(pairs, applied)) => {
                if applied {
                    self.uncut(&pairs);
                }
                let links = self.links_back(pairs.iter().copied());
                self.restored_now(Restored::Links(links));
            }
            None => {}
            Some(Active::Network) => {
                self.overrides.remove(&i);
                self.recompute_network();
                let count = self.link_count();
                self.restored_now(Restored::All { count });
            }
        }
    }

    /// Of the node pairs `pairs`, the links (pairs that sync) no cut holds now.
    fn links_back(&self, pairs: impl Iterator<Item = (usize, usize)>) -> BTreeSet<LinkPair> {
        pairs
            .map(|(a, b)| (a.min(b), a.max(b)))
            .filter(|&(a, b)| {
                (self.links.contains_key(&(a, b)) || self.links.contains_key(&(b, a)))
                    && self.reachable(a, b)
            })
            .collect()
    }

    /// Links between nodes, each pair once.
    fn link_count(&self) -> u64 {
        let pairs: BTreeSet<LinkPair> = self
            .links
            .keys()
            .map(|&(a, b)| (a.min(b), a.max(b)))
            .collect();
        pairs.len() as u64
    }

    /// Notes that the heal happening now gave back `links`.
    fn restored_now(&mut self, links: Restored) {
        let merged = match self.restored.remove(&self.now) {
            Some(before) => before.merge(links),
            None => links,
        };
        self.restored.insert(self.now, merged);
    }

    fn flap(&mut self, i: usize, on: bool) {
        let Some(Active::Cuts(pairs, applied)) = self.active.get_mut(&i) else {
            return;
        };
        if *applied == on {
            return;
        }
        *applied = on;
        let pairs = pairs.clone();
        let Timeline::Flap { down, up, .. } = self.timeline[i].clone() else {
            return;
        };
        if on {
            self.cut(&pairs);
            self.schedule(self.now + down.0, Ev::FlapToggle(i, false));
        } else {
            self.uncut(&pairs);
            self.schedule(self.now + up.0, Ev::FlapToggle(i, true));
        }
    }

    /// The process of node `n` dies (a crash, or a departure when `leaving`).
    fn crash(&mut self, n: usize, leaving: bool) {
        if self.nodes[n].state != State::Up {
            return;
        }
        self.stats.crashes += u64::from(!leaving);
        self.note(b"crash", self.nodes[n].name.clone().as_bytes());
        let node = &mut self.nodes[n];
        node.state = State::Down;
        let replica = node.replica.take();
        timed!(self, "close replicas", drop(replica));
        let node = &mut self.nodes[n];
        node.sessions.clear();
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ends.contains(&n))
            .map(|(&id, _)| id)
            .collect();
        let idle = self.net.idle_timeout.0;
        for id in ids {
            self.doom(id, [true, true], idle);
        }
        for ((d, _), link) in self.links.iter_mut() {
            if *d == n {
                link.conn = None;
            }
        }
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].state != State::Down {
            return;
        }
        self.stats.restarts += 1;
        self.note(b"restart", self.nodes[n].name.clone().as_bytes());
        if let Err(e) = timed!(self, "open replicas", self.open(n)) {
            let name = self.nodes[n].name.clone();
            self.fail("crash", format!("{name} does not restart: {e}"));
            return;
        }
        self.nodes[n].state = State::Up;
        let mine: Vec<(usize, usize)> = self
            .links
            .keys()
            .filter(|(d, _)| *d == n)
            .copied()
            .collect();
        for (d, a) in mine {
            if let Some(l) = self.links.get_mut(&(d, a)) {
                l.backoff_ms = self.net.backoff_min.0;
            }
            let at = self.now + self.rng.u64(0..200);
            self.schedule(at, Ev::Dial(d, a));
        }
        let peers: Vec<(usize, usize)> = self
            .links
            .keys()
            .filter(|(d, a)| *d == n || *a == n)
            .copied()
            .collect();
        let links = self.links_back(peers.into_iter());
        self.restored_now(Restored::Links(links));
    }

    fn heal(&mut self) {
        self.healed = true;
        self.note(b"heal", &[]);
        info!(at_ms = self.now, "faults heal");
        let count = self.link_count();
        self.restored_now(Restored::All { count });
        self.cuts.clear();
        self.active.clear();
        self.overrides.clear();
        self.recompute_network();
        for n in 0..self.nodes.len() {
            if self.nodes[n].state == State::Down {
                self.restart(n);
            }
        }
    }

    fn liveness(&mut self) {
        let mut missing = Vec::new();
        for (&(d, a), link) in &self.links {
            if self.nodes[d].state != State::Up || self.nodes[a].state != State::Up {
                continue;
            }
            let up = link
                .conn
                .and_then(|c| self.conns.get(&c))
                .is_some_and(|c| c.opened && !c.doomed);
            if !up {
                missing.push(format!("{}->{}", self.nodes[d].name, self.nodes[a].name));
            }
        }
        if !missing.is_empty() {
            let n = missing.len();
            missing.truncate(5);
            self.fail(
                "liveness",
                format!(
                    "{n} links not connected {} after the faults healed: {}",
                    self.scenario.checks.liveness_bound,
                    missing.join(", ")
                ),
            );
        }
    }

    // ---- checkers ---------------------------------------------------------

    /// Heads agree everywhere a document is in scope; `None` when they do,
    /// else the first disagreement.
    fn heads_disagree(&mut self) -> Option<String> {
        let mut reference: BTreeMap<DocId, ([u8; 32], usize, usize)> = BTreeMap::new();
        for n in 0..self.nodes.len() {
            if self.nodes[n].state != State::Up {
                continue;
            }
            let Some(replica) = self.nodes[n].replica.as_ref() else {
                continue;
            };
            for item in replica.scan() {
                let (d, entry) = match item {
                    Ok(x) => x,
                    Err(e) => return Some(format!("{}: scan failed: {e}", self.nodes[n].name)),
                };
                let digest = entry.digest();
                match reference.get_mut(&d) {
                    None => {
                        reference.insert(d, (digest, 1, n));
                    }
                    Some(r) if r.0 == digest => r.1 += 1,
                    Some(r) => {
                        return Some(format!(
                            "{d}: {} has generation {} heads {} but {} has another state",
                            self.nodes[n].name,
                            entry.generation,
                            short_heads(&entry.heads),
                            self.nodes[r.2].name
                        ));
                    }
                }
            }
        }
        for (d, (_, count, first)) in &reference {
            let readers: Vec<usize> = self
                .readers(d)
                .into_iter()
                .filter(|&r| self.nodes[r].state == State::Up)
                .collect();
            if *count != readers.len() {
                let mut lacking = Vec::new();
                for &r in &readers {
                    let has = self.nodes[r]
                        .replica
                        .as_mut()
                        .is_some_and(|rep| rep.entry(d).ok().flatten().is_some());
                    if !has {
                        lacking.push(self.nodes[r].name.clone());
                    }
                }
                return Some(format!(
                    "{d}: held by {count} of its {} readers (first by {}); missing at {}",
                    readers.len(),
                    self.nodes[*first].name,
                    lacking.join(", ")
                ));
            }
        }
        None
    }

    fn check_tick(&mut self) {
        if self.in_flight == 0 {
            if let Some(why) = self.heads_disagree() {
                debug!(at = self.now, %why, "not converged yet");
            } else {
                self.converged_at = Some(self.now);
                self.done = true;
                return;
            }
        }
        if self.now >= self.give_up_at {
            let why = self
                .heads_disagree()
                .unwrap_or_else(|| format!("{} messages still in flight", self.in_flight));
            self.fail(
                "convergence",
                format!(
                    "replicas did not converge within {} after the workload stopped: {why}",
                    self.scenario.checks.settle_timeout
                ),
            );
            self.done = true;
            return;
        }
        self.schedule(self.now + 1000, Ev::Check);
    }

    fn up_readers(&self, d: &DocId) -> Vec<usize> {
        self.readers(d)
            .into_iter()
            .filter(|&r| self.nodes[r].state == State::Up)
            .collect()
    }

    /// The final checks, once the run has converged (or given up).
    fn final_checks(&mut self) {
        // Values: every reader of a document reads the same JSON.
        let docs: BTreeSet<DocId> = self
            .nodes
            .iter()
            .filter(|n| n.state == State::Up)
            .filter_map(|n| n.replica.as_ref())
            .flat_map(|r| r.scan().filter_map(Result::ok).map(|(d, _)| d))
            .collect();
        let mut values: BTreeMap<DocId, Value> = BTreeMap::new();
        for d in &docs {
            let mut first: Option<(usize, Option<Value>)> = None;
            for r in self.up_readers(d) {
                let v = self.nodes[r]
                    .replica
                    .as_mut()
                    .and_then(|rep| rep.read_json(d).ok().flatten());
                match &first {
                    None => first = Some((r, v)),
                    Some((f, fv)) if *fv != v => {
                        let (a, b) = (self.nodes[*f].name.clone(), self.nodes[r].name.clone());
                        self.fail(
                            "convergence",
                            format!("{d}: {a} reads {} but {b} reads {}", short(fv), short(&v)),
                        );
                        break;
                    }
                    Some(_) => {}
                }
            }
            if let Some((_, Some(v))) = first {
                values.insert(d.clone(), v);
            }
        }
        self.check_lost_writes(&values);
        self.check_conflicts(&values);
        self.check_storage();
    }

    fn check_lost_writes(&mut self, values: &BTreeMap<DocId, Value>) {
        // History-keeping documents: every acknowledged change is present at every reader.
        let kept = std::mem::take(&mut self.oracle.kept);
        for (d, writer, hash) in &kept {
            if self.nodes[*writer].state == State::Departed {
                continue;
            }
            for r in self.up_readers(d) {
                let has = self.nodes[r]
                    .replica
                    .as_mut()
                    .is_some_and(|rep| rep.has_change(d, hash).unwrap_or(false));
                if !has {
                    let (w, rn) = (self.nodes[*writer].name.clone(), self.nodes[r].name.clone());
                    self.fail(
                        "lost-write",
                        format!("{d}: change {} written by {w} and acknowledged to it is missing at {rn}", &hex(&hash.0)[..12]),
                    );
                }
            }
        }
        self.oracle.kept = kept;
        // Rolling documents (single writer, history dropped at roll-over):
        // every reader holds the writer's last acknowledged value.
        let rolling = std::mem::take(&mut self.oracle.rolling);
        for (d, (writer, last)) in &rolling {
            if self.nodes[*writer].state == State::Departed {
                continue;
            }
            if let Some(f) = checks::rolling_lost(d, &self.nodes[*writer].name, last, values) {
                self.fail("lost-write", f);
            }
        }
        self.oracle.rolling = rolling;
    }

    fn check_conflicts(&mut self, values: &BTreeMap<DocId, Value>) {
        // Each writer's slot holds its last write (later writes of the same
        // writer overwrite earlier ones; other writers' slots never do).
        let desired = std::mem::take(&mut self.oracle.desired);
        for ((d, prop, writer), last) in &desired {
            if self.nodes[*writer].state == State::Departed {
                continue;
            }
            let me = self.nodes[*writer].id.to_string();
            let w = &self.nodes[*writer].name;
            if let Some(f) = checks::desired_lost(d, prop, w, &me, last, values) {
                self.fail("lost-write", f);
            }
        }
        self.oracle.desired = desired;
        let (failures, conflicts) = checks::conflict_rule(values);
        self.stats.conflicts += conflicts;
        for f in failures {
            self.fail("conflict", f);
        }
    }

    fn check_storage(&mut self) {
        let limit = self.scenario.checks.max_twin_bytes;
        let mut max_by_kind: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut over = Vec::new();
        for n in 0..self.nodes.len() {
            let Some(replica) = self.nodes[n].replica.as_ref() else {
                continue;
            };
            let docs: Vec<DocId> = replica
                .scan()
                .filter_map(Result::ok)
                .map(|(d, _)| d)
                .collect();
            for d in docs {
                let bytes = replica.store().doc_bytes(&d).unwrap_or(0);
                let kind = d.kind();
                let m = max_by_kind.entry(kind.as_str()).or_insert(0);
                *m = (*m).max(bytes);
                let twin = matches!(
                    kind,
                    DocKind::DeviceDesired | DocKind::DeviceReported | DocKind::NodeStatus
                );
                if twin && bytes > limit {
                    over.push(format!("{d} at {}: {bytes} B", self.nodes[n].name));
                }
            }
        }
        self.storage = max_by_kind;
        if !over.is_empty() {
            let n = over.len();
            over.truncate(5);
            self.fail(
                "storage",
                format!("{n} twin documents exceed {limit} B: {}", over.join(", ")),
            );
        }
    }

    // ---- the run ----------------------------------------------------------

    /// Runs to the end and reports.
    pub fn run(mut self) -> Report {
        let started = tokio::time::Instant::now();
        self.drive();
        let wall = started.elapsed();
        self.finish(wall.as_millis() as u64)
    }

    /// Processes events until the run has converged or given up.
    fn drive(&mut self) {
        while let Some(Reverse(next)) = self.queue.pop() {
            self.now = next.at;
            self.stats.events += 1;
            if self.stats.events > MAX_EVENTS {
                self.fail(
                    "liveness",
                    format!("more than {MAX_EVENTS} events: the run does not settle"),
                );
                break;
            }
            match next.ev {
                Ev::Dial(d, a) => self.dial(d, a, false),
                Ev::DupDial(d, a) => self.dial(d, a, true),
                Ev::Open(id) => self.open_conn(id),
                Ev::Closed { conn, node } => self.closed(conn, node),
                Ev::SaveAcks { node, peer, conn } => self.save_acks(node, peer, conn),
                Ev::Deliver { conn, dir, bytes } => self.deliver(conn, dir, bytes),
                Ev::Report(n) => self.report_tick(n),
                Ev::Api(c) => self.api(c),
                Ev::Timeline(i) => self.timeline(i),
                Ev::FaultEnd(i) => self.fault_end(i),
                Ev::FlapToggle(i, on) => self.flap(i, on),
                Ev::Restart(n) => self.restart(n),
                Ev::Heal => self.heal(),
                Ev::Liveness => self.liveness(),
                Ev::Check => timed!(self, "convergence checks", self.check_tick()),
            }
            if self.done {
                break;
            }
        }
    }

    /// The final checks, the digest of the final state, the report.
    fn finish(mut self, wall_ms: u64) -> Report {
        timed!(self, "final checks", self.final_checks());
        // The final state joins the digest: heads of every document everywhere.
        for n in 0..self.nodes.len() {
            let mut h = blake3::Hasher::new();
            if let Some(r) = self.nodes[n].replica.as_ref() {
                for (d, e) in r.scan().filter_map(Result::ok) {
                    h.update(d.as_str().as_bytes());
                    h.update(&e.digest());
                }
            }
            let state = *h.finalize().as_bytes();
            self.note(b"final", &state);
        }
        self.into_report(wall_ms)
    }

    fn into_report(mut self, wall_ms: u64) -> Report {
        let writes: BTreeMap<String, u64> = self
            .oracle
            .writes_by_kind
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let total = writes.values().sum::<u64>().max(1) as f64;
        let cloud_docs = self
            .clouds
            .first()
            .and_then(|&c| self.nodes[c].replica.as_ref())
            .map_or(0, |r| r.scan().count() as u64);
        let s = &mut self.stats;
        let mut lag_ms: Vec<u64> = s.lag.iter().map(|l| l.lag_ms).collect();
        let lag_bin_ms = crate::report::lag_bin_ms(self.now);
        let heals = crate::report::heals(
            &self.windows,
            &self.restored,
            &s.lag,
            self.converged_at.is_some(),
        );
        Report {
            seed: self.seed,
            scenario: self.scenario.name.clone(),
            clouds: self.clouds.len(),
            edges: self.nodes.len() - self.clouds.len(),
            sites: self.site_edges.len(),
            duration_ms: self.scenario.duration.0,
            simulated_ms: self.now,
            wall_ms,
            peak_rss_kib: crate::report::peak_rss_kib(),
            events: s.events,
            messages_per_write: s.messages as f64 / total,
            bytes_per_write: s.bytes as f64 / total,
            writes,
            messages: s.messages,
            bytes: s.bytes,
            by_message: s.by_kind.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            messages_dropped: s.dropped,
            retransmitted: s.retransmitted,
            held_back: s.held_back,
            resets: s.lost_to_reset,
            connections_opened: s.conns_opened,
            connections_broken: s.conns_broken,
            dials_failed: s.dials_failed,
            duplicated_dials: s.duplicated_dials,
            faults: s.faults.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            crashes: s.crashes,
            restarts: s.restarts,
            conflicts_visible: s.conflicts,
            host_ms: s
                .host_ns
                .iter()
                .map(|(k, v)| (k.to_string(), v / 1_000_000))
                .collect(),
            lag_ms: Percentiles::of(&mut lag_ms),
            lag_after_heal_ms: Percentiles::of(&mut s.lag_after_heal_ms),
            converged_after_ms: self.converged_at.map(|t| t.saturating_sub(self.stop_at)),
            workload_stop_ms: self.stop_at,
            fault_windows: std::mem::take(&mut self.windows),
            heals,
            lag_bin_ms,
            lag_over_time: crate::report::lag_over_time(&s.lag, lag_bin_ms),
            max_doc_bytes: self
                .storage
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            cloud_docs,
            digest: self.digest.finalize().to_hex().to_string(),
            failures: self.failures.clone(),
            failure_counts: self
                .failure_counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }
}

/// The window of a timeline event applied at `now` (faults end by `heal_at`
/// at the latest, as [`World`] ends them), with a label for people.
pub(crate) fn window(event: &Timeline, now: u64, heal_at: u64) -> FaultWindow {
    let end = |length: &Dur| (now + length.0).min(heal_at);
    let (label, end_ms) = match event {
        Timeline::Partition { length, a, b, .. } => (format!("partition {a} | {b}"), end(length)),
        Timeline::OneWay {
            length, from, to, ..
        } => (format!("one-way {from} \u{2192} {to}"), end(length)),
        Timeline::Flap {
            length,
            a,
            b,
            down,
            up,
            ..
        } => (
            format!(
                "flap {a} | {b} ({} down, {} up)",
                human_ms(down.0),
                human_ms(up.0)
            ),
            end(length),
        ),
        Timeline::IsolateSite { length, site, .. } => (format!("isolate {site}"), end(length)),
        Timeline::Crash {
            node,
            restart_after,
            ..
        } => (
            format!("crash {node}"),
            // A restart due after the heal happens at the heal.
            restart_after.map_or(heal_at, |d| (now + d.0).min(heal_at)),
        ),
        Timeline::Skew { node, skew_ms, .. } => {
            let sign = if *skew_ms < 0 { "-" } else { "+" };
            (
                format!("skew {node} {sign}{}", human_ms(skew_ms.unsigned_abs())),
                now,
            )
        }
        Timeline::Network { length, change, .. } => {
            let mut what = Vec::new();
            if change.delay.is_some() {
                what.push("delay".to_string());
            }
            for (name, p) in [
                ("loss", change.loss),
                ("reset", change.reset),
                ("duplicate", change.duplicate),
                ("reorder", change.reorder),
            ] {
                if let Some(p) = p {
                    what.push(format!("{name} {}", human_prob(p)));
                }
            }
            (format!("network {}", what.join(", ")), end(length))
        }
        Timeline::Join { count, .. } => (format!("join {count}"), now),
        Timeline::Leave { node, .. } => (format!("leave {node}"), now),
    };
    FaultWindow {
        kind: event.kind().to_string(),
        label,
        start_ms: now,
        end_ms,
    }
}

/// The nodes a fault's selector names, given the candidate `edges` and
/// `all` nodes: `clouds`, `edges`, `all`, `random-edge` and `fraction:F`
/// (drawn from `rng`), `site:site-N`, or a node's name. Both modes' faults
/// pick their targets with it.
pub(crate) fn select_targets(
    sel: &str,
    rng: &mut fastrand::Rng,
    edges: Vec<usize>,
    all: Vec<usize>,
    clouds: &[usize],
    site_edges: &[Vec<usize>],
    by_name: &BTreeMap<String, usize>,
) -> Vec<usize> {
    match sel {
        "clouds" => clouds.to_vec(),
        "edges" => edges,
        "all" => all,
        "random-edge" => {
            if edges.is_empty() {
                vec![]
            } else {
                vec![edges[rng.usize(0..edges.len())]]
            }
        }
        _ => {
            if let Some(f) = sel.strip_prefix("fraction:") {
                let f: f64 = f.parse().unwrap_or(0.0);
                let mut pick = edges;
                rng.shuffle(&mut pick);
                pick.truncate((pick.len() as f64 * f).round() as usize);
                pick.sort_unstable();
                pick
            } else if let Some(s) = sel.strip_prefix("site:site-") {
                s.parse::<usize>()
                    .ok()
                    .and_then(|s| site_edges.get(s).cloned())
                    .unwrap_or_default()
            } else {
                by_name.get(sel).copied().into_iter().collect()
            }
        }
    }
}

pub(crate) fn resolve_slot(v: &Value, property: &str, writer: &str) -> Option<DesiredWrite> {
    writes(v)
        .remove(property)?
        .into_iter()
        .find(|w| w.writer == writer)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn short_heads(heads: &[[u8; 32]]) -> String {
    let h: Vec<String> = heads.iter().map(|h| hex(&h[..4])).collect();
    format!("[{}]", h.join(","))
}

pub(crate) fn short(v: &Option<Value>) -> String {
    let s = match v {
        Some(v) => v.to_string(),
        None => "nothing".into(),
    };
    if s.len() > 160 {
        format!("{}...", &s[..160])
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Fleet;
    use serde_json::json;

    fn small() -> Scenario {
        Scenario {
            duration: Dur(30_000),
            fleet: Fleet {
                edges: 4,
                sites: 1,
                ..Fleet::default()
            },
            ..Scenario::default()
        }
    }

    fn settled(seed: u64) -> World {
        let mut w = World::new(seed, small()).unwrap();
        w.drive();
        assert!(w.converged_at.is_some(), "{:?}", w.failures);
        w
    }

    #[test]
    fn a_change_no_session_hears_of_is_a_divergence() {
        let mut w = settled(3);
        let cloud = w.clouds[0];
        let d = pod_spec("edge-0", 0);
        let replica = w.nodes[cloud].replica.as_mut().unwrap();
        replica
            .write_json(&d, &json!({"sneaky": true}), EPOCH_MS)
            .unwrap();
        let why = w.heads_disagree().expect("the heads differ");
        assert!(why.contains("pod-spec/edge-0"), "{why}");
        w.final_checks();
        assert_eq!(
            w.failure_counts.get("convergence"),
            Some(&1),
            "{:?}",
            w.failures
        );
    }

    #[test]
    fn an_acknowledged_write_that_never_left_is_lost() {
        let mut w = settled(4);
        let edge = w.by_name["edge-1"];
        // Written and acknowledged at the edge, never synced.
        w.write_docs(
            edge,
            vec![(node_status("edge-1"), json!({"ready": false, "seq": 999}))],
        );
        w.nodes[edge].sessions.clear(); // as if the link died right then
        w.final_checks();
        let failures = format!("{:?}", w.failures);
        assert!(w.failure_counts.contains_key("lost-write"), "{failures}");
        assert!(failures.contains("node-status/edge-1"), "{failures}");
    }

    #[test]
    fn a_desired_slot_overwritten_by_another_writer_is_caught() {
        let mut w = settled(5);
        let (cloud, edge) = (w.clouds[0], w.by_name["edge-2"]);
        let d = device_desired("edge-2", 0);
        // The cloud writes the edge's slot: the edge's last write is gone.
        let edge_hex = w.nodes[edge].id.to_string();
        w.oracle.desired.insert(
            (d.clone(), "setpoint".into(), edge),
            DesiredWrite {
                writer: edge_hex.clone(),
                value: "mine".into(),
                at: outpost_sync::hlc::Hlc {
                    wall_ms: 1,
                    counter: 0,
                },
                seen: Default::default(),
            },
        );
        let _ = cloud;
        w.final_checks();
        let failures = format!("{:?}", w.failures);
        assert!(failures.contains("last desired write"), "{failures}");
    }

    #[test]
    fn selectors_pick_what_they_name() {
        let mut w = World::new(1, small()).unwrap();
        assert_eq!(w.select("clouds"), vec![0]);
        assert_eq!(w.select("edges").len(), 4);
        assert_eq!(w.select("site:site-0").len(), 4);
        assert_eq!(w.select("fraction:0.5").len(), 2);
        assert_eq!(w.select("edge-3"), vec![w.by_name["edge-3"]]);
        assert!(w.select("edge-99").is_empty());
    }
}
