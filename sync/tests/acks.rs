//! A peer's acknowledgements: kept in memory and saved together (by the
//! session when asked, when too many are held, and by the engine a second
//! later and when a session ends), never one write each; one lost in a crash
//! costs a resend the peer ignores, nothing more.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::time::Duration;

use outpost_sync::PeerId;
use outpost_sync::access::Roster;
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::protocol::{ACKS_UNSAVED_MAX, Session};
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, connect};
use serde_json::json;
use support::{CLOUD, EDGE, roster};
use tokio::time::Instant;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("outpost-acks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn replica(name: &str, me: PeerId) -> Replica {
    Replica::open(dir(name), me, ReplicaOptions::default()).unwrap()
}

/// Runs both sessions until neither has anything to send.
fn settle(a: &mut Replica, sa: &mut Session, b: &mut Replica, sb: &mut Session, roster: &Roster) {
    loop {
        let mut moved = false;
        while let Some(m) = sa.poll_transmit(a, roster).unwrap() {
            sb.handle(m, b, roster).unwrap();
            moved = true;
        }
        while let Some(m) = sb.poll_transmit(b, roster).unwrap() {
            sa.handle(m, a, roster).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn sessions(cloud: &Replica, edge: &Replica, roster: &Roster) -> (Session, Session) {
    let mut sc = Session::new(EDGE, roster).unwrap();
    let mut se = Session::new(CLOUD, roster).unwrap();
    sc.start(cloud, roster, false).unwrap();
    se.start(edge, roster, true).unwrap();
    (sc, se)
}

/// The heads of `doc` the cloud's store has saved as the edge's.
fn saved_ack(cloud: &Replica, doc: &DocId) -> Option<Vec<[u8; 32]>> {
    cloud.store().peer_ack(&EDGE.0, doc).unwrap().map(|a| a.1)
}

fn pod(i: usize) -> DocId {
    format!("pod-spec/edge-1/default/p{i}/u").parse().unwrap()
}

fn spec(image: &str) -> serde_json::Value {
    json!({"containers": [{"name": "main", "image": image}]})
}

#[test]
fn acknowledgements_are_saved_together_and_a_lost_one_costs_only_a_resend() {
    let roster = roster();
    let mut cloud = replica("sans-io-cloud", CLOUD);
    let mut edge = replica("sans-io-edge", EDGE);
    let (mut sc, mut se) = sessions(&cloud, &edge, &roster);
    settle(&mut cloud, &mut sc, &mut edge, &mut se, &roster);

    cloud
        .write_json(&pod(0), &spec("busybox:1"), 1_000)
        .unwrap();
    sc.local_change(&CLOUD, &roster, &pod(0));
    settle(&mut cloud, &mut sc, &mut edge, &mut se, &roster);
    assert_eq!(edge.read_json(&pod(0)).unwrap(), Some(spec("busybox:1")));
    // Acknowledged, and used (nothing more to send), but not written yet.
    assert_eq!(sc.watermark_ms(), None);
    assert_eq!(sc.unsaved_acks(), 1);
    assert_eq!(saved_ack(&cloud, &pod(0)), None);

    sc.save_acks(&cloud).unwrap();
    assert_eq!(sc.unsaved_acks(), 0);
    let heads = cloud.entry(&pod(0)).unwrap().unwrap().heads;
    assert_eq!(saved_ack(&cloud, &pod(0)), Some(heads.clone()));

    // The next acknowledgement is lost with the process (sessions dropped
    // unsaved): the store still holds the one before.
    cloud
        .write_json(&pod(0), &spec("busybox:2"), 2_000)
        .unwrap();
    sc.local_change(&CLOUD, &roster, &pod(0));
    settle(&mut cloud, &mut sc, &mut edge, &mut se, &roster);
    assert_eq!(sc.unsaved_acks(), 1);
    drop((sc, se));
    assert_eq!(saved_ack(&cloud, &pod(0)), Some(heads));
    // A new session and more writes on both sides converge all the same.
    cloud
        .write_json(&pod(0), &spec("busybox:3"), 3_000)
        .unwrap();
    let status: DocId = "pod-status/edge-1/default/p0/u".parse().unwrap();
    edge.write_json(&status, &json!({"phase": "Running"}), 3_000)
        .unwrap();
    let (mut sc, mut se) = sessions(&cloud, &edge, &roster);
    settle(&mut cloud, &mut sc, &mut edge, &mut se, &roster);
    for doc in [pod(0), status] {
        assert_eq!(
            edge.entry(&doc).unwrap().map(|e| e.heads),
            cloud.entry(&doc).unwrap().map(|e| e.heads),
            "{doc}"
        );
    }
    assert_eq!(edge.read_json(&pod(0)).unwrap(), Some(spec("busybox:3")));
}

#[test]
fn a_session_holding_too_many_acknowledgements_saves_them_itself() {
    let roster = roster();
    let mut cloud = replica("many-cloud", CLOUD);
    let mut edge = replica("many-edge", EDGE);
    let (mut sc, mut se) = sessions(&cloud, &edge, &roster);
    let docs: Vec<(DocId, serde_json::Value)> = (0..ACKS_UNSAVED_MAX + 10)
        .map(|i| (pod(i), spec(&format!("busybox:{i}"))))
        .collect();
    cloud
        .write_many(docs.iter().map(|(d, v)| (d, v)), 1_000)
        .unwrap();
    for (doc, _) in &docs {
        sc.local_change(&CLOUD, &roster, doc);
    }
    settle(&mut cloud, &mut sc, &mut edge, &mut se, &roster);
    assert_eq!(sc.watermark_ms(), None);
    assert!(
        sc.unsaved_acks() < ACKS_UNSAVED_MAX,
        "{} unsaved",
        sc.unsaved_acks()
    );
    let saved = docs
        .iter()
        .filter(|(d, _)| saved_ack(&cloud, d).is_some())
        .count();
    assert!(
        saved + sc.unsaved_acks() >= docs.len(),
        "{saved} saved, {} unsaved, of {}",
        sc.unsaved_acks(),
        docs.len()
    );
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn engine(name: &str, me: PeerId, roster: &Roster) -> Engine {
    Engine::new(replica(name, me), roster.clone(), SyncMetrics::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_saves_acknowledgements_a_second_later_and_when_the_session_ends() {
    let roster = roster();
    let cloud = engine("engine-cloud", CLOUD, &roster);
    let edge = engine("engine-edge", EDGE, &roster);
    let acked = |doc: &DocId| {
        cloud.with_replica(|r| {
            let heads = r.entry(doc).unwrap().map(|e| e.heads);
            heads.is_some() && saved_ack(r, doc) == heads
        })
    };
    let link = connect(&edge, &cloud, DEFAULT_LINK_BUFFER);
    until("both sessions", || {
        !cloud.connected().is_empty() && !edge.connected().is_empty()
    })
    .await;
    for i in 0..20 {
        cloud.write_json(&pod(i), &spec("busybox:1")).unwrap();
    }
    // Saved by the session's timer, with the session still open.
    until("the acknowledgements saved", || {
        (0..20).all(|i| acked(&pod(i)))
    })
    .await;

    let written = Instant::now();
    cloud.write_json(&pod(0), &spec("busybox:2")).unwrap();
    until("the new change acknowledged", || {
        cloud.watermark_ms(&EDGE).is_none() && cloud.pending(&EDGE) == Some(0)
    })
    .await;
    // Well within the second the engine waits (unless this machine is very
    // slow), the acknowledgement is not saved yet...
    if written.elapsed() < Duration::from_millis(500) {
        assert!(!acked(&pod(0)), "saved before its time");
    }
    // ...and the session's end saves it: the slot goes and the save is made
    // under one lock, so once the session is gone it is there.
    link.cut();
    until("the session's end", || cloud.connected().is_empty()).await;
    assert!(acked(&pod(0)), "the session's end did not save it");
}
