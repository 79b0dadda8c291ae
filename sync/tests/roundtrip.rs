//! Any JSON object written to a document reads back as written, from the
//! cache and after reopening the store, for the kinds stored flat (rolling
//! single-writer documents) and those stored as automerge maps; writing the
//! same value again changes nothing.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use outpost_sync::PeerId;
use outpost_sync::document::DocId;
use outpost_sync::replica::{Replica, ReplicaOptions};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::String),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z$.:/]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-zA-Z]{1,8}", json(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn values_read_back_as_written(first in object(), second in object(), case in any::<u32>()) {
        let dir = std::env::temp_dir()
            .join(format!("outpost-roundtrip-{}-{case}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let docs: [DocId; 2] = [
            "device-reported/edge-1/default/d-1".parse().unwrap(), // flat
            "configmap/edge-1/default/c-1".parse().unwrap(),       // automerge maps
        ];
        {
            let mut r = Replica::open(&dir, PeerId([3; 32]), ReplicaOptions::default()).unwrap();
            for doc in &docs {
                r.write_json(doc, &first, 1).unwrap();
                // An empty object makes no document.
                let expected = (first != Value::Object(Map::new())).then(|| first.clone());
                prop_assert_eq!(r.read_json(doc).unwrap(), expected, "{}", doc);
                prop_assert!(r.write_json(doc, &first, 2).unwrap().is_none(), "{} changed", doc);
                r.write_json(doc, &second, 3).unwrap();
            }
        }
        let empty = Value::Object(Map::new());
        let expected = (first != empty || second != empty).then(|| second.clone());
        let mut r = Replica::open(&dir, PeerId([3; 32]), ReplicaOptions::default()).unwrap();
        for doc in &docs {
            prop_assert_eq!(r.read_json(doc).unwrap(), expected.clone(), "{} reopened", doc);
        }
        drop(r);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
