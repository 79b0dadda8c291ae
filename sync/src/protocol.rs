//! The sync protocol between two peers, sans-IO.
//!
//! A [`Session`] takes messages and time in and produces messages out; it
//! never touches a socket, so the same code runs over iroh, over the
//! simulation's network and in unit tests. The replica is passed into each
//! call: storage is local, not I/O the protocol waits on.
//!
//! # Reconciliation
//! Both peers index the documents of the scope they share by a 64-bit hash
//! of the document id. The hash space is a 16-ary tree; a bucket's
//! fingerprint is the XOR of `hash(doc id, generation, heads)` over its
//! documents, with their count. The initiator sends the 16 top-level
//! buckets; a peer answers a bucket whose fingerprint differs from its own
//! either with its 16 children (while both sides hold many documents there)
//! or with the documents themselves and their heads ([`Message::Items`]).
//! Equal buckets end there. So the bytes and round trips grow with the
//! number of documents that differ (and the log16 of the number that exist),
//! not with the number that exist.
//!
//! # Changes
//! For each document that differs, a peer sends the changes the other lacks:
//! exactly those after its heads when it knows them all, otherwise those
//! after what the other last acknowledged ([`crate::store::Store::peer_ack`]).
//! The receiver checks every change's author against the roster, applies the
//! batch in one write, and acknowledges the heads it persisted. Changes whose
//! dependencies are missing make it ask for the document again from its heads.
//!
//! # Live push, back-pressure, fairness
//! While connected, documents changed locally (or applied from another peer)
//! are marked dirty; [`Session::poll_transmit`] turns dirty documents into
//! changes only when the transport can take another message, so nothing
//! queues without bound: the dirty set holds each document once, and the
//! reconciliation outbox is bounded. Node heartbeats go first.

use std::collections::{BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::PeerId;
use crate::access::Roster;
use crate::document::{DocId, DocKind};
use crate::replica::{Incoming, Replica, ReplicaError, change_author, decode_changes};
use crate::store::Batch;

/// The protocol version spoken.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest encoded message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// A bucket holding at most this many documents on both sides is answered
/// with its documents rather than its children.
const ITEMS_THRESHOLD: u32 = 8;
/// The deepest bucket level (16 levels of 4 bits cover the 64-bit hash).
const MAX_DEPTH: u8 = 16;
/// Messages waiting in the reconciliation outbox at most.
const OUTBOX_MAX: usize = 1024;
/// Bytes of changes put in one message, about.
const CHANGES_BATCH_BYTES: usize = 256 << 10;
/// Acknowledgements a session keeps unsaved at most: more are saved at once.
pub const ACKS_UNSAVED_MAX: usize = 4096;

/// One bucket of the hash tree and the sender's fingerprint of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Depth in the tree, 1..=16; a bucket at depth d covers hashes whose top 4d bits are `prefix`.
    pub depth: u8,
    /// The bucket's prefix.
    pub prefix: u64,
    /// XOR of the fingerprints of the sender's documents in it.
    pub fingerprint: u64,
    /// How many documents the sender has in it.
    pub count: u32,
}

/// A document and the sender's state of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The document.
    pub doc: DocId,
    /// Its generation at the sender.
    pub generation: u64,
    /// Its heads at the sender.
    pub heads: Vec<[u8; 32]>,
}

/// Changes of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocChanges {
    /// The document.
    pub doc: DocId,
    /// The generation the changes belong to.
    pub generation: u64,
    /// Encoded automerge changes.
    pub changes: Vec<serde_bytes::ByteBuf>,
}

/// A message of the sync protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Opens a session: the sender's protocol version.
    Hello {
        /// The protocol version.
        version: u32,
    },
    /// Fingerprints of buckets to compare.
    Buckets(Vec<Bucket>),
    /// The sender's documents in some buckets; `reply` asks for the receiver's in return.
    Items {
        /// The buckets the items cover, as (depth, prefix).
        buckets: Vec<(u8, u64)>,
        /// The documents.
        items: Vec<Item>,
        /// Answer with your own items of these buckets.
        reply: bool,
    },
    /// Changes of one or more documents.
    Changes(Vec<DocChanges>),
    /// The generation and heads the sender persisted, per document.
    Ack(Vec<Item>),
    /// The sender lacks dependencies of a document: send it changes from these heads.
    Need(Item),
}

/// Why a session must close.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The peer is not on the roster.
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    /// A message did not decode, or broke the protocol's rules.
    #[error("malformed message from {peer}: {reason}")]
    Malformed {
        /// The sender.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
    /// The peer speaks another protocol version.
    #[error("peer {peer} speaks protocol version {version}, this replica {PROTOCOL_VERSION}")]
    Version {
        /// The sender.
        peer: PeerId,
        /// Its version.
        version: u32,
    },
    /// The local replica failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

/// Encodes a message for the wire.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Serializing these plain types into a Vec cannot fail.
    postcard::to_allocvec(msg).unwrap_or_default()
}

/// Decodes a message from the wire, refusing oversized or malformed input.
pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
            bytes.len()
        ));
    }
    postcard::from_bytes(bytes).map_err(|e| format!("cannot decode message: {e}"))
}

/// What a session reports to its driver besides outgoing messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Changes from the peer were persisted; other sessions may want them.
    Applied {
        /// The document.
        doc: DocId,
        /// Commit-to-persisted lag of each new change, in milliseconds.
        lag_ms: Vec<i64>,
    },
    /// Changes were refused: their author may not write the document, or the
    /// peer may not deliver it.
    Rejected {
        /// The document.
        doc: DocId,
        /// Why.
        reason: String,
    },
    /// A reconciliation round (one `Buckets` message) was answered.
    Round,
}

fn doc_hash(doc: &DocId) -> u64 {
    let h = blake3::hash(doc.as_str().as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_be_bytes(b)
}

fn item_fingerprint(doc: &DocId, digest: &[u8; 32]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(doc.as_str().as_bytes());
    hasher.update(digest);
    let mut b = [0u8; 8];
    b.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

fn in_bucket(hash: u64, depth: u8, prefix: u64) -> bool {
    let shift = 64 - 4 * u32::from(depth);
    hash.checked_shr(shift).unwrap_or(0) == prefix
}

/// Counters of one session, for metrics and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// `Buckets` messages answered.
    pub rounds: u64,
    /// Messages produced.
    pub messages_out: u64,
    /// Bytes of messages produced.
    pub bytes_out: u64,
    /// Changes sent.
    pub changes_out: u64,
    /// Changes rejected by the access rules.
    pub rejected: u64,
}

/// One peer's side of a sync session with another.
#[derive(Debug)]
pub struct Session {
    peer: PeerId,
    /// (hash, doc, fingerprint) of the shared scope, sorted by hash.
    index: Vec<(u64, DocId, u64)>,
    outbox: VecDeque<Message>,
    dirty: BTreeSet<(u8, DocId)>,
    /// What we last sent of each document: (generation, heads).
    sent: HashMap<DocId, (u64, Vec<[u8; 32]>)>,
    /// Commit time (ms) of the oldest change sent and not yet acknowledged, per document.
    unacked: HashMap<DocId, i64>,
    /// What the peer told us it has, in this session.
    theirs: HashMap<DocId, (u64, Vec<[u8; 32]>)>,
    /// The peer's acknowledgements not yet saved in the store
    /// ([`Session::save_acks`]), the latest per document.
    acks_unsaved: HashMap<DocId, crate::store::PeerAck>,
    stats: SessionStats,
}

impl Session {
    /// A session with `peer`. Unknown peers are refused.
    pub fn new(peer: PeerId, roster: &Roster) -> Result<Self, SessionError> {
        if roster.role(&peer).is_none() {
            return Err(SessionError::UnknownPeer(peer));
        }
        Ok(Self {
            peer,
            index: Vec::new(),
            outbox: VecDeque::new(),
            dirty: BTreeSet::new(),
            sent: HashMap::new(),
            unacked: HashMap::new(),
            theirs: HashMap::new(),
            acks_unsaved: HashMap::new(),
            stats: SessionStats::default(),
        })
    }

    /// The peer of this session.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    /// The session's counters.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Documents waiting to be pushed.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Documents whose latest acknowledgement from the peer is not saved yet.
    pub fn unsaved_acks(&self) -> usize {
        self.acks_unsaved.len()
    }

    /// Saves the peer's acknowledgements received since the last save, in
    /// one write.
    ///
    /// An acknowledgement only tells what to send the peer next time, when
    /// its heads are not known: one lost in a crash makes a later session
    /// send changes the peer already has, which it ignores. So they are kept
    /// in memory and saved now and then (the engine does it a second after
    /// the first unsaved one, and when the session ends), not in a write of
    /// their own each, which would hold up the changes sent meanwhile.
    /// [`Session::handle`] saves them itself when [`ACKS_UNSAVED_MAX`] are held.
    pub fn save_acks(&mut self, replica: &Replica) -> Result<(), SessionError> {
        if self.acks_unsaved.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        for (doc, (generation, heads)) in &self.acks_unsaved {
            replica
                .store()
                .stage_peer_ack(&mut batch, &self.peer.0, doc, *generation, heads);
        }
        replica.store().commit(batch).map_err(ReplicaError::from)?;
        self.acks_unsaved.clear();
        Ok(())
    }

    /// What the peer acknowledged of `doc`: the unsaved acknowledgement, or
    /// the saved one.
    fn acked(
        &self,
        replica: &Replica,
        doc: &DocId,
    ) -> Result<Option<crate::store::PeerAck>, SessionError> {
        if let Some(ack) = self.acks_unsaved.get(doc) {
            return Ok(Some(ack.clone()));
        }
        Ok(replica
            .store()
            .peer_ack(&self.peer.0, doc)
            .map_err(ReplicaError::from)?)
    }

    /// Commit time (ms since the epoch) of the oldest change sent to the peer
    /// and not acknowledged: the peer's watermark. `None` when all is acknowledged.
    pub fn watermark_ms(&self) -> Option<i64> {
        self.unacked.values().min().copied()
    }

    /// Rebuilds the index of the scope shared with the peer from the replica.
    /// With an edge, only the prefixes of its scope are read, so a cloud
    /// holding a large fleet's documents indexes each edge's few.
    fn reindex(&mut self, replica: &Replica, roster: &Roster) -> Result<(), SessionError> {
        let me = replica.me();
        let mut index = Vec::new();
        let mut add =
            |item: Result<(DocId, crate::store::IndexEntry), crate::store::StoreError>| {
                let (doc, entry) = item.map_err(ReplicaError::from)?;
                if shared(roster, &me, &self.peer, &doc) {
                    index.push((
                        doc_hash(&doc),
                        doc.clone(),
                        item_fingerprint(&doc, &entry.digest()),
                    ));
                }
                Ok::<(), SessionError>(())
            };
        match roster.read_prefixes(&self.peer) {
            Some(prefixes) => {
                for prefix in &prefixes {
                    for item in replica.scan_prefix(prefix) {
                        add(item)?;
                    }
                }
            }
            None => {
                for item in replica.scan() {
                    add(item)?;
                }
            }
        }
        index.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        // Should two prefixes ever match one id, count it once.
        index.dedup_by(|a, b| a.1 == b.1);
        self.index = index;
        Ok(())
    }

    fn bucket(&self, depth: u8, prefix: u64) -> (u64, u32, &[(u64, DocId, u64)]) {
        let shift = 64 - 4 * u32::from(depth);
        let lo = prefix.checked_shl(shift).unwrap_or(0);
        let start = self.index.partition_point(|e| e.0 < lo);
        let end = start + self.index[start..].partition_point(|e| in_bucket(e.0, depth, prefix));
        let slice = &self.index[start..end];
        let fp = slice.iter().fold(0u64, |acc, e| acc ^ e.2);
        (fp, slice.len() as u32, slice)
    }

    fn children(&self, depth: u8, prefix: u64) -> Vec<Bucket> {
        (0..16u64)
            .map(|i| {
                let child = (prefix << 4) | i;
                let (fingerprint, count, _) = self.bucket(depth + 1, child);
                Bucket {
                    depth: depth + 1,
                    prefix: child,
                    fingerprint,
                    count,
                }
            })
            .collect()
    }

    fn push(&mut self, msg: Message) {
        if self.outbox.len() < OUTBOX_MAX {
            self.outbox.push_back(msg);
        }
        // A full outbox drops reconciliation messages; the next
        // reconciliation (on reconnect or timer) finds what they would have.
    }

    /// Starts a session: says hello and, on the side that initiates (the one
    /// that dialled), opens reconciliation of the shared scope. Both sides
    /// index the scope: the other answers the initiator's buckets.
    pub fn start(
        &mut self,
        replica: &Replica,
        roster: &Roster,
        initiate: bool,
    ) -> Result<(), SessionError> {
        self.reindex(replica, roster)?;
        self.outbox.clear();
        self.theirs.clear();
        self.outbox.push_back(Message::Hello {
            version: PROTOCOL_VERSION,
        });
        if initiate {
            let top = self.children(0, 0);
            self.outbox.push_back(Message::Buckets(top));
        }
        Ok(())
    }

    /// Marks a document changed locally (or by another peer) for pushing.
    pub fn local_change(&mut self, me: &PeerId, roster: &Roster, doc: &DocId) {
        if shared(roster, me, &self.peer, doc) {
            self.dirty.insert((priority(doc.kind()), doc.clone()));
        }
    }

    fn items_of(
        &self,
        replica: &mut Replica,
        buckets: &[(u8, u64)],
    ) -> Result<Vec<Item>, SessionError> {
        let mut docs = Vec::new();
        for &(depth, prefix) in buckets {
            let (_, _, slice) = self.bucket(depth, prefix);
            docs.extend(slice.iter().map(|e| e.1.clone()));
        }
        let mut items = Vec::with_capacity(docs.len());
        for doc in docs {
            if let Some(entry) = replica.entry(&doc)? {
                items.push(Item {
                    doc,
                    generation: entry.generation,
                    heads: entry.heads,
                });
            }
        }
        Ok(items)
    }

    /// Handles one message from the peer.
    pub fn handle(
        &mut self,
        msg: Message,
        replica: &mut Replica,
        roster: &Roster,
    ) -> Result<Vec<Event>, SessionError> {
        let peer = self.peer;
        let malformed = move |reason: String| SessionError::Malformed { peer, reason };
        let me = replica.me();
        let mut events = Vec::new();
        match msg {
            Message::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    return Err(SessionError::Version {
                        peer: self.peer,
                        version,
                    });
                }
            }
            Message::Buckets(buckets) => {
                if buckets.len() > 4096 {
                    return Err(malformed(format!(
                        "{} buckets in one message",
                        buckets.len()
                    )));
                }
                self.stats.rounds += 1;
                events.push(Event::Round);
                let mut deeper = Vec::new();
                let mut leaves = Vec::new();
                for b in buckets {
                    if b.depth == 0
                        || b.depth > MAX_DEPTH
                        || (b.depth < MAX_DEPTH && b.prefix >> (4 * u32::from(b.depth)) != 0)
                    {
                        return Err(malformed(format!(
                            "bucket depth {} prefix {:#x}",
                            b.depth, b.prefix
                        )));
                    }
                    let (fp, count, _) = self.bucket(b.depth, b.prefix);
                    if fp == b.fingerprint && count == b.count {
                        continue;
                    }
                    if b.depth == MAX_DEPTH
                        || (count <= ITEMS_THRESHOLD && b.count <= ITEMS_THRESHOLD)
                    {
                        leaves.push((b.depth, b.prefix));
                    } else {
                        deeper.extend(self.children(b.depth, b.prefix));
                    }
                }
                if !deeper.is_empty() {
                    self.push(Message::Buckets(deeper));
                }
                if !leaves.is_empty() {
                    let items = self.items_of(replica, &leaves)?;
                    self.push(Message::Items {
                        buckets: leaves,
                        items,
                        reply: true,
                    });
                }
            }
            Message::Items {
                buckets,
                items,
                reply,
            } => {
                let mut theirs: HashMap<DocId, (u64, Vec<[u8; 32]>)> = HashMap::new();
                for item in items {
                    if !shared(roster, &me, &self.peer, &item.doc) {
                        continue; // not ours to discuss with this peer
                    }
                    theirs.insert(item.doc, (item.generation, item.heads));
                }
                let mine = self.items_of(replica, &buckets)?;
                for item in &mine {
                    if self.should_send(replica, &me, item, theirs.get(&item.doc))? {
                        self.dirty
                            .insert((priority(item.doc.kind()), item.doc.clone()));
                    }
                }
                for (doc, state) in theirs {
                    self.theirs.insert(doc, state);
                }
                if reply {
                    self.push(Message::Items {
                        buckets,
                        items: mine,
                        reply: false,
                    });
                }
            }
            Message::Changes(docs) => {
                // Check every document's scope and every change's author,
                // then apply all that pass in one write.
                let mut incoming = Vec::with_capacity(docs.len());
                for dc in docs {
                    let n = dc.changes.len() as u64;
                    if !roster.may_read(&self.peer, &dc.doc)
                        || !roster.may_read(&me, &dc.doc) && roster.role(&me).is_some()
                    {
                        self.stats.rejected += n;
                        events.push(Event::Rejected {
                            doc: dc.doc,
                            reason: "outside the shared scope".into(),
                        });
                        continue;
                    }
                    let changes = match decode_changes(
                        &dc.doc,
                        dc.changes.into_iter().map(serde_bytes::ByteBuf::into_vec),
                    ) {
                        Ok(changes) => changes,
                        Err(e) => return Err(malformed(e.to_string())),
                    };
                    let mut bad = None;
                    for c in &changes {
                        let reason = match change_author(c) {
                            Some(author) if roster.may_write(&author, &dc.doc) => continue,
                            Some(author) => format!("author {author} may not write it"),
                            None => "a change has no author identity".to_string(),
                        };
                        // A change held here already was checked when it
                        // first arrived (or was written here: a replica's
                        // roster need not list itself). A peer that did not
                        // know this replica's heads sends it back; no offence.
                        if replica.has_change(&dc.doc, &c.hash())? {
                            continue;
                        }
                        bad = Some(reason);
                        break;
                    }
                    if let Some(reason) = bad {
                        self.stats.rejected += n;
                        events.push(Event::Rejected {
                            doc: dc.doc,
                            reason,
                        });
                        continue;
                    }
                    incoming.push(Incoming {
                        doc: dc.doc,
                        generation: dc.generation,
                        changes,
                    });
                }
                let docs: Vec<DocId> = incoming.iter().map(|i| i.doc.clone()).collect();
                let results = replica.apply_batch(incoming)?;
                let mut acks = Vec::new();
                for (doc, result) in docs.into_iter().zip(results) {
                    let applied = match result {
                        Ok(applied) => applied,
                        Err(ReplicaError::MalformedChange { doc, reason }) => {
                            return Err(malformed(format!("change for {doc}: {reason}")));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    if applied.stale {
                        continue;
                    }
                    // The sender has at least the batch's heads. If this
                    // replica has more (concurrent changes), send them back.
                    self.theirs.insert(
                        doc.clone(),
                        (applied.entry.generation, applied.batch_heads.clone()),
                    );
                    // Only when the batch brought something new: a batch of
                    // known changes says nothing new about the sender.
                    if applied.new_changes > 0
                        && !applied.missing_deps
                        && applied.entry.heads != applied.batch_heads
                    {
                        let (_, extra) = replica.changes_for(
                            &doc,
                            applied.entry.generation,
                            &applied.batch_heads,
                            &[],
                        )?;
                        if !extra.is_empty() {
                            self.dirty.insert((priority(doc.kind()), doc.clone()));
                        }
                    }
                    if applied.missing_deps {
                        self.push(Message::Need(Item {
                            doc: doc.clone(),
                            generation: applied.entry.generation,
                            heads: applied.entry.heads.clone(),
                        }));
                    }
                    acks.push(Item {
                        doc: doc.clone(),
                        generation: applied.entry.generation,
                        heads: applied.entry.heads,
                    });
                    if applied.new_changes > 0 {
                        events.push(Event::Applied {
                            doc,
                            lag_ms: applied.commit_times_ms,
                        });
                    }
                }
                if !acks.is_empty() {
                    self.push(Message::Ack(acks));
                }
            }
            Message::Ack(items) => {
                for item in items {
                    if !shared(roster, &me, &self.peer, &item.doc) {
                        continue;
                    }
                    self.acks_unsaved
                        .insert(item.doc.clone(), (item.generation, item.heads.clone()));
                    if let Some((g, heads)) = self.sent.get(&item.doc) {
                        let covered = item.generation > *g
                            || (item.generation == *g
                                && heads.iter().all(|h| item.heads.contains(h)));
                        if covered {
                            self.unacked.remove(&item.doc);
                        }
                    }
                    self.theirs.insert(item.doc, (item.generation, item.heads));
                }
                if self.acks_unsaved.len() >= ACKS_UNSAVED_MAX {
                    self.save_acks(replica)?;
                }
            }
            Message::Need(item) => {
                if shared(roster, &me, &self.peer, &item.doc) {
                    self.theirs
                        .insert(item.doc.clone(), (item.generation, item.heads));
                    self.sent.remove(&item.doc);
                    self.dirty.insert((0, item.doc));
                }
            }
        }
        Ok(events)
    }

    /// After an exchange of items: does this replica hold changes of a
    /// document that the peer lacks? Exactly when all the peer's heads are
    /// known here and differ from ours (or the peer is a generation behind).
    /// When the peer has changes unknown here, it sends them first and the
    /// batch-heads rule answers with ours; when both have unknown changes,
    /// the lower peer id sends first, so that one side always moves.
    fn should_send(
        &self,
        replica: &mut Replica,
        me: &PeerId,
        mine: &Item,
        theirs: Option<&(u64, Vec<[u8; 32]>)>,
    ) -> Result<bool, SessionError> {
        let Some((generation, heads)) = theirs else {
            return Ok(true);
        };
        if *generation != mine.generation {
            return Ok(*generation < mine.generation);
        }
        if *heads == mine.heads {
            return Ok(false);
        }
        let mut all_known = true;
        for h in heads {
            if !replica.has_change(&mine.doc, &automerge::ChangeHash(*h))? {
                all_known = false;
                break;
            }
        }
        Ok(all_known || *me < self.peer)
    }

    /// The next message to send, if any: reconciliation first, then changes
    /// of dirty documents, a batch at a time. Call it whenever the transport
    /// can take a message; `now_ms` stamps the watermark.
    pub fn poll_transmit(
        &mut self,
        replica: &mut Replica,
        roster: &Roster,
    ) -> Result<Option<Message>, SessionError> {
        let _ = roster;
        if let Some(msg) = self.outbox.pop_front() {
            return Ok(Some(self.count(msg)));
        }
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while bytes < CHANGES_BATCH_BYTES {
            let Some(key) = self.dirty.pop_first() else {
                break;
            };
            let doc = key.1;
            let acked = self.acked(replica, &doc)?;
            let (their_gen, their_heads) = self
                .theirs
                .get(&doc)
                .cloned()
                .or_else(|| self.sent.get(&doc).cloned())
                .or_else(|| acked.clone())
                .unwrap_or_default();
            let acked_heads = acked.map(|a| a.1).unwrap_or_default();
            let out = replica.outgoing(&doc, their_gen, &their_heads, &acked_heads)?;
            let (generation, changes) = (out.generation, out.changes);
            if changes.is_empty() {
                continue;
            }
            self.unacked
                .entry(doc.clone())
                .or_insert(out.oldest_commit_ms.unwrap_or_default());
            if let Some(entry) = replica.entry(&doc)? {
                self.sent
                    .insert(doc.clone(), (entry.generation, entry.heads.clone()));
                self.theirs.remove(&doc);
            }
            bytes += changes.iter().map(Vec::len).sum::<usize>();
            self.stats.changes_out += changes.len() as u64;
            batch.push(DocChanges {
                doc,
                generation,
                changes: changes
                    .into_iter()
                    .map(serde_bytes::ByteBuf::from)
                    .collect(),
            });
        }
        if batch.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.count(Message::Changes(batch))))
    }

    fn count(&mut self, msg: Message) -> Message {
        self.stats.messages_out += 1;
        // Sizing these plain types cannot fail.
        self.stats.bytes_out += postcard::experimental::serialized_size(&msg).unwrap_or(0) as u64;
        msg
    }
}

/// Both `me` and `peer` may read `doc`: it is in the scope they share.
fn shared(roster: &Roster, me: &PeerId, peer: &PeerId, doc: &DocId) -> bool {
    roster.may_read(peer, doc) && (roster.role(me).is_none() || roster.may_read(me, doc))
}

/// Heartbeats first, then status, then the rest.
fn priority(kind: DocKind) -> u8 {
    match kind {
        DocKind::NodeStatus => 0,
        DocKind::PodStatus | DocKind::DeviceReported => 1,
        _ => 2,
    }
}
