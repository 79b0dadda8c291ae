//! An agent configured with two bridge replicas (`--cloud A,B`) syncs with
//! both over real iroh endpoints on loopback, and goes on syncing with the
//! survivor when one goes away: its heartbeats keep reaching it, and a pod
//! spec written there reaches the agent.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_edge_node::agent::Agent;
use outpost_edge_node::config::{Config, FileConfig, RunArgs};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{NodeStatusDoc, PodSpecDoc};
use outpost_sync::test_utils::{env_value, unique_name};
use outpost_sync::transport::iroh::{self as transport, PeerAddr};

struct Cloud {
    engine: Engine,
    endpoint: iroh::Endpoint,
    addr: PeerAddr,
}

async fn cloud(dir: &std::path::Path, edge: PeerId, node: &str) -> Cloud {
    let key = outpost_sync::identity::load_or_create(dir).unwrap();
    let replica = Replica::open(
        dir.join("replica"),
        PeerId::from(key.public()),
        ReplicaOptions::default(),
    )
    .unwrap();
    let mut roster = Roster::new();
    roster.insert(
        edge,
        Role::Edge {
            node: node.into(),
            site: None,
        },
    );
    let engine = Engine::new(replica, roster, SyncMetrics::default());
    let endpoint = transport::bind(key, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = PeerAddr {
        id: endpoint.id(),
        addr: endpoint.bound_sockets()[0],
    };
    let (e, ep) = (engine.clone(), endpoint.clone());
    tokio::spawn(async move { e.accept_loop(ep).await });
    Cloud {
        engine,
        endpoint,
        addr,
    }
}

fn heartbeat_at(cloud: &Engine, node: &str) -> u64 {
    let id = DocId::new(DocKind::NodeStatus, Owner::Node(node), &[]).unwrap();
    cloud
        .with_replica(|r| r.get::<NodeStatusDoc>(&id))
        .unwrap()
        .map_or(0, |s| s.heartbeat_ms)
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..300 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_syncs_with_every_bridge_replica_and_survives_the_loss_of_one() {
    let node = unique_name("clouds");
    let dir = std::env::temp_dir().join("outpost-edge-tests").join(&node);
    let edge_key = outpost_sync::identity::load_or_create(&dir.join("edge")).unwrap();
    let edge = PeerId::from(edge_key.public());
    let a = cloud(&dir.join("a"), edge, &node).await;
    let b = cloud(&dir.join("b"), edge, &node).await;

    let args = RunArgs {
        data_dir: Some(dir.join("edge")),
        node_name: Some(node.clone()),
        cloud: Some(format!("{}, {}", a.addr, b.addr)),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        containerd_socket: Some(env_value("OUTPOST_CONTAINERD_SOCK").unwrap().into()),
        heartbeat_s: Some(1),
        mqtt: Some("off".into()),
        api_listen: Some("off".into()),
        ..Default::default()
    };
    let config = Config::merge(&args, FileConfig::default()).unwrap();
    assert_eq!(config.cloud_peers().len(), 2);
    let agent = Agent::start(&config).await.unwrap();

    until("heartbeats at both replicas", || {
        heartbeat_at(&a.engine, &node) > 0 && heartbeat_at(&b.engine, &node) > 0
    })
    .await;

    // Replica A goes away; B goes on hearing the edge and reaching it.
    a.endpoint.close().await;
    let seen = heartbeat_at(&b.engine, &node);
    until("newer heartbeats at the survivor", || {
        heartbeat_at(&b.engine, &node) > seen + 1_000
    })
    .await;
    let spec_id = DocId::new(
        DocKind::PodSpec,
        Owner::Node(&node),
        &["default", "p", "u1"],
    )
    .unwrap();
    let spec = PodSpecDoc {
        namespace: "default".into(),
        name: "p".into(),
        uid: "u1".into(),
        deletion: Some(outpost_sync::schema::Deletion {
            requested_at: "2026-01-01T00:00:00Z".into(),
            grace_period_seconds: 0,
        }),
        ..Default::default()
    };
    b.engine.put(&spec_id, &spec).unwrap();
    until("the survivor's pod spec at the edge", || {
        agent
            .engine()
            .with_replica(|r| r.get::<PodSpecDoc>(&spec_id))
            .unwrap()
            .is_some()
    })
    .await;
    agent.shutdown().await;
    b.endpoint.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
