//! Fairness over the in-memory transport: an edge reconnecting with a large
//! backlog does not starve a healthy edge's heartbeats (the "reconnection
//! storm" KubeEdge users report), and the backlog still drains completely.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::time::Duration;

use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, connect};
use serde_json::json;
use tokio::time::Instant;

const CLOUD: PeerId = PeerId([1; 32]);
const BACKLOGGED: PeerId = PeerId([2; 32]);
const HEALTHY: PeerId = PeerId([3; 32]);

fn engine(name: &str, me: PeerId, roster: &Roster) -> Engine {
    let dir = std::env::temp_dir().join(format!("outpost-fair-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let replica = Replica::open(&dir, me, ReplicaOptions::default()).unwrap();
    Engine::new(replica, roster.clone(), SyncMetrics::default())
}

fn edge(node: &str) -> Role {
    Role::Edge {
        node: node.into(),
        site: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogged_peer_does_not_starve_a_healthy_ones_heartbeats() {
    let mut roster = Roster::new();
    roster.insert(CLOUD, Role::Cloud);
    roster.insert(BACKLOGGED, edge("edge-slow"));
    roster.insert(HEALTHY, edge("edge-ok"));
    let cloud = engine("cloud", CLOUD, &roster);
    let slow = engine("slow", BACKLOGGED, &roster);
    let ok = engine("ok", HEALTHY, &roster);

    // Offline for a long time: thousands of reported values waiting.
    let backlog = 6_000;
    let items: Vec<(DocId, serde_json::Value)> = (0..backlog)
        .map(|i| {
            (
                format!("device-reported/edge-slow/default/dev-{i}")
                    .parse()
                    .unwrap(),
                json!({"state": "online", "temp": format!("{i}")}),
            )
        })
        .collect();
    for chunk in items.chunks(500) {
        slow.write_many(chunk).unwrap();
    }

    let _ok_link = connect(&ok, &cloud, DEFAULT_LINK_BUFFER);
    let heartbeat: DocId = "node-status/edge-ok".parse().unwrap();
    let last: DocId = format!("device-reported/edge-slow/default/dev-{}", backlog - 1)
        .parse()
        .unwrap();
    // The storm: the backlogged edge reconnects.
    let _slow_link = connect(&slow, &cloud, DEFAULT_LINK_BUFFER);
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut beats_during_backlog = 0;
    for beat in 0..200u64 {
        let value = json!({"heartbeatMs": beat});
        let t = Instant::now();
        ok.write_json(&heartbeat, &value).unwrap();
        loop {
            if cloud.read_json(&heartbeat).unwrap() == Some(value.clone()) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "heartbeat {beat} not seen by the cloud within 5 s during the backlog"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        worst = worst.max(t.elapsed());
        let drained = cloud.read_json(&last).unwrap().is_some()
            && (0..backlog).step_by(500).all(|i| {
                let d: DocId = format!("device-reported/edge-slow/default/dev-{i}")
                    .parse()
                    .unwrap();
                cloud.read_json(&d).unwrap().is_some()
            });
        if drained {
            break;
        }
        beats_during_backlog += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        beats_during_backlog >= 3,
        "the backlog drained before the heartbeats could be measured against it"
    );
    // Every heartbeat arrived while the backlog was draining, each well
    // before a node would be marked NotReady (40 s in Kubernetes).
    assert!(
        worst < Duration::from_secs(1),
        "worst heartbeat delay {worst:?} during the backlog"
    );

    // And the backlog drains completely.
    let deadline = Instant::now() + Duration::from_secs(120);
    for (doc, value) in &items {
        loop {
            if cloud.read_json(doc).unwrap().as_ref() == Some(value) {
                break;
            }
            assert!(Instant::now() < deadline, "{doc} never reached the cloud");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "backlog of {backlog} drained in {:?}; {beats_during_backlog} heartbeats during it, worst delay {worst:?}",
        started.elapsed()
    );
}

/// Sessions that wait for the replica take turns without blocking a runtime
/// thread each: while the replica is busy (here: held by another thread for
/// two seconds, as a long apply holds it), the sessions of several peers
/// with changes to apply wait for it, and the runtime's other tasks (a
/// bridge's Lease renewals) still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_waiting_for_the_replica_leave_the_runtime_running() {
    let peers: Vec<(PeerId, String)> = (0..4u8)
        .map(|i| (PeerId([10 + i; 32]), format!("edge-turn-{i}")))
        .collect();
    let mut roster = Roster::new();
    roster.insert(CLOUD, Role::Cloud);
    for (key, node) in &peers {
        roster.insert(*key, edge(node));
    }
    let cloud = engine("turn-cloud", CLOUD, &roster);
    let edges: Vec<Engine> = peers
        .iter()
        .map(|(key, node)| engine(node, *key, &roster))
        .collect();
    let _links: Vec<_> = edges
        .iter()
        .map(|e| connect(e, &cloud, DEFAULT_LINK_BUFFER))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cloud.connected().len() < peers.len() {
        assert!(Instant::now() < deadline, "the edges never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The replica is busy for two seconds.
    let held = cloud.clone();
    let holder = std::thread::spawn(move || {
        held.with_replica(|_| std::thread::sleep(Duration::from_secs(2)));
    });
    std::thread::sleep(Duration::from_millis(100));
    // Every edge has a change for it meanwhile (pod statuses: heartbeats
    // go past the gate).
    for (e, (_, node)) in edges.iter().zip(&peers) {
        let doc: DocId = format!("pod-status/{node}/default/p/u1").parse().unwrap();
        e.write_json(&doc, &json!({"phase": "Running"})).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    // Another task of the runtime still runs.
    let asked = Instant::now();
    let probe = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        asked.elapsed()
    });
    let took = probe.await.unwrap();
    holder.join().unwrap();
    assert!(
        took < Duration::from_millis(1000),
        "a task waited {took:?} while sessions waited for the replica"
    );
    // And the changes arrive once the replica is free.
    for (_, node) in &peers {
        let doc: DocId = format!("pod-status/{node}/default/p/u1").parse().unwrap();
        while cloud.read_json(&doc).unwrap().is_none() {
            assert!(Instant::now() < deadline, "{doc} never reached the cloud");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
