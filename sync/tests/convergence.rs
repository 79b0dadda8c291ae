//! Property: among 3 to 7 replicas (a cloud and edges of one site), any
//! interleaving of writes, partitions, message loss, reordering, duplication
//! and restarts converges, once faults heal, to identical heads and values,
//! and loses no write that was acknowledged to its writer.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use automerge::ChangeHash;
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::DocId;
use outpost_sync::protocol::{Event, Session, decode, encode};
use outpost_sync::replica::{Replica, ReplicaOptions};
use proptest::prelude::*;
use serde_json::json;

struct Node {
    dir: PathBuf,
    replica: Option<Replica>,
    sessions: HashMap<PeerId, Session>,
}

struct Net {
    nodes: Vec<Node>,
    ids: Vec<PeerId>,
    roster: Roster,
    wire: Vec<(usize, usize, Vec<u8>)>,
    cut: HashSet<(usize, usize)>,
    /// Every change acknowledged to a writer: (doc, hash).
    acked: Vec<(DocId, ChangeHash)>,
}

fn node_name(i: usize) -> String {
    format!("edge-{i}")
}

impl Net {
    fn new(n: usize, tag: u64) -> Self {
        let mut roster = Roster::new();
        let ids: Vec<PeerId> = (0..n).map(|i| PeerId([i as u8 + 1; 32])).collect();
        roster.insert(ids[0], Role::Cloud);
        for (i, id) in ids.iter().enumerate().skip(1) {
            roster.insert(
                *id,
                Role::Edge {
                    node: node_name(i),
                    site: Some("north".into()),
                },
            );
        }
        let nodes = (0..n)
            .map(|i| {
                let dir = std::env::temp_dir()
                    .join(format!("outpost-conv-{}-{tag}-{i}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                let replica = Replica::open(&dir, ids[i], ReplicaOptions::default()).unwrap();
                Node {
                    dir,
                    replica: Some(replica),
                    sessions: HashMap::new(),
                }
            })
            .collect();
        let mut net = Net {
            nodes,
            ids,
            roster,
            wire: Vec::new(),
            cut: HashSet::new(),
            acked: Vec::new(),
        };
        for i in 0..n {
            for j in 0..n {
                if i != j && net.linked(i, j) {
                    net.connect(i, j);
                }
            }
        }
        net
    }

    /// The cloud talks to every edge; edges of the site talk to each other.
    fn linked(&self, _i: usize, _j: usize) -> bool {
        true
    }

    fn connect(&mut self, i: usize, j: usize) {
        // The lower index dials, and initiates reconciliation.
        let initiate = i < j;
        let peer = self.ids[j];
        let mut session = Session::new(peer, &self.roster).unwrap();
        let replica = self.nodes[i].replica.as_ref().unwrap();
        session.start(replica, &self.roster, initiate).unwrap();
        self.nodes[i].sessions.insert(peer, session);
    }

    fn docs(&self, i: usize) -> Vec<DocId> {
        // The documents node i may write.
        let n = self.nodes.len();
        if i == 0 {
            let mut d: Vec<DocId> = (1..n)
                .flat_map(|e| {
                    [
                        format!("pod-spec/{}/default/web/u", node_name(e)),
                        format!("device-desired/{}/default/thermo", node_name(e)),
                    ]
                })
                .map(|s| s.parse().unwrap())
                .collect();
            d.push("configmap/site:north/default/shared".parse().unwrap());
            d
        } else {
            [
                format!("pod-status/{}/default/web/u", node_name(i)),
                format!("device-desired/{}/default/thermo", node_name(i)),
                format!("device-reported/{}/default/thermo", node_name(i)),
            ]
            .into_iter()
            .map(|s| s.parse().unwrap())
            .collect()
        }
    }

    fn write(&mut self, i: usize, pick: usize, value: u32, now: u64) {
        let docs = self.docs(i);
        let doc = docs[pick % docs.len()].clone();
        let me = self.ids[i];
        let body = json!({"v": value, "by": i, format!("k{}", value % 3): value});
        let replica = self.nodes[i].replica.as_mut().unwrap();
        let hash = replica.write_json(&doc, &body, now).unwrap();
        if let Some(hash) = hash.filter(|_| !doc.kind().rolls_over()) {
            self.acked.push((doc.clone(), hash));
        }
        let roster = self.roster.clone();
        for s in self.nodes[i].sessions.values_mut() {
            s.local_change(&me, &roster, &doc);
        }
    }

    fn pump(&mut self, i: usize) {
        let roster = self.roster.clone();
        let node = &mut self.nodes[i];
        let Some(replica) = node.replica.as_mut() else {
            return;
        };
        for (peer, session) in node.sessions.iter_mut() {
            let j = self.ids.iter().position(|p| p == peer).unwrap();
            for _ in 0..64 {
                match session.poll_transmit(replica, &roster).unwrap() {
                    Some(msg) => {
                        if !self.cut.contains(&(i, j)) {
                            self.wire.push((i, j, encode(&msg)));
                        }
                    }
                    None => break,
                }
            }
        }
    }

    fn deliver(&mut self, k: usize, keep: bool) {
        if self.wire.is_empty() {
            return;
        }
        let k = k % self.wire.len();
        let (from, to, bytes) = if keep {
            self.wire[k].clone()
        } else {
            self.wire.swap_remove(k)
        };
        if self.cut.contains(&(from, to)) {
            return;
        }
        let roster = self.roster.clone();
        let from_id = self.ids[from];
        let me = self.ids[to];
        let node = &mut self.nodes[to];
        let Some(replica) = node.replica.as_mut() else {
            return;
        };
        let Some(session) = node.sessions.get_mut(&from_id) else {
            return;
        };
        let msg = decode(&bytes).unwrap();
        let events = session.handle(msg, replica, &roster).unwrap();
        for e in events {
            if let Event::Applied { doc, .. } = &e {
                for (p, s) in node.sessions.iter_mut() {
                    if *p != from_id {
                        s.local_change(&me, &roster, doc);
                    }
                }
            }
            if let Event::Rejected { doc, reason } = e {
                panic!("legitimate change rejected: {doc}: {reason}");
            }
        }
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i].replica = None;
        self.nodes[i].replica = Some(
            Replica::open(&self.nodes[i].dir, self.ids[i], ReplicaOptions::default()).unwrap(),
        );
        self.nodes[i].sessions.clear();
        self.wire.retain(|(f, t, _)| *f != i && *t != i);
        let n = self.nodes.len();
        for j in 0..n {
            if j != i {
                self.connect(i, j);
                self.connect(j, i);
            }
        }
    }

    fn heal_and_settle(&mut self) {
        self.cut.clear();
        self.wire.clear();
        let n = self.nodes.len();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    self.connect(i, j);
                }
            }
        }
        for _round in 0..200 {
            for i in 0..n {
                self.pump(i);
            }
            if self.wire.is_empty() {
                return;
            }
            while !self.wire.is_empty() {
                self.deliver(0, false);
            }
        }
        panic!("did not settle in 200 rounds");
    }

    fn check(&mut self) {
        let n = self.nodes.len();
        let mut all_docs: HashSet<DocId> = HashSet::new();
        for i in 0..n {
            all_docs.extend(self.docs(i));
        }
        for doc in all_docs {
            let readers: Vec<usize> = (0..n)
                .filter(|&i| self.roster.may_read(&self.ids[i], &doc))
                .collect();
            let mut states = Vec::new();
            for &i in &readers {
                let r = self.nodes[i].replica.as_mut().unwrap();
                states.push((
                    i,
                    r.entry(&doc).unwrap().map(|e| (e.generation, e.heads)),
                    r.read_json(&doc).unwrap(),
                ));
            }
            for w in states.windows(2) {
                assert_eq!(
                    w[0].1, w[1].1,
                    "{doc}: heads of node {} and node {} differ",
                    w[0].0, w[1].0
                );
                assert_eq!(
                    w[0].2, w[1].2,
                    "{doc}: values of node {} and node {} differ",
                    w[0].0, w[1].0
                );
            }
        }
        for (doc, hash) in self.acked.clone() {
            for i in 0..n {
                if self.roster.may_read(&self.ids[i], &doc) {
                    let r = self.nodes[i].replica.as_mut().unwrap();
                    assert!(
                        r.has_change(&doc, &hash).unwrap(),
                        "node {i} lost acknowledged change {hash} of {doc}"
                    );
                }
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.replica = None;
            let _ = std::fs::remove_dir_all(&node.dir);
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        node: usize,
        pick: usize,
        value: u32,
    },
    Pump {
        node: usize,
    },
    Deliver {
        k: usize,
    },
    Duplicate {
        k: usize,
    },
    Drop {
        k: usize,
    },
    Cut {
        a: usize,
        b: usize,
        both: bool,
    },
    Heal {
        a: usize,
        b: usize,
    },
    Restart {
        node: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..7usize, 0..8usize, 0..1000u32).prop_map(|(node, pick, value)| Op::Write { node, pick, value }),
        4 => (0..7usize).prop_map(|node| Op::Pump { node }),
        6 => any::<usize>().prop_map(|k| Op::Deliver { k }),
        1 => any::<usize>().prop_map(|k| Op::Duplicate { k }),
        1 => any::<usize>().prop_map(|k| Op::Drop { k }),
        1 => (0..7usize, 0..7usize, any::<bool>()).prop_map(|(a, b, both)| Op::Cut { a, b, both }),
        1 => (0..7usize, 0..7usize).prop_map(|(a, b)| Op::Heal { a, b }),
        1 => (0..7usize).prop_map(|node| Op::Restart { node }),
    ]
}

static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

proptest! {
    // 48 cases in the normal suite; PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)))]

    #[test]
    fn replicas_converge_after_any_faults(n in 3..=7usize, ops in proptest::collection::vec(op(), 1..120)) {
        let tag = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut net = Net::new(n, tag);
        let mut now = 1_000_000u64;
        for op in ops {
            now += 7;
            match op {
                Op::Write { node, pick, value } => net.write(node % n, pick, value, now),
                Op::Pump { node } => net.pump(node % n),
                Op::Deliver { k } => net.deliver(k, false),
                Op::Duplicate { k } => net.deliver(k, true),
                Op::Drop { k } => { if !net.wire.is_empty() { let k = k % net.wire.len(); net.wire.swap_remove(k); } }
                Op::Cut { a, b, both } => {
                    net.cut.insert((a % n, b % n));
                    if both { net.cut.insert((b % n, a % n)); }
                }
                Op::Heal { a, b } => { net.cut.remove(&(a % n, b % n)); net.cut.remove(&(b % n, a % n)); }
                Op::Restart { node } => net.restart(node % n),
            }
        }
        net.heal_and_settle();
        net.check();
    }
}
