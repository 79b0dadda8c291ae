//! The sync engine over real iroh endpoints on loopback: two peers; five in
//! a mesh with one partitioned and healed; an unknown key refused; a write
//! outside a peer's write scope rejected.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::net::SocketAddr;
use std::time::Duration;

use iroh::{Endpoint, SecretKey};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::transport::iroh::{PeerAddr, bind};
use serde_json::{Value, json};

struct Peer {
    key: SecretKey,
    dir: std::path::PathBuf,
    engine: Engine,
    endpoint: Endpoint,
    addr: SocketAddr,
}

impl Peer {
    async fn start(name: &str, key: SecretKey, roster: &Roster, addr: SocketAddr) -> Peer {
        let dir = std::env::temp_dir().join(format!(
            "outpost-iroh-{name}-{}-{}",
            std::process::id(),
            key.public().fmt_short()
        ));
        let replica =
            Replica::open(&dir, PeerId::from(key.public()), ReplicaOptions::default()).unwrap();
        let engine = Engine::new(replica, roster.clone(), SyncMetrics::default());
        let endpoint = bind(key.clone(), addr).await.unwrap();
        let addr = endpoint.bound_sockets()[0];
        tokio::spawn({
            let engine = engine.clone();
            let endpoint = endpoint.clone();
            async move { engine.accept_loop(endpoint).await }
        });
        Peer {
            key,
            dir,
            engine,
            endpoint,
            addr,
        }
    }

    fn peer_addr(&self) -> PeerAddr {
        PeerAddr {
            id: self.key.public(),
            addr: self.addr,
        }
    }

    fn dial(&self, other: &Peer) {
        let engine = self.engine.clone();
        let endpoint = self.endpoint.clone();
        let addr = other.peer_addr();
        tokio::spawn(async move { engine.dial_loop(endpoint, addr).await });
    }

    fn id(&self) -> PeerId {
        PeerId::from(self.key.public())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn doc(s: &str) -> DocId {
    s.parse().unwrap()
}

/// Waits until `peer` holds `value` in `doc`.
async fn eventually(peer: &Peer, d: &DocId, value: &Value) {
    for _ in 0..200 {
        if peer.engine.read_json(d).unwrap().as_ref() == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{d} never reached {value} at {:?}: {:?}",
        peer.id(),
        peer.engine.read_json(d).unwrap()
    );
}

fn roster_of(cloud: &SecretKey, edges: &[(&SecretKey, &str)]) -> Roster {
    let mut roster = Roster::new();
    roster.insert(PeerId::from(cloud.public()), Role::Cloud);
    for (key, node) in edges {
        roster.insert(
            PeerId::from(key.public()),
            Role::Edge {
                node: (*node).into(),
                site: Some("north".into()),
            },
        );
    }
    roster
}

#[tokio::test]
async fn two_peers_sync_both_ways() {
    let (ck, ek) = (SecretKey::generate(), SecretKey::generate());
    let roster = roster_of(&ck, &[(&ek, "edge-1")]);
    let cloud = Peer::start("cloud", ck, &roster, loopback()).await;
    let edge = Peer::start("edge", ek, &roster, loopback()).await;
    // Written before the link exists: reconciliation finds it.
    let spec = doc("pod-spec/edge-1/default/web/u1");
    let spec_value = json!({"containers": [{"name": "main", "image": "busybox"}]});
    cloud.engine.write_json(&spec, &spec_value).unwrap();
    edge.dial(&cloud);
    eventually(&edge, &spec, &spec_value).await;
    // Written while connected: pushed.
    let status = doc("pod-status/edge-1/default/web/u1");
    let status_value = json!({"phase": "Running"});
    edge.engine.write_json(&status, &status_value).unwrap();
    eventually(&cloud, &status, &status_value).await;
    // Acknowledged: the watermark clears.
    for _ in 0..100 {
        if edge.engine.watermark_ms(&cloud.id()).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(edge.engine.watermark_ms(&cloud.id()), None);
    // The lag of the pushed change was measured, and exported.
    let mut registry = prometheus_client::registry::Registry::default();
    cloud.engine.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let count = text
        .lines()
        .find(|l| l.starts_with("outpost_sync_lag_seconds_count"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(count.is_some_and(|c| c >= 1), "{text}");
    assert!(
        text.contains("outpost_sync_reconciliation_rounds_total"),
        "{text}"
    );
}

#[tokio::test]
async fn five_peer_mesh_heals_a_partition() {
    let ck = SecretKey::generate();
    let keys: Vec<SecretKey> = (0..4).map(|_| SecretKey::generate()).collect();
    let names = ["edge-1", "edge-2", "edge-3", "edge-4"];
    let edges: Vec<(&SecretKey, &str)> = keys.iter().zip(names).collect();
    let roster = roster_of(&ck, &edges);
    let cloud = Peer::start("mesh-cloud", ck, &roster, loopback()).await;
    let mut peers = Vec::new();
    for (k, n) in keys.iter().zip(names) {
        peers.push(Peer::start(n, k.clone(), &roster, loopback()).await);
    }
    for p in &peers {
        p.dial(&cloud);
    }
    for i in 0..peers.len() {
        for j in i + 1..peers.len() {
            peers[i].dial(&peers[j]);
        }
    }
    let shared = doc("configmap/site:north/default/settings");
    cloud
        .engine
        .write_json(&shared, &json!({"mode": "a"}))
        .unwrap();
    for p in &peers {
        eventually(p, &shared, &json!({"mode": "a"})).await;
    }

    // Partition edge-4: its endpoint goes away; it keeps its replica and
    // accepts local writes; the others keep writing.
    let edge4 = peers.pop().unwrap();
    edge4.endpoint.close().await;
    let desired = doc("device-desired/edge-4/default/thermo");
    edge4
        .engine
        .write_json(&desired, &json!({"temp": "25", "fan": "low"}))
        .unwrap();
    cloud
        .engine
        .write_json(&shared, &json!({"mode": "b"}))
        .unwrap();
    cloud
        .engine
        .write_json(
            &doc("pod-spec/edge-4/default/web/u4"),
            &json!({"image": "v2"}),
        )
        .unwrap();
    for p in &peers {
        eventually(p, &shared, &json!({"mode": "b"})).await;
    }
    assert_ne!(
        edge4.engine.read_json(&shared).unwrap(),
        Some(json!({"mode": "b"}))
    );

    // Heal: edge-4 comes back with the same key (on a new port, as after a
    // network change) and dials out, as edges do.
    let endpoint = bind(edge4.key.clone(), loopback()).await.unwrap();
    let addr = endpoint.bound_sockets()[0];
    let healed = Peer {
        key: edge4.key.clone(),
        dir: edge4.dir.clone(),
        engine: edge4.engine.clone(),
        endpoint,
        addr,
    };
    std::mem::forget(edge4); // its directory now belongs to `healed`
    tokio::spawn({
        let engine = healed.engine.clone();
        let endpoint = healed.endpoint.clone();
        async move { engine.accept_loop(endpoint).await }
    });
    healed.dial(&cloud);
    for p in &peers {
        healed.dial(p);
    }
    eventually(&healed, &shared, &json!({"mode": "b"})).await;
    eventually(
        &healed,
        &doc("pod-spec/edge-4/default/web/u4"),
        &json!({"image": "v2"}),
    )
    .await;
    eventually(&cloud, &desired, &json!({"temp": "25", "fan": "low"})).await;
}

#[tokio::test]
async fn unknown_key_is_refused() {
    let (ck, ek, stranger) = (
        SecretKey::generate(),
        SecretKey::generate(),
        SecretKey::generate(),
    );
    let roster = roster_of(&ck, &[(&ek, "edge-1")]);
    let cloud = Peer::start("refuse-cloud", ck.clone(), &roster, loopback()).await;
    cloud
        .engine
        .write_json(
            &doc("configmap/site:north/default/c"),
            &json!({"secret": "no"}),
        )
        .unwrap();
    // The stranger believes it is edge-1's site-mate; the cloud does not know it.
    let mut its_roster = roster.clone();
    its_roster.insert(
        PeerId::from(stranger.public()),
        Role::Edge {
            node: "edge-9".into(),
            site: Some("north".into()),
        },
    );
    let intruder = Peer::start("stranger", stranger, &its_roster, loopback()).await;
    let conn = intruder
        .endpoint
        .connect(
            iroh::EndpointAddr::from(&cloud.peer_addr()),
            outpost_sync::transport::iroh::SYNC_ALPN,
        )
        .await
        .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("unknown peer"), "{reason}");
    assert!(cloud.engine.connected().is_empty());
    assert_eq!(
        intruder
            .engine
            .read_json(&doc("configmap/site:north/default/c"))
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn write_outside_write_scope_is_rejected() {
    let (ck, ek) = (SecretKey::generate(), SecretKey::generate());
    let roster = roster_of(&ck, &[(&ek, "edge-2")]);
    let cloud = Peer::start("scope-cloud", ck, &roster, loopback()).await;
    let edge = Peer::start("scope-edge", ek, &roster, loopback()).await;
    // Pod specs are the cloud's to write; an edge writing one locally must not
    // get it into the cloud's replica.
    let forged = doc("pod-spec/edge-2/default/web/u");
    edge.engine
        .write_json(&forged, &json!({"image": "evil"}))
        .unwrap();
    let allowed = doc("pod-status/edge-2/default/web/u");
    edge.engine
        .write_json(&allowed, &json!({"phase": "Running"}))
        .unwrap();
    edge.dial(&cloud);
    eventually(&cloud, &allowed, &json!({"phase": "Running"})).await;
    for _ in 0..100 {
        if cloud.engine.metrics().rejected_changes.get() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cloud.engine.metrics().rejected_changes.get() > 0);
    assert_eq!(cloud.engine.read_json(&forged).unwrap(), None);
}
