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
//! Document layout: `{"desired": {"<property>": {"<writer>": {"value", "wall_ms", "counter", "seen_wall_ms", "seen_counter"}}}}`,
//! beside whatever else the writers keep in the document (protocol and visitor config).

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

fn writes_of(slots: &Value) -> Vec<DesiredWrite> {
    let Some(map) = slots.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(writer, slot)| {
            Some(DesiredWrite {
                writer: writer.clone(),
                value: slot.get("value")?.as_str()?.to_owned(),
                at: hlc_of(slot, "wall_ms", "counter"),
                seen: hlc_of(slot, "seen_wall_ms", "seen_counter"),
            })
        })
        .collect()
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
    if doc.kind() != DocKind::DeviceDesired {
        return Err(DesiredError::WrongKind(doc.clone()));
    }
    let mut body = replica.read_json(doc)?.unwrap_or_else(|| json!({}));
    let me = replica.me().to_string();
    let slots = body
        .pointer(&format!("/desired/{}", escape(property)))
        .cloned()
        .unwrap_or(Value::Null);
    let seen = writes_of(&slots)
        .into_iter()
        .filter(|w| w.writer != me)
        .map(|w| w.at)
        .max()
        .unwrap_or_default();
    replica.observe(seen);
    let at = replica.tick(now_ms)?;
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
    let desired = body
        .as_object_mut()
        .map(|o| o.entry("desired").or_insert_with(|| json!({})));
    if let Some(Value::Object(desired)) = desired {
        let prop = desired.entry(property).or_insert_with(|| json!({}));
        if !prop.is_object() {
            *prop = json!({});
        }
        if let Value::Object(prop) = prop {
            prop.insert(me, slot);
        }
    }
    replica.write_json(doc, &body, now_ms)?;
    Ok(at)
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Resolves every property of a device-desired document's JSON by the rule
/// above.
pub fn resolve(doc: &Value) -> BTreeMap<String, Resolved> {
    let mut out = BTreeMap::new();
    let Some(props) = doc.get("desired").and_then(Value::as_object) else {
        return out;
    };
    for (name, slots) in props {
        let mut writes = writes_of(slots);
        writes.sort_by(|a, b| (b.at, &b.writer).cmp(&(a.at, &a.writer)));
        let mut iter = writes.into_iter();
        let Some(winner) = iter.next() else { continue };
        let losers = iter
            .filter(|w| w.at > winner.seen && w.value != winner.value)
            .collect();
        out.insert(name.clone(), Resolved { winner, losers });
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
}
