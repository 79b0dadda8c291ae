//! The engine over the in-memory transport: live push, a partition and its
//! heal with concurrent desired values (the conflict counted once and the
//! losing write visible on both sides), and an unknown peer refused.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::time::Duration;

use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::desired::resolve;
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::protocol::SessionError;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, connect};
use serde_json::{Value, json};
use support::{CLOUD, EDGE, roster};
use tokio::time::Instant;

fn engine(name: &str, me: PeerId, roster: &Roster) -> Engine {
    let dir = std::env::temp_dir().join(format!("outpost-memeng-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let replica = Replica::open(&dir, me, ReplicaOptions::default()).unwrap();
    Engine::new(replica, roster.clone(), SyncMetrics::default())
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn partition_heal_merges_concurrent_desired_values_and_counts_the_conflict() {
    let roster = roster();
    let cloud = engine("cloud", CLOUD, &roster);
    let edge = engine("edge", EDGE, &roster);
    let doc: DocId = "device-desired/edge-1/default/thermo-1".parse().unwrap();
    let link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
    cloud.set_desired(&doc, "temp", "20").unwrap();
    until("the first value at the edge", || {
        edge.read_json(&doc).unwrap().is_some()
    })
    .await;

    let exposition = |e: &Engine| {
        let mut registry = prometheus_client::registry::Registry::default();
        e.metrics().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    assert!(exposition(&cloud).contains("outpost_sync_peer_watermark_timestamp_seconds{"));
    link.cut();
    until("the sessions to close", || {
        cloud.connected().is_empty() && edge.connected().is_empty()
    })
    .await;
    // A closed session's per-peer series are gone (no stale watermark).
    for e in [&cloud, &edge] {
        let text = exposition(e);
        assert!(!text.contains("peer=\""), "{text}");
    }
    cloud.set_desired(&doc, "temp", "22").unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    edge.set_desired(&doc, "temp", "25").unwrap();

    let _link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
    let read = |e: &Engine| -> Value { e.read_json(&doc).unwrap().unwrap() };
    until("convergence", || read(&cloud) == read(&edge)).await;
    let resolved = resolve(&read(&cloud));
    assert_eq!(resolved["temp"].winner.value, "25", "the later write wins");
    assert_eq!(resolved["temp"].losers.len(), 1);
    assert_eq!(
        resolved["temp"].losers[0].value, "22",
        "the loser stays visible"
    );
    until("the conflict counted on both sides", || {
        cloud.metrics().conflicts_resolved.get() == 1
            && edge.metrics().conflicts_resolved.get() == 1
    })
    .await;

    // Live push after the heal, and the conflict is not counted again.
    edge.write_json(
        &"device-reported/edge-1/default/thermo-1".parse().unwrap(),
        &json!({"temp": "24"}),
    )
    .unwrap();
    until("the reported value at the cloud", || {
        cloud
            .read_json(&"device-reported/edge-1/default/thermo-1".parse().unwrap())
            .unwrap()
            .is_some()
    })
    .await;
    assert_eq!(cloud.metrics().conflicts_resolved.get(), 1);
}

#[tokio::test]
async fn an_unknown_peer_is_refused_over_memory_too() {
    let roster = roster();
    let cloud = engine("refuse-cloud", CLOUD, &roster);
    let stranger = engine("refuse-stranger", PeerId([9; 32]), &roster);
    let (to_cloud, at_cloud) = connect(&stranger, &cloud, DEFAULT_LINK_BUFFER).join().await;
    assert!(
        matches!(at_cloud, Err(SessionError::UnknownPeer(_))),
        "{at_cloud:?}"
    );
    // The stranger's own roster does not know the cloud either... but the
    // cloud refusing is what matters: nothing of it was stored there.
    let _ = to_cloud;
    assert!(cloud.with_replica(|r| r.scan().count()) == 0);
}

#[tokio::test]
async fn a_deleted_document_disappears_at_the_peer_and_can_come_back() {
    use outpost_sync::replica::Scope;
    let roster = roster();
    let cloud = engine("del-cloud", CLOUD, &roster);
    let edge = engine("del-edge", EDGE, &roster);
    let _link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
    let pod: DocId = "pod-spec/edge-1/default/web/u-1".parse().unwrap();
    let mut events = edge.with_replica(|r| r.subscribe_scope(Scope::all().node("edge-1")));
    cloud.write_json(&pod, &json!({"name": "web"})).unwrap();
    until("the pod at the edge", || {
        edge.read_json(&pod).unwrap().is_some()
    })
    .await;
    assert!(cloud.delete(&pod).unwrap());
    assert!(
        !cloud.delete(&pod).unwrap(),
        "deleting twice deletes nothing"
    );
    until("the deletion at the edge", || {
        edge.read_json(&pod).unwrap().is_none()
    })
    .await;
    assert!(edge.with_replica(|r| r.is_deleted(&pod)).unwrap());
    let mut seen = Vec::new();
    while let Ok(Some(doc)) = events.try_recv() {
        seen.push(doc);
    }
    assert_eq!(
        seen,
        vec![pod.clone(), pod.clone()],
        "created, then deleted"
    );

    // The edge deletes what it writes.
    let status: DocId = "pod-status/edge-1/default/web/u-1".parse().unwrap();
    edge.write_json(&status, &json!({"phase": "Running"}))
        .unwrap();
    until("the status at the cloud", || {
        cloud.read_json(&status).unwrap().is_some()
    })
    .await;
    assert!(edge.delete(&status).unwrap());
    until("the status deletion at the cloud", || {
        cloud.read_json(&status).unwrap().is_none()
    })
    .await;

    // Written again, it comes back everywhere.
    cloud
        .write_json(&pod, &json!({"name": "web", "again": true}))
        .unwrap();
    until("the pod back at the edge", || {
        edge.read_json(&pod).unwrap() == Some(json!({"name": "web", "again": true}))
    })
    .await;

    // But not what only the cloud writes: its tombstone is rejected there.
    assert!(edge.delete(&pod).unwrap());
    until("the rejection at the cloud", || {
        cloud.metrics().rejected_changes.get() > 0
    })
    .await;
    assert!(cloud.read_json(&pod).unwrap().is_some());
}

/// As deployed, a replica's roster lists its peers, not itself. After a
/// partition in which both sides changed a document, the side that sends
/// first (not knowing the other's heads) sends its whole history, including
/// changes the other wrote itself; those must not be refused for an author
/// missing from the receiver's roster, whichever side sends first.
#[tokio::test]
async fn own_changes_sent_back_are_accepted_when_the_roster_lists_only_the_peer() {
    for (i, (c, e)) in [(CLOUD, EDGE), (EDGE, CLOUD)].into_iter().enumerate() {
        let mut edge_roster = Roster::new();
        edge_roster.insert(c, Role::Cloud);
        let edge = engine(&format!("own-e{i}"), e, &edge_roster);
        let mut cloud_roster = Roster::new();
        cloud_roster.insert(
            e,
            Role::Edge {
                node: "edge-1".into(),
                site: None,
            },
        );
        let cloud = engine(&format!("own-c{i}"), c, &cloud_roster);
        let doc: DocId = "device-desired/edge-1/default/thermo-1".parse().unwrap();
        let link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
        cloud
            .write_json(&doc, &json!({"name": "thermo-1", "model": "m"}))
            .unwrap();
        until("the document at the edge", || {
            edge.read_json(&doc).unwrap().is_some()
        })
        .await;
        link.cut();
        cloud.set_desired(&doc, "fan", "2").unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        edge.set_desired(&doc, "fan", "5").unwrap();
        let _link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
        let read = |e: &Engine| -> Value { e.read_json(&doc).unwrap().unwrap() };
        until("convergence", || read(&cloud) == read(&edge)).await;
        assert_eq!(resolve(&read(&cloud))["fan"].winner.value, "5");
        assert_eq!(cloud.metrics().rejected_changes.get(), 0);
        assert_eq!(edge.metrics().rejected_changes.get(), 0);
    }
}

/// A stream of changes is acknowledged in a few messages, not one per
/// change, and every change is still acknowledged: the sender's watermark
/// clears once the stream stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_changes_is_acknowledged_together_and_in_full() {
    let roster = roster();
    let cloud = engine("acks-cloud", CLOUD, &roster);
    let edge = engine("acks-edge", EDGE, &roster);
    let _link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
    until("both sessions", || {
        !cloud.connected().is_empty() && !edge.connected().is_empty()
    })
    .await;
    let before = edge.metrics().sent_messages.get();
    let doc = |i: usize| -> DocId {
        format!("pod-spec/edge-1/default/p{}/u", i % 20)
            .parse()
            .unwrap()
    };
    let writes = 200;
    for i in 0..writes {
        cloud
            .write_json(
                &doc(i),
                &json!({"containers": [{"name": "main", "image": format!("busybox:{i}")}]}),
            )
            .unwrap();
        // A stream, not a burst: each change goes out on its own (the
        // timer rounds this up to a millisecond).
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    until("every change acknowledged", || {
        cloud.watermark_ms(&EDGE).is_none() && cloud.pending(&EDGE) == Some(0)
    })
    .await;
    for i in 0..20 {
        assert_eq!(
            edge.read_json(&doc(i)).unwrap(),
            cloud.read_json(&doc(i)).unwrap()
        );
    }
    let acks = edge.metrics().sent_messages.get() - before;
    assert!(
        acks * 2 < writes as u64,
        "{acks} messages from the receiver for {writes} changes"
    );
}
