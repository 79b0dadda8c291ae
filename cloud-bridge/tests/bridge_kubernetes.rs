//! The bridge against the real API server, controller manager and scheduler
//! of `scripts/env up`, with a real sync engine as the edge, joined to the
//! bridge's engine by the in-memory transport (the same session code as
//! over iroh).
//!
//! - admission: tokens refused when malformed, unknown, spent or expired;
//!   the join protocol over real iroh endpoints;
//! - an admitted edge becomes a Ready Node whose Lease follows heartbeats; a
//!   Pod scheduled to it (nodeSelector) reaches the edge with its ConfigMap
//!   and Secret, its status comes back, and its deletion waits for the edge;
//!   a Pod bound by spec.nodeName and force-deleted is stopped at the edge;
//! - a silent edge's Lease is no longer renewed and the node controller
//!   marks the Node NotReady.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use outpost_cloud_bridge::admission::{self, AdmitError, SYSTEM_NAMESPACE};
use outpost_cloud_bridge::join::{self, JOIN_ALPN, JoinReply};
use outpost_cloud_bridge::project;
use outpost_cloud_bridge::{Bridge, BridgeConfig};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{
    Condition, ContainerState, ContainerStatus, NodeAddress, NodeInfo, NodeStatusDoc, PodSpecDoc,
    PodStatusDoc, StateRunning,
};
use outpost_sync::test_utils::unique_name;
use outpost_sync::transport::iroh::PeerAddr;
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, connect};
use serde_json::json;
use support::{client, new_key, now_ms, until};
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);

fn engine(me: PeerId, roster: Roster) -> Engine {
    let dir = std::env::temp_dir().join(unique_name("outpost-bridge-test"));
    let replica = Replica::open(&dir, me, ReplicaOptions::default()).unwrap();
    Engine::new(replica, roster, SyncMetrics::default())
}

/// A bridge on its own engine, running in the background.
struct TestBridge {
    bridge: Bridge,
    engine: Engine,
    task: tokio::task::JoinHandle<()>,
}

impl TestBridge {
    fn start(client: &Client) -> Self {
        let engine = engine(new_key(), Roster::new());
        let bridge = Bridge::new(
            client.clone(),
            engine.clone(),
            BridgeConfig {
                retry_after: Duration::from_millis(200),
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
            bridge,
            engine,
            task,
        }
    }

    async fn until_admitted(&self, node: &str) {
        let mut edges = self.bridge.edges();
        tokio::time::timeout(
            Duration::from_secs(10),
            edges.wait_for(|e| e.contains_key(node)),
        )
        .await
        .expect("the bridge learns the admission in time")
        .unwrap();
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An edge engine that trusts `cloud` and is `node`.
fn edge(key: PeerId, node: &str, cloud: PeerId) -> Engine {
    let mut roster = Roster::new();
    roster.insert(cloud, Role::Cloud);
    roster.insert(
        key,
        Role::Edge {
            node: node.into(),
            site: None,
        },
    );
    engine(key, roster)
}

fn node_status(heartbeat_ms: u64) -> NodeStatusDoc {
    NodeStatusDoc {
        heartbeat_ms,
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
        allocatable: Default::default(),
        addresses: vec![NodeAddress {
            kind: "InternalIP".into(),
            address: "10.1.2.3".into(),
        }],
        node_info: NodeInfo {
            machine_id: "m1".into(),
            boot_id: "b1".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12".into(),
            container_runtime_version: "containerd://1.6.20".into(),
            kubelet_version: "outpost-edge/0.1.0".into(),
            operating_system: "linux".into(),
            architecture: "amd64".into(),
        },
    }
}

async fn await_api<K>(
    api: Api<K>,
    name: &str,
    what: &str,
    limit: Duration,
    cond: impl kube::runtime::wait::Condition<K>,
) -> Option<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::time::timeout(limit, await_condition(api, name, cond))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
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

fn renew_time(lease: Option<&Lease>) -> Option<k8s_openapi::jiff::Timestamp> {
    Some(lease?.spec.as_ref()?.renew_time.as_ref()?.0)
}

/// Removes what a test made in the shared API server.
async fn cleanup(client: &Client, node: &str, token_id: &str, ns: Option<&str>) {
    // The admission record first: every bridge running then lets the node go.
    let dp = DeleteParams::default();
    let _ = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .delete(&admission::token_secret_name(token_id), &dp)
        .await;
    let _ = Api::<Node>::all(client.clone()).delete(node, &dp).await;
    let _ = Api::<Lease>::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE)
        .delete(node, &dp)
        .await;
    if let Some(ns) = ns {
        let _ = Api::<Namespace>::all(client.clone()).delete(ns, &dp).await;
    }
}

#[tokio::test]
async fn tokens_admit_once_and_refuse_malformed_unknown_spent_and_expired() {
    let client = client().await;
    let node = unique_name("adm");
    let issued = admission::create_token(&client, &node, None, HOUR)
        .await
        .unwrap();
    let token = issued.token.to_string();

    // Only a hash of the secret is stored.
    let secret = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get(&admission::token_secret_name(issued.token.id()))
        .await
        .unwrap();
    let stored = serde_json::to_string(&secret).unwrap();
    assert!(!stored.contains(token.split_once('.').unwrap().1));

    let (first, second) = (new_key(), new_key());
    let admitted = admission::admit(&client, &token, first).await.unwrap();
    assert_eq!(
        (admitted.node.as_str(), admitted.key),
        (node.as_str(), first)
    );
    // A retry by the admitted key is answered again; another key is refused.
    assert_eq!(
        admission::admit(&client, &token, first).await.unwrap().key,
        first
    );
    let err = admission::admit(&client, &token, second).await.unwrap_err();
    assert!(matches!(err, AdmitError::Spent { .. }), "{err}");
    assert!(err.to_string().contains("already used"), "{err}");

    let err = admission::admit(&client, "not-a-token", second)
        .await
        .unwrap_err();
    assert!(matches!(err, AdmitError::Malformed(_)), "{err}");
    let unknown = admission::JoinToken::generate().unwrap().to_string();
    let err = admission::admit(&client, &unknown, second)
        .await
        .unwrap_err();
    assert!(matches!(err, AdmitError::Unknown { .. }), "{err}");
    // Right id, wrong secret: unknown as well, nothing revealed.
    let forged = format!("{}.{}", issued.token.id(), "a".repeat(32));
    let err = admission::admit(&client, &forged, second)
        .await
        .unwrap_err();
    assert!(matches!(err, AdmitError::Unknown { .. }), "{err}");

    let short = admission::create_token(&client, &node, None, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = admission::admit(&client, &short.token.to_string(), second)
        .await
        .unwrap_err();
    assert!(matches!(err, AdmitError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");

    let err = admission::create_token(&client, "Bad_Name", None, HOUR)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid node name"), "{err}");

    cleanup(&client, &node, issued.token.id(), None).await;
    cleanup(&client, &node, short.token.id(), None).await;
}

#[tokio::test]
async fn join_protocol_over_iroh_admits_the_connecting_key_once() {
    let client = client().await;
    let node = unique_name("join");
    let issued = admission::create_token(&client, &node, None, HOUR)
        .await
        .unwrap();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let bridge_ep = outpost_sync::transport::iroh::bind(iroh::SecretKey::generate(), loopback)
        .await
        .unwrap();
    bridge_ep.set_alpns(vec![JOIN_ALPN.to_vec()]);
    let bridge_addr = PeerAddr {
        id: bridge_ep.id(),
        addr: bridge_ep.bound_sockets()[0],
    };
    let server = {
        let (ep, client) = (bridge_ep.clone(), client.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let client = client.clone();
                tokio::spawn(async move {
                    let conn = incoming.await.unwrap();
                    assert_eq!(conn.alpn(), JOIN_ALPN);
                    join::serve(conn, &client).await;
                });
            }
        })
    };
    let edge_key = iroh::SecretKey::generate();
    let edge_peer = PeerId::from(edge_key.public());
    let edge_ep = outpost_sync::transport::iroh::bind(edge_key, loopback)
        .await
        .unwrap();
    let started = Instant::now();
    let reply = join::request(&edge_ep, &bridge_addr, &issued.token.to_string())
        .await
        .unwrap();
    eprintln!("join over iroh took {:?}", started.elapsed());
    assert_eq!(
        reply,
        JoinReply::Admitted {
            node: node.clone(),
            site: None
        }
    );
    let secret = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get(&admission::token_secret_name(issued.token.id()))
        .await
        .unwrap();
    let record = admission::Admitted::from_secret(&secret).unwrap();
    assert_eq!(
        record.key, edge_peer,
        "the key recorded is the connection's"
    );

    let other = outpost_sync::transport::iroh::bind(iroh::SecretKey::generate(), loopback)
        .await
        .unwrap();
    let reply = join::request(&other, &bridge_addr, &issued.token.to_string())
        .await
        .unwrap();
    assert!(
        matches!(&reply, JoinReply::Refused { reason, .. } if reason == "spent"),
        "{reply:?}"
    );
    let reply = join::request(&other, &bridge_addr, "garbage")
        .await
        .unwrap();
    assert!(
        matches!(&reply, JoinReply::Refused { reason, .. } if reason == "malformed"),
        "{reply:?}"
    );

    server.abort();
    for ep in [edge_ep, other, bridge_ep] {
        ep.close().await;
    }
    cleanup(&client, &node, issued.token.id(), None).await;
}

#[tokio::test]
async fn admitted_edge_runs_a_scheduled_pod_and_its_deletion_waits_for_the_edge() {
    let client = client().await;
    let node = unique_name("edge");
    let ns = unique_name("bridge");
    let bridge = TestBridge::start(&client);
    let issued = admission::create_token(&client, &node, None, HOUR)
        .await
        .unwrap();
    let edge_key = new_key();
    let started = Instant::now();
    admission::admit(&client, &issued.token.to_string(), edge_key)
        .await
        .unwrap();
    bridge.until_admitted(&node).await;
    eprintln!(
        "admit to the key in the bridge's roster: {:?}",
        started.elapsed()
    );
    let edge = edge(edge_key, &node, bridge.engine.me());
    let _link = connect(&edge, &bridge.engine, DEFAULT_LINK_BUFFER);

    // Node status and Lease from heartbeats.
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    let status_doc = project::node_status_id(&node).unwrap();
    let started = Instant::now();
    edge.put(&status_doc, &node_status(now_ms())).unwrap();
    let ready = await_api(
        nodes.clone(),
        &node,
        "the node to be Ready",
        Duration::from_secs(20),
        |n: Option<&Node>| ready_status(n).as_deref() == Some("True"),
    )
    .await
    .unwrap();
    eprintln!(
        "heartbeat at the edge to Node Ready: {:?}",
        started.elapsed()
    );
    let labels = ready.metadata.labels.clone().unwrap();
    assert_eq!(
        labels.get(project::EDGE_ROLE_LABEL).map(String::as_str),
        Some("")
    );
    assert_eq!(
        ready.metadata.annotations.as_ref().unwrap()[admission::PEER_KEY_ANNOTATION],
        edge_key.to_string()
    );
    let status = ready.status.clone().unwrap();
    assert_eq!(status.capacity.as_ref().unwrap()["memory"].0, "4Gi");
    assert_eq!(status.allocatable.as_ref().unwrap()["pods"].0, "110");
    assert_eq!(status.addresses.as_ref().unwrap()[0].address, "10.1.2.3");
    assert_eq!(
        status.node_info.as_ref().unwrap().kubelet_version,
        "outpost-edge/0.1.0"
    );
    let first = await_api(
        leases.clone(),
        &node,
        "the lease",
        Duration::from_secs(10),
        |l: Option<&Lease>| renew_time(l).is_some(),
    )
    .await;
    let first = renew_time(first.as_ref()).unwrap();
    let started = Instant::now();
    edge.put(&status_doc, &node_status(now_ms() + 1)).unwrap();
    await_api(
        leases.clone(),
        &node,
        "the lease to be renewed",
        Duration::from_secs(10),
        move |l: Option<&Lease>| renew_time(l).is_some_and(|t| t > first),
    )
    .await;
    eprintln!(
        "heartbeat at the edge to Lease renewed: {:?}",
        started.elapsed()
    );
    // The heartbeat shows in the bridge's metrics, per node.
    let mut registry = prometheus_client::registry::Registry::default();
    bridge.bridge.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(&format!(
            "outpost_cloud_edge_heartbeat_timestamp_seconds{{node=\"{node}\"}}"
        )),
        "{text}"
    );
    assert!(
        !text.contains("outpost_cloud_lease_renewals_total 0\n"),
        "{text}"
    );

    // A Pod scheduled by nodeSelector, with a ConfigMap and a Secret.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let pp = PostParams::default();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"mode": "fast"}}))
                .unwrap(),
        )
        .await
        .unwrap();
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"password": "hunter2"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    pods.create(
        &pp,
        &serde_json::from_value(json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "terminationGracePeriodSeconds": 30,
                "containers": [{
                    "name": "main", "image": "docker.io/outpost/busybox:1",
                    "command": ["sleep", "3600"],
                    "env": [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}}],
                    "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]
                }],
                "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]
            }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let bound = await_api(
        pods.clone(),
        "web",
        "the scheduler to bind the pod",
        Duration::from_secs(30),
        |p: Option<&Pod>| {
            p.and_then(|p| p.spec.as_ref()?.node_name.as_ref())
                .is_some()
        },
    )
    .await
    .unwrap();
    let scheduled = started.elapsed();
    let uid = bound.metadata.uid.clone().unwrap();
    let spec_doc = project::pod_spec_id(&node, &ns, "web", &uid).unwrap();
    let spec: PodSpecDoc = until(
        "the pod spec at the edge",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.get::<PodSpecDoc>(&spec_doc))
                .unwrap()
        },
    )
    .await;
    eprintln!(
        "pod created to bound: {scheduled:?}; to pod-spec at the edge: {:?}",
        started.elapsed()
    );
    assert_eq!(spec.containers[0].command, ["sleep", "3600"]);
    assert_eq!(spec.uid, uid);
    assert!(spec.deletion.is_none());
    let cm_doc: DocId = format!("configmap/{node}/{ns}/cfg").parse().unwrap();
    let secret_doc: DocId = format!("secret/{node}/{ns}/creds").parse().unwrap();
    let cm = until(
        "the configmap at the edge",
        Duration::from_secs(10),
        async || edge.read_json(&cm_doc).unwrap(),
    )
    .await;
    assert_eq!(cm["data"]["mode"], "fast");
    let secret = until(
        "the secret at the edge",
        Duration::from_secs(10),
        async || edge.read_json(&secret_doc).unwrap(),
    )
    .await;
    assert_eq!(secret["data"]["password"], "aHVudGVyMg==");

    // Pod status from the edge, through the status subresource.
    let status_id = project::pod_status_id(&node, &ns, "web", &uid).unwrap();
    let running = PodStatusDoc {
        uid: uid.clone(),
        phase: "Running".into(),
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }],
        container_statuses: vec![ContainerStatus {
            name: "main".into(),
            ready: true,
            restart_count: 0,
            state: ContainerState {
                running: Some(StateRunning {
                    started_at: Some("2030-01-01T00:00:00Z".into()),
                }),
                ..Default::default()
            },
            image: "docker.io/outpost/busybox:1".into(),
            container_id: Some("containerd://abc".into()),
            ..Default::default()
        }],
        pod_ip: Some("10.1.2.40".into()),
        host_ip: Some("10.1.2.3".into()),
        ..Default::default()
    };
    let started = Instant::now();
    edge.put(&status_id, &running).unwrap();
    let live = await_api(
        pods.clone(),
        "web",
        "the pod to be Running",
        Duration::from_secs(10),
        |p: Option<&Pod>| p.and_then(|p| p.status.as_ref()?.phase.as_deref()) == Some("Running"),
    )
    .await
    .unwrap();
    eprintln!("pod status at the edge to the API: {:?}", started.elapsed());
    let live_status = live.status.unwrap();
    assert_eq!(live_status.pod_ip.as_deref(), Some("10.1.2.40"));
    let cs = &live_status.container_statuses.unwrap()[0];
    assert!(cs.ready && cs.state.as_ref().unwrap().running.is_some());

    // Graceful deletion: the pod stays until the edge reports it stopped.
    pods.delete("web", &DeleteParams::default()).await.unwrap();
    let spec: PodSpecDoc = until(
        "the deletion at the edge",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.get::<PodSpecDoc>(&spec_doc))
                .unwrap()
                .filter(|s| s.deletion.is_some())
        },
    )
    .await;
    assert_eq!(spec.deletion.unwrap().grace_period_seconds, 30);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = pods.get_opt("web").await.unwrap();
    assert!(
        still.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        "the pod stays until the edge reports it terminated"
    );
    let started = Instant::now();
    edge.put(
        &status_id,
        &PodStatusDoc {
            phase: "Succeeded".into(),
            terminated: true,
            container_statuses: vec![],
            conditions: vec![],
            ..running
        },
    )
    .unwrap();
    await_api(
        pods.clone(),
        "web",
        "the pod to leave the API",
        Duration::from_secs(10),
        conditions::is_deleted(&uid),
    )
    .await;
    eprintln!(
        "terminated at the edge to pod gone: {:?}",
        started.elapsed()
    );
    // The pod's spec document goes with it (the replica stays bounded).
    until(
        "the spec document deleted at the edge",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.is_deleted(&spec_doc))
                .unwrap()
                .then_some(())
        },
    )
    .await;

    // A pod bound by spec.nodeName and deleted at once (grace period 0)
    // leaves the API without waiting: the edge is told to stop it anyway.
    let forced = pods
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "forced"},
                "spec": {"nodeName": node, "containers": [{"name": "main", "image": "docker.io/outpost/busybox:1"}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let forced_uid = forced.metadata.uid.unwrap();
    let forced_doc = project::pod_spec_id(&node, &ns, "forced", &forced_uid).unwrap();
    until(
        "the forced pod at the edge",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.get::<PodSpecDoc>(&forced_doc))
                .unwrap()
        },
    )
    .await;
    pods.delete(
        "forced",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    let spec: PodSpecDoc = until(
        "the forced deletion at the edge",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.get::<PodSpecDoc>(&forced_doc))
                .unwrap()
                .filter(|s| s.deletion.is_some())
        },
    )
    .await;
    assert_eq!(spec.deletion.unwrap().grace_period_seconds, 0);
    // Gone from the API already: its spec document goes once the edge
    // reports it terminated.
    let forced_status = project::pod_status_id(&node, &ns, "forced", &forced_uid).unwrap();
    edge.put(
        &forced_status,
        &PodStatusDoc {
            uid: forced_uid.clone(),
            phase: "Failed".into(),
            terminated: true,
            ..Default::default()
        },
    )
    .unwrap();
    until(
        "the forced pod's spec document deleted",
        Duration::from_secs(10),
        async || {
            edge.with_replica(|r| r.is_deleted(&forced_doc))
                .unwrap()
                .then_some(())
        },
    )
    .await;

    drop(bridge);
    cleanup(&client, &node, issued.token.id(), Some(&ns)).await;
}

#[tokio::test]
async fn silent_edge_lease_lapses_and_the_node_controller_marks_it_not_ready() {
    let client = client().await;
    let node = unique_name("quiet");
    let bridge = TestBridge::start(&client);
    let issued = admission::create_token(&client, &node, None, HOUR)
        .await
        .unwrap();
    let edge_key = new_key();
    admission::admit(&client, &issued.token.to_string(), edge_key)
        .await
        .unwrap();
    bridge.until_admitted(&node).await;
    let edge = edge(edge_key, &node, bridge.engine.me());
    let _link = connect(&edge, &bridge.engine, DEFAULT_LINK_BUFFER);
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    edge.put(
        &project::node_status_id(&node).unwrap(),
        &node_status(now_ms()),
    )
    .unwrap();
    await_api(
        nodes.clone(),
        &node,
        "the node to be Ready",
        Duration::from_secs(20),
        |n: Option<&Node>| ready_status(n).as_deref() == Some("True"),
    )
    .await;
    let last_heartbeat = Instant::now();
    let renewed = renew_time(leases.get(&node).await.ok().as_ref()).unwrap();

    // No more heartbeats: the node controller's grace period (its default,
    // 50 s: scripts/lib/kubernetes.sh sets no --node-monitor-grace-period)
    // runs out and it marks the node's Ready condition Unknown.
    await_api(
        nodes.clone(),
        &node,
        "the node controller to mark the node NotReady",
        Duration::from_secs(100),
        |n: Option<&Node>| ready_status(n).as_deref() == Some("Unknown"),
    )
    .await;
    eprintln!("last heartbeat to NotReady: {:?}", last_heartbeat.elapsed());
    assert_eq!(
        renew_time(leases.get(&node).await.ok().as_ref()),
        Some(renewed),
        "no heartbeat, no renewal"
    );

    // A heartbeat brings it back.
    let started = Instant::now();
    edge.put(
        &project::node_status_id(&node).unwrap(),
        &node_status(now_ms()),
    )
    .unwrap();
    await_api(
        nodes.clone(),
        &node,
        "the node to be Ready again",
        Duration::from_secs(20),
        |n: Option<&Node>| ready_status(n).as_deref() == Some("True"),
    )
    .await;
    eprintln!("heartbeat to Ready again: {:?}", started.elapsed());

    drop(bridge);
    cleanup(&client, &node, issued.token.id(), None).await;
}
