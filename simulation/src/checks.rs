//! Checker rules that the deterministic mode ([`crate::world`]) and the
//! real-stack mode ([`crate::quic`]) share: on the merged documents every
//! reader agrees on, a rolling document holds its writer's last value, a
//! desired-value slot holds its writer's last write, and conflicts resolve
//! by the hybrid-logical-clock rule.
//!
//! They are pure: they return the failures' explanations, and each mode
//! records them (with its own clock) and decides whose writes still count.

use std::collections::BTreeMap;

use outpost_sync::desired::{DesiredWrite, resolve, writes};
use outpost_sync::document::{DocId, DocKind};
use serde_json::Value;

use crate::world::{resolve_slot, short};

/// A rolling document (single writer, history dropped at roll-over) whose
/// readers do not hold `last`, the last value its writer (named `writer`)
/// wrote: the explanation of the lost write.
pub(crate) fn rolling_lost(
    d: &DocId,
    writer: &str,
    last: &Value,
    values: &BTreeMap<DocId, Value>,
) -> Option<String> {
    let got = values.get(d);
    (got != Some(last)).then(|| {
        format!(
            "{d}: the last value {writer} wrote, {}, is not what its readers hold: {}",
            short(&Some(last.clone())),
            short(&got.cloned())
        )
    })
}

/// A desired-value slot of `prop` in `d` whose writer (named `writer`, peer
/// id `writer_id`) does not find its last write `last` in the merged
/// document: the explanation of the lost write.
pub(crate) fn desired_lost(
    d: &DocId,
    prop: &str,
    writer: &str,
    writer_id: &str,
    last: &DesiredWrite,
    values: &BTreeMap<DocId, Value>,
) -> Option<String> {
    let slot = values.get(d).and_then(|v| resolve_slot(v, prop, writer_id));
    (slot.as_ref() != Some(last)).then(|| {
        format!(
            "{d}/{prop}: {writer}'s last desired write {:?} at {:?} is not in the merged document (slot: {slot:?})",
            last.value, last.at
        )
    })
}

/// The desired-value conflict rule on the merged documents: the winner is
/// the write with the highest HLC (writer id breaks ties); every write the
/// winner had not seen, with another value, is listed as a loser. Returns
/// the explanations of the properties that break it (in document and
/// property order) and how many properties are in conflict.
pub(crate) fn conflict_rule(values: &BTreeMap<DocId, Value>) -> (Vec<String>, u64) {
    let mut failures = Vec::new();
    let mut conflicts = 0;
    for (d, v) in values {
        if d.kind() != DocKind::DeviceDesired {
            continue;
        }
        let resolved = resolve(v);
        for (prop, slots) in writes(v) {
            let Some(winner) = slots
                .iter()
                .max_by(|a, b| (a.at, &a.writer).cmp(&(b.at, &b.writer)))
            else {
                continue;
            };
            let mut losers: Vec<&DesiredWrite> = slots
                .iter()
                .filter(|w| {
                    w.writer != winner.writer && w.at > winner.seen && w.value != winner.value
                })
                .collect();
            losers.sort_by(|a, b| (b.at, &b.writer).cmp(&(a.at, &a.writer)));
            let Some(got) = resolved.get(&prop) else {
                failures.push(format!("{d}/{prop}: resolve() gives no value"));
                continue;
            };
            if got.winner != *winner {
                failures.push(format!(
                    "{d}/{prop}: resolve() picks {:?} ({:?}) but the highest HLC is {:?} ({:?})",
                    got.winner.value, got.winner.at, winner.value, winner.at
                ));
            }
            conflicts += u64::from(!got.losers.is_empty());
            let mut got_losers: Vec<&DesiredWrite> = got.losers.iter().collect();
            got_losers.sort_by(|a, b| (b.at, &b.writer).cmp(&(a.at, &a.writer)));
            if got_losers != losers {
                failures.push(format!(
                    "{d}/{prop}: losing writes visible {:?}, expected {:?}",
                    got_losers.iter().map(|w| &w.value).collect::<Vec<_>>(),
                    losers.iter().map(|w| &w.value).collect::<Vec<_>>()
                ));
            }
        }
    }
    (failures, conflicts)
}
