//! Desired values: the one multi-writer document kind.
//!
//! The cloud (from the Device's `desired` values) and the owning edge (local
//! apps, offline) may both set a property's desired value. Each writer keeps
//! its own slot per property, so concurrent writes never overwrite each
//! other inside automerge; every slot carries the writer's hybrid logical
//! timestamp and the newest timestamp it had seen in the other slots.
//!
//! The rule: the value with the highest timestamp wins (ties broken by
//! writer id). A slot the winner had not seen (its timestamp is newer than
//! what the winner saw) lost a conflict, and stays visible as such: who
//! wrote it, when, and what.
//!
//! Document layout: each writer keeps its slots under a root key of its own,
//! `{"desired:<writer>": {"<property>": {"value", "wall_ms", "counter", "seen_wall_ms", "seen_counter"}}}`,
//! beside whatever else the writers keep in the document (protocol and
//! visitor config). Only that writer ever creates that key or the maps in
//! it: two writers creating one nested map concurrently would make two
//! concurrent maps under one key, of which automerge keeps one, and the
//! other writer's values would vanish.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::document::{DocId, DocKind};
use crate::hlc::Hlc;
use crate::replica::{Replica, ReplicaError};

/// One writer's desired value of a property.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredWrite {
    /// The writer's identity (hex of its key).
    pub writer: String,
    /// The value (KubeEdge twin values are strings).
    pub value: String,
    /// When it was written.
    pub at: Hlc,
    /// The newest timestamp of another writer's value it had seen.
    pub seen: Hlc,
}

/// A property's resolved desired value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// The winning write.
    pub winner: DesiredWrite,
    /// Writes that were concurrent with the winner and lost.
    pub losers: Vec<DesiredWrite>,
}

/// Why a desired value could not be set.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// The document is not a device-desired document.
    #[error("{0} is not a device-desired document")]
    WrongKind(DocId),
    /// The replica failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

fn hlc_of(slot: &Value, wall: &str, counter: &str) -> Hlc {
    Hlc {
        wall_ms: slot.get(wall).and_then(Value::as_u64).unwrap_or(0),
        counter: slot.get(counter).and_then(Value::as_u64).unwrap_or(0) as u32,
    }
}

/// The root key holding a writer's slots.
pub const SLOTS_PREFIX: &str = "desired:";

/// Every writer's desired value of every property of a device-desired
/// document's JSON, by property. Malformed slots are skipped.
pub fn writes(doc: &Value) -> BTreeMap<String, Vec<DesiredWrite>> {
    let mut out: BTreeMap<String, Vec<DesiredWrite>> = BTreeMap::new();
    let Some(root) = doc.as_object() else {
        return out;
    };
    for (key, props) in root {
        let Some(writer) = key.strip_prefix(SLOTS_PREFIX) else {
            continue;
        };
        let Some(props) = props.as_object() else {
            continue;
        };
        for (property, slot) in props {
            let Some(value) = slot.get("value").and_then(Value::as_str) else {
                continue;
            };
            out.entry(property.clone()).or_default().push(DesiredWrite {
                writer: writer.to_owned(),
                value: value.to_owned(),
                at: hlc_of(slot, "wall_ms", "counter"),
                seen: hlc_of(slot, "seen_wall_ms", "seen_counter"),
            });
        }
    }
    out
}

/// Sets this replica's desired value of `property` in a device-desired
/// document, stamped after every value it has seen. Persisted before it returns.
pub fn set_desired(
    replica: &mut Replica,
    doc: &DocId,
    property: &str,
    value: &str,
    now_ms: u64,
) -> Result<Hlc, DesiredError> {
    set_desired_at(replica, doc, property, value, now_ms, None)
}

/// [`set_desired`] for a value written elsewhere before it is recorded
/// here: `written_ms` is when its source took it (the API server's record
/// of the change), if that is before `now_ms`. The write is stamped then,
/// not when recorded, so that a writer that records late (a bridge that was
/// down or busy) does not make an older write beat a newer one; it counts
/// as having seen only what the document held from before that time, so a
/// newer write of another writer keeps winning and this one stays visible
/// as the loser.
pub fn set_desired_at(
    replica: &mut Replica,
    doc: &DocId,
    property: &str,
    value: &str,
    now_ms: u64,
    written_ms: Option<u64>,
) -> Result<Hlc, DesiredError> {
    if doc.kind() != DocKind::DeviceDesired {
        return Err(DesiredError::WrongKind(doc.clone()));
    }
    let mut body = replica.read_json(doc)?.unwrap_or_else(|| json!({}));
    let me = replica.me().to_string();
    let all = writes(&body);
    // The newest timestamp of this property's writes that `keep` selects.
    let latest = |keep: &dyn Fn(&DesiredWrite) -> bool| {
        all.get(property)
            .into_iter()
            .flatten()
            .filter(|w| keep(w))
            .map(|w| w.at)
            .max()
            .unwrap_or_default()
    };
    let seen = latest(&|w| w.writer != me);
    // After what it saw, and after its own previous write.
    let own = latest(&|w| w.writer == me);
    let (at, seen) = match written_ms.filter(|w| *w < now_ms) {
        None => {
            replica.observe(seen.max(own));
            (replica.tick(now_ms)?, seen)
        }
        Some(written) => {
            let stamp = Hlc {
                wall_ms: written,
                counter: 0,
            };
            // After this writer's own previous value, whatever the record says.
            let at = if stamp > own {
                stamp
            } else {
                Hlc {
                    wall_ms: own.wall_ms,
                    counter: own.counter.saturating_add(1),
                }
            };
            (at, latest(&|w| w.writer != me && w.at < at))
        }
    };
    let slot = json!({
        "value": value,
        "wall_ms": at.wall_ms,
        "counter": at.counter,
        "seen_wall_ms": seen.wall_ms,
        "seen_counter": seen.counter,
    });
    if !body.is_object() {
        body = json!({});
    }
    let mine = body.as_object_mut().map(|o| {
        o.entry(format!("{SLOTS_PREFIX}{me}"))
            .or_insert_with(|| json!({}))
    });
    if let Some(mine) = mine {
        if !mine.is_object() {
            *mine = json!({});
        }
        if let Value::Object(mine) = mine {
            mine.insert(property.to_owned(), slot);
        }
    }
    replica.write_json(doc, &body, now_ms)?;
    Ok(at)
}

/// Resolves every property of a device-desired document's JSON by the rule
/// above.
pub fn resolve(doc: &Value) -> BTreeMap<String, Resolved> {
    let mut out = BTreeMap::new();
    for (name, mut writes) in writes(doc) {
        writes.sort_by(|a, b| (b.at, &b.writer).cmp(&(a.at, &a.writer)));
        let mut iter = writes.into_iter();
        let Some(winner) = iter.next() else { continue };
        let losers = iter
            .filter(|w| w.at > winner.seen && w.value != winner.value)
            .collect();
        out.insert(name, Resolved { winner, losers });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerId;
    use crate::replica::ReplicaOptions;

    fn open(tag: &str, me: u8) -> (Replica, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("outpost-desired-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (
            Replica::open(&dir, PeerId([me; 32]), ReplicaOptions::default()).unwrap(),
            dir,
        )
    }

    fn sync(from: &mut Replica, to: &mut Replica, doc: &DocId) {
        let e = to.entry(doc).unwrap().unwrap_or_default();
        let (g, ch) = from.changes_for(doc, e.generation, &e.heads, &[]).unwrap();
        to.apply(doc, g, &ch).unwrap();
    }

    #[test]
    fn concurrent_writes_resolve_by_hlc_and_keep_the_loser_visible() {
        let (mut cloud, d1) = open("cloud", 1);
        let (mut edge, d2) = open("edge", 2);
        let doc: DocId = "device-desired/edge-1/default/thermo".parse().unwrap();
        set_desired(&mut cloud, &doc, "temp", "20", 1_000).unwrap();
        sync(&mut cloud, &mut edge, &doc);
        // Partitioned: both change it; the edge's clock is later.
        set_desired(&mut cloud, &doc, "temp", "22", 2_000).unwrap();
        set_desired(&mut edge, &doc, "temp", "25", 3_000).unwrap();
        sync(&mut cloud, &mut edge, &doc);
        sync(&mut edge, &mut cloud, &doc);
        let a = resolve(&cloud.read_json(&doc).unwrap().unwrap());
        let b = resolve(&edge.read_json(&doc).unwrap().unwrap());
        assert_eq!(a, b, "both sides resolve alike");
        let temp = &a["temp"];
        assert_eq!(temp.winner.value, "25");
        assert_eq!(temp.winner.writer, PeerId([2; 32]).to_string());
        assert_eq!(temp.losers.len(), 1);
        assert_eq!(temp.losers[0].value, "22");
        assert_eq!(temp.losers[0].writer, PeerId([1; 32]).to_string());
        assert_eq!(temp.losers[0].at.wall_ms, 2_000);

        // A write made after seeing the other's is no conflict, even with a
        // clock that lags behind (the HLC orders it after what it saw).
        set_desired(&mut cloud, &doc, "temp", "21", 500).unwrap();
        sync(&mut cloud, &mut edge, &doc);
        let c = resolve(&edge.read_json(&doc).unwrap().unwrap());
        assert_eq!(c["temp"].winner.value, "21");
        assert!(c["temp"].losers.is_empty(), "{c:?}");
        let _ = std::fs::remove_dir_all(d1);
        let _ = std::fs::remove_dir_all(d2);
    }

    #[test]
    fn the_clock_leases_ahead_and_never_goes_back_across_a_restart() {
        let (mut edge, dir) = open("clock", 2);
        let a: DocId = "device-desired/edge-1/default/a".parse().unwrap();
        let b: DocId = "device-desired/edge-1/default/b".parse().unwrap();
        let saved = |r: &Replica| r.store().meta(b"clock").unwrap();
        let first = set_desired(&mut edge, &a, "speed", "1", 5_000).unwrap();
        let lease = saved(&edge);
        // Writes within the lease do not write the clock again.
        let mut last = first;
        for (v, now) in [("2", 5_000), ("3", 5_400), ("4", 5_999)] {
            last = set_desired(&mut edge, &a, "speed", v, now).unwrap();
        }
        assert_eq!(saved(&edge), lease, "no clock write within the lease");
        assert_eq!(last.wall_ms, 5_999);
        drop(edge);
        // Reopened with the wall clock stepped back, and writing another
        // document (whose record holds no earlier write of this replica):
        // only the saved lease orders the write after the earlier ones.
        let mut edge = Replica::open(&dir, PeerId([2; 32]), ReplicaOptions::default()).unwrap();
        let next = set_desired(&mut edge, &b, "speed", "5", 1_000).unwrap();
        assert!(next > last, "{next:?} after {last:?}");
        assert_eq!(next.wall_ms, 5_000 + crate::replica::CLOCK_LEASE_MS);
        drop(edge);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_write_recorded_late_is_stamped_when_it_was_made() {
        let (mut cloud, d1) = open("late-cloud", 1);
        let (mut edge, d2) = open("late-edge", 2);
        let doc: DocId = "device-desired/edge-1/default/fan".parse().unwrap();
        set_desired(&mut cloud, &doc, "speed", "1", 1_000).unwrap();
        sync(&mut cloud, &mut edge, &doc);
        // The edge sets 4 at 5 s; the cloud learns it at 6 s.
        set_desired(&mut edge, &doc, "speed", "4", 5_000).unwrap();
        sync(&mut edge, &mut cloud, &doc);
        // A value written at 3 s (before the edge's), recorded at 9 s.
        let at = set_desired_at(&mut cloud, &doc, "speed", "2", 9_000, Some(3_000)).unwrap();
        assert_eq!(at.wall_ms, 3_000);
        sync(&mut cloud, &mut edge, &doc);
        let r = resolve(&edge.read_json(&doc).unwrap().unwrap());
        assert_eq!(r["speed"].winner.value, "4", "the newer write wins: {r:?}");
        assert_eq!(
            r["speed"].losers.len(),
            1,
            "the older one is visible: {r:?}"
        );
        assert_eq!(r["speed"].losers[0].value, "2");
        // Written after the edge's value: it wins, and the edge's value
        // (older, seen) is no conflict.
        set_desired_at(&mut cloud, &doc, "speed", "3", 9_500, Some(7_000)).unwrap();
        sync(&mut cloud, &mut edge, &doc);
        let r = resolve(&edge.read_json(&doc).unwrap().unwrap());
        assert_eq!(r["speed"].winner.value, "3");
        assert!(r["speed"].losers.is_empty(), "{r:?}");
        // A record time not before now is no reason to stamp earlier.
        let at = set_desired_at(&mut cloud, &doc, "speed", "5", 10_000, Some(20_000)).unwrap();
        assert!(at.wall_ms >= 10_000);
        let _ = std::fs::remove_dir_all(d1);
        let _ = std::fs::remove_dir_all(d2);
    }
}
