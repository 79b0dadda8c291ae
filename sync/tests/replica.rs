//! The replica and its event store: diffed writes, persistence across
//! restarts, batched application of peer changes, generations.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use outpost_sync::PeerId;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::replica::{Replica, ReplicaOptions};
use serde_json::json;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("outpost-replica-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn pod(name: &str) -> DocId {
    DocId::new(
        DocKind::PodSpec,
        Owner::Node("edge-1"),
        &["default", name, "uid"],
    )
    .unwrap()
}

#[test]
fn unchanged_write_makes_no_change_and_state_survives_restart() {
    let d = dir("restart");
    let me = PeerId([1; 32]);
    let doc = pod("web");
    let value =
        json!({"containers": [{"name": "main", "image": "busybox"}], "restartPolicy": "Always"});
    {
        let mut r = Replica::open(&d, me, ReplicaOptions::default()).unwrap();
        assert!(r.write_json(&doc, &value, 1000).unwrap().is_some());
        assert!(
            r.write_json(&doc, &value, 1001).unwrap().is_none(),
            "no change for an equal value"
        );
        let mut changed = value.clone();
        changed["restartPolicy"] = json!("Never");
        assert!(r.write_json(&doc, &changed, 1002).unwrap().is_some());
    }
    let mut r = Replica::open(&d, me, ReplicaOptions::default()).unwrap();
    let back = r.read_json(&doc).unwrap().unwrap();
    assert_eq!(back["restartPolicy"], json!("Never"));
    assert_eq!(back["containers"][0]["image"], json!("busybox"));
    assert_eq!(r.entry(&doc).unwrap().unwrap().changes, 2);
    assert!(
        r.write_json(&doc, &json!([1, 2]), 1003).is_err(),
        "root must be an object"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn peer_changes_apply_in_batches_and_converge() {
    let (da, db) = (dir("a"), dir("b"));
    let mut a = Replica::open(&da, PeerId([1; 32]), ReplicaOptions::default()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    let doc = DocId::new(
        DocKind::DeviceDesired,
        Owner::Node("edge-1"),
        &["default", "thermo"],
    )
    .unwrap();
    for i in 0..100 {
        a.write_json(&doc, &json!({"props": {"temp": i.to_string()}}), 1000 + i)
            .unwrap();
    }
    let (generation, changes) = a.changes_for(&doc, 0, &[], &[]).unwrap();
    assert_eq!(changes.len(), 100);
    let applied = b.apply(&doc, generation, &changes).unwrap();
    assert_eq!(applied.new_changes, 100);
    assert!(!applied.missing_deps);
    // Duplicates are harmless.
    assert_eq!(b.apply(&doc, generation, &changes).unwrap().new_changes, 0);
    assert_eq!(
        a.entry(&doc).unwrap().unwrap().heads,
        b.entry(&doc).unwrap().unwrap().heads
    );
    // Concurrent edits merge.
    a.write_json(&doc, &json!({"props": {"temp": "a"}, "x": 1}), 5000)
        .unwrap();
    b.write_json(&doc, &json!({"props": {"temp": "b"}, "y": 2}), 5001)
        .unwrap();
    let eb = b.entry(&doc).unwrap().unwrap();
    let (g, to_b) = a.changes_for(&doc, eb.generation, &eb.heads, &[]).unwrap();
    b.apply(&doc, g, &to_b).unwrap();
    let ea = a.entry(&doc).unwrap().unwrap();
    let (g, to_a) = b.changes_for(&doc, ea.generation, &ea.heads, &[]).unwrap();
    a.apply(&doc, g, &to_a).unwrap();
    assert_eq!(a.read_json(&doc).unwrap(), b.read_json(&doc).unwrap());
    // Malformed input changes nothing.
    let before = b.entry(&doc).unwrap();
    assert!(
        b.apply(&doc, g, &[vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3]])
            .is_err()
    );
    assert_eq!(b.entry(&doc).unwrap(), before);
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

#[test]
fn rolling_documents_stay_bounded_and_newer_generations_win() {
    let (da, db) = (dir("roll-a"), dir("roll-b"));
    let opts = ReplicaOptions {
        rollover_after_changes: 16,
        ..Default::default()
    };
    let mut a = Replica::open(&da, PeerId([1; 32]), opts.clone()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), opts).unwrap();
    let doc = DocId::new(
        DocKind::DeviceReported,
        Owner::Node("edge-1"),
        &["default", "thermo"],
    )
    .unwrap();
    let mut synced_generation = 0;
    for i in 0..1000u64 {
        a.write_json(
            &doc,
            &json!({"temp": (i % 50).to_string(), "ts": i}),
            1000 + i,
        )
        .unwrap();
        if i % 100 == 0 {
            let eb = b.entry(&doc).unwrap().unwrap_or_default();
            let (g, ch) = a.changes_for(&doc, eb.generation, &eb.heads, &[]).unwrap();
            b.apply(&doc, g, &ch).unwrap();
            synced_generation = g;
        }
    }
    let ea = a.entry(&doc).unwrap().unwrap();
    assert!(ea.generation > 50, "rolled over: {ea:?}");
    assert!(ea.changes <= 17);
    // An old generation arriving late is ignored.
    let eb = b.entry(&doc).unwrap().unwrap();
    let (g, ch) = a.changes_for(&doc, eb.generation, &eb.heads, &[]).unwrap();
    b.apply(&doc, g, &ch).unwrap();
    assert_eq!(a.read_json(&doc).unwrap(), b.read_json(&doc).unwrap());
    assert!(
        b.apply(&doc, synced_generation.saturating_sub(1), &[])
            .unwrap()
            .stale
            || synced_generation == 0
    );
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

#[test]
fn a_memory_store_survives_reopening_on_the_same_disk() {
    use outpost_sync::store::{MemoryDisk, StoreOptions};
    let disk = MemoryDisk::new().unwrap();
    let options = || ReplicaOptions {
        store: StoreOptions {
            memory: Some(disk.clone()),
            ..StoreOptions::default()
        },
        ..ReplicaOptions::default()
    };
    let doc: DocId = "device-reported/edge-1/default/m-1".parse().unwrap();
    let path = &dir("memory");
    {
        let mut r = Replica::open(path, PeerId([7; 32]), options()).unwrap();
        r.write_json(&doc, &serde_json::json!({"temp": "21"}), 1)
            .unwrap();
    }
    let mut r = Replica::open(path, PeerId([7; 32]), options()).unwrap();
    assert_eq!(
        r.read_json(&doc).unwrap(),
        Some(serde_json::json!({"temp": "21"}))
    );
    // The binding creates the directory; the files stay in memory.
    let on_disk = std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0);
    assert_eq!(on_disk, 0, "nothing is written to the real disk");
}

#[test]
fn a_scoped_subscription_sees_only_its_documents() {
    use outpost_sync::replica::Scope;
    let mut r = Replica::open(dir("scope"), PeerId([7; 32]), ReplicaOptions::default()).unwrap();
    let mut devices =
        r.subscribe_scope(Scope::all().kinds([DocKind::DeviceDesired]).node("edge-1"));
    let mut everything = r.subscribe_scope(Scope::all());
    let mine: DocId = "device-desired/edge-1/default/d-1".parse().unwrap();
    let other_node: DocId = "device-desired/edge-2/default/d-2".parse().unwrap();
    let other_kind: DocId = "device-reported/edge-1/default/d-1".parse().unwrap();
    for doc in [&other_node, &other_kind, &mine] {
        r.write_json(doc, &json!({"v": "1"}), 1).unwrap();
    }
    // An unchanged write persists nothing and tells no one.
    r.write_json(&mine, &json!({"v": "1"}), 2).unwrap();
    assert_eq!(devices.try_recv().unwrap(), Some(mine.clone()));
    assert_eq!(devices.try_recv().unwrap(), None);
    let mut all = Vec::new();
    while let Some(doc) = everything.try_recv().unwrap() {
        all.push(doc);
    }
    assert_eq!(all, vec![other_node, other_kind, mine]);
}

#[test]
fn a_burst_of_other_documents_does_not_make_a_scoped_subscription_lag() {
    use outpost_sync::replica::Scope;
    let mut r = Replica::open(dir("burst"), PeerId([7; 32]), ReplicaOptions::default()).unwrap();
    let mut heartbeats = r.subscribe_scope(Scope::all().kinds([DocKind::NodeStatus]));
    let node: DocId = "node-status/edge-1".parse().unwrap();
    r.write_json(&node, &json!({"heartbeatMs": 1}), 1).unwrap();
    // Thousands of pod statuses (a reconnect storm's backlog)...
    for i in 0..5_000 {
        let doc: DocId = format!("pod-status/edge-2/default/p-{i}/u-{i}")
            .parse()
            .unwrap();
        r.write_json(&doc, &json!({"phase": "Running"}), 2).unwrap();
    }
    r.write_json(&node, &json!({"heartbeatMs": 2}), 3).unwrap();
    // ...and the heartbeat subscriber still sees each heartbeat, no lag.
    assert_eq!(heartbeats.try_recv().unwrap(), Some(node.clone()));
    assert_eq!(heartbeats.try_recv().unwrap(), Some(node));
    assert_eq!(heartbeats.try_recv().unwrap(), None);
}

#[test]
fn a_deletion_is_persisted_and_a_stale_change_does_not_revive_it() {
    let d = dir("delete");
    let doc: DocId = "pod-spec/edge-1/default/web/u-1".parse().unwrap();
    let mut other = Replica::open(
        dir("delete-other"),
        PeerId([8; 32]),
        ReplicaOptions::default(),
    )
    .unwrap();
    {
        let mut r = Replica::open(&d, PeerId([7; 32]), ReplicaOptions::default()).unwrap();
        r.write_json(&doc, &json!({"name": "web"}), 1).unwrap();
        // The other replica has generation 0 and changes it concurrently.
        let (g, ch) = r.changes_for(&doc, 0, &[], &[]).unwrap();
        other.apply(&doc, g, &ch).unwrap();
        other
            .write_json(&doc, &json!({"name": "web", "late": true}), 2)
            .unwrap();
        assert!(r.delete(&doc, 3).unwrap());
        // The concurrent change of the old generation is stale here.
        let (g, ch) = other.changes_for(&doc, 0, &[], &[]).unwrap();
        assert!(r.apply(&doc, g, &ch).unwrap().stale);
    }
    let mut r = Replica::open(&d, PeerId([7; 32]), ReplicaOptions::default()).unwrap();
    assert_eq!(r.read_json(&doc).unwrap(), None, "deleted across a restart");
    assert!(r.is_deleted(&doc).unwrap());
    // The tombstone supersedes the other replica's generation there too.
    let e = other.entry(&doc).unwrap().unwrap();
    let (g, ch) = r.changes_for(&doc, e.generation, &e.heads, &[]).unwrap();
    other.apply(&doc, g, &ch).unwrap();
    assert_eq!(other.read_json(&doc).unwrap(), None);
}

/// A report that extends the receiver's only head in a straight line is
/// appended without loading the document (cached or not) and applied when
/// the document is next read; anything else is checked in full.
#[test]
fn straight_line_reports_are_appended_and_read_back_exactly() {
    let (da, db) = (dir("line-a"), dir("line-b"));
    let mut a = Replica::open(&da, PeerId([1; 32]), ReplicaOptions::default()).unwrap();
    // A one-document cache: the receiver's documents keep leaving it.
    let small = ReplicaOptions {
        cache_docs: std::num::NonZeroUsize::new(1).unwrap(),
        ..Default::default()
    };
    let mut b = Replica::open(&db, PeerId([2; 32]), small.clone()).unwrap();
    let docs: Vec<DocId> = (0..3)
        .map(|i| {
            DocId::new(
                DocKind::DeviceReported,
                Owner::Node("edge-1"),
                &["default", &format!("dev-{i}")],
            )
            .unwrap()
        })
        .collect();
    let sync = |a: &mut Replica, b: &mut Replica, doc: &DocId| {
        let eb = b.entry(doc).unwrap().unwrap_or_default();
        let (g, ch) = a.changes_for(doc, eb.generation, &eb.heads, &[]).unwrap();
        let applied = b.apply(doc, g, &ch).unwrap();
        assert!(!applied.missing_deps);
        let ea = a.entry(doc).unwrap().unwrap();
        assert_eq!(
            (applied.entry.generation, &applied.entry.heads),
            (ea.generation, &ea.heads)
        );
    };
    for round in 0..40u64 {
        for (i, doc) in docs.iter().enumerate() {
            let value = json!({"state": "online", "twins": {"t": {"value": (round * 7 + i as u64).to_string()}}});
            a.write_json(doc, &value, 1000 + round).unwrap();
            sync(&mut a, &mut b, doc);
            if round % 9 == 4 {
                // Read between reports: the appended changes are applied.
                assert_eq!(b.read_json(doc).unwrap(), a.read_json(doc).unwrap());
            }
        }
        if round == 20 {
            // Two reports in one batch.
            for round in [1000u64, 1001] {
                a.write_json(&docs[0], &json!({"state": "offline", "n": round}), round)
                    .unwrap();
            }
            sync(&mut a, &mut b, &docs[0]);
        }
    }
    // A change the receiver has already is harmless.
    let eb = b.entry(&docs[1]).unwrap().unwrap();
    let (g, all) = a.changes_for(&docs[1], eb.generation, &[], &[]).unwrap();
    assert_eq!(b.apply(&docs[1], g, &all).unwrap().new_changes, 0);
    for doc in &docs {
        assert_eq!(b.read_json(doc).unwrap(), a.read_json(doc).unwrap());
    }
    // What was appended is what a restart finds.
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), small).unwrap();
    for doc in &docs {
        assert_eq!(b.read_json(doc).unwrap(), a.read_json(doc).unwrap());
        assert_eq!(
            b.entry(doc).unwrap().unwrap().heads,
            a.entry(doc).unwrap().unwrap().heads
        );
    }
    // Receiving does not load the document; reading it does.
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    a.write_json(&docs[2], &json!({"state": "online", "n": 1}), 9000)
        .unwrap();
    sync(&mut a, &mut b, &docs[2]);
    assert_eq!(b.cached_docs(), 0, "appended without loading");
    assert_eq!(
        b.read_json(&docs[2]).unwrap(),
        a.read_json(&docs[2]).unwrap()
    );
    assert_eq!(b.cached_docs(), 1);
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

/// A document new to the receiver whose changes start from nothing in a
/// straight line is stored as it comes, without automerge; changes that
/// start elsewhere (their dependencies missing) go the checked path and
/// wait for what they lack.
#[test]
fn a_new_document_received_in_a_straight_line_is_stored_without_loading() {
    let (da, db, dc) = (dir("new-a"), dir("new-b"), dir("new-c"));
    let mut a = Replica::open(&da, PeerId([1; 32]), ReplicaOptions::default()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    let doc = pod("fresh");
    for i in 0..3 {
        a.write_json(
            &doc,
            &json!({"containers": [{"name": "main", "image": format!("busybox:{i}")}]}),
            1000 + i,
        )
        .unwrap();
    }
    let (g, all) = a.changes_for(&doc, 0, &[], &[]).unwrap();
    assert_eq!(all.len(), 3);
    let applied = b.apply(&doc, g, &all).unwrap();
    assert_eq!(applied.new_changes, 3);
    assert!(!applied.missing_deps);
    assert_eq!(b.cached_docs(), 0, "stored without loading");
    assert_eq!(
        b.entry(&doc).unwrap(),
        a.entry(&doc).unwrap().map(|mut e| {
            // The sender compacts on its own schedule; generation, heads and
            // change count are what must agree.
            e.chunks = 3;
            e.snapshot = None;
            e
        })
    );
    // The next change extends the line from what was just stored.
    a.write_json(
        &doc,
        &json!({"containers": [{"name": "main", "image": "busybox:9"}]}),
        2000,
    )
    .unwrap();
    let eb = b.entry(&doc).unwrap().unwrap();
    let (g, next) = a.changes_for(&doc, eb.generation, &eb.heads, &[]).unwrap();
    assert_eq!(b.apply(&doc, g, &next).unwrap().new_changes, 1);
    assert_eq!(b.cached_docs(), 0);
    assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());

    // The last changes alone, to a replica without the first: checked,
    // held, and asked for what they depend on.
    let mut c = Replica::open(&dc, PeerId([3; 32]), ReplicaOptions::default()).unwrap();
    let (g, all) = a.changes_for(&doc, 0, &[], &[]).unwrap();
    let applied = c.apply(&doc, g, &all[2..]).unwrap();
    assert!(applied.missing_deps);
    let applied = c.apply(&doc, g, &all[..2]).unwrap();
    assert!(!applied.missing_deps);
    assert_eq!(c.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());
    for d in [da, db, dc] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A second writer's report with the same sequence number as one the
/// receiver holds (an edge that lost its data and came back with the same
/// actor) does not extend the line: automerge refuses it, and what the
/// receiver stored stays readable.
#[test]
fn a_report_that_reuses_a_sequence_number_is_refused_and_the_store_stays_readable() {
    let (da, dc, db) = (dir("seq-a"), dir("seq-c"), dir("seq-b"));
    let me = PeerId([1; 32]);
    let doc = DocId::new(
        DocKind::DeviceReported,
        Owner::Node("edge-1"),
        &["default", "dup"],
    )
    .unwrap();
    let mut a = Replica::open(&da, me, ReplicaOptions::default()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    a.write_json(&doc, &json!({"v": "1"}), 1000).unwrap();
    let (g, first) = a.changes_for(&doc, 0, &[], &[]).unwrap();
    b.apply(&doc, g, &first).unwrap();
    // A fork of `a` (same actor) after the first change.
    drop(a);
    copy_dir(&da, &dc);
    let mut a = Replica::open(&da, me, ReplicaOptions::default()).unwrap();
    let mut c = Replica::open(&dc, me, ReplicaOptions::default()).unwrap();
    a.write_json(&doc, &json!({"v": "2"}), 1001).unwrap();
    c.write_json(&doc, &json!({"v": "other"}), 1001).unwrap();
    let head = b.entry(&doc).unwrap().unwrap().heads;
    let (g, second) = a.changes_for(&doc, 0, &head, &[]).unwrap();
    b.apply(&doc, g, &second).unwrap();
    let (g, forged) = c.changes_for(&doc, 0, &head, &[]).unwrap();
    let before = b.entry(&doc).unwrap();
    let _ = b.apply(&doc, g, &forged);
    assert_eq!(b.read_json(&doc).unwrap(), Some(json!({"v": "2"})));
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    assert_eq!(b.entry(&doc).unwrap(), before);
    assert_eq!(b.read_json(&doc).unwrap(), Some(json!({"v": "2"})));
    for d in [da, dc, db] {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// One batch naming a document twice (two messages' worth of its changes)
/// keeps both: the second item sees what the first staged.
#[test]
fn a_batch_naming_a_document_twice_keeps_both_parts() {
    use outpost_sync::replica::{Incoming, decode_changes};
    let (da, db) = (dir("twice-a"), dir("twice-b"));
    let mut a = Replica::open(&da, PeerId([1; 32]), ReplicaOptions::default()).unwrap();
    let doc = DocId::new(
        DocKind::DeviceReported,
        Owner::Node("edge-1"),
        &["default", "twice"],
    )
    .unwrap();
    a.write_json(&doc, &json!({"v": "0"}), 1000).unwrap();
    {
        let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
        let (g, ch) = a.changes_for(&doc, 0, &[], &[]).unwrap();
        b.apply(&doc, g, &ch).unwrap();
    }
    let base = a.entry(&doc).unwrap().unwrap().heads;
    a.write_json(&doc, &json!({"v": "1"}), 1001).unwrap();
    let middle = a.entry(&doc).unwrap().unwrap().heads;
    a.write_json(&doc, &json!({"v": "2"}), 1002).unwrap();
    let (g, first) = a.changes_for(&doc, 0, &base, &[]).unwrap();
    let (_, second) = a.changes_for(&doc, 0, &middle, &[]).unwrap();
    assert_eq!((first.len(), second.len()), (2, 1));
    let first = first[..1].to_vec();
    // Reopened: the document is not loaded when the batch arrives.
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    let items = [first, second]
        .into_iter()
        .map(|changes| Incoming {
            doc: doc.clone(),
            generation: g,
            changes: decode_changes(&doc, changes).unwrap(),
        })
        .collect();
    for result in b.apply_batch(items).unwrap() {
        result.unwrap();
    }
    assert_eq!(b.read_json(&doc).unwrap(), Some(json!({"v": "2"})));
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
    assert_eq!(b.read_json(&doc).unwrap(), Some(json!({"v": "2"})));
    assert_eq!(
        b.entry(&doc).unwrap().unwrap().heads,
        a.entry(&doc).unwrap().unwrap().heads
    );
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

/// A flat document's changes are built by the replica itself while it alone
/// writes the document (see `Replica::stage_flat_direct`); everything that
/// needs the document whole reads it again from the store. Every way of
/// reaching it gives back what was written: reads, a peer syncing from
/// scratch, a second writer, a batch that rolls the document over midway,
/// and a restart.
#[test]
fn flat_writes_read_back_through_every_path() {
    // With the default cache, and with a one-document cache, where the
    // flat document is kept out of the cache (without its automerge
    // document) between writes, and another document takes the cache.
    flat_paths(256);
    flat_paths(1);
}

fn flat_paths(cache: usize) {
    let (da, db) = (
        dir(&format!("flat-a{cache}")),
        dir(&format!("flat-b{cache}")),
    );
    let opts = ReplicaOptions {
        rollover_after_changes: 16,
        cache_docs: std::num::NonZeroUsize::new(cache).unwrap(),
        ..Default::default()
    };
    let other = pod("other");
    let mut a = Replica::open(&da, PeerId([1; 32]), opts.clone()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), opts.clone()).unwrap();
    let doc = DocId::new(
        DocKind::DeviceReported,
        Owner::Node("edge-1"),
        &["default", "flat"],
    )
    .unwrap();
    let report = |i: u64| {
        let mut v = json!({"state": "online", "twins": {"t": {"value": (i % 7).to_string()}}});
        if i.is_multiple_of(3) {
            v["extra"] = json!(i); // comes and goes
        }
        v
    };
    let sync = |from: &mut Replica, to: &mut Replica| {
        let e = to.entry(&doc).unwrap().unwrap_or_default();
        let (g, ch) = from.changes_for(&doc, e.generation, &e.heads, &[]).unwrap();
        let applied = to.apply(&doc, g, &ch).unwrap();
        assert!(!applied.missing_deps);
    };
    for i in 0..100u64 {
        a.write_json(&doc, &report(i), 1000 + i).unwrap();
        if i % 5 == 2 {
            // Another document in between takes a one-document cache.
            a.write_json(&other, &json!({"containers": [], "n": i}), 1000 + i)
                .unwrap();
        }
        assert_eq!(a.read_json(&doc).unwrap().unwrap(), report(i));
        if i % 11 == 0 {
            sync(&mut a, &mut b);
            assert_eq!(b.read_json(&doc).unwrap().unwrap(), report(i));
        }
        if i == 50 {
            // A peer that has nothing gets every change of the generation.
            let (g, all) = a.changes_for(&doc, 0, &[], &[]).unwrap();
            let (dc, mut c) = {
                let d = dir(&format!("flat-c{cache}"));
                let c = Replica::open(&d, PeerId([3; 32]), opts.clone()).unwrap();
                (d, c)
            };
            c.apply(&doc, g, &all).unwrap();
            assert_eq!(c.read_json(&doc).unwrap().unwrap(), report(i));
            drop(c);
            let _ = std::fs::remove_dir_all(dc);
        }
    }
    // A second writer: both sides end up with the same values.
    sync(&mut a, &mut b);
    b.write_json(&doc, &json!({"state": "offline", "by": "b"}), 5000)
        .unwrap();
    a.write_json(&doc, &json!({"state": "online", "by": "a"}), 5001)
        .unwrap();
    sync(&mut b, &mut a);
    sync(&mut a, &mut b);
    assert_eq!(a.read_json(&doc).unwrap(), b.read_json(&doc).unwrap());
    // Writing again after the merge, then a batch that rolls the document
    // over midway.
    for i in 200..210u64 {
        a.write_json(&doc, &report(i), 6000 + i).unwrap();
    }
    let batch: Vec<serde_json::Value> = (300..340u64).map(report).collect();
    a.write_many(batch.iter().map(|v| (&doc, v)), 7000).unwrap();
    assert_eq!(a.read_json(&doc).unwrap().unwrap(), report(339));
    sync(&mut a, &mut b);
    assert_eq!(b.read_json(&doc).unwrap().unwrap(), report(339));
    let before = a.entry(&doc).unwrap().unwrap();
    drop(a);
    let mut a = Replica::open(&da, PeerId([1; 32]), opts).unwrap();
    assert_eq!(a.entry(&doc).unwrap().unwrap(), before);
    assert_eq!(a.read_json(&doc).unwrap().unwrap(), report(339));
    a.write_json(&doc, &report(400), 8000).unwrap();
    sync(&mut a, &mut b);
    assert_eq!(b.read_json(&doc).unwrap().unwrap(), report(400));
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

/// One `write_many` naming a document twice, with more documents between
/// than the cache holds: both writes are kept, in order, and the store
/// reads back after a restart.
#[test]
fn a_write_many_naming_a_document_twice_far_apart_keeps_both_writes() {
    let d = dir("many-twice");
    let small = ReplicaOptions {
        cache_docs: std::num::NonZeroUsize::new(4).unwrap(),
        ..Default::default()
    };
    let mut r = Replica::open(&d, PeerId([1; 32]), small.clone()).unwrap();
    let x = pod("twice");
    r.write_json(&x, &json!({"image": "v0"}), 1000).unwrap();
    let first = json!({"image": "v1", "first": true});
    let second = json!({"image": "v2"});
    let others: Vec<(DocId, serde_json::Value)> = (0..10)
        .map(|i| {
            (
                pod(&format!("between-{i}")),
                json!({"image": format!("o{i}")}),
            )
        })
        .collect();
    let mut items: Vec<(&DocId, &serde_json::Value)> = vec![(&x, &first)];
    items.extend(others.iter().map(|(d, v)| (d, v)));
    items.push((&x, &second));
    let hashes = r.write_many(items, 2000).unwrap();
    assert!(hashes.iter().all(Option::is_some));
    assert_eq!(r.read_json(&x).unwrap(), Some(second.clone()));
    let entry = r.entry(&x).unwrap().unwrap();
    assert_eq!(entry.changes, 3, "v0, v1 and v2 are three changes");
    assert_eq!(entry.heads, vec![hashes.last().unwrap().unwrap().0]);
    drop(r);
    let mut r = Replica::open(&d, PeerId([1; 32]), small).unwrap();
    assert_eq!(r.read_json(&x).unwrap(), Some(second));
    assert_eq!(r.entry(&x).unwrap().unwrap().changes, 3);
    for (doc, value) in &others {
        assert_eq!(r.read_json(doc).unwrap().as_ref(), Some(value));
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A straight line received past the compaction threshold is stored as it
/// comes and compacted by [`Replica::compact_deferred`], unless the document
/// changed since in another way (that path compacts it) or the line reaches
/// twice the threshold (then on receipt).
#[test]
fn compaction_due_on_receipt_waits_for_compact_deferred() {
    let (da, db) = (dir("deferred-a"), dir("deferred-b"));
    let mut options = ReplicaOptions::default();
    options.store.compact_after_chunks = 4;
    let mut a = Replica::open(&da, PeerId([1; 32]), options.clone()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), options.clone()).unwrap();
    let doc = pod("deferred");
    let send = |a: &mut Replica, b: &mut Replica, doc: &DocId, i: u64| {
        a.write_json(doc, &json!({"image": format!("busybox:{i}")}), 1000 + i)
            .unwrap();
        let eb = b.entry(doc).unwrap().unwrap_or_default();
        let (g, next) = a.changes_for(doc, eb.generation, &eb.heads, &[]).unwrap();
        assert_eq!(b.apply(doc, g, &next).unwrap().new_changes, 1);
        b.entry(doc).unwrap().unwrap()
    };
    for i in 0..4 {
        assert_eq!(send(&mut a, &mut b, &doc, i).chunks, i as u32 + 1);
    }
    // The fifth is past the threshold: stored, compaction left for later.
    let entry = send(&mut a, &mut b, &doc, 4);
    assert_eq!((entry.chunks, entry.snapshot), (5, None));
    assert_eq!(b.compact_deferred(8).unwrap(), 0);
    assert_eq!(b.cached_docs(), 0, "compacted without loading");
    let entry = b.entry(&doc).unwrap().unwrap();
    assert_eq!(entry.chunks, 0);
    assert!(entry.snapshot.is_some());
    assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());

    // Never compacted later: on receipt once past twice the threshold.
    let counts: Vec<u32> = (5..20)
        .map(|i| send(&mut a, &mut b, &doc, i).chunks)
        .collect();
    assert!(counts.iter().all(|&c| c <= 8), "{counts:?}");
    assert!(counts.contains(&8) && counts.contains(&0), "{counts:?}");

    // Due, then changed another way: the write that changed it compacted
    // it, and `compact_deferred` leaves it as it is.
    let due = (100..110).find(|&i| send(&mut a, &mut b, &doc, i).chunks > 4);
    assert!(due.is_some());
    b.write_json(&doc, &json!({"image": "local"}), 5000)
        .unwrap();
    let before = b.entry(&doc).unwrap().unwrap();
    assert_eq!(b.compact_deferred(8).unwrap(), 0);
    assert_eq!(b.entry(&doc).unwrap().unwrap(), before);
    assert!(before.chunks <= 4, "{before:?}");

    // A local write after a compaction in the idle turn is appended after
    // it, and reads back.
    let other = pod("deferred-then-written");
    for i in 0..5 {
        send(&mut a, &mut b, &other, i);
    }
    assert_eq!(b.compact_deferred(8).unwrap(), 0);
    assert_eq!(b.entry(&other).unwrap().unwrap().chunks, 0);
    b.write_json(&other, &json!({"image": "local"}), 6000)
        .unwrap();
    assert_eq!(b.entry(&other).unwrap().unwrap().chunks, 1);
    let values = [b.read_json(&doc).unwrap(), b.read_json(&other).unwrap()];
    assert_eq!(values[1], Some(json!({"image": "local"})));
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), options).unwrap();
    assert_eq!(
        [b.read_json(&doc).unwrap(), b.read_json(&other).unwrap()],
        values
    );
    for d in [da, db] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A peer's long straight line of changes is compacted without loading the
/// document (its chunks appended to the snapshot as they are) until the
/// snapshot reaches its cap, then the usual way, whether the compaction is
/// left for [`Replica::compact_deferred`] or done on receipt (past twice the
/// threshold); what is stored reads back exactly, before and after
/// reopening.
#[test]
fn a_long_line_received_is_compacted_without_loading_and_reads_back_exactly() {
    let (da, db) = (dir("long-a"), dir("long-b"));
    let mut options = ReplicaOptions::default();
    options.store.compact_after_chunks = 8;
    let mut a = Replica::open(&da, PeerId([1; 32]), options.clone()).unwrap();
    let mut b = Replica::open(&db, PeerId([2; 32]), options.clone()).unwrap();
    let doc = pod("long");
    let mut raw_bytes = 0;
    for i in 0..600u64 {
        // About 250 bytes of new values per change.
        a.write_json(
            &doc,
            &json!({"containers": [{"name": "main", "image": format!("busybox:{i}"), "args": [format!("{i}-{}", "x".repeat(200))]}]}),
            1000 + i,
        )
        .unwrap();
        let eb = b.entry(&doc).unwrap().unwrap_or_default();
        let (g, next) = a.changes_for(&doc, eb.generation, &eb.heads, &[]).unwrap();
        raw_bytes += next.iter().map(Vec::len).sum::<usize>();
        assert_eq!(
            b.apply(&doc, g, &next).unwrap().new_changes,
            1,
            "change {i}"
        );
        // Stretches where the engine would be idle, and stretches where
        // it would not.
        if (i / 50) % 2 == 0 {
            assert_eq!(b.compact_deferred(usize::MAX).unwrap(), 0);
            assert!(b.entry(&doc).unwrap().unwrap().chunks <= 8, "change {i}");
        }
        assert!(b.entry(&doc).unwrap().unwrap().chunks <= 16, "change {i}");
        if i == 100 {
            // Nothing has read the document yet.
            assert_eq!(b.cached_docs(), 0, "compacted 10 times without loading");
        }
        if i > 100 && i % 97 == 0 {
            assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());
        }
    }
    // Past the snapshot's cap (64 KB), compaction went the usual way, and
    // nothing is stored twice.
    let bytes = b.store().doc_bytes(&doc).unwrap() as usize;
    assert!(raw_bytes > 128 << 10, "{raw_bytes} bytes of changes");
    assert!(bytes <= raw_bytes + (8 << 10), "{bytes} bytes stored");
    assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());
    assert_eq!(
        b.entry(&doc).unwrap().unwrap().heads,
        a.entry(&doc).unwrap().unwrap().heads
    );
    drop(b);
    let mut b = Replica::open(&db, PeerId([2; 32]), options).unwrap();
    assert_eq!(b.read_json(&doc).unwrap(), a.read_json(&doc).unwrap());
    for d in [da, db] {
        let _ = std::fs::remove_dir_all(d);
    }
}
