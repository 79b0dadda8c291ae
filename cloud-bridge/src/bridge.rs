//! The running bridge: watchers on one side, the replica on the other.
//!
//! Five loops share a sync [`Engine`]:
//! - **admission** watches the admission records (Secrets labelled
//!   [`ADMITTED_LABEL`] in [`SYSTEM_NAMESPACE`]) through a reflector, turns
//!   them into the engine's roster and publishes the admitted edges;
//! - **nodes** applies a Node per admitted edge (and deletes it when the
//!   admission record is deleted: the key is no longer trusted), and projects each edge's
//!   node-status document to the Node's status and its Lease (renewed only
//!   when a new heartbeat arrives, so a silent edge's Lease lapses and the
//!   node controller marks it NotReady);
//! - **pods** watches bound Pods, ConfigMaps and Secrets through reflectors,
//!   writes pod-spec, configmap and secret documents for managed nodes, and
//!   projects pod-status documents back through the status subresource,
//!   finishing graceful deletions when the edge reports a pod terminated;
//! - **devices** ([`crate::devices`]) installs the device CRDs, writes
//!   Devices and DeviceModels into documents, and writes twins and merged
//!   desired values back, coalesced and rate-bounded;
//! - **shards** ([`crate::shard`], when [`BridgeConfig::shards`] is set)
//!   takes, renews and releases the node Leases of the replicas' group and
//!   publishes the nodes this replica holds ([`Bridge::held`]) and the other
//!   replicas ([`Bridge::replicas`]).
//!
//! The nodes, pods and devices loops write only the nodes this replica
//! holds (every admitted node without sharding). A node handed to another
//! replica is only forgotten: its Node, documents and Leases stay, the new
//! holder carries on from them.
//!
//! Nothing polls: the API side comes from watch streams, the edge side from
//! the replica's subscriptions. A failed API write is retried after
//! [`BridgeConfig::retry_after`], by key, so that a later success replaces it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, NodeStatus, Pod, PodSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use outpost_sync::PeerId;
use outpost_sync::access::Role;
use outpost_sync::document::{DocId, DocKind};
use outpost_sync::engine::Engine;
use outpost_sync::replica::{Scope, Subscription, SubscriptionError};
use outpost_sync::schema::{NodeStatusDoc, PodSpecDoc, PodStatusDoc};
use outpost_sync::store::IndexEntry;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admission::{self, ADMITTED_LABEL, Admitted, SYSTEM_NAMESPACE};
use crate::metrics::{CloudMetrics, NodeLabel};
use crate::project::{self, MANAGED_BY, MANAGED_BY_LABEL, PodKey, Reference};
use crate::shard::ShardConfig;

/// The bridge's settings.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The field manager of the bridge's server-side applies.
    pub field_manager: String,
    /// `leaseDurationSeconds` of the node Leases (the kubelet's default: 40).
    pub lease_duration_s: i32,
    /// Node status is written when it changes, when the node controller
    /// disagrees with it, or at least this often while heartbeats arrive
    /// (the kubelet's `nodeStatusReportFrequency`: 5 minutes).
    pub node_status_refresh: Duration,
    /// How long a failed API write waits before it is tried again.
    pub retry_after: Duration,
    /// The most API writes a second of device twin status (`DeviceStatus`
    /// and `Device.status`), however often devices report; up to one
    /// second's worth may go at once. Reports coalesce while they wait: each
    /// write carries a device's latest values.
    pub device_status_writes_per_s: f64,
    /// The most pod status writes in flight at once (fewer, one, while
    /// node Lease renewals wait: they go first).
    pub pod_status_writes_in_flight: usize,
    /// How replicas split the nodes ([`crate::shard`]); `None`: this
    /// bridge projects every admitted node and takes no Leases (one bridge
    /// alone, as in tests that share an API server).
    pub shards: Option<ShardConfig>,
    /// Serve only the admitted edges whose node name starts with this
    /// prefix; `None`: every admitted edge.
    pub node_prefix: Option<String>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            field_manager: "outpost-cloud".into(),
            lease_duration_s: 40,
            node_status_refresh: Duration::from_secs(300),
            retry_after: Duration::from_secs(1),
            device_status_writes_per_s: 20.0,
            pod_status_writes_in_flight: 8,
            shards: None,
            node_prefix: None,
        }
    }
}

/// Why the bridge stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The API refused a start-up step.
    #[error("the Kubernetes API failed: {0}")]
    Kube(#[from] kube::Error),
    /// A watch stream or the replica subscription ended.
    #[error("{0} ended")]
    Ended(&'static str),
}

/// The admitted edges by node name.
pub type Edges = BTreeMap<String, Admitted>;

/// Other replicas of a bridge's group: their sync keys and the address
/// each advertises, if any.
pub type Replicas = BTreeMap<PeerId, Option<std::net::SocketAddr>>;

/// The cloud bridge over one sync engine.
#[derive(Clone)]
pub struct Bridge {
    pub(crate) client: Client,
    pub(crate) engine: Engine,
    pub(crate) config: Arc<BridgeConfig>,
    pub(crate) edges: watch::Sender<Edges>,
    /// The admitted edges whose nodes this replica holds (all of them
    /// without sharding): the only nodes it writes to the API.
    pub(crate) held: watch::Sender<Edges>,
    /// The other live replicas of the group: their keys (trusted as
    /// clouds) and the sync addresses they advertise.
    pub(crate) replicas: watch::Sender<Replicas>,
    /// The bridge's metrics.
    pub(crate) metrics: CloudMetrics,
    /// Node projections (Lease renewals) are waiting for a slot: other API
    /// writes hold back.
    pub(crate) nodes_waiting: watch::Sender<bool>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("engine", &self.engine)
            .field("config", &self.config)
            .finish()
    }
}

impl Bridge {
    /// A bridge between the API behind `client` and `engine`'s replica.
    pub fn new(client: Client, engine: Engine, config: BridgeConfig) -> Self {
        Self {
            client,
            engine,
            config: Arc::new(config),
            edges: watch::Sender::new(Edges::new()),
            held: watch::Sender::new(Edges::new()),
            replicas: watch::Sender::new(Replicas::new()),
            metrics: CloudMetrics::default(),
            nodes_waiting: watch::Sender::new(false),
        }
    }

    /// How many API writes of device twin status (`DeviceStatus` objects
    /// and `Device.status`) this bridge has sent.
    pub fn device_status_writes(&self) -> u64 {
        self.metrics.device_status_writes.get()
    }

    /// The bridge's metrics (register them to serve them).
    pub fn metrics(&self) -> &CloudMetrics {
        &self.metrics
    }

    /// The admitted edges, as the bridge currently knows them.
    pub fn edges(&self) -> watch::Receiver<Edges> {
        self.edges.subscribe()
    }

    /// The admitted edges whose nodes this replica holds and projects.
    pub fn held(&self) -> watch::Receiver<Edges> {
        self.held.subscribe()
    }

    /// The other live replicas of this bridge's group (their sync keys and
    /// advertised addresses): trusted as clouds, and worth a sync session
    /// each so that every replica keeps the whole replicated state.
    pub fn replicas(&self) -> watch::Receiver<Replicas> {
        self.replicas.subscribe()
    }

    /// Runs until a watch stream or the replica ends (or an error at
    /// start-up).
    pub async fn run(self) -> Result<(), BridgeError> {
        admission::ensure_namespace(&self.client).await?;
        // Each loop is a task of its own: a burst of work in one (a pod
        // loop busy with thousands of statuses) does not hold up another
        // (the node loop's Lease renewals). Dropping the set (this future)
        // stops them all.
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(self.clone().admission_loop());
        loops.spawn(NodeLoop::new(self.clone()).run());
        loops.spawn(PodLoop::new(self.clone()).run());
        loops.spawn(crate::devices::run(self.clone()));
        if let Some(config) = &self.config.shards {
            loops.spawn(crate::shard::run(self.clone(), config.clone()));
        }
        while let Some(done) = loops.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(BridgeError::Ended("a bridge loop")),
            }
        }
        Err(BridgeError::Ended("every bridge loop"))
    }

    /// The engine's roster: the admitted edges and the other replicas.
    pub(crate) fn update_roster(&self) {
        let mut roster = admission::roster_of(&self.edges.borrow());
        for peer in self.replicas.borrow().keys() {
            roster.insert(*peer, Role::Cloud);
        }
        self.engine.set_roster(roster);
    }

    /// Does this replica write `node`'s objects?
    pub(crate) fn holds(&self, node: &str) -> bool {
        self.held.borrow().contains_key(node)
    }

    pub(crate) fn apply_params(&self) -> PatchParams {
        PatchParams::apply(&self.config.field_manager).force()
    }

    pub(crate) fn subscribe(&self, kinds: impl IntoIterator<Item = DocKind>) -> Subscription {
        self.engine
            .with_replica(|r| r.subscribe_scope(Scope::all().kinds(kinds)))
    }

    /// Every document of a kind in the replica.
    pub(crate) fn scan(&self, kind: DocKind) -> Vec<DocId> {
        let prefix = format!("{}/", kind.as_str());
        self.engine.with_replica(|r| {
            r.scan_prefix(&prefix)
                .filter_map(Result::ok)
                .map(|(doc, _)| doc)
                .collect()
        })
    }

    async fn admission_loop(self) -> Result<(), BridgeError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        let config = watcher::Config::default().labels(&format!("{ADMITTED_LABEL}=true"));
        let (store, mut stream) = reflect(api, config, slim_admission);
        let mut ready = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone) => ready = true,
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "admission watch failed; retrying");
                    continue;
                }
            }
            if !ready {
                continue;
            }
            let state = store.state();
            let mut edges = admission::latest_per_node(state.iter().map(|s| s.as_ref()));
            if let Some(prefix) = &self.config.node_prefix {
                edges.retain(|node, _| node.starts_with(prefix.as_str()));
            }
            if *self.edges.borrow() != edges {
                info!(edges = edges.len(), "roster updated");
                self.metrics.edges_admitted.set(edges.len() as i64);
                if self.config.shards.is_none() {
                    self.held.send_replace(edges.clone());
                }
                self.edges.send_replace(edges);
                self.update_roster();
            }
        }
        Err(BridgeError::Ended("the admission watch"))
    }
}

/// Receives the next document of a subscription; a lag yields `None`
/// (the caller re-reads its scope).
pub(crate) async fn next_doc(sub: &mut Subscription) -> Result<Option<DocId>, BridgeError> {
    match sub.recv().await {
        Ok(doc) => Ok(Some(doc)),
        Err(SubscriptionError::Lagged(n)) => {
            warn!(missed = n, "replica subscription lagged; re-reading");
            Ok(None)
        }
        Err(SubscriptionError::Closed) => Err(BridgeError::Ended("the replica subscription")),
    }
}

/// Schedules `key` to be sent on `tx` after `delay`.
pub(crate) fn retry<T: Send + 'static>(tx: &mpsc::UnboundedSender<T>, key: T, delay: Duration) {
    let tx = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = tx.send(key);
    });
}

/// What the node loop knows of one node.
#[derive(Debug, Default, Clone)]
struct NodeState {
    uid: Option<String>,
    /// The newest heartbeat seen (edge clock, ms).
    heartbeat_ms: u64,
    /// The status last written, without heartbeat times.
    status_key: Option<serde_json::Value>,
    status_written: Option<Instant>,
    /// The edge's heartbeat period as estimated from the heartbeats of
    /// successive renewals ([`next_period_ms`]); 0 before two renewals.
    period_ms: u64,
}

/// The heartbeat period estimate after a renewal whose heartbeat came
/// `seen_ms` after the previous renewal's: down at once, up by an eighth
/// at most. Two renewals can be further apart than the edge's period
/// because the renewal waited (several heartbeats then make one renewal);
/// taken as the period, that wait would push the node's next deadline
/// ([`WaitKey`]) later and make it wait longer still, so that healthy
/// nodes caught in a reconnect storm fell behind the reconnecting ones. An
/// edge whose period really grew is followed within a few renewals.
fn next_period_ms(estimate: u64, seen_ms: u64) -> u64 {
    if estimate == 0 {
        return seen_ms;
    }
    seen_ms.min(estimate + estimate / 8)
}

/// The order in which nodes waiting for a projection slot get one:
/// earliest deadline first, a node's deadline being one heartbeat period
/// (as last seen, at most half the Lease) after it asked. A node whose edge
/// heartbeats often goes before one that heartbeats rarely or is catching
/// up after a reconnect, yet every node's turn comes: deadlines are fixed
/// when a node asks, so none waits behind later ones for ever.
type WaitKey = (Instant, String);

struct NodeLoop {
    bridge: Bridge,
    nodes: HashMap<String, NodeState>,
    store: Store<Node>,
    retry_tx: mpsc::UnboundedSender<String>,
    retry_rx: mpsc::UnboundedReceiver<String>,
    /// Projections running, one per node at most, [`PROJECT_CONCURRENCY`]
    /// at once: a Lease renewal waits for no other node's API calls.
    running: tokio::task::JoinSet<(String, NodeState, bool)>,
    /// Nodes being projected now.
    inflight: HashSet<String>,
    /// Nodes to project again when their running projection ends, and
    /// nodes waiting for a free slot ([`WaitKey`] order).
    again: HashSet<String>,
    waiting: BTreeSet<WaitKey>,
    /// When each node waiting or running first asked for its projection.
    asked: HashMap<String, Instant>,
}

/// The log target of the node loop's per-heartbeat timings (a heartbeat
/// arriving, its projection starting, the Lease call), at debug level:
/// `RUST_LOG=outpost_cloud_bridge::lease=debug` shows where a renewal
/// waited.
const LEASE_LOG: &str = "outpost_cloud_bridge::lease";

/// Nodes projected (Lease and status written) at once. Enough that 1,000
/// edges heartbeating every 10 s keep fewer busy than this when the API
/// answers in ~100 ms: a node waits for a slot only in a burst, and then
/// pod status writes hold back ([`Bridge::nodes_waiting`]).
const PROJECT_CONCURRENCY: usize = 32;

impl NodeLoop {
    fn new(bridge: Bridge) -> Self {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Self {
            bridge,
            nodes: HashMap::new(),
            store: reflector::store::<Node>().0,
            retry_tx,
            retry_rx,
            running: tokio::task::JoinSet::new(),
            inflight: HashSet::new(),
            again: HashSet::new(),
            waiting: BTreeSet::new(),
            asked: HashMap::new(),
        }
    }

    /// Projects a node's status (Lease, Node status) as soon as a slot is
    /// free; a node already being projected is projected again after.
    fn schedule(&mut self, node: &str) {
        self.asked
            .entry(node.to_owned())
            .or_insert_with(Instant::now);
        if self.inflight.contains(node) {
            self.again.insert(node.to_owned());
            return;
        }
        if self.inflight.len() >= PROJECT_CONCURRENCY {
            if !self.again.contains(node) {
                self.again.insert(node.to_owned());
                let half_lease =
                    u64::try_from(self.bridge.config.lease_duration_s).unwrap_or(40) * 500;
                let period = match self.nodes.get(node).map_or(0, |s| s.period_ms) {
                    0 => half_lease / 2,
                    p => p.min(half_lease),
                };
                let deadline = Instant::now() + Duration::from_millis(period);
                self.waiting.insert((deadline, node.to_owned()));
                self.publish_waiting();
            }
            return;
        }
        let Some(state) = self.nodes.get(node).cloned() else {
            return; // not admitted (or not applied yet: ensure_node comes back here)
        };
        self.inflight.insert(node.to_owned());
        let asked = self.asked.remove(node).unwrap_or_else(Instant::now);
        let (bridge, store, node) = (self.bridge.clone(), self.store.clone(), node.to_owned());
        self.running.spawn(async move {
            let (state, failed) = project_node(&bridge, &store, &node, state, asked).await;
            (node, state, failed)
        });
    }

    /// A projection ended: keeps its state, retries a failure, starts what
    /// waited.
    fn finished(&mut self, node: String, state: NodeState, failed: bool) {
        self.inflight.remove(&node);
        // The node may have been removed meanwhile; keep a uid cleared by a
        // 404 (the Node is applied again).
        if let Some(slot) = self.nodes.get_mut(&node) {
            *slot = state;
        }
        if failed {
            retry(&self.retry_tx, node.clone(), self.bridge.config.retry_after);
        }
        if self.again.remove(&node) {
            self.waiting.retain(|(_, n)| n != &node);
            self.schedule(&node);
        }
        while self.inflight.len() < PROJECT_CONCURRENCY {
            let Some((_, next)) = self.waiting.pop_first() else {
                break;
            };
            if self.again.remove(&next) {
                self.schedule(&next);
            }
        }
        self.publish_waiting();
    }

    /// Tells the other loops whether node projections wait for a slot.
    fn publish_waiting(&self) {
        let waiting = !self.waiting.is_empty();
        self.bridge.nodes_waiting.send_if_modified(|w| {
            let changed = *w != waiting;
            *w = waiting;
            changed
        });
    }

    async fn run(mut self) -> Result<(), BridgeError> {
        let mut edges_rx = self.bridge.held();
        let mut sub = self.bridge.subscribe([DocKind::NodeStatus]);
        let api: Api<Node> = Api::all(self.bridge.client.clone());
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let (store, mut node_events) = reflect(api, config, slim_node);
        self.store = store;
        loop {
            tokio::select! {
                changed = edges_rx.changed() => {
                    if changed.is_err() {
                        return Err(BridgeError::Ended("the admission loop"));
                    }
                    let edges = edges_rx.borrow_and_update().clone();
                    let gone: Vec<String> = self
                        .nodes
                        .keys()
                        .filter(|n| !edges.contains_key(*n))
                        .cloned()
                        .collect();
                    for node in gone {
                        self.nodes.remove(&node);
                        self.asked.remove(&node);
                        // Still admitted: another replica holds it now.
                        if !self.bridge.edges.borrow().contains_key(&node) {
                            self.remove_node(&node).await;
                        } else {
                            info!(%node, "node handed to another replica");
                        }
                    }
                    for edge in edges.values() {
                        self.ensure_node(edge).await;
                    }
                }
                doc = next_doc(&mut sub) => match doc? {
                    Some(doc) => {
                        if let outpost_sync::document::Owner::Node(node) = doc.owner() {
                            let node = node.to_owned();
                            debug!(
                                target: LEASE_LOG,
                                %node,
                                inflight = self.inflight.len(),
                                waiting = self.waiting.len(),
                                "node status arrived"
                            );
                            self.schedule(&node);
                        }
                    }
                    None => {
                        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
                        for node in nodes {
                            self.schedule(&node);
                        }
                    }
                },
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    match done {
                        Ok((node, state, failed)) => self.finished(node, state, failed),
                        Err(e) => warn!(error = %e, "a node projection failed"),
                    }
                }
                event = node_events.next() => match event {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "node watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the node watch")),
                },
                Some(node) = self.retry_rx.recv() => {
                    let edge = self.bridge.held.borrow().get(&node).cloned();
                    if let Some(edge) = edge {
                        if self.nodes.get(&node).is_none_or(|s| s.uid.is_none()) {
                            self.ensure_node(&edge).await;
                        } else {
                            self.schedule(&node);
                        }
                    }
                }
            }
        }
    }

    /// Deletes the Node of an edge whose admission record is gone (its key
    /// is no longer trusted); its Lease goes with it (owner reference).
    async fn remove_node(&self, node: &str) {
        let api: Api<Node> = Api::all(self.bridge.client.clone());
        match api.delete(node, &DeleteParams::default()).await {
            Ok(_) => info!(%node, "admission revoked; node deleted"),
            Err(e) if admission::is_status(&e, 404) => {}
            Err(e) => warn!(%node, error = %e, "cannot delete the node of a revoked edge"),
        }
    }

    /// Applies the Node of an admitted edge (labels, key annotation), then
    /// its status if the edge has sent one.
    async fn ensure_node(&mut self, edge: &Admitted) {
        if self.nodes.get(&edge.node).is_some_and(|s| s.uid.is_some()) {
            return;
        }
        let api: Api<Node> = Api::all(self.bridge.client.clone());
        let patch = project::node_object(edge);
        match api
            .patch(
                &edge.node,
                &self.bridge.apply_params(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(node) => {
                info!(node = %edge.node, peer = %edge.key, "node applied");
                self.nodes.entry(edge.node.clone()).or_default().uid = node.metadata.uid;
                self.schedule(&edge.node);
            }
            Err(e) => {
                warn!(node = %edge.node, error = %e, "cannot apply node; retrying");
                retry(
                    &self.retry_tx,
                    edge.node.clone(),
                    self.bridge.config.retry_after,
                );
            }
        }
    }
}

/// Projects a node-status document: renews the Lease on a new heartbeat,
/// writes the Node status when it changed. Returns the node's state after,
/// and whether something failed (to be retried).
async fn project_node(
    bridge: &Bridge,
    store: &Store<Node>,
    node: &str,
    mut state: NodeState,
    asked: Instant,
) -> (NodeState, bool) {
    let Ok(id) = project::node_status_id(node) else {
        return (state, false);
    };
    let started = Instant::now();
    let read = bridge.engine.with_replica(|r| r.get::<NodeStatusDoc>(&id));
    let read_ms = started.elapsed().as_millis();
    let doc = match read {
        Ok(Some(doc)) => doc,
        Ok(None) => return (state, false),
        Err(e) => {
            warn!(%node, error = %e, "unreadable node-status document");
            return (state, false);
        }
    };
    let config = &bridge.config;
    let now = Timestamp::now();
    let now_ms = u64::try_from(now.as_millisecond()).unwrap_or_default();
    // The first heartbeat this process sees must be recent: a document
    // left from before a restart is no proof that the edge is alive.
    let fresh = if state.heartbeat_ms == 0 {
        now_ms.saturating_sub(doc.heartbeat_ms) < config.lease_duration_s as u64 * 1000
    } else {
        doc.heartbeat_ms > state.heartbeat_ms
    };
    let mut failed = false;
    debug!(
        target: LEASE_LOG,
        %node,
        fresh,
        heartbeat_age_ms = now_ms.saturating_sub(doc.heartbeat_ms),
        waited_ms = started.duration_since(asked).as_millis(),
        read_ms,
        "projection starts"
    );
    if fresh {
        let lease = project::lease_patch(node, state.uid.as_deref(), now, config.lease_duration_s);
        let api: Api<Lease> = Api::namespaced(bridge.client.clone(), project::NODE_LEASE_NAMESPACE);
        let call = Instant::now();
        let result = api
            .patch(node, &bridge.apply_params(), &Patch::Apply(&lease))
            .await;
        debug!(
            target: LEASE_LOG,
            %node,
            call_ms = call.elapsed().as_millis(),
            ok = result.is_ok(),
            "lease call done"
        );
        match result {
            Ok(_) => {
                debug!(%node, heartbeat_ms = doc.heartbeat_ms, "lease renewed");
                if state.heartbeat_ms > 0 {
                    state.period_ms = next_period_ms(
                        state.period_ms,
                        doc.heartbeat_ms.saturating_sub(state.heartbeat_ms),
                    );
                }
                state.heartbeat_ms = doc.heartbeat_ms;
                let m = &bridge.metrics;
                m.lease_renewals.inc();
                m.edge_heartbeat_timestamp_seconds
                    .get_or_create(&NodeLabel {
                        node: node.to_owned(),
                    })
                    .set(now_ms as f64 / 1000.0);
            }
            Err(e) => {
                warn!(%node, error = %e, "cannot renew lease");
                bridge.metrics.lease_renewal_errors.inc();
                failed = true;
            }
        }
    }
    let key = project::node_status_patch(node, &doc, false);
    let live_ready = store.get(&ObjectRef::new(node)).and_then(|n| {
        n.status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.clone())
    });
    let stale = state
        .status_written
        .is_none_or(|t| t.elapsed() >= config.node_status_refresh);
    let disagrees = live_ready.as_deref() != Some(project::desired_ready(&doc).as_str());
    if state.status_key.as_ref() != Some(&key) || (fresh && (stale || disagrees)) {
        let patch = project::node_status_patch(node, &doc, true);
        let api: Api<Node> = Api::all(bridge.client.clone());
        match api
            .patch_status(node, &bridge.apply_params(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => {
                debug!(%node, "node status written");
                state.status_key = Some(key);
                state.status_written = Some(Instant::now());
            }
            Err(e) if admission::is_status(&e, 404) => {
                warn!(%node, "node is gone; applying it again");
                state.uid = None;
                failed = true;
            }
            Err(e) => {
                warn!(%node, error = %e, "cannot write node status");
                failed = true;
            }
        }
    }
    (state, failed)
}

/// What the pod loop retries.
#[derive(Debug)]
enum PodRetry {
    Spec(ObjectRef<Pod>),
    Status(DocId),
    /// The pods of a node taken back ([`PodLoop::refetch_pods`]).
    Node(String),
}

struct PodLoop {
    bridge: Bridge,
    pods: Store<Pod>,
    /// Writes `pods`: the loop applies each pod event itself, after
    /// comparing it with what the store held.
    pod_writer: Option<reflector::store::Writer<Pod>>,
    configmaps: Store<ConfigMap>,
    secrets: Store<Secret>,
    /// Which pods (uid → node) use each (namespace, reference).
    users: HashMap<(String, Reference), HashMap<String, String>>,
    /// What each pod (uid) uses.
    uses: HashMap<String, (String, BTreeSet<Reference>)>,
    /// Managed pods by uid: their pod-spec document (for deletions seen
    /// only as a watch Delete event) and the [`projection_digest`] it was
    /// written from.
    specs: HashMap<String, (DocId, u64)>,
    /// The pod watch has listed every pod once (before that, a pod missing
    /// from the store may just not be listed yet).
    pods_listed: bool,
    retry_tx: mpsc::UnboundedSender<PodRetry>,
    retry_rx: mpsc::UnboundedReceiver<PodRetry>,
    /// Pod status writes waiting and running.
    statuses: StatusQueue,
}

/// Pod status writes: queued by pod-status document (a document queued
/// twice is written once, with its latest content), at most
/// [`BridgeConfig::pod_status_writes_in_flight`] at once and one per pod,
/// and only one at a time while node Lease renewals wait for a slot
/// ([`Bridge::nodes_waiting`]): a healthy node's renewal never queues
/// behind a backlog of pod statuses.
#[derive(Default)]
struct StatusQueue {
    order: VecDeque<DocId>,
    queued: HashSet<DocId>,
    inflight: HashSet<DocId>,
    /// Queued again while being written: written again after.
    again: HashSet<DocId>,
    running: tokio::task::JoinSet<StatusDone>,
    /// The version ([`doc_version`]) of each document last written, and
    /// whether it said terminated: a document read again unchanged (a
    /// re-read after a lag, a relisting) costs no API write, nor even a
    /// load.
    written: HashMap<DocId, (u64, bool)>,
}

/// A pod status write that ended.
struct StatusDone {
    doc: DocId,
    pod: Arc<Pod>,
    version: u64,
    terminated: bool,
    outcome: StatusOutcome,
}

enum StatusOutcome {
    Written,
    /// The Pod is gone.
    Gone,
    Failed,
}

impl StatusQueue {
    fn push(&mut self, doc: DocId) {
        if self.inflight.contains(&doc) {
            self.again.insert(doc);
        } else if self.queued.insert(doc.clone()) {
            self.order.push_back(doc);
        }
    }
}

/// A document's version: its generation and heads, from the replica's
/// index (no load).
fn doc_version(entry: &IndexEntry) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    entry.generation.hash(&mut h);
    entry.heads.hash(&mut h);
    h.finish()
}

/// Pod-status documents looked at, at most, before the pod loop lets its
/// other work run.
const STATUS_BATCH: usize = 256;

/// A digest of what a pod's pod-spec document is made of: an event that
/// leaves it unchanged (e.g. the bridge's own status write) needs no
/// projection.
fn projection_digest(pod: &Pod) -> u64 {
    use std::hash::{Hash, Hasher};
    let m = &pod.metadata;
    let parts = (
        &m.uid,
        &m.labels,
        &m.annotations,
        &m.deletion_timestamp,
        &m.deletion_grace_period_seconds,
        &pod.spec,
    );
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&parts)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// A projected pod as the pod store keeps it: its spec is in its pod-spec
/// document, the store keeps only what finds the document (the node) and
/// finishes a deletion. Containers and volumes are most of a Pod's memory.
fn without_spec(mut pod: Pod) -> Pod {
    pod.spec = pod.spec.map(|spec| PodSpec {
        node_name: spec.node_name,
        termination_grace_period_seconds: spec.termination_grace_period_seconds,
        ..PodSpec::default()
    });
    pod
}

/// Does the store hold `pod`'s whole spec? (Every real pod has a
/// container; one kept [`without_spec`] has none.)
fn has_spec(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| !s.containers.is_empty())
}

/// A watch stream whose events have been applied to a reflector store.
pub(crate) type Events<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// Watches `api` into a reflector store. Every object goes through `slim`
/// first: the store (and the events) keep only what the bridge reads, not
/// `managedFields` and the like, which are most of an object's memory.
pub(crate) fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    slim: fn(&mut K),
) -> (Store<K>, Events<K>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watched(api, config, slim).reflect(writer).boxed();
    (store, stream)
}

/// The watch stream of `api`, each object slimmed by `slim`.
fn watched<K>(api: Api<K>, config: watcher::Config, slim: fn(&mut K)) -> Events<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher(api, config).default_backoff().modify(slim).boxed()
}

/// Annotations the bridge never reads and never copies: dropped from every
/// object it keeps.
const DROPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// Drops what no loop of the bridge reads from an object's metadata:
/// `managedFields` (often the larger part of a small object) and
/// [`DROPPED_ANNOTATIONS`].
pub(crate) fn slim_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.retain(|k, _| !DROPPED_ANNOTATIONS.contains(&k.as_str()));
    }
}

/// [`slim_metadata`] for any object.
pub(crate) fn slim<K: kube::Resource>(object: &mut K) {
    slim_metadata(object.meta_mut());
}

/// A Pod as the pod loop keeps it: no status (the bridge writes it, never
/// reads it), no owner references.
fn slim_pod(pod: &mut Pod) {
    slim_metadata(&mut pod.metadata);
    pod.metadata.owner_references = None;
    pod.status = None;
}

/// Metadata cut down to what identifies the object and its version.
fn identity_only(meta: &mut ObjectMeta) {
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        ..ObjectMeta::default()
    };
}

/// A ConfigMap as the pod loop keeps it: its name and data.
fn slim_configmap(cm: &mut ConfigMap) {
    identity_only(&mut cm.metadata);
}

/// A Secret as the pod loop keeps it: its name, type and data.
fn slim_secret(secret: &mut Secret) {
    identity_only(&mut secret.metadata);
    secret.string_data = None;
}

/// An admission record as the admission loop keeps it: type and
/// annotations (the record), no data (the token's hash).
fn slim_admission(secret: &mut Secret) {
    slim_metadata(&mut secret.metadata);
    secret.data = None;
    secret.string_data = None;
}

/// A Node as the node loop keeps it: its Ready condition.
fn slim_node(node: &mut Node) {
    // A Node has no namespace: identity_only keeps the same three fields.
    identity_only(&mut node.metadata);
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        conditions: status
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..NodeStatus::default()
    });
}

impl PodLoop {
    fn new(bridge: Bridge) -> Self {
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        Self {
            bridge,
            pods: reflector::store::<Pod>().0,
            configmaps: reflector::store::<ConfigMap>().0,
            secrets: reflector::store::<Secret>().0,
            users: HashMap::new(),
            uses: HashMap::new(),
            specs: HashMap::new(),
            pods_listed: false,
            retry_tx,
            retry_rx,
            pod_writer: None,
            statuses: StatusQueue::default(),
        }
    }

    fn managed(&self, node: &str) -> bool {
        self.bridge.holds(node)
    }

    async fn run(mut self) -> Result<(), BridgeError> {
        let client = self.bridge.client.clone();
        let mut edges_rx = self.bridge.held();
        let mut managed: HashSet<String> = HashSet::new();
        let mut sub = self.bridge.subscribe([DocKind::PodStatus]);
        let mut nodes_waiting = self.bridge.nodes_waiting.subscribe();
        // Bound pods only; which of them are on managed nodes is checked here.
        let (pods, pod_writer) = reflector::store();
        let mut pod_events = watched(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields("spec.nodeName!="),
            slim_pod,
        );
        let (configmaps, mut cm_events) = reflect(
            Api::<ConfigMap>::all(client.clone()),
            watcher::Config::default(),
            slim_configmap,
        );
        let (secrets, mut secret_events) = reflect(
            Api::<Secret>::all(client.clone()),
            watcher::Config::default().fields("type!=kubernetes.io/service-account-token"),
            slim_secret,
        );
        (self.pods, self.configmaps, self.secrets) = (pods, configmaps, secrets);
        self.pod_writer = Some(pod_writer);
        loop {
            self.start_statuses().await;
            tokio::select! {
                changed = edges_rx.changed() => {
                    if changed.is_err() {
                        return Err(BridgeError::Ended("the admission loop"));
                    }
                    let now: HashSet<String> = edges_rx.borrow_and_update().keys().cloned().collect();
                    let added: Vec<String> = now.difference(&managed).cloned().collect();
                    managed = now;
                    // Pods of nodes handed to another replica: theirs now.
                    self.specs.retain(|_, (doc, _)| {
                        matches!(doc.owner(), outpost_sync::document::Owner::Node(n) if managed.contains(n))
                    });
                    // Statuses of nodes taken over are written again: the
                    // API may have moved on while another replica held them.
                    self.statuses.written.retain(|doc, _| {
                        matches!(doc.owner(), outpost_sync::document::Owner::Node(n)
                            if managed.contains(n) && !added.iter().any(|a| a == n))
                    });
                    // Pods bound before their node was admitted (or taken
                    // over). The store keeps the whole spec of pods of
                    // nodes never held; those of a node held before, handed
                    // away and taken back, come from the API again.
                    let mut refetch = BTreeSet::new();
                    for pod in self.pods.state() {
                        let Some(node) = PodKey::of(&pod).map(|k| k.node) else { continue };
                        if !added.contains(&node) {
                            continue;
                        }
                        if has_spec(&pod) {
                            if self.project_pod(&pod) {
                                self.keep_projected(&pod);
                            }
                        } else {
                            refetch.insert(node);
                        }
                    }
                    self.refetch_pods(refetch).await;
                    if !added.is_empty() {
                        self.project_all_statuses();
                    }
                }
                event = pod_events.next() => match event {
                    Some(Ok(event)) => self.pod_event(event).await,
                    Some(Err(e)) => warn!(error = %e, "pod watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the pod watch")),
                },
                event = cm_events.next() => match event {
                    Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                        let ns = cm.metadata.namespace.clone().unwrap_or_default();
                        let r = Reference::ConfigMap(cm.metadata.name.clone().unwrap_or_default());
                        self.write_reference(&ns, &r);
                    }
                    // The store holds the initial listing only now: what
                    // pods use and could not be written during it is.
                    Some(Ok(watcher::Event::InitDone)) => {
                        self.write_all_references(|r| matches!(r, Reference::ConfigMap(_)));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "configmap watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the configmap watch")),
                },
                event = secret_events.next() => match event {
                    Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                        let ns = s.metadata.namespace.clone().unwrap_or_default();
                        let r = Reference::Secret(s.metadata.name.clone().unwrap_or_default());
                        self.write_reference(&ns, &r);
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        self.write_all_references(|r| matches!(r, Reference::Secret(_)));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warn!(error = %e, "secret watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the secret watch")),
                },
                doc = next_doc(&mut sub) => match doc? {
                    Some(doc) => self.statuses.push(doc),
                    None => self.project_all_statuses(),
                },
                Some(done) = self.statuses.running.join_next(), if !self.statuses.running.is_empty() => {
                    match done {
                        Ok(done) => self.status_written(done).await,
                        Err(e) if e.is_cancelled() => {}
                        Err(e) => warn!(error = %e, "a pod status write failed"),
                    }
                }
                changed = nodes_waiting.changed() => {
                    if changed.is_err() {
                        return Err(BridgeError::Ended("the node loop"));
                    }
                }
                Some(retry) = self.retry_rx.recv() => match retry {
                    // A pod kept without spec has been projected since.
                    PodRetry::Spec(key) => {
                        if let Some(pod) = self.pods.get(&key).filter(|p| has_spec(p))
                            && self.project_pod(&pod)
                        {
                            self.keep_projected(&pod);
                        }
                    }
                    PodRetry::Node(node) => self.refetch_pods(BTreeSet::from([node])).await,
                    PodRetry::Status(doc) => self.statuses.push(doc),
                },
            }
        }
    }

    /// Applies a pod watch event to the store and projects it.
    async fn pod_event(&mut self, event: watcher::Event<Pod>) {
        // A pod whose spec is in its pod-spec document is kept without it.
        let event = match event {
            watcher::Event::Apply(pod) => watcher::Event::Apply(self.project_kept(pod)),
            watcher::Event::InitApply(pod) => watcher::Event::InitApply(self.project_kept(pod)),
            other => other,
        };
        if let Some(writer) = &mut self.pod_writer {
            writer.apply_watcher_event(&event);
        }
        match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                self.finish_deletion(&pod).await;
            }
            watcher::Event::Delete(pod) => self.pod_gone(&pod),
            watcher::Event::InitDone => {
                self.pods_listed = true;
                self.project_all_statuses();
            }
            watcher::Event::Init => {}
        }
    }

    /// Projects a pod and returns it as the store is to keep it.
    fn project_kept(&mut self, pod: Pod) -> Pod {
        if self.project_pod(&pod) {
            without_spec(pod)
        } else {
            pod
        }
    }

    /// Replaces a projected pod in the store with its [`without_spec`]
    /// form, unless the store moved on to another version meanwhile.
    fn keep_projected(&mut self, pod: &Pod) {
        let current = self.pods.get(&ObjectRef::from(pod));
        if current.is_none_or(|c| c.metadata.resource_version != pod.metadata.resource_version) {
            return;
        }
        if let Some(writer) = &mut self.pod_writer {
            writer.apply_watcher_event(&watcher::Event::Apply(without_spec(pod.clone())));
        }
    }

    /// Lists again, from the API, the pods of nodes whose pods the store
    /// keeps without spec (nodes held before, handed away and taken back),
    /// and projects them.
    async fn refetch_pods(&mut self, nodes: BTreeSet<String>) {
        if nodes.is_empty() {
            return;
        }
        let api: Api<Pod> = Api::all(self.bridge.client.clone());
        let lists: Vec<(String, Result<kube::core::ObjectList<Pod>, kube::Error>)> =
            futures::stream::iter(nodes)
                .map(|node| {
                    let api = api.clone();
                    async move {
                        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
                        let list = api.list(&params).await;
                        (node, list)
                    }
                })
                .buffer_unordered(8)
                .collect()
                .await;
        for (node, list) in lists {
            match list {
                Ok(list) => {
                    for mut pod in list.items {
                        slim_pod(&mut pod);
                        self.project_pod(&pod);
                    }
                }
                Err(e) => {
                    warn!(%node, error = %e, "cannot list the pods of a node taken back; retrying");
                    retry(
                        &self.retry_tx,
                        PodRetry::Node(node),
                        self.bridge.config.retry_after,
                    );
                }
            }
        }
    }

    /// Writes a managed pod's pod-spec document and the ConfigMaps and
    /// Secrets it uses, unless it was written from the same pod already.
    /// True when the document holds this pod (its spec need not be kept).
    fn project_pod(&mut self, pod: &Pod) -> bool {
        let Some(key) = PodKey::of(pod) else {
            return false;
        };
        if !self.managed(&key.node) {
            return false;
        }
        let digest = projection_digest(pod);
        if self.specs.get(&key.uid).is_some_and(|(_, d)| *d == digest) {
            return true;
        }
        let spec = match project::pod_spec_doc(pod) {
            Ok(spec) => spec,
            Err(e) => {
                // Not retried: the pod changes (and comes back) or is fixed by hand.
                warn!(pod = %format!("{}/{}", key.namespace, key.name), error = %e, "pod not projected");
                return false;
            }
        };
        let doc = match key.spec_doc() {
            Ok(doc) => doc,
            Err(e) => {
                warn!(error = %e, "pod not projected: invalid document id");
                return false;
            }
        };
        if let Err(e) = self.bridge.engine.put(&doc, &spec) {
            warn!(%doc, error = %e, "cannot write pod-spec document; retrying");
            retry(
                &self.retry_tx,
                PodRetry::Spec(ObjectRef::from(pod)),
                self.bridge.config.retry_after,
            );
            return false;
        }
        self.specs.insert(key.uid.clone(), (doc, digest));
        let refs = project::references(&spec);
        self.set_uses(&key.uid, &key.node, &key.namespace, refs.clone());
        for r in &refs {
            self.write_reference_for(&key.node, &key.namespace, r);
        }
        true
    }

    fn set_uses(&mut self, uid: &str, node: &str, ns: &str, refs: BTreeSet<Reference>) {
        if let Some((old_ns, old)) = self.uses.remove(uid) {
            for r in old {
                if let Some(users) = self.users.get_mut(&(old_ns.clone(), r.clone())) {
                    users.remove(uid);
                    if users.is_empty() {
                        self.users.remove(&(old_ns.clone(), r));
                    }
                }
            }
        }
        if refs.is_empty() {
            return;
        }
        for r in &refs {
            self.users
                .entry((ns.to_owned(), r.clone()))
                .or_default()
                .insert(uid.to_owned(), node.to_owned());
        }
        self.uses.insert(uid.to_owned(), (ns.to_owned(), refs));
    }

    /// Writes a ConfigMap or Secret for every node whose pods use it.
    /// Writes every ConfigMap or Secret (as `which` picks) that managed
    /// pods use.
    fn write_all_references(&self, which: impl Fn(&Reference) -> bool) {
        let used: Vec<(String, Reference)> = self
            .users
            .keys()
            .filter(|(_, r)| which(r))
            .cloned()
            .collect();
        for (ns, r) in used {
            self.write_reference(&ns, &r);
        }
    }

    fn write_reference(&self, ns: &str, r: &Reference) {
        let Some(users) = self.users.get(&(ns.to_owned(), r.clone())) else {
            return;
        };
        let nodes: BTreeSet<&String> = users.values().collect();
        for node in nodes {
            self.write_reference_for(node, ns, r);
        }
    }

    fn write_reference_for(&self, node: &str, ns: &str, r: &Reference) {
        if !self.managed(node) {
            return;
        }
        let Ok(doc) = project::reference_id(node, ns, r) else {
            return;
        };
        let written = match r {
            Reference::ConfigMap(name) => {
                match self.configmaps.get(&ObjectRef::new(name).within(ns)) {
                    Some(cm) => self.bridge.engine.put(&doc, &project::configmap_doc(&cm)),
                    None => return, // written when it appears
                }
            }
            Reference::Secret(name) => match self.secrets.get(&ObjectRef::new(name).within(ns)) {
                Some(s) => self.bridge.engine.put(&doc, &project::secret_doc(&s)),
                None => return,
            },
        };
        if let Err(e) = written {
            warn!(%doc, error = %e, "cannot write document");
        }
    }

    /// A managed pod left the API. If it went without the edge reporting it
    /// stopped (a forced deletion), the edge is told to stop it now.
    fn pod_gone(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        self.set_uses(&uid, "", "", BTreeSet::new());
        let Some((doc, _)) = self.specs.remove(&uid) else {
            return;
        };
        let engine = &self.bridge.engine;
        match engine.with_replica(|r| r.get::<PodSpecDoc>(&doc)) {
            Ok(Some(mut spec)) if spec.deletion.is_none() => {
                spec.deletion = Some(outpost_sync::schema::Deletion {
                    requested_at: Timestamp::now().to_string(),
                    grace_period_seconds: 0,
                });
                if let Err(e) = engine.put(&doc, &spec) {
                    warn!(%doc, error = %e, "cannot mark a deleted pod");
                }
            }
            Ok(_) => {}
            Err(e) => warn!(%doc, error = %e, "unreadable pod-spec document"),
        }
        // Already terminated at the edge (a graceful deletion): the
        // documents can go now; otherwise when the edge says so.
        if let Some(status) = doc
            .as_str()
            .strip_prefix(DocKind::PodSpec.as_str())
            .and_then(|rest| {
                format!("{}{rest}", DocKind::PodStatus.as_str())
                    .parse::<DocId>()
                    .ok()
            })
        {
            self.statuses.written.remove(&status);
            self.forget_terminated(&status);
        }
    }

    /// Queues every pod-status document not written as it is now.
    fn project_all_statuses(&mut self) {
        let prefix = format!("{}/", DocKind::PodStatus.as_str());
        let written = &self.statuses.written;
        let changed: Vec<DocId> = self.bridge.engine.with_replica(|r| {
            r.scan_prefix(&prefix)
                .filter_map(Result::ok)
                .filter(|(doc, entry)| {
                    written.get(doc).map(|(v, _)| *v) != Some(doc_version(entry))
                })
                .map(|(doc, _)| doc)
                .collect()
        });
        for doc in changed {
            self.statuses.push(doc);
        }
    }

    /// Starts queued pod status writes while there is room: up to
    /// [`BridgeConfig::pod_status_writes_in_flight`], or one while node
    /// projections wait for a slot.
    async fn start_statuses(&mut self) {
        let limit = if *self.bridge.nodes_waiting.borrow() {
            1
        } else {
            self.bridge.config.pod_status_writes_in_flight.max(1)
        };
        let mut looked = 0;
        while self.statuses.running.len() < limit {
            let Some(doc) = self.statuses.order.pop_front() else {
                return;
            };
            self.statuses.queued.remove(&doc);
            self.project_status(doc).await;
            looked += 1;
            if looked % STATUS_BATCH == 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Writes a pod-status document to its Pod's status (in a task of its
    /// own); unless it is what was last written, in which case only the
    /// pod's deletion is finished if the edge reports it terminated.
    async fn project_status(&mut self, doc: DocId) {
        let parts: Vec<&str> = doc.as_str().split('/').collect();
        let [_, node, ns, name, uid] = parts[..] else {
            debug!(%doc, "pod-status document id has an unexpected shape");
            return;
        };
        if !self.managed(node) {
            return;
        }
        let pod = self.pods.get(&ObjectRef::new(name).within(ns));
        if pod.as_ref().and_then(|p| p.metadata.uid.as_deref()) != Some(uid) {
            // The Pod left the API: once its edge reports it terminated, its
            // spec document goes too (the edge then drops the status).
            if self.pods_listed {
                self.forget_terminated(&doc);
            }
            return;
        }
        let Some(pod) = pod else { return };
        let Some(key) = PodKey::of(&pod) else { return };
        if key.uid != uid || key.node != node || !self.managed(node) {
            return;
        }
        // The document, unless this version of it was written already.
        let written = self.statuses.written.get(&doc).copied();
        let read = self.bridge.engine.with_replica(|r| {
            let Some(entry) = r.entry(&doc)? else {
                return Ok(None);
            };
            let version = doc_version(&entry);
            match written {
                Some((v, terminated)) if v == version => Ok(Some((version, Err(terminated)))),
                _ => Ok(r.get::<PodStatusDoc>(&doc)?.map(|s| (version, Ok(s)))),
            }
        });
        let (version, status) = match read {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err::<_, outpost_sync::replica::ReplicaError>(e) => {
                warn!(%doc, error = %e, "unreadable pod-status document");
                return;
            }
        };
        let status = match status {
            Ok(status) => status,
            Err(terminated) => {
                if terminated {
                    self.finish_deletion(&pod).await;
                }
                return;
            }
        };
        let patch = project::pod_status_patch(ns, name, &status);
        let api: Api<Pod> = Api::namespaced(self.bridge.client.clone(), ns);
        let params = self.bridge.apply_params();
        let name = name.to_owned();
        self.statuses.inflight.insert(doc.clone());
        self.statuses.running.spawn(async move {
            let outcome = match api
                .patch_status(&name, &params, &Patch::Apply(&patch))
                .await
            {
                Ok(_) => {
                    debug!(%doc, phase = %status.phase, "pod status written");
                    StatusOutcome::Written
                }
                Err(e) if admission::is_status(&e, 404) => StatusOutcome::Gone,
                Err(e) => {
                    warn!(%doc, error = %e, "cannot write pod status; retrying");
                    StatusOutcome::Failed
                }
            };
            StatusDone {
                doc,
                pod,
                version,
                terminated: status.terminated,
                outcome,
            }
        });
    }

    /// A pod status write ended: remembers it, retries a failure, finishes
    /// the pod's deletion if the edge reports it terminated.
    async fn status_written(&mut self, done: StatusDone) {
        let StatusDone {
            doc,
            pod,
            version,
            terminated,
            outcome,
        } = done;
        self.statuses.inflight.remove(&doc);
        match outcome {
            StatusOutcome::Written => {
                self.statuses
                    .written
                    .insert(doc.clone(), (version, terminated));
                if terminated {
                    self.finish_deletion(&pod).await;
                }
            }
            StatusOutcome::Gone => {}
            StatusOutcome::Failed => retry(
                &self.retry_tx,
                PodRetry::Status(doc.clone()),
                self.bridge.config.retry_after,
            ),
        }
        if self.statuses.again.remove(&doc) {
            self.statuses.push(doc);
        }
    }

    /// Deletes the pod-spec document of a pod gone from the API whose
    /// pod-status document says terminated.
    fn forget_terminated(&self, status_doc: &DocId) {
        let engine = &self.bridge.engine;
        let terminated = matches!(
            engine.with_replica(|r| r.get::<PodStatusDoc>(status_doc)),
            Ok(Some(s)) if s.terminated
        );
        if !terminated {
            return;
        }
        let Some(spec_doc) = status_doc
            .as_str()
            .strip_prefix(DocKind::PodStatus.as_str())
            .and_then(|rest| {
                format!("{}{rest}", DocKind::PodSpec.as_str())
                    .parse::<DocId>()
                    .ok()
            })
        else {
            return;
        };
        match engine.delete(&spec_doc) {
            Ok(true) => {
                debug!(doc = %spec_doc, "terminated pod gone from the API: spec document deleted")
            }
            Ok(false) => {}
            Err(e) => {
                warn!(doc = %spec_doc, error = %e, "cannot delete a finished pod's spec document")
            }
        }
    }

    /// Deletes a pod for good (grace period 0, as the kubelet does) once it
    /// is being deleted and its edge reported it terminated.
    async fn finish_deletion(&mut self, pod: &Pod) {
        if pod.metadata.deletion_timestamp.is_none() {
            return;
        }
        let Some(key) = PodKey::of(pod) else { return };
        if !self.managed(&key.node) {
            return;
        }
        let Ok(doc) = key.status_doc() else { return };
        let terminated = matches!(
            self.bridge.engine.with_replica(|r| r.get::<PodStatusDoc>(&doc)),
            Ok(Some(s)) if s.terminated && s.uid == key.uid
        );
        if !terminated {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.bridge.client.clone(), &key.namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(key.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&key.name, &params).await {
            Ok(_) => {
                info!(pod = %format!("{}/{}", key.namespace, key.name), "pod terminated at the edge; deleted")
            }
            Err(e) if admission::is_status(&e, 404) || admission::is_status(&e, 409) => {}
            Err(e) => {
                warn!(pod = %key.name, error = %e, "cannot delete terminated pod; retrying");
                retry(
                    &self.retry_tx,
                    PodRetry::Status(doc),
                    self.bridge.config.retry_after,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(label: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "ns", "uid": "u1",
                "labels": {"app": label},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"big\": true}",
                    "team": "a"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-1", "uid": "r1"}]
            },
            "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "img"}]},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod")
    }

    #[test]
    fn a_slimmed_pod_projects_as_the_full_one() {
        let full = pod("web", "Running");
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert!(slim.metadata.managed_fields.is_none());
        assert!(slim.status.is_none());
        let annotations = slim.metadata.annotations.as_ref().expect("annotations");
        assert_eq!(annotations.len(), 1, "{annotations:?}");
        let (a, b) = (
            project::pod_spec_doc(&full).expect("full"),
            project::pod_spec_doc(&slim).expect("slim"),
        );
        assert_eq!(
            serde_json::to_value(a).expect("json"),
            serde_json::to_value(b).expect("json")
        );
    }

    #[test]
    fn a_status_change_needs_no_projection_a_label_does() {
        let (a, b, c) = (
            pod("web", "Pending"),
            pod("web", "Running"),
            pod("api", "Pending"),
        );
        assert_eq!(projection_digest(&a), projection_digest(&b));
        assert_ne!(projection_digest(&a), projection_digest(&c));
    }

    #[test]
    fn a_projected_pod_is_kept_with_its_node_only() {
        let full = pod("web", "Running");
        assert!(has_spec(&full));
        let kept = without_spec(full.clone());
        assert!(!has_spec(&kept));
        let key = PodKey::of(&kept).expect("still bound");
        assert_eq!((key.node.as_str(), key.uid.as_str()), ("edge-1", "u1"));
        assert_eq!(kept.metadata, full.metadata);
    }

    #[test]
    fn a_renewal_that_waited_does_not_stretch_the_heartbeat_period() {
        // Heartbeats every 2 s; one renewal waited 12 s (a storm).
        let period = next_period_ms(2_000, 12_000);
        assert_eq!(period, 2_250);
        // Back to 2 s at the next renewal on time.
        assert_eq!(next_period_ms(period, 2_000), 2_000);
        // An edge that moved to 10 s heartbeats is followed.
        let mut p = 2_000;
        for _ in 0..20 {
            p = next_period_ms(p, 10_000);
        }
        assert_eq!(p, 10_000);
        assert_eq!(next_period_ms(0, 10_000), 10_000);
    }

    #[test]
    fn a_slimmed_node_keeps_its_ready_condition() {
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "edge-1", "uid": "n1", "labels": {"a": "b"},
                         "managedFields": [{"manager": "x"}]},
            "status": {
                "conditions": [{"type": "MemoryPressure", "status": "False"},
                               {"type": "Ready", "status": "Unknown"}],
                "nodeInfo": {"machineID": "m", "systemUUID": "", "bootID": "b",
                             "kernelVersion": "k", "osImage": "o",
                             "containerRuntimeVersion": "c", "kubeletVersion": "v",
                             "kubeProxyVersion": "", "operatingSystem": "linux",
                             "architecture": "amd64"}
            }
        }))
        .expect("node");
        slim_node(&mut node);
        assert_eq!(node.metadata.name.as_deref(), Some("edge-1"));
        assert!(node.metadata.labels.is_none() && node.metadata.managed_fields.is_none());
        let status = node.status.expect("status");
        assert!(status.node_info.is_none());
        let conditions = status.conditions.expect("conditions");
        assert_eq!(conditions.len(), 1);
        assert_eq!(
            (conditions[0].type_.as_str(), conditions[0].status.as_str()),
            ("Ready", "Unknown")
        );
    }

    #[test]
    fn a_slimmed_secret_and_configmap_project_as_the_full_ones() {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "ns", "labels": {"a": "b"},
                         "managedFields": [{"manager": "x"}]},
            "type": "Opaque", "data": {"k": "dg=="}
        }))
        .expect("secret");
        let mut slim = secret.clone();
        slim_secret(&mut slim);
        assert!(slim.metadata.labels.is_none());
        assert_eq!(project::secret_doc(&slim), project::secret_doc(&secret));
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "ns", "annotations": {"a": "b"}},
            "data": {"k": "v"}, "binaryData": {"b": "dg=="}
        }))
        .expect("configmap");
        let mut slim = cm.clone();
        slim_configmap(&mut slim);
        assert!(slim.metadata.annotations.is_none());
        assert_eq!(project::configmap_doc(&slim), project::configmap_doc(&cm));
    }
}
