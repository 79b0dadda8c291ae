//! Bugs of outpost-sync that the simulation found, reduced to a few lines,
//! kept as regression tests once fixed.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::path::Path;

use outpost_sync::PeerId;
use outpost_sync::desired::{resolve, set_desired};
use outpost_sync::document::DocId;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::store::{MemoryDisk, StoreOptions};

fn open(disk: &MemoryDisk, name: &str, me: u8) -> Replica {
    let options = ReplicaOptions {
        store: StoreOptions {
            memory: Some(disk.clone()),
            ..StoreOptions::default()
        },
        ..ReplicaOptions::default()
    };
    Replica::open(Path::new("/bugs").join(name), PeerId([me; 32]), options).unwrap()
}

fn sync(from: &mut Replica, to: &mut Replica, doc: &DocId) {
    let e = to.entry(doc).unwrap().unwrap_or_default();
    let (g, changes) = from.changes_for(doc, e.generation, &e.heads, &[]).unwrap();
    to.apply(doc, g, &changes).unwrap();
}

/// Found by `outpost-sim run --seed 1 --scenario simulation/scenarios/desired-race.toml`
/// (and by the 1,000-edge benchmark without any fault): the cloud and the
/// edge each set a desired value of a device-desired document that neither
/// has yet. Each `set_desired` creates the document's `desired` map; the two
/// maps are concurrent values of the same root key, automerge keeps one, and
/// the other writer's slot vanishes from the merged document: an
/// acknowledged write is lost, not even visible as a losing write. It stays
/// lost unless its writer writes that property again.
#[test]
fn concurrent_first_desired_writes_keep_both_slots() {
    let disk = MemoryDisk::new().unwrap();
    let mut cloud = open(&disk, "cloud", 1);
    let mut edge = open(&disk, "edge", 2);
    let doc: DocId = "device-desired/edge-1/default/thermo".parse().unwrap();
    set_desired(&mut cloud, &doc, "temp", "20", 1_000).unwrap();
    set_desired(&mut edge, &doc, "temp", "25", 2_000).unwrap();
    sync(&mut cloud, &mut edge, &doc);
    sync(&mut edge, &mut cloud, &doc);
    let a = cloud.read_json(&doc).unwrap().unwrap();
    let b = edge.read_json(&doc).unwrap().unwrap();
    assert_eq!(a, b, "both sides read alike");
    let temp = &resolve(&a)["temp"];
    assert_eq!(temp.winner.value, "25", "{a}");
    assert_eq!(
        temp.losers
            .iter()
            .map(|w| w.value.as_str())
            .collect::<Vec<_>>(),
        ["20"],
        "the cloud's concurrent write stays visible as the loser: {a}"
    );
}
