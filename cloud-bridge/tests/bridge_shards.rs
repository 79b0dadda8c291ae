//! Two bridge replicas of one group against the real API server of
//! `scripts/env up`, splitting four admitted nodes with Leases. Every edge
//! (a real sync engine) has a session with both replicas, and the replicas
//! with each other, over the in-memory transport: each replica holds the
//! whole state, and only the holder of a node's Lease writes that node's
//! objects. Stopping one replica (its task aborted, its sessions cut, as a
//! kill would) makes the other take its nodes over within the lease
//! duration; the Nodes stay Ready and a Pod bound to a taken-over node
//! reaches its edge and reports back through the survivor.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use outpost_cloud_bridge::admission::{self, SYSTEM_NAMESPACE};
use outpost_cloud_bridge::metrics::NodeLabel;
use outpost_cloud_bridge::shard::{self, ShardConfig};
use outpost_cloud_bridge::{Bridge, BridgeConfig, project};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{Condition, NodeStatusDoc, PodSpecDoc, PodStatusDoc};
use outpost_sync::test_utils::unique_name;
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, MemoryLink, connect};
use serde_json::json;
use support::{client, new_key, now_ms, until};
use tokio::time::Instant;

const LEASE_S: i32 = 6;

fn engine(me: PeerId, roster: Roster) -> Engine {
    let dir = std::env::temp_dir().join(unique_name("outpost-shards-test"));
    let replica = Replica::open(&dir, me, ReplicaOptions::default()).unwrap();
    Engine::new(replica, roster, SyncMetrics::default())
}

/// One replica of the group, running in the background.
struct BridgeReplica {
    id: String,
    bridge: Bridge,
    engine: Engine,
    task: tokio::task::JoinHandle<()>,
}

impl BridgeReplica {
    fn start(client: &Client, group: &str, id: &str) -> Self {
        let engine = engine(new_key(), Roster::new());
        let bridge = Bridge::new(
            client.clone(),
            engine.clone(),
            BridgeConfig {
                field_manager: format!("outpost-cloud-{id}"),
                retry_after: Duration::from_millis(200),
                shards: Some(ShardConfig {
                    group: group.into(),
                    replica_id: id.into(),
                    lease_duration_s: LEASE_S,
                    advertise: None,
                }),
                ..BridgeConfig::default()
            },
        );
        let run = bridge.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = run.run().await {
                panic!("bridge stopped: {e}");
            }
        });
        Self {
            id: id.into(),
            bridge,
            engine,
            task,
        }
    }

    /// The nodes of `among` this replica holds (the group manages every
    /// admitted node of the cluster, other tests' too).
    fn held_of(&self, among: &BTreeSet<String>) -> BTreeSet<String> {
        self.bridge
            .held()
            .borrow()
            .keys()
            .filter(|n| among.contains(*n))
            .cloned()
            .collect()
    }

    /// This replica's last Lease renewal for `node` (its metric).
    fn renewed(&self, node: &str) -> f64 {
        self.bridge
            .metrics()
            .edge_heartbeat_timestamp_seconds
            .get_or_create(&NodeLabel {
                node: node.to_owned(),
            })
            .get()
    }
}

impl Drop for BridgeReplica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn node_status() -> NodeStatusDoc {
    NodeStatusDoc {
        heartbeat_ms: now_ms(),
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: "True".into(),
            reason: Some("EdgeReady".into()),
            message: Some("the edge agent runs".into()),
            last_transition_time: Some("2030-01-01T00:00:00Z".into()),
        }],
        capacity: [("cpu", "2"), ("memory", "4Gi"), ("pods", "110")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn ready_status(node: Option<&Node>) -> Option<String> {
    node?
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// One admitted edge with sessions to both replicas and a heartbeat.
struct Edge {
    node: String,
    token_id: String,
    engine: Engine,
    links: Vec<Option<MemoryLink>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

#[tokio::test]
async fn two_replicas_split_the_nodes_and_the_survivor_takes_over_a_dead_ones() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let client = client().await;
    let group = unique_name("shards");
    let ns = unique_name("shards");
    let replicas = [
        BridgeReplica::start(&client, &group, &format!("{group}-a")),
        BridgeReplica::start(&client, &group, &format!("{group}-b")),
    ];
    // The replicas find each other through their membership Leases, trust
    // each other and keep a session (outpost-cloud dials the replicas that
    // advertise an address; here, the in-memory transport).
    for (r, other) in [(&replicas[0], &replicas[1]), (&replicas[1], &replicas[0])] {
        let mut rx = r.bridge.replicas();
        let key = other.engine.me();
        tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|m| m.contains_key(&key)),
        )
        .await
        .expect("the replicas see each other")
        .unwrap();
    }
    let mut replica_link = Some(connect(
        &replicas[0].engine,
        &replicas[1].engine,
        DEFAULT_LINK_BUFFER,
    ));

    let mut edges = Vec::new();
    for i in 0..4 {
        let node = unique_name(&format!("shard{i}"));
        let issued = admission::create_token(&client, &node, None, Duration::from_secs(3600))
            .await
            .unwrap();
        let key = new_key();
        admission::admit(&client, &issued.token.to_string(), key)
            .await
            .unwrap();
        for r in &replicas {
            let mut rx = r.bridge.edges();
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|e| e.contains_key(&node)),
            )
            .await
            .expect("admitted in time")
            .unwrap();
        }
        let mut roster = Roster::new();
        for r in &replicas {
            roster.insert(r.engine.me(), Role::Cloud);
        }
        roster.insert(
            key,
            Role::Edge {
                node: node.clone(),
                site: None,
            },
        );
        let engine = engine(key, roster);
        let links = replicas
            .iter()
            .map(|r| Some(connect(&engine, &r.engine, DEFAULT_LINK_BUFFER)))
            .collect();
        let heartbeat = {
            let (engine, doc) = (engine.clone(), project::node_status_id(&node).unwrap());
            tokio::spawn(async move {
                loop {
                    engine.put(&doc, &node_status()).unwrap();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        };
        edges.push(Edge {
            node,
            token_id: issued.token.id().to_owned(),
            engine,
            links,
            heartbeat,
        });
    }
    let all: BTreeSet<String> = edges.iter().map(|e| e.node.clone()).collect();

    // Every node held by exactly one replica, as its Lease says.
    let started = Instant::now();
    let shard_leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    until(
        "the nodes split between the replicas",
        Duration::from_secs(30),
        async || {
            let (a, b) = (replicas[0].held_of(&all), replicas[1].held_of(&all));
            (a.is_disjoint(&b) && a.union(&b).cloned().collect::<BTreeSet<_>>() == all)
                .then_some(())
        },
    )
    .await;
    eprintln!("admitted to split: {:?}", started.elapsed());
    let nodes: Api<Node> = Api::all(client.clone());
    for edge in &edges {
        until(
            &format!("{} Ready", edge.node),
            Duration::from_secs(30),
            async || {
                let n = nodes.get_opt(&edge.node).await.unwrap();
                (ready_status(n.as_ref()).as_deref() == Some("True")).then_some(())
            },
        )
        .await;
        let lease = shard_leases
            .get(&shard::node_lease_name(&group, &edge.node))
            .await
            .unwrap();
        let holder = lease.spec.unwrap().holder_identity.unwrap();
        let held_by: Vec<&str> = replicas
            .iter()
            .filter(|r| r.held_of(&all).contains(&edge.node))
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(held_by, [holder.as_str()], "{}", edge.node);
    }
    let split: BTreeMap<String, BTreeSet<String>> = replicas
        .iter()
        .map(|r| (r.id.clone(), r.held_of(&all)))
        .collect();
    eprintln!("split: {split:?}");

    // Only the holder writes: over a few heartbeats, each node's Lease is
    // renewed by one replica only.
    let before: Vec<Vec<f64>> = replicas
        .iter()
        .map(|r| edges.iter().map(|e| r.renewed(&e.node)).collect())
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, edge) in edges.iter().enumerate() {
        let writers: Vec<&str> = replicas
            .iter()
            .enumerate()
            .filter(|(r, replica)| replica.renewed(&edge.node) > before[*r][i])
            .map(|(_, replica)| replica.id.as_str())
            .collect();
        let holder: Vec<&str> = replicas
            .iter()
            .filter(|r| r.held_of(&all).contains(&edge.node))
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(
            writers, holder,
            "{} is written by its holder only",
            edge.node
        );
    }

    // Stop the replica holding more nodes, as a kill would.
    let victim = if replicas[0].held_of(&all).len() >= replicas[1].held_of(&all).len() {
        0
    } else {
        1
    };
    let survivor = 1 - victim;
    let taken: BTreeSet<String> = replicas[victim].held_of(&all);
    assert!(!taken.is_empty());
    replicas[victim].task.abort();
    for edge in &mut edges {
        edge.links[victim].take();
    }
    replica_link.take();
    let stopped = Instant::now();
    let survivor_r = &replicas[survivor];
    until(
        "the survivor to hold every node",
        Duration::from_secs(LEASE_S as u64 * 4),
        async || (survivor_r.held_of(&all) == all).then_some(()),
    )
    .await;
    let takeover = stopped.elapsed();
    // Its first write of a taken-over node's Lease.
    let renewed_at: Vec<f64> = taken.iter().map(|n| survivor_r.renewed(n)).collect();
    until(
        "the survivor to renew the taken-over Leases",
        Duration::from_secs(10),
        async || {
            taken
                .iter()
                .zip(&renewed_at)
                .all(|(n, before)| survivor_r.renewed(n) > *before)
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "replica stopped to its {} nodes held by the survivor: {takeover:?}; to their Leases renewed: {:?} (shard lease {LEASE_S} s)",
        taken.len(),
        stopped.elapsed()
    );
    for node in &taken {
        let lease = shard_leases
            .get(&shard::node_lease_name(&group, node))
            .await
            .unwrap();
        assert_eq!(
            lease.spec.unwrap().holder_identity.as_deref(),
            Some(survivor_r.id.as_str())
        );
        let n = nodes.get(node).await.unwrap();
        assert_eq!(
            ready_status(Some(&n)).as_deref(),
            Some("True"),
            "{node} stays Ready"
        );
    }

    // A Pod bound to a taken-over node reaches its edge through the
    // survivor, and its status comes back.
    let node = taken.iter().next().unwrap().clone();
    let edge = edges.iter().find(|e| e.node == node).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "docker.io/outpost/busybox:1"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let uid = pod.metadata.uid.unwrap();
    let spec_doc = project::pod_spec_id(&node, &ns, "web", &uid).unwrap();
    until("the pod at the edge", Duration::from_secs(10), async || {
        edge.engine
            .with_replica(|r| r.get::<PodSpecDoc>(&spec_doc))
            .unwrap()
    })
    .await;
    edge.engine
        .put(
            &project::pod_status_id(&node, &ns, "web", &uid).unwrap(),
            &PodStatusDoc {
                uid: uid.clone(),
                phase: "Running".into(),
                ..Default::default()
            },
        )
        .unwrap();
    until(
        "the pod Running in the API",
        Duration::from_secs(10),
        async || {
            let p = pods.get("web").await.unwrap();
            (p.status?.phase.as_deref() == Some("Running")).then_some(())
        },
    )
    .await;

    // Cleanup.
    let dp = DeleteParams::default();
    let node_leases: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    drop(replicas);
    for edge in &edges {
        let _ = secrets
            .delete(&admission::token_secret_name(&edge.token_id), &dp)
            .await;
        let _ = nodes.delete(&edge.node, &dp).await;
        let _ = node_leases.delete(&edge.node, &dp).await;
        let _ = shard_leases
            .delete(&shard::node_lease_name(&group, &edge.node), &dp)
            .await;
    }
    for id in ["a", "b"] {
        let _ = shard_leases
            .delete(
                &shard::replica_lease_name(&group, &format!("{group}-{id}")),
                &dp,
            )
            .await;
    }
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &dp).await;
}
