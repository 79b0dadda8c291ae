//! Several bridge replicas splitting the admitted nodes with Leases.
//!
//! Replicas of one bridge form a *group* ([`ShardConfig::group`], by
//! default `outpost-cloud`). Each replica keeps a membership Lease,
//! `<group>.replica.<id>` in [`SYSTEM_NAMESPACE`], renewed every third of
//! [`ShardConfig::lease_duration_s`] and annotated with its sync key (and
//! address), and each admitted node has one node Lease per group,
//! `<group>.node.<node>`, held by the replica that writes that node's
//! objects to the API (the Node and its
//! status, its `kube-node-lease` Lease, pod statuses and deletions,
//! pod-spec, configmap, secret and device documents, device twins).
//!
//! Every replica keeps the whole replicated state: it trusts the other
//! replicas of its group as clouds, accepts sessions from every admitted
//! edge, and is told the other replicas' keys ([`crate::Bridge::replicas`])
//! so that its process can open sync sessions to them. Only the holder of a
//! node's Lease writes that node's objects.
//!
//! Who should hold a node is decided by rendezvous hashing of the node over
//! the live replicas (those whose membership Lease changed within its
//! duration), so every replica reaches the same answer and a replica that
//! joins or leaves moves only its share of nodes. A holder that is not the
//! chosen replica any more releases the Lease; a free Lease is taken by the
//! chosen replica, an expired one (unchanged for its duration, as this
//! replica observed it: clocks of replicas need not agree) too, and by any
//! replica once it has been expired for another duration (the chosen one
//! may be unable to take it). Writes go through `resourceVersion`, so two
//! replicas racing for one Lease cannot both win. A replica that cannot
//! renew its Leases for their duration stops writing those nodes.
//!
//! A dead replica's nodes are therefore taken over within about one lease
//! duration and a third; a restarted replica keeps its id (derived from its
//! key, in its data dir) and renews its own Leases at once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use outpost_sync::PeerId;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::admission::{self, PEER_KEY_ANNOTATION, SYSTEM_NAMESPACE};
use crate::bridge::{Bridge, BridgeError, Edges, Replicas, reflect, slim};

/// Label on the bridge's Leases: `replica` (membership) or `node`.
pub const LEASE_KIND_LABEL: &str = "outpost.io/bridge-lease";
/// Label on the bridge's Leases: the group of replicas they belong to.
pub const GROUP_LABEL: &str = "outpost.io/bridge-group";
/// Annotation on membership Leases: the replica's sync address
/// (`ip:port`), where the other replicas open sessions to it.
pub const PEER_ADDR_ANNOTATION: &str = "outpost.io/peer-addr";

/// How the replicas of a group split the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// The group: replicas with the same group split the nodes between
    /// them (a label value: lowercase letters, digits, `-`, `.`).
    pub group: String,
    /// This replica's id: the holder identity of its Leases. Unique in the
    /// group and stable across restarts of the same data dir.
    pub replica_id: String,
    /// `leaseDurationSeconds` of the membership and node Leases; renewed
    /// every third of it.
    pub lease_duration_s: i32,
    /// The sync address the other replicas reach this one at, if any.
    pub advertise: Option<std::net::SocketAddr>,
}

impl ShardConfig {
    /// The default group's settings for the replica whose sync key is
    /// `key` (its id: the first 16 hex digits of the key).
    pub fn for_key(key: &PeerId) -> Self {
        Self {
            group: "outpost-cloud".into(),
            replica_id: default_replica_id(key),
            lease_duration_s: 15,
            advertise: None,
        }
    }

    /// Checks the group, id and duration.
    pub fn validate(&self) -> Result<(), String> {
        admission::validate_node_name(&self.group)
            .map_err(|e| format!("invalid group {:?}: {e}", self.group))?;
        admission::validate_node_name(&self.replica_id)
            .map_err(|e| format!("invalid replica id {:?}: {e}", self.replica_id))?;
        if self.lease_duration_s < 3 {
            return Err("the shard lease duration must be at least 3 seconds".into());
        }
        Ok(())
    }

    fn duration(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.lease_duration_s.max(3)).unwrap_or(3))
    }
}

/// A replica id derived from its sync key: stable for a data dir.
pub fn default_replica_id(key: &PeerId) -> String {
    key.to_string().chars().take(16).collect()
}

/// The name of the Lease that says which replica of `group` writes
/// `node`.
pub fn node_lease_name(group: &str, node: &str) -> String {
    format!("{group}.node.{node}")
}

/// The name of a replica's membership Lease in `group`.
pub fn replica_lease_name(group: &str, replica_id: &str) -> String {
    format!("{group}.replica.{replica_id}")
}

/// The replica that should hold `node` among `replicas`: the highest
/// rendezvous hash (the same answer on every replica that sees the same
/// members).
pub fn chosen<'a>(node: &str, replicas: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    replicas.into_iter().max_by_key(|r| {
        let mut h = blake3::Hasher::new();
        h.update(node.as_bytes());
        h.update(&[0]);
        h.update(r.as_bytes());
        *h.finalize().as_bytes()
    })
}

/// What a replica does with one node's Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet and this replica is chosen: create it, held.
    Create,
    /// Held here and this replica is still chosen: renew.
    Renew,
    /// Held here but another live replica is chosen: let it go.
    Release,
    /// Free or expired, and this replica may take it.
    Acquire,
    /// Someone else's, or not this replica's to take.
    Wait,
}

/// A node Lease as one replica sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// Its holder; `None` when released.
    pub holder: Option<&'a str>,
    /// How long since this replica saw it change.
    pub unchanged_for: Duration,
}

/// Decides one node Lease for replica `me`, given the replica `chosen` for
/// the node and the Lease as seen (`None`: no Lease).
pub fn step(me: &str, chosen: &str, lease: Option<Seen<'_>>, duration: Duration) -> Step {
    let Some(lease) = lease else {
        return if chosen == me {
            Step::Create
        } else {
            Step::Wait
        };
    };
    match lease.holder {
        Some(holder) if holder == me => {
            if chosen == me {
                Step::Renew
            } else {
                Step::Release
            }
        }
        Some(_) if lease.unchanged_for < duration => Step::Wait,
        // Free, or expired.
        _ => {
            let grace = if lease.holder.is_none() {
                Duration::ZERO
            } else {
                duration
            };
            if chosen == me || lease.unchanged_for >= grace + duration {
                Step::Acquire
            } else {
                Step::Wait
            }
        }
    }
}

/// When this replica last saw each Lease change (by resourceVersion).
#[derive(Default)]
struct Observed(HashMap<String, (String, Instant)>);

impl Observed {
    fn update(&mut self, leases: &[std::sync::Arc<Lease>], now: Instant) {
        let mut seen = HashMap::with_capacity(leases.len());
        for lease in leases {
            let (Some(name), Some(rv)) = (&lease.metadata.name, &lease.metadata.resource_version)
            else {
                continue;
            };
            let at = match self.0.get(name) {
                Some((old, at)) if old == rv => *at,
                _ => now,
            };
            seen.insert(name.clone(), (rv.clone(), at));
        }
        self.0 = seen;
    }

    fn unchanged_for(&self, name: &str, now: Instant) -> Duration {
        self.0
            .get(name)
            .map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at))
    }
}

fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

struct ShardLoop {
    bridge: Bridge,
    config: ShardConfig,
    api: Api<Lease>,
    store: Store<Lease>,
    observed: Observed,
    /// Nodes held, with when this replica last renewed each.
    held: BTreeMap<String, Instant>,
    /// When the membership Lease was last renewed.
    member_renewed: Option<Instant>,
}

/// Runs the shard loop of `bridge`: keeps its membership Lease, takes,
/// renews and releases node Leases, and publishes the nodes held and the
/// other replicas.
pub(crate) async fn run(bridge: Bridge, config: ShardConfig) -> Result<(), BridgeError> {
    let api: Api<Lease> = Api::namespaced(bridge.client.clone(), SYSTEM_NAMESPACE);
    let (store, mut events) = reflect(
        api.clone(),
        watcher::Config::default().labels(&format!("{GROUP_LABEL}={}", config.group)),
        slim,
    );
    let mut shard = ShardLoop {
        bridge,
        config,
        api,
        store,
        observed: Observed::default(),
        held: BTreeMap::new(),
        member_renewed: None,
    };
    info!(group = %shard.config.group, replica = %shard.config.replica_id, lease_duration_s = shard.config.lease_duration_s, "splitting nodes with the group's replicas");
    let mut edges_rx = shard.bridge.edges();
    let mut listed = false;
    let period = shard.config.duration() / 3;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::InitDone)) => {
                    listed = true;
                    shard.tick().await;
                }
                Some(Ok(watcher::Event::Apply(lease))) if listed => {
                    // A node Lease let go: the chosen replica takes it now.
                    let released = lease.labels().get(LEASE_KIND_LABEL).map(String::as_str) == Some("node")
                        && holder(&lease).is_none();
                    if released {
                        shard.tick().await;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => warn!(error = %e, "bridge lease watch failed; retrying"),
                None => return Err(BridgeError::Ended("the bridge lease watch")),
            },
            changed = edges_rx.changed() => {
                if changed.is_err() {
                    return Err(BridgeError::Ended("the admission loop"));
                }
                edges_rx.borrow_and_update();
                if listed {
                    shard.tick().await;
                }
            }
            _ = tick.tick() => {
                if listed {
                    shard.tick().await;
                }
            }
        }
    }
}

impl ShardLoop {
    fn me(&self) -> &str {
        &self.config.replica_id
    }

    fn lease(&self, name: &str) -> Option<std::sync::Arc<Lease>> {
        self.store
            .get(&ObjectRef::new(name).within(SYSTEM_NAMESPACE))
    }

    async fn tick(&mut self) {
        let now = Instant::now();
        let duration = self.config.duration();
        // Ticks also come from events (admissions, released Leases): a
        // Lease is written only once half a renewal period has passed.
        let due = |renewed: Option<&Instant>| {
            renewed.is_none_or(|t| now.saturating_duration_since(*t) >= duration / 6)
        };
        self.observed.update(&self.store.state(), now);
        if due(self.member_renewed.as_ref()) && self.renew_membership().await {
            self.member_renewed = Some(now);
        }

        // Live replicas of the group, this one included.
        let mut members: BTreeMap<String, Option<(PeerId, Option<std::net::SocketAddr>)>> =
            BTreeMap::new();
        for lease in self.store.state() {
            if lease.labels().get(LEASE_KIND_LABEL).map(String::as_str) != Some("replica") {
                continue;
            }
            let Some(id) = holder(&lease) else { continue };
            if self.observed.unchanged_for(&lease.name_any(), now) >= duration {
                continue;
            }
            let key = lease
                .annotations()
                .get(PEER_KEY_ANNOTATION)
                .and_then(|k| admission::parse_key(k));
            let addr = lease
                .annotations()
                .get(PEER_ADDR_ANNOTATION)
                .and_then(|a| a.parse().ok());
            members.insert(id.to_owned(), key.map(|k| (k, addr)));
        }
        members.insert(self.me().to_owned(), None);
        let replicas: Replicas = members
            .iter()
            .filter(|(id, _)| *id != self.me())
            .filter_map(|(_, key)| *key)
            .filter(|(key, _)| *key != self.bridge.engine.me())
            .collect();
        if *self.bridge.replicas.borrow() != replicas {
            info!(replicas = members.len(), "replicas of the group changed");
            self.bridge.replicas.send_replace(replicas);
            self.bridge.update_roster();
        }

        let edges = self.bridge.edges.borrow().clone();
        for node in edges.keys() {
            let name = node_lease_name(&self.config.group, node);
            let lease = self.lease(&name);
            let Some(chosen) = chosen(node, members.keys().map(String::as_str)) else {
                continue;
            };
            let seen = lease.as_deref().map(|l| Seen {
                holder: holder(l),
                unchanged_for: self.observed.unchanged_for(&name, now),
            });
            let step = step(self.me(), chosen, seen, duration);
            debug!(%node, %chosen, ?step, holder = ?seen.and_then(|s| s.holder), "node lease");
            let ok = match (step, lease) {
                (Step::Create, _) => self.create(node).await,
                (Step::Renew, Some(_)) if !due(self.held.get(node)) => continue,
                (Step::Renew | Step::Acquire, Some(lease)) => {
                    self.write(node, &lease, Some(self.me().to_owned())).await
                }
                (Step::Release, Some(lease)) => {
                    self.held.remove(node);
                    if self.write(node, &lease, None).await {
                        info!(%node, to = %chosen, "node lease released");
                    }
                    false
                }
                _ => false,
            };
            if ok {
                if !self.held.contains_key(node) {
                    info!(%node, replica = %self.me(), "node lease taken");
                }
                self.held.insert(node.clone(), Instant::now());
            } else if matches!(step, Step::Wait) {
                self.held.remove(node);
            }
        }
        // Revoked nodes: their Leases go.
        let revoked: Vec<String> = self
            .held
            .keys()
            .filter(|n| !edges.contains_key(*n))
            .cloned()
            .collect();
        for node in revoked {
            self.held.remove(&node);
            self.delete(&node).await;
        }
        // A node whose Lease could not be renewed for its duration is no
        // longer this replica's to write.
        self.held
            .retain(|_, renewed| now.saturating_duration_since(*renewed) < duration);
        let held: Edges = edges
            .into_iter()
            .filter(|(node, _)| self.held.contains_key(node))
            .collect();
        if *self.bridge.held.borrow() != held {
            debug!(nodes = held.len(), "nodes held");
            self.bridge.held.send_replace(held);
        }
    }

    async fn renew_membership(&self) -> bool {
        let name = replica_lease_name(&self.config.group, self.me());
        let mut annotations =
            serde_json::json!({PEER_KEY_ANNOTATION: self.bridge.engine.me().to_string()});
        if let Some(addr) = self.config.advertise {
            annotations[PEER_ADDR_ANNOTATION] = addr.to_string().into();
        }
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": SYSTEM_NAMESPACE,
                "labels": {LEASE_KIND_LABEL: "replica", GROUP_LABEL: self.config.group},
                "annotations": annotations,
            },
            "spec": {
                "holderIdentity": self.me(),
                "leaseDurationSeconds": self.config.lease_duration_s,
                "renewTime": MicroTime(Timestamp::now()),
            },
        });
        match self
            .api
            .patch(&name, &self.bridge.apply_params(), &Patch::Apply(&lease))
            .await
        {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "cannot renew this replica's membership lease");
                false
            }
        }
    }

    fn spec(&self, holder: Option<String>, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let same = holder.is_some() && previous.and_then(|p| p.holder_identity.clone()) == holder;
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            acquire_time: if same {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                holder.as_ref().map(|_| now.clone())
            },
            holder_identity: holder.clone(),
            lease_duration_seconds: Some(self.config.lease_duration_s),
            lease_transitions: Some(if same || holder.is_none() {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            renew_time: holder.map(|_| now),
            ..LeaseSpec::default()
        }
    }

    async fn create(&self, node: &str) -> bool {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node_lease_name(&self.config.group, node)),
                namespace: Some(SYSTEM_NAMESPACE.into()),
                labels: Some(
                    [
                        (LEASE_KIND_LABEL.to_owned(), "node".to_owned()),
                        (GROUP_LABEL.to_owned(), self.config.group.clone()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(Some(self.me().to_owned()), None)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => true,
            Err(e) if admission::is_status(&e, 409) => false, // raced: seen next tick
            Err(e) => {
                warn!(%node, error = %e, "cannot create the node lease");
                false
            }
        }
    }

    /// Replaces a node Lease guarded by its resourceVersion.
    async fn write(&self, node: &str, lease: &Lease, holder: Option<String>) -> bool {
        let mut next = lease.clone();
        next.spec = Some(self.spec(holder, lease.spec.as_ref()));
        if let Some(labels) = next.metadata.labels.as_mut() {
            labels.insert(GROUP_LABEL.to_owned(), self.config.group.clone());
        }
        next.metadata.managed_fields = None;
        match self
            .api
            .replace(
                &node_lease_name(&self.config.group, node),
                &PostParams::default(),
                &next,
            )
            .await
        {
            Ok(_) => true,
            Err(e) if admission::is_status(&e, 409) => {
                debug!(%node, "node lease changed meanwhile; seen next tick");
                false
            }
            Err(e) => {
                warn!(%node, error = %e, "cannot write the node lease");
                false
            }
        }
    }

    async fn delete(&self, node: &str) {
        let name = node_lease_name(&self.config.group, node);
        let Some(lease) = self.lease(&name) else {
            return;
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(&name, &params).await {
            Ok(_) => info!(%node, "admission revoked; node lease deleted"),
            Err(e) if admission::is_status(&e, 404) || admission::is_status(&e, 409) => {}
            Err(e) => warn!(%node, error = %e, "cannot delete the node lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn seen(holder: Option<&str>, secs: u64) -> Option<Seen<'_>> {
        Some(Seen {
            holder,
            unchanged_for: Duration::from_secs(secs),
        })
    }

    #[test]
    fn the_chosen_replica_creates_renews_and_takes_free_or_expired_leases() {
        assert_eq!(step("a", "a", None, D), Step::Create);
        assert_eq!(step("a", "b", None, D), Step::Wait);
        assert_eq!(step("a", "a", seen(Some("a"), 5), D), Step::Renew);
        assert_eq!(step("a", "b", seen(Some("a"), 5), D), Step::Release);
        assert_eq!(step("a", "a", seen(None, 0), D), Step::Acquire);
        assert_eq!(step("a", "b", seen(None, 0), D), Step::Wait);
        assert_eq!(step("a", "a", seen(Some("b"), 14), D), Step::Wait);
        assert_eq!(step("a", "a", seen(Some("b"), 15), D), Step::Acquire);
        // Not chosen: only once expired for another duration.
        assert_eq!(step("a", "c", seen(Some("b"), 20), D), Step::Wait);
        assert_eq!(step("a", "c", seen(Some("b"), 30), D), Step::Acquire);
        assert_eq!(step("a", "c", seen(None, 15), D), Step::Acquire);
    }

    #[test]
    fn rendezvous_hashing_moves_only_the_share_of_a_leaving_replica() {
        let nodes: Vec<String> = (0..200).map(|i| format!("edge-{i}")).collect();
        let three = ["r1", "r2", "r3"];
        let two = ["r1", "r2"];
        let mut counts = HashMap::new();
        for node in &nodes {
            let before = chosen(node, three).unwrap();
            *counts.entry(before).or_insert(0) += 1;
            let after = chosen(node, two).unwrap();
            if before != "r3" {
                assert_eq!(before, after, "{node} moved though its replica stayed");
            }
        }
        for r in three {
            assert!(counts[r] > 40, "{counts:?}");
        }
        assert_eq!(chosen("edge-1", std::iter::empty()), None);
    }
}
