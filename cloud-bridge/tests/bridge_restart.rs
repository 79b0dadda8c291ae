//! The real `outpost-cloud` binary killed (SIGKILL) and restarted on the
//! same data dir, against the API server of `scripts/env up`, with a real
//! sync engine as the edge over iroh on loopback.
//!
//! Killing loses nothing: every document and its heads are in the RocksDB
//! replica after the kill; the restarted bridge takes its node back at once
//! (same replica id, its own node Lease), picks up what changed in the API
//! while it was down, and re-listing every Pod, ConfigMap, Secret, Device and
//! DeviceModel writes no change to the documents it had already written.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use outpost_cloud_bridge::admission::{self, SYSTEM_NAMESPACE};
use outpost_cloud_bridge::{project, shard};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::{DocId, Owner, Writers};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{Condition, NodeStatusDoc};
use outpost_sync::test_utils::{env_value, unique_name};
use outpost_sync::transport::iroh::PeerAddr;
use serde_json::json;
use support::{client, now_ms, until};
use tokio::time::Instant;

/// A running `outpost-cloud run`, killed with SIGKILL when dropped.
struct CloudProcess {
    child: Child,
    log: PathBuf,
}

impl CloudProcess {
    fn start(data_dir: &Path, port: u16, group: &str) -> Self {
        let log = data_dir.with_extension(format!("{}.log", now_ms()));
        let _ = std::fs::remove_file(data_dir.join("peer-addr"));
        let child = Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
            .args(["run", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "off", "--shard-group", group])
            .args(["--shard-lease-s", "6"])
            .arg("--kubeconfig")
            .arg(env_value("KUBECONFIG").unwrap())
            .env("RUST_LOG", "info,outpost_cloud_bridge=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("outpost-cloud starts");
        Self { child, log }
    }

    async fn addr(&mut self, data_dir: &Path) -> PeerAddr {
        let file = data_dir.join("peer-addr");
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(addr) = text.trim().parse()
            {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("outpost-cloud exited ({status}): {}", self.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no peer-addr: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as the OOM killer or a node failure would.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every live document of a replica and its heads.
fn heads_of(replica: &Replica) -> BTreeMap<DocId, Vec<[u8; 32]>> {
    replica
        .scan()
        .map(Result::unwrap)
        .map(|(doc, entry)| (doc, entry.heads))
        .collect()
}

/// The documents of `node` the cloud writes, and their heads (the bridge
/// projects every admitted node of the shared API server, other tests'
/// too).
fn cloud_written(
    heads: &BTreeMap<DocId, Vec<[u8; 32]>>,
    node: &str,
) -> BTreeMap<DocId, Vec<[u8; 32]>> {
    heads
        .iter()
        .filter(|(doc, _)| doc.kind().writers() != Writers::OwningEdge)
        .filter(|(doc, _)| doc.owner() == Owner::Node(node))
        .map(|(d, h)| (d.clone(), h.clone()))
        .collect()
}

/// Opens the killed bridge's replica (its RocksDB lock is free once the
/// process is gone) and reads every document's heads.
fn bridge_heads(data_dir: &Path, me: PeerId) -> BTreeMap<DocId, Vec<[u8; 32]>> {
    let replica = Replica::open(data_dir.join("replica"), me, ReplicaOptions::default()).unwrap();
    heads_of(&replica)
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

fn renew_time(lease: Option<&Lease>) -> Option<k8s_openapi::jiff::Timestamp> {
    Some(lease?.spec.as_ref()?.renew_time.as_ref()?.0)
}

async fn create_dynamic(client: &Client, ns: &str, yaml: &str) -> Result<(), kube::Error> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        value["metadata"]["namespace"] = json!(ns);
        let kind = value["kind"].as_str().unwrap().to_owned();
        let ar = ApiResource {
            group: "devices.kubeedge.io".into(),
            version: "v1beta1".into(),
            api_version: "devices.kubeedge.io/v1beta1".into(),
            kind: kind.clone(),
            plural: format!("{}s", kind.to_lowercase()),
        };
        let obj: DynamicObject = serde_json::from_value(value).unwrap();
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar)
            .create(&PostParams::default(), &obj)
            .await?;
    }
    Ok(())
}

const DEVICES: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermo-model}
spec:
  protocol: modbus
  properties:
  - {name: temp, type: INT, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1}
spec:
  deviceModelRef: {name: thermo-model}
  nodeName: NODE
  protocol: {protocolName: modbus, configData: {ip: 127.0.0.1, port: 1502}}
  properties:
  - name: temp
    reportToCloud: true
    desired: {value: "30"}
    visitors: {protocolName: modbus, configData: {register: HoldingRegister, offset: 2}}
"#;

#[tokio::test]
async fn a_killed_bridge_restarts_on_its_replica_loses_nothing_and_resends_nothing() {
    let client = client().await;
    let node = unique_name("restart");
    let ns = unique_name("restart");
    let group = unique_name("restart");
    let data_dir = std::env::temp_dir().join(unique_name("outpost-cloud-restart"));
    std::fs::create_dir_all(&data_dir).unwrap();
    let port = free_udp_port();
    let mut cloud = CloudProcess::start(&data_dir, port, &group);
    let cloud_addr = cloud.addr(&data_dir).await;
    let cloud_key = PeerId::from(cloud_addr.id);

    // The edge: admitted, dialing the bridge over iroh, heartbeating.
    let issued = admission::create_token(&client, &node, None, Duration::from_secs(3600))
        .await
        .unwrap();
    let edge_secret = iroh::SecretKey::generate();
    let edge_key = PeerId::from(edge_secret.public());
    admission::admit(&client, &issued.token.to_string(), edge_key)
        .await
        .unwrap();
    let mut roster = Roster::new();
    roster.insert(cloud_key, Role::Cloud);
    roster.insert(
        edge_key,
        Role::Edge {
            node: node.clone(),
            site: None,
        },
    );
    let edge_dir = std::env::temp_dir().join(unique_name("outpost-edge-restart"));
    let edge = Engine::new(
        Replica::open(&edge_dir, edge_key, ReplicaOptions::default()).unwrap(),
        roster,
        SyncMetrics::default(),
    );
    let edge_ep = outpost_sync::transport::iroh::bind(edge_secret, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let dial = {
        let (edge, ep) = (edge.clone(), edge_ep.clone());
        tokio::spawn(async move { edge.dial_loop(ep, cloud_addr).await })
    };
    let status_doc = project::node_status_id(&node).unwrap();
    let heartbeat = {
        let (edge, doc) = (edge.clone(), status_doc.clone());
        tokio::spawn(async move {
            loop {
                edge.put(&doc, &node_status()).unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    // A Pod bound to the node with a ConfigMap and a Secret, a Device and
    // its model.
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    for (name, mode) in [("cfg", "fast"), ("late", "before")] {
        configmaps
            .create(
                &pp,
                &serde_json::from_value(
                    json!({"metadata": {"name": name}, "data": {"mode": mode}}),
                )
                .unwrap(),
            )
            .await
            .unwrap();
    }
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
    let pod = pods
        .create(
            &pp,
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {
                    "nodeName": node,
                    "containers": [{
                        "name": "main", "image": "docker.io/outpost/busybox:1",
                        "env": [
                            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "mode"}}}
                        ],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]
                    }],
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}]
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let uid = pod.metadata.uid.unwrap();
    // The bridge installs the device CRDs at start; create once it has.
    let devices = DEVICES.replace("NODE", &node);
    until("the device CRDs", Duration::from_secs(60), async || {
        create_dynamic(&client, &ns, &devices).await.ok()
    })
    .await;

    let expected: Vec<DocId> = [
        project::pod_spec_id(&node, &ns, "web", &uid)
            .unwrap()
            .to_string(),
        format!("configmap/{node}/{ns}/cfg"),
        format!("configmap/{node}/{ns}/late"),
        format!("secret/{node}/{ns}/creds"),
        format!("device-desired/{node}/{ns}/thermo-1"),
        format!("device-model/{node}/{ns}/thermo-model"),
    ]
    .iter()
    .map(|d| d.parse().unwrap())
    .collect();
    let started = Instant::now();
    for doc in &expected {
        until(
            &format!("{doc} at the edge"),
            Duration::from_secs(30),
            async || edge.read_json(doc).unwrap(),
        )
        .await;
    }
    eprintln!("documents at the edge after {:?}", started.elapsed());
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    until("the node", Duration::from_secs(20), async || {
        nodes.get_opt(&node).await.unwrap()
    })
    .await;
    // Let the bridge settle (nothing more to write), then kill it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let edge_before = edge.with_replica(|r| heads_of(r));
    cloud.kill();
    let killed = Instant::now();
    let before = bridge_heads(&data_dir, cloud_key);
    for doc in &expected {
        assert!(before.contains_key(doc), "{doc} survives the kill");
    }
    assert!(before.contains_key(&status_doc));
    let cloud_before = cloud_written(&before, &node);
    assert_eq!(
        cloud_before,
        cloud_written(&edge_before, &node),
        "the edge had everything the bridge wrote"
    );

    // While the bridge is down, one ConfigMap changes.
    configmaps
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"mode": "after"}})),
        )
        .await
        .unwrap();
    let renewed_before = renew_time(leases.get_opt(&node).await.unwrap().as_ref()).unwrap();

    let restarted = Instant::now();
    let mut cloud = CloudProcess::start(&data_dir, port, &group);
    let addr = cloud.addr(&data_dir).await;
    eprintln!("restart to listening again: {:?}", restarted.elapsed());
    assert_eq!(
        PeerId::from(addr.id),
        cloud_key,
        "same identity from the data dir"
    );
    let late: DocId = format!("configmap/{node}/{ns}/late").parse().unwrap();
    until(
        "the change made while down at the edge",
        Duration::from_secs(60),
        async || {
            let v = edge.read_json(&late).unwrap()?;
            (v["data"]["mode"] == "after").then_some(())
        },
    )
    .await;
    // Edges dial the bridge: the edge's old session to the killed process
    // lasts until its QUIC idle timeout, which bounds this time.
    let to_change = restarted.elapsed();
    until(
        "the node lease renewed by the restarted bridge",
        Duration::from_secs(30),
        async || {
            let t = renew_time(leases.get_opt(&node).await.unwrap().as_ref())?;
            (t > renewed_before).then_some(())
        },
    )
    .await;
    let to_lease = restarted.elapsed();
    eprintln!(
        "down for {:?}; restart to the change made while down at the edge: {to_change:?}; to the node lease renewed: {to_lease:?}",
        restarted.duration_since(killed)
    );
    // Re-listing is over once the change made while down arrived (one
    // listing per kind); give stragglers a moment, then compare.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let edge_after = edge.with_replica(|r| heads_of(r));
    cloud.kill();
    let after = bridge_heads(&data_dir, cloud_key);

    let mut resent = Vec::new();
    for (doc, heads) in &cloud_before {
        if *doc == late {
            continue;
        }
        match after.get(doc) {
            None => panic!("{doc} lost across the restart"),
            Some(h) if h != heads => resent.push(doc.to_string()),
            Some(_) => {}
        }
        assert_eq!(edge_after.get(doc), after.get(doc), "{doc} at the edge");
    }
    eprintln!(
        "documents written by the bridge: {}; changed by re-listing: {}",
        cloud_before.len() - 1,
        resent.len()
    );
    assert!(resent.is_empty(), "re-listing rewrote {resent:?}");
    assert_ne!(after.get(&late), cloud_before.get(&late));
    for doc in before.keys() {
        assert!(after.contains_key(doc), "{doc} lost across the restart");
    }
    // The bridge held its node throughout: its own Lease, its own id.
    let shard_lease = Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .get(&shard::node_lease_name(&group, &node))
        .await
        .unwrap();
    assert_eq!(
        shard_lease.spec.unwrap().holder_identity.as_deref(),
        Some(shard::default_replica_id(&cloud_key).as_str())
    );

    heartbeat.abort();
    dial.abort();
    edge_ep.close().await;
    let dp = DeleteParams::default();
    let _ = Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .delete(&admission::token_secret_name(issued.token.id()), &dp)
        .await;
    let _ = nodes.delete(&node, &dp).await;
    let _ = leases.delete(&node, &dp).await;
    let system: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let _ = system
        .delete(&shard::node_lease_name(&group, &node), &dp)
        .await;
    let _ = system
        .delete(
            &shard::replica_lease_name(&group, &shard::default_replica_id(&cloud_key)),
            &dp,
        )
        .await;
    let _ = Api::<Namespace>::all(client.clone()).delete(&ns, &dp).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(&edge_dir);
}
