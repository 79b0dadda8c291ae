//! The real stack in one process: real iroh endpoints (QUIC, TLS, the
//! engine's sessions) over a seeded, fault-injecting in-memory network.
//!
//! [`world`](crate::world) runs the sans-IO sessions in simulated time; this
//! mode runs what production runs: every node is an
//! [`Engine`] over a [`Replica`] on the shared in-memory RocksDB disk, bound
//! to an iroh [`Endpoint`] built like
//! [`outpost_sync::transport::iroh::bind`] (same ALPN, keep-alive and idle
//! timeout, no relay, no IP transports) whose only transport is a custom one
//! ([`SimTransport`], iroh's `unstable-custom-transports` feature). Nodes run
//! [`Engine::accept_loop`] and [`Engine::dial_loop`] unchanged. Time is real
//! (tokio) time: a scenario of 30 s takes 30 s plus the time to settle.
//!
//! # What the network models
//! Every QUIC datagram any endpoint sends goes through [`SimNetwork`], which
//! decides its fate with one [`fastrand::Rng`] seeded from the run's seed
//! (behind a mutex):
//! - **delay**: each datagram is delivered after a delay drawn from the
//!   scenario's delay distribution (a tokio timer per datagram); the jitter
//!   of the distribution reorders datagrams naturally;
//! - **loss**: each datagram is dropped with probability `network.loss`
//!   (per datagram here, where the deterministic mode loses whole messages);
//!   QUIC's own loss recovery retransmits;
//! - **reorder**: with probability `network.reorder` a datagram is held back
//!   an extra `network.reorder_delay`;
//! - **duplicate**: with probability `network.duplicate` a datagram is
//!   delivered twice (the deterministic mode duplicates dials instead);
//! - **partitions** (`partition`, `one-way`, `flap`, `isolate-site`): a
//!   datagram sent across a cut direction is dropped. QUIC notices a dead
//!   path only through its own timers: a cut shorter than the idle timeout
//!   (12 s) leaves connections open, and the stream resumes after the heal;
//! - **crashes** (`crash`): the node's datagrams are dropped from the
//!   moment it crashes, its engine, endpoint and tasks are dropped, and it
//!   restarts by reopening its replica from the same memory disk (a new
//!   incarnation) and binding a new endpoint with the same key;
//! - **network** windows change delay, loss, duplicate and reorder for a
//!   while.
//!
//! # What it does not model
//! Bandwidth and queueing (a datagram's delay does not depend on load), MTU
//! (every datagram fits), connection resets (`network.reset` and a
//! `network` event's `reset` are ignored, with a warning), and everything
//! the deterministic mode draws itself but the real stack owns: `rto`,
//! `idle_timeout`, `connect_timeout` and the redial back-off are QUIC's and
//! the engine's own. Clock skew (`skew`), membership changes (`join`,
//! `leave`) and the random nemesis are not supported: the engine stamps
//! changes with the host's clock, and the roster is fixed for the run; a
//! scenario that uses them is refused with [`QuicError::Unsupported`].
//!
//! # The checkers
//! After the faults heal the workload goes on for `checks.liveness_bound`;
//! then every link must be connected (liveness), the workload stops, and
//! within `checks.settle_timeout` every replica that may read a document
//! must hold the same heads (convergence), every change acknowledged to its
//! writer must be present everywhere it may be read, the last value of each
//! single-writer document must be what its readers hold, each writer's
//! desired-value slot must hold its last write, and the desired-value
//! conflict rule must pick the highest HLC with every concurrent loser
//! visible (no acknowledged write lost), as in the deterministic mode.
//!
//! # Sync lag
//! Each acknowledged write is watched until every reader has it: a poll
//! every [`LAG_POLL`] asks each reader's replica (by change hash for
//! documents that keep history, by sequence number for single-writer
//! documents that roll over). Lag is host milliseconds from the write's
//! return to the poll that saw it, so it is over-estimated by up to one poll
//! interval.
//!
//! # How deterministic it is
//! Not bit for bit. The workload (which document gets which value, in which
//! order: ticks keep their scheduled times even when the host runs late)
//! and the fault timeline are drawn from the seed in a fixed order, so
//! [`QuicReport::workload_digest`] is equal across runs of one seed. What
//! happens on the wire is not: tokio's scheduling, QUIC's timers (ACK
//! delays, probe timeouts, keep-alives), the engine's redial jitter
//! (`fastrand`'s global generator) and the real clock decide how many
//! datagrams are sent and in which order, so the network's seeded draws
//! fall on different datagrams. And every automerge change carries the
//! host's wall-clock time (and a desired-value write its hybrid logical
//! clock), so change hashes, and with them the final-state digest
//! ([`Report::digest`]: generation and heads of every document at every
//! node), differ on every run even though the fleet converges on the same
//! documents with the same workload values.
//!
//! Measured on `scenarios/quic-partition.toml`, seed 1, four runs on the
//! 2-core VM: workload digests equal; acknowledged writes per kind equal
//! (507), as were lag sample counts (488), and, in the two runs that
//! recorded them, documents at the cloud (39) and QUIC connections opened
//! (12); final-state digests all different; datagrams 1,500 to 2,652 and
//! protocol messages 722 to 796 (QUIC's
//! probes during the partition, acknowledgement timing, and which datagrams
//! the 1 % loss hits); sync lag p50 28 to 30 ms and p99 7.41 to 7.50 s; the
//! catch-up after the heal 243 to 593 ms. Every run passed every checker.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use automerge::ChangeHash;
use iroh::address_lookup::memory::MemoryLookup;
use iroh::endpoint::transports::{
    CustomEndpoint, CustomSender, CustomTransport, RecvInfo, Transmit,
};
use iroh::endpoint::{IdleTimeout, QuicTransportConfig, presets};
use iroh::{Endpoint, EndpointAddr, SecretKey, TransportAddr};
use iroh_base::CustomAddr;
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::desired::DesiredWrite;
use outpost_sync::document::{DocId, DocKind};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::store::{MemoryDisk, StoreOptions};
use outpost_sync::transport::iroh::{IDLE_TIMEOUT, KEEP_ALIVE, PeerAddr, SYNC_ALPN};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::checks;
use crate::report::{
    Failure, FaultWindow, LagSample, Link as LinkPair, Percentiles, Report, Restored,
};
use crate::scenario::{Delay, Dur, Event as Timeline, Network, NetworkChange, Scenario};
use crate::workload::{self, Writes};
use crate::world::{
    EPOCH_MS, Scheduled, hex, resolve_slot, select_targets, short, short_heads, window,
};

/// The custom transport id of the simulated network (iroh's registry keeps
/// small ids for known transports; this one is private to the harness).
pub const TRANSPORT_ID: u64 = 0x6f75_7470_7369_6d00;

/// How often the sync-lag watcher polls the readers of pending writes.
pub const LAG_POLL: Duration = Duration::from_millis(25);

/// How often convergence is checked once the workload stopped.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Failures recorded per checker in detail (the rest are counted).
const FAILURES_PER_CHECKER: usize = 5;

/// An IP address dial loops are given: the engine's dialler takes an
/// `<id>@<ip:port>` address, but these endpoints have no IP transport, so
/// it is never used; iroh finds the custom address through the address
/// lookup. (TEST-NET-1, reserved for documentation.)
const NO_IP: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
    9,
);

/// Why a run could not be carried out (as opposed to a checker failing).
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The scenario names a node or site the fleet does not have.
    #[error("scenario: {0}")]
    Scenario(String),
    /// The scenario uses something this mode cannot do.
    #[error(
        "the quic mode does not support {what}; use `outpost-sim run` (the deterministic mode) for it"
    )]
    Unsupported {
        /// What, and where in the scenario.
        what: String,
    },
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
    /// An iroh endpoint could not be bound.
    #[error("cannot bind the iroh endpoint of {node}: {reason}")]
    Bind {
        /// The node.
        node: String,
        /// What iroh said.
        reason: String,
    },
}

// ---- the network ------------------------------------------------------------

/// What the network did with the datagrams it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Datagrams sent by any endpoint.
    pub datagrams: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Datagrams scheduled for delivery (duplicates count twice).
    pub delivered: u64,
    /// Dropped at random (`loss`).
    pub lost: u64,
    /// Dropped because a partition cut their direction.
    pub cut: u64,
    /// Dropped because the sender or the receiver was down (crashed) or unknown.
    pub to_down: u64,
    /// Delivered twice.
    pub duplicated: u64,
    /// Held back by `reorder_delay`.
    pub held_back: u64,
}

/// The network's conditions: the scenario's, or a `network` event's.
#[derive(Debug, Clone)]
struct Conditions {
    delay: Delay,
    loss: f64,
    duplicate: f64,
    reorder: f64,
    reorder_delay: u64,
}

impl Conditions {
    fn of(net: &Network) -> Self {
        Self {
            delay: net.delay.clone(),
            loss: net.loss,
            duplicate: net.duplicate,
            reorder: net.reorder,
            reorder_delay: net.reorder_delay.0,
        }
    }
}

/// A datagram on its way.
#[derive(Debug)]
struct Datagram {
    from: CustomAddr,
    data: Vec<u8>,
}

#[derive(Debug)]
struct NetState {
    rng: fastrand::Rng,
    cond: Conditions,
    /// Directed cuts (from, to) by node index, counted (faults may overlap).
    cuts: BTreeMap<(usize, usize), u32>,
    /// Node index by endpoint key.
    index: HashMap<[u8; 32], usize>,
    /// The inbox of each node's current endpoint.
    inboxes: HashMap<usize, mpsc::UnboundedSender<Datagram>>,
    /// Crashed nodes: nothing leaves or reaches them.
    down: BTreeSet<usize>,
    stats: NetStats,
}

/// A seeded in-memory network for iroh endpoints: delay, loss, reordering,
/// duplication and partitions, applied to every datagram.
#[derive(Debug, Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<NetState>>,
}

fn custom_addr(key: &[u8; 32]) -> CustomAddr {
    CustomAddr::from_parts(TRANSPORT_ID, key)
}

fn parse_addr(addr: &CustomAddr) -> Option<[u8; 32]> {
    if addr.id() != TRANSPORT_ID {
        return None;
    }
    <[u8; 32]>::try_from(addr.data()).ok()
}

impl SimNetwork {
    /// A network with `network`'s conditions, its random draws seeded from `seed`.
    pub fn new(seed: u64, network: &Network) -> Self {
        Self {
            state: Arc::new(Mutex::new(NetState {
                // Its own stream, apart from the workload's draws.
                rng: fastrand::Rng::with_seed(seed ^ 0x6e65_7477_6f72_6b00),
                cond: Conditions::of(network),
                cuts: BTreeMap::new(),
                index: HashMap::new(),
                inboxes: HashMap::new(),
                down: BTreeSet::new(),
                stats: NetStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        // A panic while holding the lock already failed loudly; the state stays usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers node `node` with endpoint key `key` and returns its transport.
    pub fn transport(&self, node: usize, key: [u8; 32]) -> Arc<SimTransport> {
        self.lock().index.insert(key, node);
        Arc::new(SimTransport {
            node,
            key,
            net: self.clone(),
        })
    }

    /// Replaces the conditions (delay, loss, duplicate, reorder).
    pub fn set_conditions(&self, network: &Network) {
        self.lock().cond = Conditions::of(network);
    }

    /// Cuts each direction (from, to) of `pairs`.
    pub fn cut(&self, pairs: &[(usize, usize)]) {
        let mut s = self.lock();
        for &p in pairs {
            *s.cuts.entry(p).or_insert(0) += 1;
        }
    }

    /// Lifts one cut of each direction of `pairs`.
    pub fn uncut(&self, pairs: &[(usize, usize)]) {
        let mut s = self.lock();
        for p in pairs {
            if let Some(c) = s.cuts.get_mut(p) {
                *c -= 1;
                if *c == 0 {
                    s.cuts.remove(p);
                }
            }
        }
    }

    /// Lifts every cut.
    pub fn clear_cuts(&self) {
        self.lock().cuts.clear();
    }

    /// Whether `from` can reach `to` now.
    pub fn reachable(&self, from: usize, to: usize) -> bool {
        let s = self.lock();
        !s.cuts.contains_key(&(from, to)) && !s.down.contains(&from) && !s.down.contains(&to)
    }

    /// Marks a node down (its datagrams are dropped both ways) or up.
    pub fn set_down(&self, node: usize, down: bool) {
        let mut s = self.lock();
        if down {
            s.down.insert(node);
        } else {
            s.down.remove(&node);
        }
    }

    /// What the network did so far.
    pub fn stats(&self) -> NetStats {
        self.lock().stats.clone()
    }

    /// Routes one datagram from node `from` to the endpoint with key `to`.
    fn send(&self, from: usize, from_addr: &CustomAddr, to: &[u8; 32], data: &[u8]) {
        let mut guard = self.lock();
        let s = &mut *guard;
        s.stats.datagrams += 1;
        s.stats.bytes += data.len() as u64;
        let Some(&to) = s.index.get(to) else {
            s.stats.to_down += 1;
            return;
        };
        if s.down.contains(&from) || s.down.contains(&to) {
            s.stats.to_down += 1;
            return;
        }
        if s.cuts.contains_key(&(from, to)) {
            s.stats.cut += 1;
            return;
        }
        if s.cond.loss > 0.0 && s.rng.f64() < s.cond.loss {
            s.stats.lost += 1;
            return;
        }
        let Some(inbox) = s.inboxes.get(&to).cloned() else {
            s.stats.to_down += 1;
            return;
        };
        let copies = if s.cond.duplicate > 0.0 && s.rng.f64() < s.cond.duplicate {
            s.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = s.cond.delay.sample(&mut s.rng);
            if s.cond.reorder > 0.0 && s.rng.f64() < s.cond.reorder {
                delay += s.cond.reorder_delay;
                s.stats.held_back += 1;
            }
            s.stats.delivered += 1;
            let datagram = Datagram {
                from: from_addr.clone(),
                data: data.to_vec(),
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) if delay > 0 => {
                    let inbox = inbox.clone();
                    rt.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = inbox.send(datagram);
                    });
                }
                // No delay (or no runtime to time it): deliver now.
                _ => {
                    let _ = inbox.send(datagram);
                }
            }
        }
    }
}

/// One node's transport on a [`SimNetwork`]: a factory of endpoints, one
/// per iroh endpoint bound with it.
#[derive(Debug)]
pub struct SimTransport {
    node: usize,
    key: [u8; 32],
    net: SimNetwork,
}

impl CustomTransport for SimTransport {
    fn bind(&self) -> io::Result<Box<dyn CustomEndpoint>> {
        let (tx, rx) = mpsc::unbounded_channel();
        // A new endpoint of the node (a restart) takes over its inbox.
        self.net.lock().inboxes.insert(self.node, tx);
        let addr = custom_addr(&self.key);
        Ok(Box::new(SimEndpoint {
            node: self.node,
            addr: addr.clone(),
            addrs: n0_watcher::Watchable::new(vec![addr]),
            net: self.net.clone(),
            inbox: rx,
        }))
    }
}

/// The receiving end of a node's endpoint.
#[derive(Debug)]
struct SimEndpoint {
    node: usize,
    addr: CustomAddr,
    addrs: n0_watcher::Watchable<Vec<CustomAddr>>,
    net: SimNetwork,
    inbox: mpsc::UnboundedReceiver<Datagram>,
}

impl CustomEndpoint for SimEndpoint {
    fn watch_local_addrs(&self) -> n0_watcher::Direct<Vec<CustomAddr>> {
        self.addrs.watch()
    }

    fn create_sender(&self) -> Arc<dyn CustomSender> {
        Arc::new(SimSender {
            node: self.node,
            addr: self.addr.clone(),
            net: self.net.clone(),
        })
    }

    fn poll_recv(
        &mut self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        metas: &mut [noq_udp::RecvMeta],
        recv_infos: &mut [RecvInfo],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.len().min(metas.len()).min(recv_infos.len());
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut filled = 0;
        while filled < n {
            let datagram = match self.inbox.poll_recv(cx) {
                Poll::Ready(Some(d)) => d,
                Poll::Ready(None) if filled == 0 => {
                    return Poll::Ready(Err(io::Error::other("the simulated network is gone")));
                }
                Poll::Ready(None) | Poll::Pending => break,
            };
            let len = datagram.data.len();
            if bufs[filled].len() < len {
                // Larger than the receive buffer: dropped, as a NIC would.
                debug!(len, "datagram larger than the receive buffer dropped");
                continue;
            }
            bufs[filled][..len].copy_from_slice(&datagram.data);
            metas[filled].len = len;
            metas[filled].stride = len;
            recv_infos[filled] = RecvInfo::new(datagram.from, Some(self.addr.clone()));
            filled += 1;
        }
        if filled == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(filled))
        }
    }
}

/// The sending end of a node's endpoint.
#[derive(Debug)]
struct SimSender {
    node: usize,
    addr: CustomAddr,
    net: SimNetwork,
}

impl CustomSender for SimSender {
    fn is_valid_send_addr(&self, addr: &CustomAddr) -> bool {
        addr.id() == TRANSPORT_ID
    }

    fn poll_send(
        &self,
        _cx: &mut Context,
        dst: &CustomAddr,
        _src: Option<&CustomAddr>,
        transmit: &Transmit<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(to) = parse_addr(dst) else {
            return Poll::Ready(Err(io::Error::other(
                "not an address of the simulated network",
            )));
        };
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for segment in transmit.contents.chunks(size) {
            self.net.send(self.node, &self.addr, &to, segment);
        }
        Poll::Ready(Ok(()))
    }
}

// ---- the fleet --------------------------------------------------------------

/// A running node: its engine, its endpoint and their tasks.
struct Live {
    engine: Engine,
    endpoint: Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

struct Node {
    name: String,
    key: SecretKey,
    id: PeerId,
    cloud: bool,
    site: Option<usize>,
    dir: PathBuf,
    live: Option<Live>,
    /// Report ticks so far (edges), API changes so far (clouds).
    seq: u64,
    /// Messages and bytes sent, and QUIC connections opened, by earlier incarnations.
    sent_before: (u64, u64, u64),
}

/// What a write must look like at a reader to count as arrived.
#[derive(Debug, Clone)]
enum Arrival {
    /// Every one of these changes is present.
    Changes(Vec<ChangeHash>),
    /// The document's `seq` is at least this (single-writer documents that roll over).
    Seq(u64),
}

/// A write on its way to its readers.
struct Pending {
    doc: DocId,
    origin: usize,
    committed_ms: u64,
    arrival: Arrival,
    /// Readers that do not have it yet.
    left: Vec<usize>,
}

/// What the checkers know of the writes (as in the deterministic mode).
#[derive(Default)]
struct Oracle {
    kept: Vec<(DocId, usize, ChangeHash)>,
    rolling: BTreeMap<DocId, (usize, Value)>,
    desired: BTreeMap<(DocId, String, usize), DesiredWrite>,
    writes_by_kind: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone)]
enum Action {
    Report(usize),
    Api(usize),
    Timeline(usize),
    FaultEnd(usize),
    Flap(usize, bool),
    Restart(usize),
    Heal,
    Stop,
    Check,
    Poll,
}

/// A fault in force.
enum Active {
    Cuts(Vec<(usize, usize)>, bool),
    Network,
}

/// The report of a run of the quic mode: the report the deterministic mode
/// gives (its `digest` is the final state's: heads of every document at
/// every node), plus what the network did and the digest of the workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuicReport {
    /// The figures and verdict, in the deterministic mode's shape. Its
    /// `events` counts datagrams; `messages` and `bytes` are the engines'
    /// protocol messages sent (their metrics); `connections_opened` counts
    /// QUIC connections at both ends (iroh's metrics); `simulated_ms` is
    /// real time since the workload started. QUIC owns retransmission and
    /// connection loss here, so `retransmitted`, `resets`,
    /// `connections_broken`, `dials_failed` and `duplicated_dials` stay 0,
    /// and `by_message`, `host_ms` and `max_doc_bytes` are left empty.
    pub report: Report,
    /// What the network did.
    pub network: NetStats,
    /// Digest of the workload: every write's node, document and value (not
    /// its time), in order. Equal across runs of one seed.
    pub workload_digest: String,
    /// Scenario settings this mode ignored, said once each.
    pub warnings: Vec<String>,
}

impl QuicReport {
    /// Whether every checker passed.
    pub fn passed(&self) -> bool {
        self.report.passed()
    }

    /// The report as a table, for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = self.report.table();
        let n = &self.network;
        let _ = writeln!(
            s,
            "| {:<34} | {:<52} |",
            "datagrams (delivered/lost/cut/down)",
            format!(
                "{} ({} / {} / {} / {})",
                n.datagrams, n.delivered, n.lost, n.cut, n.to_down
            )
        );
        let _ = writeln!(
            s,
            "| {:<34} | {:<52} |",
            "workload digest",
            &self.workload_digest[..16.min(self.workload_digest.len())]
        );
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

/// A fleet of real engines on real iroh endpoints over a [`SimNetwork`],
/// with the scenario's workload, faults and checkers.
pub struct QuicWorld {
    seed: u64,
    scenario: Scenario,
    rng: fastrand::Rng,
    t0: Instant,
    /// The scheduled time of the action being handled, ms since `t0`
    /// (fault windows and heals are placed at it, not at the moment the
    /// host got round to it).
    at: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled<Action>>>,
    disk: MemoryDisk,
    net: SimNetwork,
    lookup: MemoryLookup,
    nodes: Vec<Node>,
    by_name: BTreeMap<String, usize>,
    by_id: HashMap<PeerId, usize>,
    clouds: Vec<usize>,
    site_edges: Vec<Vec<usize>>,
    roster: Roster,
    /// (dialler, acceptor).
    links: Vec<(usize, usize)>,
    timeline: Vec<Timeline>,
    active: BTreeMap<usize, Active>,
    overrides: BTreeMap<usize, NetworkChange>,
    windows: Vec<FaultWindow>,
    restored: BTreeMap<u64, Restored>,
    oracle: Oracle,
    pending: Vec<Pending>,
    lag: Vec<LagSample>,
    lag_after_heal: Vec<u64>,
    faults: BTreeMap<&'static str, u64>,
    crashes: u64,
    restarts: u64,
    conflicts: u64,
    failures: Vec<Failure>,
    failure_counts: BTreeMap<&'static str, u64>,
    warnings: Vec<String>,
    workload: blake3::Hasher,
    heal_at: u64,
    stop_at: u64,
    give_up_at: u64,
    healed: bool,
    stopped: bool,
    converged_at: Option<u64>,
    done: bool,
}

fn key_of(seed: u64, name: &str) -> SecretKey {
    SecretKey::from_bytes(
        blake3::hash(format!("outpost-sim quic {seed} {name}").as_bytes()).as_bytes(),
    )
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

/// Refuses what this mode cannot run; returns warnings for what it ignores.
fn check_supported(scenario: &Scenario) -> Result<Vec<String>, QuicError> {
    if scenario.nemesis.is_some() {
        return Err(QuicError::Unsupported {
            what: "the random nemesis (it draws skew and membership changes)".into(),
        });
    }
    let mut warnings = Vec::new();
    for (i, e) in scenario.events.iter().enumerate() {
        match e {
            Timeline::Skew { .. } | Timeline::Join { .. } | Timeline::Leave { .. } => {
                return Err(QuicError::Unsupported {
                    what: format!(
                        "{} events (event {} at {}): the engine stamps changes with the host's clock and the roster is fixed for the run",
                        e.kind(),
                        i + 1,
                        e.at()
                    ),
                });
            }
            Timeline::Network { change, .. } if change.reset.is_some() => warnings.push(format!(
                "event {} (network at {}): reset is not modelled (QUIC connections are not reset); ignored",
                i + 1,
                e.at()
            )),
            _ => {}
        }
    }
    if scenario.network.reset > 0.0 {
        warnings
            .push("network.reset is not modelled (QUIC connections are not reset); ignored".into());
    }
    Ok(warnings)
}

impl Writes for QuicWorld {
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

impl QuicWorld {
    /// Builds the fleet for `seed` and `scenario`: replicas, engines,
    /// endpoints, dial loops, and the cloud's provisioning writes. Must run
    /// inside a tokio runtime.
    pub async fn new(seed: u64, scenario: Scenario) -> Result<Self, QuicError> {
        let warnings = check_supported(&scenario)?;
        for w in &warnings {
            warn!("{w}");
        }
        let mut timeline = scenario.events.clone();
        timeline.sort_by_key(Timeline::at);
        let heal_at = scenario.duration.0;
        let stop_at = heal_at + scenario.checks.liveness_bound.0;
        let give_up_at = stop_at + scenario.checks.settle_timeout.0;
        let mut world = QuicWorld {
            seed,
            rng: fastrand::Rng::with_seed(seed),
            t0: Instant::now(),
            at: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            disk: MemoryDisk::new()?,
            net: SimNetwork::new(seed, &scenario.network),
            lookup: MemoryLookup::new(),
            nodes: Vec::new(),
            by_name: BTreeMap::new(),
            by_id: HashMap::new(),
            clouds: Vec::new(),
            site_edges: vec![Vec::new(); scenario.fleet.sites],
            roster: Roster::new(),
            links: Vec::new(),
            timeline,
            active: BTreeMap::new(),
            overrides: BTreeMap::new(),
            windows: Vec::new(),
            restored: BTreeMap::new(),
            oracle: Oracle::default(),
            pending: Vec::new(),
            lag: Vec::new(),
            lag_after_heal: Vec::new(),
            faults: BTreeMap::new(),
            crashes: 0,
            restarts: 0,
            conflicts: 0,
            failures: Vec::new(),
            failure_counts: BTreeMap::new(),
            warnings,
            workload: blake3::Hasher::new(),
            heal_at,
            stop_at,
            give_up_at,
            healed: false,
            stopped: false,
            converged_at: None,
            done: false,
            scenario,
        };
        world.workload.update(&seed.to_le_bytes());
        // The fleet and its links, as the deterministic world lays them out.
        for c in 0..world.scenario.fleet.clouds {
            world.add_node(format!("cloud-{c}"), true, None);
        }
        for i in 0..world.scenario.fleet.edges {
            let sites = world.site_edges.len();
            let site = (sites > 0).then(|| i % sites);
            let n = world.add_node(format!("edge-{i}"), false, site);
            for c in world.clouds.clone() {
                world.links.push((n, c));
            }
            if let Some(s) = site {
                let k = world.scenario.fleet.site_peers;
                let earlier: Vec<usize> =
                    world.site_edges[s].iter().rev().take(k).copied().collect();
                for m in earlier {
                    world.links.push((n, m));
                }
                world.site_edges[s].push(n);
            }
        }
        let clouds = world.clouds.clone();
        for (i, &a) in clouds.iter().enumerate() {
            for &b in &clouds[i + 1..] {
                world.links.push((a, b));
            }
        }
        world.check_names()?;
        for n in 0..world.nodes.len() {
            world.start(n).await?;
        }
        world.provision();
        // The clock of the run starts now that every node is up.
        world.t0 = Instant::now();
        for n in 0..world.nodes.len() {
            if world.nodes[n].cloud {
                let at = world.rng.u64(0..world.scenario.workload.api_interval.0);
                world.schedule(at, Action::Api(n));
            } else {
                let at = world.rng.u64(0..world.scenario.workload.report_interval.0);
                world.schedule(at, Action::Report(n));
            }
        }
        for i in 0..world.timeline.len() {
            let at = world.timeline[i].at().0;
            world.schedule(at, Action::Timeline(i));
        }
        world.schedule(heal_at, Action::Heal);
        world.schedule(stop_at, Action::Stop);
        world.schedule(0, Action::Poll);
        Ok(world)
    }

    fn add_node(&mut self, name: String, cloud: bool, site: Option<usize>) -> usize {
        let key = key_of(self.seed, &name);
        let id = PeerId::from(key.public());
        let n = self.nodes.len();
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
        self.lookup.add_endpoint_info(EndpointAddr::from_parts(
            key.public(),
            [TransportAddr::Custom(custom_addr(key.public().as_bytes()))],
        ));
        self.nodes.push(Node {
            dir: PathBuf::from(format!("/sim-quic/{name}")),
            name: name.clone(),
            key,
            id,
            cloud,
            site,
            live: None,
            seq: 0,
            sent_before: (0, 0, 0),
        });
        self.by_name.insert(name, n);
        self.by_id.insert(id, n);
        if cloud {
            self.clouds.push(n);
        }
        n
    }

    fn check_names(&self) -> Result<(), QuicError> {
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
                        return Err(QuicError::Scenario(format!(
                            "isolate-site: no site {site:?} (the fleet has {} sites)",
                            self.site_edges.len()
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
                    });
                if !known {
                    return Err(QuicError::Scenario(format!(
                        "{} at {}: no node or group {sel:?}",
                        e.kind(),
                        e.at()
                    )));
                }
            }
        }
        Ok(())
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
                ..StoreOptions::default()
            },
            cache_docs: NonZeroUsize::new(cache).unwrap_or(NonZeroUsize::MIN),
            ..ReplicaOptions::default()
        }
    }

    /// Opens node `n`'s replica, binds its endpoint, and starts its accept
    /// loop and the dial loops of the links it dials.
    async fn start(&mut self, n: usize) -> Result<(), QuicError> {
        let options = self.options(n);
        let node = &self.nodes[n];
        // A crashed incarnation's store closes once its last task let go of
        // the engine; until then RocksDB may refuse a second opening.
        let mut tries = 0;
        let replica = loop {
            match Replica::open(&node.dir, node.id, options.clone()) {
                Ok(r) => break r,
                Err(e) if tries < 50 => {
                    debug!(node = %node.name, error = %e, "replica not reopened yet");
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    return Err(QuicError::Open {
                        node: node.name.clone(),
                        source,
                    });
                }
            }
        };
        let engine = Engine::new(replica, self.roster.clone(), SyncMetrics::default());
        let transport = self.net.transport(n, *node.key.public().as_bytes());
        let quic = QuicTransportConfig::builder()
            .keep_alive_interval(KEEP_ALIVE)
            .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
            .build();
        let endpoint = Endpoint::builder(presets::Minimal)
            .clear_ip_transports()
            .add_custom_transport(transport)
            .address_lookup(self.lookup.clone())
            .transport_config(quic)
            .secret_key(node.key.clone())
            .alpns(vec![SYNC_ALPN.to_vec()])
            .bind()
            .await
            .map_err(|e| QuicError::Bind {
                node: node.name.clone(),
                reason: e.to_string(),
            })?;
        let mut tasks = vec![tokio::spawn({
            let engine = engine.clone();
            let endpoint = endpoint.clone();
            async move { engine.accept_loop(endpoint).await }
        })];
        for &(d, a) in &self.links {
            if d != n {
                continue;
            }
            let peer = PeerAddr {
                id: self.nodes[a].key.public(),
                addr: NO_IP,
            };
            let engine = engine.clone();
            let endpoint = endpoint.clone();
            tasks.push(tokio::spawn(async move {
                engine.dial_loop(endpoint, peer).await
            }));
        }
        self.net.set_down(n, false);
        self.nodes[n].live = Some(Live {
            engine,
            endpoint,
            tasks,
        });
        Ok(())
    }

    /// The engine of the node named `name`, when it is up.
    pub fn engine(&self, name: &str) -> Option<Engine> {
        let n = *self.by_name.get(name)?;
        self.nodes[n].live.as_ref().map(|l| l.engine.clone())
    }

    /// The index of the node named `name` (as [`SimNetwork`] knows it).
    pub fn node(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The network.
    pub fn network(&self) -> &SimNetwork {
        &self.net
    }

    fn engine_of(&self, n: usize) -> Option<&Engine> {
        self.nodes[n].live.as_ref().map(|l| &l.engine)
    }

    fn now(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn schedule(&mut self, at: u64, action: Action) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev: action,
        }));
    }

    fn fail(&mut self, checker: &'static str, explanation: String) {
        let count = self.failure_counts.entry(checker).or_insert(0);
        *count += 1;
        if *count as usize <= FAILURES_PER_CHECKER {
            info!(checker, %explanation, "check failed");
            let at_ms = self.now();
            self.failures.push(Failure {
                checker: checker.to_owned(),
                at_ms,
                explanation,
            });
        }
    }

    fn note_workload(&mut self, n: usize, d: &DocId, what: &str) {
        self.workload.update(self.nodes[n].name.as_bytes());
        self.workload.update(b"\0");
        self.workload.update(d.as_str().as_bytes());
        self.workload.update(b"\0");
        self.workload.update(what.as_bytes());
        self.workload.update(b"\n");
    }

    /// Readers of `d` other than `except`, by node index.
    fn readers(&self, d: &DocId, except: usize) -> Vec<usize> {
        self.roster
            .readers(d)
            .iter()
            .filter_map(|p| self.by_id.get(p).copied())
            .filter(|&r| r != except)
            .collect()
    }

    fn heads(&self, n: usize, d: &DocId) -> Vec<[u8; 32]> {
        self.engine_of(n)
            .and_then(|e| e.with_replica(|r| r.entry(d).ok().flatten()))
            .map(|e| e.heads)
            .unwrap_or_default()
    }

    fn watch(&mut self, n: usize, d: &DocId, arrival: Arrival) {
        let left = self.readers(d, n);
        if left.is_empty() {
            return;
        }
        let committed_ms = self.now();
        self.pending.push(Pending {
            doc: d.clone(),
            origin: n,
            committed_ms,
            arrival,
            left,
        });
    }

    // ---- workload -------------------------------------------------------

    /// Writes whole documents at node `n` through its engine.
    fn write_docs(&mut self, n: usize, docs: Vec<(DocId, Value)>) {
        for (d, v) in docs {
            let Some(engine) = self.engine_of(n).cloned() else {
                return;
            };
            let what = if d.kind() == DocKind::NodeStatus {
                // The heartbeat is the host's time: only its sequence is the workload's.
                v.get("seq").map(Value::to_string).unwrap_or_default()
            } else {
                v.to_string()
            };
            self.note_workload(n, &d, &what);
            let before = self.heads(n, &d);
            match engine.write_json(&d, &v) {
                Ok(changed) => {
                    *self
                        .oracle
                        .writes_by_kind
                        .entry(d.kind().as_str())
                        .or_insert(0) += 1;
                    if d.kind().rolls_over() {
                        self.oracle.rolling.insert(d.clone(), (n, v.clone()));
                        if changed && let Some(seq) = v.get("seq").and_then(Value::as_u64) {
                            self.watch(n, &d, Arrival::Seq(seq));
                        }
                    } else if changed {
                        let new: Vec<ChangeHash> = self
                            .heads(n, &d)
                            .into_iter()
                            .filter(|h| !before.contains(h))
                            .map(ChangeHash)
                            .collect();
                        for h in &new {
                            self.oracle.kept.push((d.clone(), n, *h));
                        }
                        if !new.is_empty() {
                            self.watch(n, &d, Arrival::Changes(new));
                        }
                    }
                }
                Err(e) => {
                    let name = self.nodes[n].name.clone();
                    self.fail("write", format!("{name}: writing {d} failed: {e}"));
                }
            }
        }
    }

    fn delete_doc(&mut self, n: usize, d: &DocId) {
        let Some(engine) = self.engine_of(n).cloned() else {
            return;
        };
        self.note_workload(n, d, "delete");
        match engine.delete(d) {
            Ok(true) => {
                // Superseded: what must hold now is that every reader has
                // the tombstone (or a later write), which convergence checks.
                self.oracle.kept.retain(|(doc, _, _)| doc != d);
                self.pending.retain(|p| p.doc != *d);
                *self.oracle.writes_by_kind.entry("delete").or_insert(0) += 1;
            }
            Ok(false) => {}
            Err(e) => {
                let name = self.nodes[n].name.clone();
                self.fail("write", format!("{name}: deleting {d} failed: {e}"));
            }
        }
    }

    fn write_desired(&mut self, n: usize, d: &DocId, property: &str, value: String) {
        let Some(engine) = self.engine_of(n).cloned() else {
            return;
        };
        self.note_workload(n, d, &format!("{property}={value}"));
        let me = engine.me().to_string();
        let before = self.heads(n, d);
        let result = engine.set_desired(d, property, &value);
        let after = self.heads(n, d);
        let slot = engine
            .read_json(d)
            .ok()
            .flatten()
            .and_then(|v| resolve_slot(&v, property, &me));
        let name = self.nodes[n].name.clone();
        match result {
            Ok(at) => {
                let Some(slot) = slot else {
                    self.fail(
                        "write",
                        format!("{name}: set_desired({d}, {property}) returned Ok but the slot is not readable"),
                    );
                    return;
                };
                if slot.at != at || slot.value != value {
                    self.fail(
                        "write",
                        format!("{name}: set_desired({d}, {property}) returned {at:?} but reads back {slot:?}"),
                    );
                }
                let key = (d.clone(), property.to_owned(), n);
                if let Some(prev) = self.oracle.desired.get(&key)
                    && at <= prev.at
                {
                    self.fail(
                        "conflict",
                        format!("{name}: desired write to {d}/{property} stamped {at:?}, not after its own previous {:?}", prev.at),
                    );
                }
                self.oracle.desired.insert(key, slot);
                *self
                    .oracle
                    .writes_by_kind
                    .entry("desired-value")
                    .or_insert(0) += 1;
                let new: Vec<ChangeHash> = after
                    .into_iter()
                    .filter(|h| !before.contains(h))
                    .map(ChangeHash)
                    .collect();
                for h in &new {
                    self.oracle.kept.push((d.clone(), n, *h));
                }
                if !new.is_empty() {
                    self.watch(n, d, Arrival::Changes(new));
                }
            }
            Err(e) => self.fail("write", format!("{name}: set_desired failed: {e}")),
        }
    }

    fn provision(&mut self) {
        let Some(&cloud) = self.clouds.first() else {
            return;
        };
        for s in 0..self.site_edges.len() {
            workload::provision_site(self, cloud, s);
        }
        let f = self.scenario.fleet.clone();
        for n in 0..self.nodes.len() {
            if self.nodes[n].cloud {
                continue;
            }
            let edge = self.nodes[n].name.clone();
            workload::provision_edge(self, cloud, &edge, &f);
        }
        // Provisioning happens before the clock starts: not a lag sample.
        self.pending.clear();
    }

    fn report_tick(&mut self, n: usize) {
        if self.stopped || self.at >= self.stop_at {
            return;
        }
        // Ticks keep their scheduled times (not the host's lateness), so that
        // the workload's draws come in the same order on every run of a seed.
        let next = self.at + self.scenario.workload.report_interval.0;
        self.schedule(next, Action::Report(n));
        if self.nodes[n].live.is_none() {
            return;
        }
        self.nodes[n].seq += 1;
        let seq = self.nodes[n].seq;
        let edge = self.nodes[n].name.clone();
        let wall = EPOCH_MS + self.now();
        let w = self.scenario.workload.clone();
        let f = self.scenario.fleet.clone();
        let site = self.nodes[n].site;
        workload::report_tick(self, n, &edge, seq, wall, site, &f, &w);
    }

    fn api(&mut self, c: usize) {
        if self.stopped || self.at >= self.stop_at {
            return;
        }
        let next = self.at + self.scenario.workload.api_interval.0;
        self.schedule(next, Action::Api(c));
        if self.nodes[c].live.is_none() {
            return;
        }
        let edges: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].cloud)
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
        // Deletes only with one cloud, as in the deterministic world.
        let one_cloud = self.clouds.len() == 1;
        workload::api_write(self, c, &cloud, seq, &edge, site, &f, &w, one_cloud);
    }

    // ---- sync lag ---------------------------------------------------------

    fn arrived(&self, r: usize, d: &DocId, arrival: &Arrival) -> bool {
        let Some(engine) = self.engine_of(r) else {
            return false;
        };
        engine.with_replica(|rep| match arrival {
            Arrival::Changes(hashes) => {
                hashes.iter().all(|h| rep.has_change(d, h).unwrap_or(false))
            }
            Arrival::Seq(seq) => rep
                .read_json(d)
                .ok()
                .flatten()
                .and_then(|v| v.get("seq").and_then(Value::as_u64))
                .is_some_and(|got| got >= *seq),
        })
    }

    fn poll_lag(&mut self) {
        let now = self.now();
        let mut pending = std::mem::take(&mut self.pending);
        for p in &mut pending {
            let mut left = Vec::new();
            for &r in &p.left {
                if self.arrived(r, &p.doc, &p.arrival) {
                    let lag = now.saturating_sub(p.committed_ms);
                    if self.healed {
                        self.lag_after_heal.push(lag);
                    }
                    self.lag.push(LagSample {
                        applied_ms: now,
                        lag_ms: lag,
                        link: (p.origin.min(r), p.origin.max(r)),
                    });
                } else {
                    left.push(r);
                }
            }
            p.left = left;
        }
        pending.retain(|p| !p.left.is_empty());
        // Writes made while polling (none: polling does not write) keep their place.
        pending.append(&mut self.pending);
        self.pending = pending;
    }

    // ---- faults -------------------------------------------------------------

    fn select(&mut self, sel: &str) -> Vec<usize> {
        let edges: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| !self.nodes[n].cloud)
            .collect();
        let all: Vec<usize> = (0..self.nodes.len()).collect();
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

    fn recompute_network(&mut self) {
        let mut net = self.scenario.network.clone();
        for change in self.overrides.values() {
            if let Some(d) = &change.delay {
                net.delay = d.clone();
            }
            if let Some(p) = change.loss {
                net.loss = p;
            }
            if let Some(p) = change.duplicate {
                net.duplicate = p;
            }
            if let Some(p) = change.reorder {
                net.reorder = p;
            }
        }
        self.net.set_conditions(&net);
    }

    fn links_back(&self, pairs: impl Iterator<Item = (usize, usize)>) -> BTreeSet<LinkPair> {
        pairs
            .map(|(a, b)| (a.min(b), a.max(b)))
            .filter(|&(a, b)| {
                self.links.iter().any(|&l| l == (a, b) || l == (b, a))
                    && self.net.reachable(a, b)
                    && self.net.reachable(b, a)
            })
            .collect()
    }

    fn link_count(&self) -> u64 {
        let pairs: BTreeSet<LinkPair> = self
            .links
            .iter()
            .map(|&(a, b)| (a.min(b), a.max(b)))
            .collect();
        pairs.len() as u64
    }

    fn restored_now(&mut self, links: Restored) {
        let now = self.at;
        let merged = match self.restored.remove(&now) {
            Some(before) => before.merge(links),
            None => links,
        };
        self.restored.insert(now, merged);
    }

    async fn timeline_event(&mut self, i: usize) {
        if self.healed {
            return;
        }
        let event = self.timeline[i].clone();
        *self.faults.entry(event.kind()).or_insert(0) += 1;
        info!(at_ms = self.now(), kind = event.kind(), "fault");
        let now = self.at;
        let heal_at = self.heal_at;
        let end = move |length: Dur| (now + length.0).min(heal_at);
        self.windows.push(window(&event, now, heal_at));
        match &event {
            Timeline::Partition { length, a, b, .. } => {
                let (a, b) = (self.select(a), self.select(b));
                self.cut_for(i, pairs(&a, &b, true), end(*length));
            }
            Timeline::OneWay {
                length, from, to, ..
            } => {
                let (a, b) = (self.select(from), self.select(to));
                self.cut_for(i, pairs(&a, &b, false), end(*length));
            }
            Timeline::Flap {
                length, a, b, down, ..
            } => {
                let (a, b) = (self.select(a), self.select(b));
                let until = end(*length);
                self.cut_for(i, pairs(&a, &b, true), until);
                self.schedule((now + down.0).min(until), Action::Flap(i, false));
            }
            Timeline::IsolateSite { length, site, .. } => {
                let edges = self.select(&format!("site:{site}"));
                let clouds = self.clouds.clone();
                self.cut_for(i, pairs(&edges, &clouds, true), end(*length));
            }
            Timeline::Crash {
                node,
                restart_after,
                ..
            } => {
                for n in self.select(node) {
                    self.crash(n);
                    if let Some(d) = restart_after {
                        let at = now + d.0;
                        if at < self.heal_at {
                            self.schedule(at, Action::Restart(n));
                        }
                    }
                }
            }
            Timeline::Network { length, change, .. } => {
                self.overrides.insert(i, change.clone());
                self.active.insert(i, Active::Network);
                self.recompute_network();
                self.schedule(end(*length), Action::FaultEnd(i));
            }
            // Refused before the run starts.
            Timeline::Skew { .. } | Timeline::Join { .. } | Timeline::Leave { .. } => {}
        }
    }

    fn cut_for(&mut self, i: usize, cut: Vec<(usize, usize)>, until: u64) {
        self.net.cut(&cut);
        self.active.insert(i, Active::Cuts(cut, true));
        self.schedule(until, Action::FaultEnd(i));
    }

    fn fault_end(&mut self, i: usize) {
        match self.active.remove(&i) {
            Some(Active::Cuts(cut, applied)) => {
                if applied {
                    self.net.uncut(&cut);
                }
                let links = self.links_back(cut.iter().copied());
                self.restored_now(Restored::Links(links));
            }
            Some(Active::Network) => {
                self.overrides.remove(&i);
                self.recompute_network();
                let count = self.link_count();
                self.restored_now(Restored::All { count });
            }
            None => {}
        }
    }

    fn flap(&mut self, i: usize, on: bool) {
        let Some(Active::Cuts(cut, applied)) = self.active.get_mut(&i) else {
            return;
        };
        if *applied == on {
            return;
        }
        *applied = on;
        let cut = cut.clone();
        let Timeline::Flap { down, up, .. } = self.timeline[i].clone() else {
            return;
        };
        let now = self.at;
        if on {
            self.net.cut(&cut);
            self.schedule(now + down.0, Action::Flap(i, false));
        } else {
            self.net.uncut(&cut);
            self.schedule(now + up.0, Action::Flap(i, true));
        }
    }

    /// Node `n`'s process dies: nothing more leaves or reaches it, its tasks
    /// stop, its engine and endpoint go. Its store stays on the memory disk.
    fn crash(&mut self, n: usize) {
        let Some(live) = self.nodes[n].live.take() else {
            return;
        };
        self.crashes += 1;
        self.net.set_down(n, true);
        let m = live.engine.metrics();
        let node = &mut self.nodes[n];
        node.sent_before.0 += m.sent_messages.get();
        node.sent_before.1 += m.sent_bytes.get();
        node.sent_before.2 += live.endpoint.metrics().socket.num_conns_opened.get();
        for t in &live.tasks {
            t.abort();
        }
        // Closing drops the endpoint's connections at once (no datagram
        // leaves a down node, so peers notice only by their idle timeout).
        let endpoint = live.endpoint;
        tokio::spawn(async move { endpoint.close().await });
        drop(live.engine);
        info!(node = %node.name, "crashed");
    }

    async fn restart(&mut self, n: usize) {
        if self.nodes[n].live.is_some() {
            return;
        }
        match self.start(n).await {
            Ok(()) => {
                self.restarts += 1;
                info!(node = %self.nodes[n].name, "restarted");
            }
            Err(e) => {
                let name = self.nodes[n].name.clone();
                self.fail("crash", format!("{name} does not restart: {e}"));
            }
        }
    }

    async fn heal(&mut self) {
        self.healed = true;
        info!(at_ms = self.now(), "faults heal");
        let count = self.link_count();
        self.restored_now(Restored::All { count });
        self.net.clear_cuts();
        self.active.clear();
        self.overrides.clear();
        self.recompute_network();
        for n in 0..self.nodes.len() {
            if self.nodes[n].live.is_none() {
                self.restart(n).await;
            }
        }
    }

    /// The workload stops; every link must be connected by now.
    fn stop(&mut self) {
        self.stopped = true;
        let mut missing = Vec::new();
        for &(d, a) in &self.links {
            let up = self
                .engine_of(d)
                .is_some_and(|e| e.connected().contains(&self.nodes[a].id));
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
        let now = self.now();
        self.schedule(now, Action::Check);
    }

    // ---- checkers -----------------------------------------------------------

    fn heads_disagree(&self) -> Option<String> {
        /// A document's state where first seen, and how many nodes agree with it.
        struct Seen {
            digest: [u8; 32],
            count: usize,
            first: usize,
            generation: u64,
            heads: Vec<[u8; 32]>,
        }
        let mut reference: BTreeMap<DocId, Seen> = BTreeMap::new();
        for n in 0..self.nodes.len() {
            let Some(engine) = self.engine_of(n) else {
                return Some(format!("{} is down", self.nodes[n].name));
            };
            let entries: Vec<_> = engine.with_replica(|r| r.scan().collect());
            for item in entries {
                let (d, entry) = match item {
                    Ok(x) => x,
                    Err(e) => return Some(format!("{}: scan failed: {e}", self.nodes[n].name)),
                };
                let digest = entry.digest();
                match reference.get_mut(&d) {
                    None => {
                        reference.insert(
                            d,
                            Seen {
                                digest,
                                count: 1,
                                first: n,
                                generation: entry.generation,
                                heads: entry.heads,
                            },
                        );
                    }
                    Some(r) if r.digest == digest => r.count += 1,
                    Some(r) => {
                        return Some(format!(
                            "{d}: {} has generation {} heads {} but {} has generation {} heads {}",
                            self.nodes[n].name,
                            entry.generation,
                            short_heads(&entry.heads),
                            self.nodes[r.first].name,
                            r.generation,
                            short_heads(&r.heads)
                        ));
                    }
                }
            }
        }
        for (d, seen) in &reference {
            let (count, first) = (seen.count, seen.first);
            let readers = self.readers(d, usize::MAX);
            if count != readers.len() {
                let lacking: Vec<String> = readers
                    .iter()
                    .filter(|&&r| {
                        !self.engine_of(r).is_some_and(|e| {
                            e.with_replica(|rep| rep.entry(d).ok().flatten().is_some())
                        })
                    })
                    .map(|&r| self.nodes[r].name.clone())
                    .collect();
                return Some(format!(
                    "{d}: held by {count} of its {} readers (first by {}); missing at {}",
                    readers.len(),
                    self.nodes[first].name,
                    lacking.join(", ")
                ));
            }
        }
        None
    }

    fn check_tick(&mut self) {
        let now = self.now();
        let why = if self.pending.is_empty() {
            self.heads_disagree()
        } else {
            Some(format!(
                "{} writes not yet at all their readers",
                self.pending.len()
            ))
        };
        match why {
            None => {
                self.converged_at = Some(now);
                self.done = true;
            }
            Some(why) if now >= self.give_up_at => {
                self.fail(
                    "convergence",
                    format!(
                        "replicas did not converge within {} after the workload stopped: {why}",
                        self.scenario.checks.settle_timeout
                    ),
                );
                self.done = true;
            }
            Some(why) => {
                debug!(at = now, %why, "not converged yet");
                self.schedule(now + CHECK_EVERY.as_millis() as u64, Action::Check);
            }
        }
    }

    fn final_checks(&mut self) {
        // Writes made after the heal must have reached every reader (liveness).
        let heal_at = self.heal_at;
        let late: Vec<String> = self
            .pending
            .iter()
            .filter(|p| p.committed_ms >= heal_at)
            .take(5)
            .map(|p| {
                let at: Vec<&str> = p
                    .left
                    .iter()
                    .map(|&r| self.nodes[r].name.as_str())
                    .collect();
                format!(
                    "{} by {} (not at {})",
                    p.doc,
                    self.nodes[p.origin].name,
                    at.join(", ")
                )
            })
            .collect();
        if !late.is_empty() {
            self.fail(
                "liveness",
                format!(
                    "writes made after the heal did not propagate: {}",
                    late.join("; ")
                ),
            );
        }
        let mut docs: BTreeSet<DocId> = BTreeSet::new();
        for n in 0..self.nodes.len() {
            if let Some(e) = self.engine_of(n) {
                docs.extend(e.with_replica(|r| {
                    r.scan()
                        .filter_map(Result::ok)
                        .map(|(d, _)| d)
                        .collect::<Vec<_>>()
                }));
            }
        }
        let mut values: BTreeMap<DocId, Value> = BTreeMap::new();
        for d in &docs {
            let mut first: Option<(usize, Option<Value>)> = None;
            for r in self.readers(d, usize::MAX) {
                let v = self
                    .engine_of(r)
                    .and_then(|e| e.read_json(d).ok().flatten());
                match &first {
                    None => first = Some((r, v)),
                    Some((f, fv)) if *fv != v => {
                        let (a, b) = (self.nodes[*f].name.clone(), self.nodes[r].name.clone());
                        let msg =
                            format!("{d}: {a} reads {} but {b} reads {}", short(fv), short(&v));
                        self.fail("convergence", msg);
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
    }

    fn check_lost_writes(&mut self, values: &BTreeMap<DocId, Value>) {
        let kept = std::mem::take(&mut self.oracle.kept);
        for (d, writer, hash) in &kept {
            for r in self.readers(d, usize::MAX) {
                let has = self.engine_of(r).is_some_and(|e| {
                    e.with_replica(|rep| rep.has_change(d, hash).unwrap_or(false))
                });
                if !has {
                    let (w, rn) = (self.nodes[*writer].name.clone(), self.nodes[r].name.clone());
                    self.fail(
                        "lost-write",
                        format!(
                            "{d}: change {} written by {w} and acknowledged to it is missing at {rn}",
                            &hex(&hash.0)[..12]
                        ),
                    );
                }
            }
        }
        self.oracle.kept = kept;
        let rolling = std::mem::take(&mut self.oracle.rolling);
        for (d, (writer, last)) in &rolling {
            if let Some(f) = checks::rolling_lost(d, &self.nodes[*writer].name, last, values) {
                self.fail("lost-write", f);
            }
        }
        self.oracle.rolling = rolling;
    }

    fn check_conflicts(&mut self, values: &BTreeMap<DocId, Value>) {
        let desired = std::mem::take(&mut self.oracle.desired);
        for ((d, prop, writer), last) in &desired {
            let me = self.nodes[*writer].id.to_string();
            let w = &self.nodes[*writer].name;
            if let Some(f) = checks::desired_lost(d, prop, w, &me, last, values) {
                self.fail("lost-write", f);
            }
        }
        self.oracle.desired = desired;
        let (failures, conflicts) = checks::conflict_rule(values);
        self.conflicts += conflicts;
        for f in failures {
            self.fail("conflict", f);
        }
    }

    // ---- the run --------------------------------------------------------------

    /// Runs the scenario to the end in real time and reports.
    pub async fn run(mut self) -> QuicReport {
        let started = Instant::now();
        while let Some(Reverse(next)) = self.queue.pop() {
            tokio::time::sleep_until(self.t0 + Duration::from_millis(next.at)).await;
            self.at = next.at;
            match next.ev {
                Action::Report(n) => self.report_tick(n),
                Action::Api(c) => self.api(c),
                Action::Timeline(i) => self.timeline_event(i).await,
                Action::FaultEnd(i) => self.fault_end(i),
                Action::Flap(i, on) => self.flap(i, on),
                Action::Restart(n) => self.restart(n).await,
                Action::Heal => self.heal().await,
                Action::Stop => self.stop(),
                Action::Check => self.check_tick(),
                Action::Poll => {
                    self.poll_lag();
                    let at = self.now() + LAG_POLL.as_millis() as u64;
                    self.schedule(at, Action::Poll);
                }
            }
            if self.done {
                break;
            }
        }
        self.poll_lag();
        self.final_checks();
        let wall_ms = started.elapsed().as_millis() as u64;
        self.finish(wall_ms).await
    }

    async fn finish(mut self, wall_ms: u64) -> QuicReport {
        let now = self.now();
        // The final state: heads of every document at every node.
        let mut digest = blake3::Hasher::new();
        let (mut messages, mut bytes, mut conns) = (0, 0, 0);
        for node in &self.nodes {
            digest.update(node.name.as_bytes());
            messages += node.sent_before.0;
            bytes += node.sent_before.1;
            conns += node.sent_before.2;
            if let Some(live) = &node.live {
                live.engine.with_replica(|r| {
                    for (d, e) in r.scan().filter_map(Result::ok) {
                        digest.update(d.as_str().as_bytes());
                        digest.update(&e.digest());
                    }
                });
                messages += live.engine.metrics().sent_messages.get();
                bytes += live.engine.metrics().sent_bytes.get();
                conns += live.endpoint.metrics().socket.num_conns_opened.get();
            }
        }
        let cloud_docs = self
            .clouds
            .first()
            .and_then(|&c| self.engine_of(c))
            .map_or(0, |e| e.with_replica(|r| r.scan().count() as u64));
        let network = self.net.stats();
        // Stop every node: its tasks, then its endpoint.
        let mut closing = Vec::new();
        for node in &mut self.nodes {
            if let Some(live) = node.live.take() {
                for t in &live.tasks {
                    t.abort();
                }
                let endpoint = live.endpoint;
                closing.push(tokio::spawn(async move { endpoint.close().await }));
            }
        }
        for c in closing {
            let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
        }
        let writes: BTreeMap<String, u64> = self
            .oracle
            .writes_by_kind
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let total = writes.values().sum::<u64>().max(1) as f64;
        let mut lag_ms: Vec<u64> = self.lag.iter().map(|l| l.lag_ms).collect();
        let lag_bin_ms = crate::report::lag_bin_ms(now);
        let heals = crate::report::heals(
            &self.windows,
            &self.restored,
            &self.lag,
            self.converged_at.is_some(),
        );
        let report = Report {
            seed: self.seed,
            scenario: self.scenario.name.clone(),
            clouds: self.clouds.len(),
            edges: self.nodes.len() - self.clouds.len(),
            sites: self.site_edges.len(),
            duration_ms: self.scenario.duration.0,
            simulated_ms: now,
            wall_ms,
            peak_rss_kib: crate::report::peak_rss_kib(),
            events: network.datagrams,
            messages_per_write: messages as f64 / total,
            bytes_per_write: bytes as f64 / total,
            writes,
            messages,
            bytes,
            by_message: BTreeMap::new(),
            messages_dropped: network.lost + network.cut + network.to_down,
            retransmitted: 0,
            held_back: network.held_back,
            resets: 0,
            // QUIC connections opened, counted at both ends (iroh's metrics).
            connections_opened: conns,
            connections_broken: 0,
            dials_failed: 0,
            duplicated_dials: 0,
            faults: self
                .faults
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            crashes: self.crashes,
            restarts: self.restarts,
            conflicts_visible: self.conflicts,
            host_ms: BTreeMap::new(),
            lag_ms: Percentiles::of(&mut lag_ms),
            lag_after_heal_ms: Percentiles::of(&mut self.lag_after_heal),
            converged_after_ms: self.converged_at.map(|t| t.saturating_sub(self.stop_at)),
            workload_stop_ms: self.stop_at,
            fault_windows: std::mem::take(&mut self.windows),
            heals,
            lag_bin_ms,
            lag_over_time: crate::report::lag_over_time(&self.lag, lag_bin_ms),
            max_doc_bytes: BTreeMap::new(),
            cloud_docs,
            digest: digest.finalize().to_hex().to_string(),
            failures: self.failures.clone(),
            failure_counts: self
                .failure_counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        };
        QuicReport {
            report,
            network,
            workload_digest: self.workload.finalize().to_hex().to_string(),
            warnings: std::mem::take(&mut self.warnings),
        }
    }
}

/// Runs `scenario` with `seed` on the real stack and returns its report.
/// Must run inside a multi-threaded tokio runtime.
pub async fn run(seed: u64, scenario: Scenario) -> Result<QuicReport, QuicError> {
    Ok(QuicWorld::new(seed, scenario).await?.run().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_events_are_refused_with_their_kind() {
        let s = Scenario::parse(
            "duration = \"10s\"\n[[event]]\nkind = \"skew\"\nat = \"1s\"\nnode = \"edge-0\"\nskew_ms = 100",
            std::path::Path::new("skew.toml"),
        )
        .expect("valid scenario");
        let err = check_supported(&s).expect_err("refused").to_string();
        assert!(err.contains("skew"), "{err}");
        let ok = Scenario::parse(
            "[network]\nreset = 0.01",
            std::path::Path::new("reset.toml"),
        )
        .expect("valid scenario");
        assert_eq!(check_supported(&ok).expect("accepted").len(), 1);
    }

    #[test]
    fn addresses_round_trip() {
        let key = [7u8; 32];
        assert_eq!(parse_addr(&custom_addr(&key)), Some(key));
        assert_eq!(parse_addr(&CustomAddr::from_parts(1, &key)), None);
    }
}
