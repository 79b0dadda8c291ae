//! Crash safety of the event store: a writer process is killed with SIGKILL
//! at random points, 50 times; after each kill the store opens and holds
//! every change whose write had returned (been acknowledged) to the writer.
//!
//! The writer is this same test binary, re-run with `OUTPOST_CRASH_WRITER`
//! set: it writes as fast as it can, compacting and rolling documents over
//! often, and prints `ACK <doc> <hash> <seq>` after each write returns.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use automerge::ChangeHash;
use outpost_sync::PeerId;
use outpost_sync::document::DocId;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::store::StoreOptions;
use serde_json::json;

const DOCS: [&str; 4] = [
    "pod-spec/edge-1/default/web/u",
    "device-desired/edge-1/default/thermo",
    "device-reported/edge-1/default/thermo",
    "node-status/edge-1",
];

fn options() -> ReplicaOptions {
    ReplicaOptions {
        store: StoreOptions {
            sync_writes: false,
            compact_after_chunks: 8,
            ..StoreOptions::default()
        },
        rollover_after_changes: 10,
        ..Default::default()
    }
}

#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var("OUTPOST_CRASH_WRITER") else {
        return; // only meaningful as the child of the test below
    };
    let mut replica = Replica::open(&dir, PeerId([7; 32]), options()).unwrap();
    let docs: Vec<DocId> = DOCS.iter().map(|d| d.parse().unwrap()).collect();
    let start: u64 = std::env::var("OUTPOST_CRASH_SEQ").unwrap().parse().unwrap();
    for seq in start.. {
        let doc = &docs[(seq % docs.len() as u64) as usize];
        let body = json!({"seq": seq, "payload": "x".repeat((seq % 200) as usize), format!("k{}", seq % 5): seq});
        if let Some(hash) = replica.write_json(doc, &body, 1_000_000 + seq).unwrap() {
            println!("ACK {doc} {hash} {seq}");
        }
    }
}

#[test]
fn store_survives_sigkill_at_random_points() {
    let dir = std::env::temp_dir().join(format!("outpost-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x005e_ed0f_0005_u64);
    let mut acked: Vec<(DocId, ChangeHash)> = Vec::new();
    let mut last_seq: HashMap<DocId, u64> = HashMap::new();
    let mut seq = 0u64;
    for round in 0..50 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("OUTPOST_CRASH_WRITER", &dir)
            .env("OUTPOST_CRASH_SEQ", seq.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(rng.u64(30..250));
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ACK ") {
                    lines.push(line);
                }
            }
            lines
        });
        std::thread::sleep(kill_after);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        for line in &lines {
            let mut parts = line.split_whitespace().skip(1);
            let doc: DocId = parts.next().unwrap().parse().unwrap();
            let hash: ChangeHash = parts.next().unwrap().parse().unwrap();
            let s: u64 = parts.next().unwrap().parse().unwrap();
            seq = seq.max(s + 1);
            if doc.kind().rolls_over() {
                last_seq.insert(doc, s);
            } else {
                acked.push((doc, hash));
            }
        }
        // The store opens, and every acknowledged change is there.
        let mut replica = Replica::open(&dir, PeerId([7; 32]), options())
            .unwrap_or_else(|e| panic!("round {round}: store does not open after SIGKILL: {e}"));
        for (doc, hash) in &acked {
            assert!(
                replica.has_change(doc, hash).unwrap(),
                "round {round}: lost acknowledged change {hash} of {doc}"
            );
        }
        // Rolling documents keep at least their last acknowledged value.
        for (doc, s) in &last_seq {
            let value = replica.read_json(doc).unwrap().unwrap();
            assert!(
                value["seq"].as_u64().unwrap() >= *s,
                "round {round}: {doc} went back to {value}"
            );
        }
    }
    assert!(
        acked.len() > 100,
        "the writer made progress: {} acknowledged changes",
        acked.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
