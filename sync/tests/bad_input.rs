//! Malformed, truncated and oversized input: decoding and handling never
//! panic, a session closes with a reason, and the store is left intact.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::protocol::{Bucket, DocChanges, Item, Message, Session, decode, encode};
use outpost_sync::replica::{Replica, ReplicaOptions};
use proptest::prelude::*;
use serde_json::json;
use support::{CLOUD, EDGE, roster};
use tokio::io::AsyncWriteExt;

fn replica(tag: &str) -> (Replica, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("outpost-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut r = Replica::open(&dir, CLOUD, ReplicaOptions::default()).unwrap();
    let doc: DocId = "pod-spec/edge-1/default/web/u".parse().unwrap();
    r.write_json(&doc, &json!({"image": "busybox"}), 1000)
        .unwrap();
    (r, dir)
}

/// Valid messages of every kind, as raw material for mutation.
fn samples(r: &mut Replica) -> Vec<Vec<u8>> {
    let doc: DocId = "pod-spec/edge-1/default/web/u".parse().unwrap();
    let (generation, changes) = r.changes_for(&doc, 0, &[], &[]).unwrap();
    let entry = r.entry(&doc).unwrap().unwrap();
    let item = Item {
        doc: doc.clone(),
        generation,
        heads: entry.heads.clone(),
    };
    [
        Message::Hello { version: 1 },
        Message::Buckets(vec![Bucket {
            depth: 1,
            prefix: 3,
            fingerprint: 42,
            count: 2,
        }]),
        Message::Items {
            buckets: vec![(1, 3)],
            items: vec![item.clone()],
            reply: true,
        },
        Message::Changes(vec![DocChanges {
            doc,
            generation,
            changes: changes
                .into_iter()
                .map(serde_bytes::ByteBuf::from)
                .collect(),
        }]),
        Message::Ack(vec![item.clone()]),
        Message::Need(item),
    ]
    .iter()
    .map(encode)
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic_nor_corrupt(pick in 0..6usize, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8), cut in any::<usize>()) {
        let (mut r, dir) = replica("mut");
        let mut bytes = samples(&mut r)[pick].clone();
        for (at, b) in flips {
            let n = bytes.len();
            bytes[at % n] ^= b;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        let roster = roster();
        let before: Vec<_> = r.scan().map(|e| e.unwrap()).collect();
        if let Ok(msg) = decode(&bytes) {
            let mut session = Session::new(EDGE, &roster).unwrap();
            // An error closes the session; either way nothing panics.
            let _ = session.handle(msg, &mut r, &roster);
            while let Ok(Some(_)) = session.poll_transmit(&mut r, &roster) {}
        }
        // Edges may not write pod specs, so nothing the edge sent may change
        // the cloud's documents; and the store still loads.
        let after: Vec<_> = r.scan().map(|e| e.unwrap()).collect();
        prop_assert_eq!(before.iter().map(|(d, e)| (d.clone(), e.heads.clone())).collect::<Vec<_>>(),
                        after.iter().map(|(d, e)| (d.clone(), e.heads.clone())).collect::<Vec<_>>());
        drop(r);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test]
async fn oversized_and_truncated_frames_close_the_session() {
    for (tag, frame) in [
        ("oversized", (u32::MAX).to_be_bytes().to_vec()),
        ("truncated", {
            let mut f = 100u32.to_be_bytes().to_vec();
            f.extend_from_slice(&[0u8; 10]);
            f
        }),
        ("garbage", {
            let mut f = 4u32.to_be_bytes().to_vec();
            f.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
            f
        }),
    ] {
        let (r, dir) = replica(tag);
        let engine = Engine::new(r, roster(), SyncMetrics::default());
        let (mut ours, theirs) = tokio::io::duplex(1 << 16);
        let (recv, send) = tokio::io::split(theirs);
        let task = tokio::spawn({
            let engine = engine.clone();
            async move { engine.run_session(EDGE, false, recv, send).await }
        });
        ours.write_all(&frame).await.unwrap();
        if tag == "truncated" {
            ours.shutdown().await.unwrap();
        }
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            // Keep draining what the engine sends so it never blocks.
            let mut sink = vec![0u8; 1 << 16];
            loop {
                tokio::select! {
                    r = &mut Box::pin(async { tokio::io::AsyncReadExt::read(&mut ours, &mut sink).await }) => { if matches!(r, Ok(0) | Err(_)) { break; } }
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => { if task.is_finished() { break; } }
                }
            }
        })
        .await;
        assert!(result.is_ok(), "{tag}: session did not end");
        let outcome = task.await.unwrap();
        assert!(outcome.is_err(), "{tag}: closed with a reason");
        assert_eq!(engine.metrics().session_errors.get(), 1, "{tag}");
        let doc: DocId = "pod-spec/edge-1/default/web/u".parse().unwrap();
        assert_eq!(
            engine.read_json(&doc).unwrap(),
            Some(json!({"image": "busybox"})),
            "{tag}: store intact"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A change altered on the way (a byte of its body flipped, its header
/// left as it was) is refused: automerge's parser would take it as another
/// change of the same author.
#[test]
fn a_change_whose_checksum_does_not_match_is_refused() {
    let (mut r, dir) = replica("checksum");
    let doc: DocId = "pod-spec/edge-1/default/web/u".parse().unwrap();
    let (_, changes) = r.changes_for(&doc, 0, &[], &[]).unwrap();
    let good = changes[0].clone();
    assert!(outpost_sync::replica::decode_changes(&doc, [good.clone()]).is_ok());
    // Every byte after the magic flipped in turn: none passes, and those
    // the parser alone would take are caught by the checksum.
    let mut caught = 0;
    for at in 4..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let err = outpost_sync::replica::decode_changes(&doc, [bad]).unwrap_err();
        caught += usize::from(err.to_string().contains("checksum"));
    }
    assert!(caught > 0);
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
}
