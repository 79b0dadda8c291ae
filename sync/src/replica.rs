//! A replica: the documents one peer holds, on its event store, with a
//! bounded cache of loaded documents.
//!
//! Writes go through [`Replica::write_json`] (or the typed [`Replica::write`]):
//! the new value is diffed against the document (automerge's
//! `update_object`), so an unchanged object produces no change at all.
//! Every change is persisted, with the index, in one atomic batch before the
//! call returns. Changes from peers go through [`Replica::apply`], in batches.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::Path;

use automerge::transaction::Transactable;
use automerge::{
    ActorId, AutoCommit, AutoSerde, Change, ChangeHash, ReadDoc, hydrate,
    transaction::CommitOptions,
};
use lru::LruCache;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

use crate::PeerId;
use crate::document::DocId;
use crate::hlc::{Clock, Hlc};
use crate::schema::Schema;
use crate::store::{
    Batch, IndexEntry, Store, StoreError, StoreOptions, apply_changes_quietly, sorted_heads,
};

/// Errors of replica operations.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A value to write is not a JSON object (documents are maps at the root).
    #[error("document {doc}: the value must be a JSON object at the root, got {found}")]
    NotAnObject {
        /// The document.
        doc: DocId,
        /// What was given instead.
        found: &'static str,
    },
    /// A value could not be converted to or from JSON.
    #[error("document {doc}: {reason}")]
    Serde {
        /// The document.
        doc: DocId,
        /// Why.
        reason: String,
    },
    /// automerge refused an operation.
    #[error("document {doc}: {reason}")]
    Automerge {
        /// The document.
        doc: DocId,
        /// What automerge said.
        reason: String,
    },
    /// A typed write or read of a document of another kind.
    #[error("document {doc} is a {found}, not a {expected}")]
    WrongKind {
        /// The document.
        doc: DocId,
        /// The kind the schema describes.
        expected: &'static str,
        /// The document's kind.
        found: &'static str,
    },
    /// A change received from a peer does not decode.
    #[error("document {doc}: malformed change: {reason}")]
    MalformedChange {
        /// The document.
        doc: DocId,
        /// Why it does not decode.
        reason: String,
    },
}

/// Tuning of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// The event store's options.
    pub store: StoreOptions,
    /// Documents kept loaded in memory at most.
    pub cache_docs: NonZeroUsize,
    /// Flat documents this replica writes, kept in memory at most without
    /// their automerge document (their values and what writing the next
    /// change needs, a few hundred bytes each), beside `cache_docs`: a node
    /// with more devices than `cache_docs` writes each report without
    /// reading the device's document from the store.
    pub idle_flat_docs: NonZeroUsize,
    /// Rolling documents start a new generation after this many changes.
    pub rollover_after_changes: u64,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            cache_docs: NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
            idle_flat_docs: NonZeroUsize::new(16_384).unwrap_or(NonZeroUsize::MIN),
            rollover_after_changes: 64,
        }
    }
}

/// What applying a peer's changes did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    /// Changes that were new to this replica.
    pub new_changes: usize,
    /// The document's generation and heads afterwards.
    pub entry: IndexEntry,
    /// Some changes wait for dependencies this replica lacks.
    pub missing_deps: bool,
    /// The changes were of an older generation and were ignored.
    pub stale: bool,
    /// Commit times (ms) of the new changes, for lag measurement.
    pub commit_times_ms: Vec<i64>,
    /// The heads of the received batch itself (its changes no other change
    /// of the batch depends on), sorted: what the sender has, at least.
    pub batch_heads: Vec<[u8; 32]>,
}

/// Changes to send a peer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outgoing {
    /// This replica's generation of the document.
    pub generation: u64,
    /// Encoded changes the peer lacks.
    pub changes: Vec<Vec<u8>>,
    /// Commit time (ms) of the oldest of them.
    pub oldest_commit_ms: Option<i64>,
}

fn batch_heads(changes: &[Change]) -> Vec<[u8; 32]> {
    let deps: std::collections::HashSet<ChangeHash> = changes
        .iter()
        .flat_map(|c| c.deps().iter().copied())
        .collect();
    let heads: Vec<ChangeHash> = changes
        .iter()
        .map(Change::hash)
        .filter(|h| !deps.contains(h))
        .collect();
    sorted_heads(&heads)
}

struct Loaded {
    doc: AutoCommit,
    entry: IndexEntry,
    /// The last change this replica wrote, while it is the document's only
    /// head: a peer holding its dependencies lacks exactly it, and serving
    /// it from here spares automerge rebuilding it from the op columns.
    last_local: Option<LastLocal>,
    /// Received changes that are persisted (in the store and in `entry`)
    /// but not yet applied to `doc`: changes that extend the document's
    /// only head in a straight line are only appended on receipt (see
    /// [`Replica::stage_successors`]), and applied when the document is
    /// next used. Bounded by the store's compaction threshold.
    pending: Vec<Change>,
    /// This replica's own flat writes (see [`Replica::stage_flat_direct`])
    /// staged in a write batch not yet committed, and not applied to `doc`.
    own: Vec<Change>,
    /// `doc` is empty and stands for what the store holds: a flat document
    /// brought back from [`FlatIdle`] ([`Replica::promote`]). It is read
    /// from the store when it is next used (or replaced whole by a
    /// roll-over, which needs none of it).
    stale: bool,
    /// For a flat document: its root values as this replica last wrote
    /// them, while they are all it holds (`None` once anything else changed
    /// it). Comparing a new report with these spares asking automerge for
    /// every value, and reads are answered from them.
    flat: Option<Flat>,
}

/// A flat document this replica wrote last, kept without its automerge
/// document (which the store holds): enough to read it and to write its
/// next change (see [`Replica::stage_flat_direct`]). Anything else that
/// needs the document reads it from the store again.
struct FlatIdle {
    entry: IndexEntry,
    flat: Flat,
    last_local: Option<LastLocal>,
    /// Direct writes staged in a write batch not yet committed.
    own: Vec<Change>,
}

/// A root value of a flat document.
type FlatValue = (String, automerge::ScalarValue);

/// A flat document's root values as this replica last wrote them.
struct Flat {
    values: Vec<FlatValue>,
    /// What writing the next change without automerge's transaction needs,
    /// when it is known (see [`Replica::stage_flat_direct`]).
    chain: Option<FlatChain>,
}

impl Flat {
    /// A document with no values and no changes.
    fn empty() -> Self {
        Self {
            values: Vec::new(),
            chain: Some(FlatChain::empty()),
        }
    }
}

impl FlatChain {
    fn empty() -> Self {
        Self {
            ops: Vec::new(),
            seq: 0,
            max_op: 0,
            head: None,
        }
    }
}

/// Where a flat document whose only head is this replica's last change
/// stands: the op that set each value, the change's sequence number and last
/// op counter. The next change is built from these alone.
struct FlatChain {
    /// The op of each of [`Flat::values`], in the same order.
    ops: Vec<automerge::legacy::OpId>,
    seq: u64,
    max_op: u64,
    head: Option<ChangeHash>,
}

/// What continuing a straight line of changes needs to know of its last one.
#[derive(Clone)]
struct ChainLink {
    hash: [u8; 32],
    actor: automerge::ActorId,
    seq: u64,
    max_op: u64,
}

impl ChainLink {
    fn of(change: &Change) -> Self {
        Self {
            hash: change.hash().0,
            actor: change.actor_id().clone(),
            seq: change.seq(),
            max_op: change.max_op(),
        }
    }
}

struct LastLocal {
    hash: [u8; 32],
    deps: Vec<[u8; 32]>,
    bytes: Vec<u8>,
    time_ms: i64,
}

impl LastLocal {
    /// The live case: this change is the document's only head (`entry`) and
    /// a peer at `their_generation` holding `have` lacks just it (it holds
    /// the change's dependencies, or is a generation behind one that is
    /// just this change). Served as kept, without automerge.
    fn serves(
        &self,
        entry: &IndexEntry,
        their_generation: u64,
        have: &[[u8; 32]],
    ) -> Option<Outgoing> {
        let lacks_just_it = if their_generation < entry.generation {
            self.deps.is_empty()
        } else {
            let mut have = have.to_vec();
            have.sort_unstable();
            their_generation == entry.generation && have == self.deps
        };
        (entry.heads == [self.hash] && lacks_just_it).then(|| Outgoing {
            generation: entry.generation,
            changes: vec![self.bytes.clone()],
            oldest_commit_ms: Some(self.time_ms),
        })
    }
}

const META_INCARNATION: &[u8] = b"incarnation";
const META_CLOCK: &[u8] = b"clock";
/// The largest snapshot compacted by appending a peer's straight line of
/// changes to it as they are (see [`Replica::stage_successors`]); a larger
/// one is loaded and saved whole by automerge.
const RAW_SNAPSHOT_MAX: usize = 64 << 10;
/// How far ahead of a timestamp the clock's lease is saved ([`Replica::tick`]).
pub const CLOCK_LEASE_MS: u64 = 1_000;

/// Documents whose compaction is left for later at most (see
/// [`Replica::compact_deferred`]); past that, a straight line is compacted
/// as it is received.
const DEFERRED_MAX: usize = 4096;

/// Changed documents a scoped subscription holds before it lags.
const SCOPED_QUEUE: usize = 4096;

/// Last changes remembered for continuing a straight line (see
/// [`Replica::stage_successors`]), about 200 bytes each with the cache's own
/// bookkeeping (some 200 KB in all).
const CHAIN_LINKS: usize = 1024;

/// The documents of one peer.
pub struct Replica {
    store: Store,
    cache: LruCache<DocId, Loaded>,
    /// Flat documents written directly, out of `cache` (see [`FlatIdle`]).
    idle: LruCache<DocId, FlatIdle>,
    /// Recently stored changes by hash, as the next change of a straight
    /// line needs them: a peer's next change to a document whose only
    /// head is one of these is appended without reading the store. Keyed
    /// by the hash, an entry is right whatever happened to the document
    /// since.
    links: LruCache<[u8; 32], ChainLink>,
    /// Documents a peer's straight line took past the compaction threshold,
    /// left to be compacted off the receive path (see
    /// [`Replica::compact_deferred`]), with the generation, chunk count and
    /// head their index entry had then: compacted only if it still has them.
    deferred: HashMap<DocId, (u64, u32, [u8; 32])>,
    me: PeerId,
    actor: ActorId,
    clock: Clock,
    /// The clock's lease: the wall time (ms) the store holds, with an fsync,
    /// as the clock's last value; see [`Replica::tick`].
    clock_saved_ms: u64,
    options: ReplicaOptions,
    events: broadcast::Sender<DocId>,
    /// Scoped subscriptions, each with a queue of its own, filled only
    /// with documents of its scope: a burst of changes elsewhere (pod
    /// statuses) never makes a subscriber to other kinds (node heartbeats)
    /// lag.
    scoped: Vec<(Scope, broadcast::Sender<DocId>)>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("me", &self.me)
            .field("store", &self.store)
            .finish()
    }
}

/// A set of documents to watch: by kind, by owning node or site, or both.
/// The empty scope matches every document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    kinds: Vec<crate::document::DocKind>,
    node: Option<String>,
    site: Option<String>,
}

impl Scope {
    /// Every document.
    pub fn all() -> Self {
        Self::default()
    }

    /// Also require one of these kinds.
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = crate::document::DocKind>) -> Self {
        self.kinds.extend(kinds);
        self
    }

    /// Also require documents owned by this node.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// Also require documents shared by this site.
    pub fn site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }

    /// Whether `doc` is in the scope.
    pub fn matches(&self, doc: &DocId) -> bool {
        use crate::document::Owner;
        (self.kinds.is_empty() || self.kinds.contains(&doc.kind()))
            && self
                .node
                .as_deref()
                .is_none_or(|n| doc.owner() == Owner::Node(n))
            && self
                .site
                .as_deref()
                .is_none_or(|s| doc.owner() == Owner::Site(s))
    }
}

/// Why a subscription yielded no document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    /// The receiver fell behind and missed this many events: re-read the
    /// documents of the scope, then go on receiving.
    #[error("subscription lagged: {0} events missed; re-read the scope")]
    Lagged(u64),
    /// The replica is gone.
    #[error("the replica was closed")]
    Closed,
}

/// Changed documents of one [`Scope`], from [`Replica::subscribe_scope`].
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<DocId>,
    scope: Scope,
}

impl Subscription {
    /// The next changed document in the scope.
    pub async fn recv(&mut self) -> Result<DocId, SubscriptionError> {
        loop {
            match self.rx.recv().await {
                Ok(doc) if self.scope.matches(&doc) => return Ok(doc),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    return Err(SubscriptionError::Lagged(n));
                }
                Err(broadcast::error::RecvError::Closed) => return Err(SubscriptionError::Closed),
            }
        }
    }

    /// A changed document in the scope, if one is waiting.
    pub fn try_recv(&mut self) -> Result<Option<DocId>, SubscriptionError> {
        loop {
            match self.rx.try_recv() {
                Ok(doc) if self.scope.matches(&doc) => return Ok(Some(doc)),
                Ok(_) => {}
                Err(broadcast::error::TryRecvError::Empty) => return Ok(None),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    return Err(SubscriptionError::Lagged(n));
                }
                Err(broadcast::error::TryRecvError::Closed) => {
                    return Err(SubscriptionError::Closed);
                }
            }
        }
    }
}

/// Decoded changes of one document received from a peer, for
/// [`Replica::apply_batch`].
#[derive(Debug)]
pub struct Incoming {
    /// The document.
    pub doc: DocId,
    /// The sender's generation of it.
    pub generation: u64,
    /// The changes.
    pub changes: Vec<Change>,
}

/// Decodes changes received for `doc`; the first that does not decode
/// fails the lot.
pub fn decode_changes(
    doc: &DocId,
    changes: impl IntoIterator<Item = Vec<u8>>,
) -> Result<Vec<Change>, ReplicaError> {
    changes
        .into_iter()
        .map(|bytes| {
            let malformed = |reason: String| ReplicaError::MalformedChange {
                doc: doc.clone(),
                reason,
            };
            // A chunk's header holds the first 4 bytes of its hash, after
            // the 4-byte magic; automerge's parser does not compare them, so
            // a change altered on the way would pass as another change of
            // the same author.
            let checksum = bytes.get(4..8).map(<[u8]>::to_vec);
            let change = Change::from_bytes(bytes).map_err(|e| malformed(e.to_string()))?;
            if checksum.as_deref() != Some(&change.hash().0[..4]) {
                return Err(malformed("checksum does not match the change".into()));
            }
            Ok(change)
        })
        .collect()
}

/// The identity that wrote a change: the first 32 bytes of its actor id.
pub fn change_author(change: &Change) -> Option<PeerId> {
    let bytes = change.actor_id().to_bytes();
    bytes
        .get(..32)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(PeerId)
}

impl Replica {
    /// Opens the replica in `dir` for the peer `me`. Each opening is a new
    /// incarnation with its own automerge actor, so a replica that lost
    /// unsynced data in a crash never reuses a sequence number.
    pub fn open(
        dir: impl AsRef<Path>,
        me: PeerId,
        options: ReplicaOptions,
    ) -> Result<Self, ReplicaError> {
        let store = Store::open(dir, options.store.clone())?;
        let incarnation = store
            .meta(META_INCARNATION)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
            + 1;
        store.put_meta(META_INCARNATION, &incarnation.to_le_bytes())?;
        let last: Hlc = store
            .meta(META_CLOCK)?
            .and_then(|b| postcard::from_bytes(&b).ok())
            .unwrap_or_default();
        let mut actor = me.0.to_vec();
        actor.extend_from_slice(&incarnation.to_le_bytes());
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            store,
            // Sparse: tables that grow as they fill. `LruCache::new` sizes
            // its table for the whole capacity at once (16,384 idle flat
            // documents are half a megabyte before the first), which every
            // replica of a small node, and each of a simulated fleet's,
            // would pay empty.
            cache: LruCache::sparse(options.cache_docs),
            idle: LruCache::sparse(options.idle_flat_docs),
            links: LruCache::sparse(NonZeroUsize::new(CHAIN_LINKS).unwrap_or(NonZeroUsize::MIN)),
            deferred: HashMap::new(),
            me,
            actor: ActorId::from(actor),
            clock: Clock::starting_after(last),
            clock_saved_ms: last.wall_ms,
            options,
            events,
            scoped: Vec::new(),
        })
    }

    /// This replica's peer identity.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Documents currently loaded in memory (flat documents kept without
    /// their automerge document included).
    pub fn cached_docs(&self) -> usize {
        self.cache.len() + self.idle.len()
    }

    /// Ids of changed documents as they are persisted (local writes and
    /// applied peer changes). A slow receiver loses events (`Lagged`) and
    /// should then re-read the index.
    pub fn subscribe(&self) -> broadcast::Receiver<DocId> {
        self.events.subscribe()
    }

    /// Ids of changed documents within `scope`, as they are persisted. See
    /// [`Subscription`].
    pub fn subscribe_scope(&mut self, scope: Scope) -> Subscription {
        self.subscribe_scope_queued(scope, SCOPED_QUEUE)
    }

    /// [`Replica::subscribe_scope`] holding at most `queue` changed
    /// documents before it lags. The queue's slots are allocated at once
    /// (about 56 bytes each): a subscriber that re-reads its scope anyway, or
    /// whose scope rarely changes, can keep a small one.
    pub fn subscribe_scope_queued(&mut self, scope: Scope, queue: usize) -> Subscription {
        let (tx, rx) = broadcast::channel(queue.max(1));
        self.scoped.push((scope.clone(), tx));
        Subscription { rx, scope }
    }

    /// Tells subscribers that `doc` changed (and forgets subscriptions
    /// whose receiver is gone).
    fn publish(&mut self, doc: DocId) {
        self.scoped.retain(|(_, tx)| tx.receiver_count() > 0);
        for (scope, tx) in &self.scoped {
            if scope.matches(&doc) {
                let _ = tx.send(doc.clone());
            }
        }
        let _ = self.events.send(doc);
    }

    /// The hybrid logical clock's next timestamp.
    ///
    /// The store holds a lease on the clock rather than its every value: a
    /// time [`CLOCK_LEASE_MS`] ahead of the timestamp that passed the
    /// previous lease, written with an fsync whatever the store's options.
    /// A reopened replica starts after the lease, so it never issues a
    /// timestamp below one it issued before, even one a peer received just
    /// before a power loss took the write that carried it. That costs an
    /// fsync per lease period of writes instead of one per write; after a
    /// restart, timestamps run up to the lease ahead of the wall clock
    /// until it catches up.
    pub fn tick(&mut self, now_ms: u64) -> Result<Hlc, ReplicaError> {
        let t = self.clock.tick(now_ms);
        if t.wall_ms >= self.clock_saved_ms {
            let lease = t.wall_ms.saturating_add(CLOCK_LEASE_MS);
            let saved = Hlc {
                wall_ms: lease,
                counter: 0,
            };
            self.store.put_meta(
                META_CLOCK,
                &postcard::to_allocvec(&saved).unwrap_or_default(),
            )?;
            self.clock_saved_ms = lease;
        }
        Ok(t)
    }

    /// Folds a timestamp seen in a peer's write into the clock.
    pub fn observe(&mut self, seen: Hlc) {
        self.clock.observe(seen);
    }

    fn load(&mut self, doc: &DocId) -> Result<Option<&mut Loaded>, ReplicaError> {
        self.promote(doc);
        if let Some(loaded) = self.cache.peek_mut(doc)
            && (loaded.stale || !loaded.own.is_empty())
        {
            let mut fresh = None;
            if loaded.stale {
                match self.store.load(doc) {
                    Ok(Some((am, _))) => fresh = Some(am),
                    Ok(None) => {}
                    Err(e) => {
                        self.cache.pop(doc);
                        return Err(e.into());
                    }
                }
            }
            let Some(loaded) = self.cache.peek_mut(doc) else {
                return Ok(None);
            };
            if let Some(mut am) = fresh {
                am.set_actor(self.actor.clone());
                loaded.doc = am;
                loaded.stale = false;
            }
            let own = std::mem::take(&mut loaded.own);
            if loaded.stale || apply_changes_quietly(&mut loaded.doc, own).is_err() {
                // The store has nothing or does not match: read the
                // document from there again, as it is, on the next call.
                self.cache.pop(doc);
                return Err(ReplicaError::Automerge {
                    doc: doc.clone(),
                    reason: "the document's own flat writes do not apply to it as stored".into(),
                });
            }
        }
        if let Some(loaded) = self.cache.peek_mut(doc)
            && !loaded.pending.is_empty()
        {
            // A peer's changes (which dropped the flat mirror when they
            // arrived; this replica's own direct writes wait in `own`).
            let pending = std::mem::take(&mut loaded.pending);
            if let Err(e) = apply_changes_quietly(&mut loaded.doc, pending) {
                // The store holds the same changes; whoever asks next reads
                // the document from there.
                self.cache.pop(doc);
                return Err(ReplicaError::Automerge {
                    doc: doc.clone(),
                    reason: e.to_string(),
                });
            }
        }
        if !self.cache.contains(doc) {
            let Some((mut am, entry)) = self.store.load(doc)? else {
                return Ok(None);
            };
            am.set_actor(self.actor.clone());
            self.cache.put(
                doc.clone(),
                Loaded {
                    doc: am,
                    entry,
                    last_local: None,
                    pending: Vec::new(),
                    own: Vec::new(),
                    stale: false,
                    flat: None,
                },
            );
        }
        Ok(self.cache.get_mut(doc))
    }

    /// Moves a flat document kept without its automerge document into the
    /// cache, to be read from the store when [`Replica::load`] needs it
    /// (with the direct writes of the batch being staged on top).
    fn promote(&mut self, doc: &DocId) {
        if let Some(idle) = self.idle.pop(doc) {
            self.cache.put(
                doc.clone(),
                Loaded {
                    doc: AutoCommit::new(),
                    entry: idle.entry,
                    last_local: idle.last_local,
                    pending: Vec::new(),
                    own: idle.own,
                    stale: true,
                    flat: Some(idle.flat),
                },
            );
        }
    }

    /// The index entry of a document (generation, heads), if the replica has it.
    pub fn entry(&mut self, doc: &DocId) -> Result<Option<IndexEntry>, ReplicaError> {
        if let Some(idle) = self.idle.peek(doc) {
            return Ok(Some(idle.entry.clone()));
        }
        if let Some(loaded) = self.cache.peek(doc) {
            return Ok(Some(loaded.entry.clone()));
        }
        Ok(self.store.index(doc)?)
    }

    /// Every document and its index entry, in id order, from the store.
    pub fn scan(&self) -> impl Iterator<Item = Result<(DocId, IndexEntry), StoreError>> + '_ {
        self.store.scan_index()
    }

    /// The documents whose id starts with `prefix`, in id order.
    pub fn scan_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = Result<(DocId, IndexEntry), StoreError>> + 'a {
        self.store.scan_index_prefix(prefix)
    }

    /// Reads a document as JSON. `None` when the replica does not have it.
    pub fn read_json(&mut self, doc: &DocId) -> Result<Option<serde_json::Value>, ReplicaError> {
        let id = doc.clone();
        // A flat document whose values this replica wrote, all of them.
        let flat = match self.idle.get(doc) {
            Some(idle) => Some(&idle.flat),
            None if doc.kind().rolls_over() => self.cache.get(doc).and_then(|l| l.flat.as_ref()),
            None => None,
        };
        if let Some(flat) = flat {
            return flat_json(&flat.values)
                .map(Some)
                .map_err(|reason| ReplicaError::Serde { doc: id, reason });
        }
        let Some(loaded) = self.load(doc)? else {
            return Ok(None);
        };
        if is_tombstone(&loaded.doc) {
            return Ok(None);
        }
        if doc.kind().rolls_over() {
            return read_flat(&loaded.doc)
                .map(Some)
                .map_err(|reason| ReplicaError::Serde { doc: id, reason });
        }
        serde_json::to_value(AutoSerde::from(&loaded.doc))
            .map(Some)
            .map_err(|e| ReplicaError::Serde {
                doc: id,
                reason: e.to_string(),
            })
    }

    /// Whether the replica holds `doc` as deleted (a tombstone).
    pub fn is_deleted(&mut self, doc: &DocId) -> Result<bool, ReplicaError> {
        if self.idle.contains(doc) || self.cache.peek(doc).is_some_and(|l| l.flat.is_some()) {
            // Values this replica wrote: not a tombstone.
            return Ok(false);
        }
        Ok(self.load(doc)?.is_some_and(|l| is_tombstone(&l.doc)))
    }

    /// Deletes a document: replaces it with a tombstone in a new generation,
    /// which supersedes the old one everywhere it syncs (changes made
    /// concurrently to the old generation are then ignored). Reads return
    /// `None` afterwards; a later write brings the document back. Only a
    /// writer of the document may delete it: peers reject a tombstone by
    /// anyone else, as any other change. Returns `false` when there was
    /// nothing to delete.
    pub fn delete(&mut self, doc: &DocId, now_ms: u64) -> Result<bool, ReplicaError> {
        let Some(loaded) = self.load(doc)? else {
            return Ok(false);
        };
        if is_tombstone(&loaded.doc) {
            return Ok(false);
        }
        let mut entry = loaded.entry.clone();
        let mut tomb = self.new_doc();
        tomb.put(automerge::ROOT, TOMBSTONE_KEY, true)
            .map_err(|e| ReplicaError::Automerge {
                doc: doc.clone(),
                reason: e.to_string(),
            })?;
        tomb.commit_with(CommitOptions::default().with_time(now_ms as i64));
        let stored = entry.chunks;
        entry.generation += 1;
        entry.changes = 1;
        let mut batch = Batch::default();
        self.stage_whole(&mut batch, doc, entry, stored, tomb);
        if let Err(e) = self.store.commit(batch) {
            self.discard(std::slice::from_ref(doc));
            return Err(e.into());
        }
        self.publish(doc.clone());
        Ok(true)
    }

    /// Reads a document into a typed value.
    pub fn read<T: DeserializeOwned>(&mut self, doc: &DocId) -> Result<Option<T>, ReplicaError> {
        match self.read_json(doc)? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ReplicaError::Serde {
                    doc: doc.clone(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Writes a document of a known schema (diffed: unchanged fields produce
    /// no operations). Refuses a document of another kind.
    pub fn put<T: Schema>(
        &mut self,
        doc: &DocId,
        value: &T,
        now_ms: u64,
    ) -> Result<Option<ChangeHash>, ReplicaError> {
        check_kind::<T>(doc)?;
        self.write(doc, value, now_ms)
    }

    /// Reads a document of a known schema. Refuses a document of another
    /// kind; `None` when the replica does not have it.
    pub fn get<T: Schema>(&mut self, doc: &DocId) -> Result<Option<T>, ReplicaError> {
        check_kind::<T>(doc)?;
        self.read(doc)
    }

    /// Writes a typed value as the whole document (diffed: unchanged fields
    /// produce no operations).
    pub fn write<T: Serialize>(
        &mut self,
        doc: &DocId,
        value: &T,
        now_ms: u64,
    ) -> Result<Option<ChangeHash>, ReplicaError> {
        let json = serde_json::to_value(value).map_err(|e| ReplicaError::Serde {
            doc: doc.clone(),
            reason: e.to_string(),
        })?;
        self.write_json(doc, &json, now_ms)
    }

    /// Writes a JSON object as the whole document. Returns the new change's
    /// hash, or `None` when nothing changed. The change is persisted before
    /// this returns.
    pub fn write_json(
        &mut self,
        doc: &DocId,
        value: &serde_json::Value,
        now_ms: u64,
    ) -> Result<Option<ChangeHash>, ReplicaError> {
        Ok(self
            .write_many([(doc, value)], now_ms)?
            .into_iter()
            .next()
            .flatten())
    }

    /// Writes many documents (each a JSON object, the whole document) and
    /// persists all their changes in one atomic write: a report cycle of many
    /// devices costs one store write. Returns each write's change hash, or
    /// `None` where nothing changed. On an error nothing is persisted.
    pub fn write_many<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a DocId, &'a serde_json::Value)>,
        now_ms: u64,
    ) -> Result<Vec<Option<ChangeHash>>, ReplicaError> {
        let items: Vec<(&DocId, &serde_json::Value)> = items.into_iter().collect();
        // Refuse bad input before any document is touched.
        for (doc, value) in &items {
            if !value.is_object() {
                return Err(ReplicaError::NotAnObject {
                    doc: (*doc).clone(),
                    found: json_kind(value),
                });
            }
        }
        self.with_room(items.len(), |r| r.stage_and_commit_writes(items, now_ms))
    }

    /// [`Replica::write_many`] once its input is checked.
    fn stage_and_commit_writes(
        &mut self,
        items: Vec<(&DocId, &serde_json::Value)>,
        now_ms: u64,
    ) -> Result<Vec<Option<ChangeHash>>, ReplicaError> {
        let mut batch = Batch::default();
        let mut touched: Vec<DocId> = Vec::new();
        let mut out = Vec::with_capacity(items.len());
        for (doc, value) in items {
            match self.stage_write(&mut batch, doc, value, now_ms) {
                Ok(hash) => {
                    if hash.is_some() {
                        touched.push(doc.clone());
                    }
                    out.push(hash);
                }
                Err(e) => {
                    touched.push(doc.clone());
                    self.discard(&touched);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.store.commit(batch) {
            self.discard(&touched);
            return Err(e.into());
        }
        for doc in &touched {
            // Direct writes are in the store now: the document is read from
            // there when something needs it whole, and kept meanwhile
            // without its automerge document.
            if let Some(idle) = self.idle.peek_mut(doc) {
                idle.own = Vec::new();
            } else if self
                .cache
                .peek(doc)
                .is_some_and(|l| !l.own.is_empty() && l.flat.is_some())
                && let Some(loaded) = self.cache.pop(doc)
                && let Some(flat) = loaded.flat
            {
                self.idle.put(
                    doc.clone(),
                    FlatIdle {
                        entry: loaded.entry,
                        flat,
                        last_local: loaded.last_local,
                        own: Vec::new(),
                    },
                );
            }
        }
        for doc in touched {
            self.publish(doc);
        }
        Ok(out)
    }

    /// An empty document written by this replica's actor.
    fn new_doc(&self) -> AutoCommit {
        let mut am = AutoCommit::new();
        am.set_actor(self.actor.clone());
        am
    }

    /// Stages `am` as the whole of `doc` (a new generation, a tombstone, a
    /// document received whole) in place of the `stored_chunks` chunks the
    /// store holds for it, and keeps it loaded. `entry` brings the generation
    /// and change count; heads and snapshot are set here. Returns the entry.
    fn stage_whole(
        &mut self,
        batch: &mut Batch,
        doc: &DocId,
        mut entry: IndexEntry,
        stored_chunks: u32,
        mut am: AutoCommit,
    ) -> IndexEntry {
        entry.heads = sorted_heads(&am.get_heads());
        let saved = am.save_nocompress();
        self.store
            .stage_replace(batch, doc, &mut entry, stored_chunks, &saved);
        self.idle.pop(doc);
        self.cache.put(
            doc.clone(),
            Loaded {
                doc: am,
                entry: entry.clone(),
                last_local: None,
                pending: Vec::new(),
                own: Vec::new(),
                stale: false,
                flat: None,
            },
        );
        entry
    }

    /// Runs `f`, a batch touching up to `n` documents, with the caches grown
    /// so that none of them is evicted before the batch is committed: a
    /// document evicted with a write staged would be read back from the
    /// store without it, and a second write to it in the same batch would
    /// replace the first. They shrink back afterwards (what they drop then
    /// is in the store).
    fn with_room<T>(&mut self, n: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        let (cache, idle) = (self.cache.cap(), self.idle.cap());
        if n < cache.get() && n < idle.get() {
            return f(self);
        }
        self.cache.resize(cache.saturating_add(n));
        self.idle.resize(idle.saturating_add(n));
        let out = f(self);
        self.cache.resize(cache);
        self.idle.resize(idle);
        out
    }

    /// Forgets loaded documents whose staged writes were not persisted, so
    /// that they are read back from the store as it is.
    fn discard(&mut self, docs: &[DocId]) {
        for doc in docs {
            self.cache.pop(doc);
            self.idle.pop(doc);
        }
    }

    fn stage_write(
        &mut self,
        batch: &mut Batch,
        doc: &DocId,
        value: &serde_json::Value,
        now_ms: u64,
    ) -> Result<Option<ChangeHash>, ReplicaError> {
        let serde_json::Value::Object(map) = value else {
            return Err(ReplicaError::NotAnObject {
                doc: doc.clone(),
                found: json_kind(value),
            });
        };
        if doc.kind().rolls_over()
            && let Some(done) = self.stage_flat_direct(batch, doc, map, now_ms)?
        {
            return Ok(done);
        }
        // Rolling documents are stored flat; the others as automerge maps.
        let root = (!doc.kind().rolls_over()).then(|| hydrate::Value::Map(json_map(map)));
        // Returns the root values of a flat document after the write.
        let set = |am: &mut AutoCommit,
                   mirror: Option<&[FlatValue]>|
         -> Result<Option<Vec<FlatValue>>, String> {
            match &root {
                None => write_flat(am, map, mirror)
                    .map(Some)
                    .map_err(|e| e.to_string()),
                Some(root) => am
                    .update_object(automerge::ROOT, root)
                    .map(|()| None)
                    .map_err(|e| e.to_string()),
            }
        };
        let rollover_after = self.options.rollover_after_changes;
        let created = self.load(doc)?.is_none();
        if created {
            let am = self.new_doc();
            self.cache.put(
                doc.clone(),
                Loaded {
                    doc: am,
                    entry: IndexEntry::default(),
                    last_local: None,
                    pending: Vec::new(),
                    own: Vec::new(),
                    stale: false,
                    // An empty document: no values.
                    flat: doc.kind().rolls_over().then(Flat::empty),
                },
            );
            if doc.kind().rolls_over()
                && let Some(done) = self.stage_flat_direct(batch, doc, map, now_ms)?
            {
                if done.is_none() {
                    // An empty object makes no document: none was stored,
                    // so none stays loaded either.
                    self.cache.pop(doc);
                }
                return Ok(done);
            }
        }
        let actor = self.actor.clone();
        let Some(loaded) = self.cache.get_mut(doc) else {
            return Ok(None);
        };
        let am_err = |e: &dyn std::fmt::Display| ReplicaError::Automerge {
            doc: doc.clone(),
            reason: e.to_string(),
        };
        let mirror = loaded.flat.take().map(|f| f.values);
        let values = set(&mut loaded.doc, mirror.as_deref()).map_err(|e| am_err(&e))?;
        let Some(hash) = loaded
            .doc
            .commit_with(CommitOptions::default().with_time(now_ms as i64))
        else {
            if created {
                // An empty object makes no document: none was stored, so
                // none stays loaded either.
                self.cache.pop(doc);
            } else if let Some(values) = values {
                let chain = flat_chain(&mut loaded.doc, &values, &actor);
                loaded.flat = Some(Flat { values, chain });
            }
            return Ok(None);
        };
        let mut entry = loaded.entry.clone();
        entry.heads = sorted_heads(&loaded.doc.get_heads());
        entry.changes += 1;
        if doc.kind().rolls_over() && entry.changes > rollover_after {
            // A new generation holding only the current values.
            let mut fresh = self.new_doc();
            let values = set(&mut fresh, Some(&[])).map_err(|e| am_err(&e))?;
            let Some(hash) = fresh.commit_with(CommitOptions::default().with_time(now_ms as i64))
            else {
                return Ok(None);
            };
            let stored = entry.chunks;
            entry.generation += 1;
            entry.changes = 1;
            let flat = values.map(|values| Flat {
                chain: flat_chain(&mut fresh, &values, &actor),
                values,
            });
            self.stage_whole(batch, doc, entry, stored, fresh);
            if let Some(loaded) = self.cache.peek_mut(doc) {
                loaded.flat = flat;
            }
            return Ok(Some(hash));
        }
        let Some(change) = loaded.doc.get_change_by_hash(&hash) else {
            return Err(am_err(&"committed change not found"));
        };
        let bytes = change.raw_bytes().to_vec();
        loaded.last_local = Some(LastLocal {
            hash: hash.0,
            deps: sorted_heads(change.deps()),
            bytes: bytes.clone(),
            time_ms: change.timestamp(),
        });
        if let Some(values) = values {
            let chain = flat_chain(&mut loaded.doc, &values, &actor);
            loaded.flat = Some(Flat { values, chain });
        }
        let doc_ref = &mut loaded.doc;
        self.store
            .stage_append(batch, doc, &mut entry, &[bytes], || {
                doc_ref.save_nocompress()
            });
        loaded.entry = entry;
        Ok(Some(hash))
    }

    /// Writes a flat document whose state this replica knows (its
    /// [`FlatChain`]) with a change built here from the values that differ,
    /// instead of through automerge's transaction: automerge would find
    /// each key's op, splice the new ones into its columns, and rebuild the
    /// committed change's bytes to hand them out, which is most of the cost
    /// of a report. The change is the one automerge would make (the same
    /// ops, counters, predecessors and dependencies, so the same bytes and
    /// hash); it is persisted like any other, and applied to the loaded
    /// document only when that is next used. `Ok(None)` when this does not
    /// apply (the chain is not known, or the write rolls the document over
    /// or compacts it): the caller writes through automerge.
    fn stage_flat_direct(
        &mut self,
        batch: &mut Batch,
        doc: &DocId,
        map: &serde_json::Map<String, serde_json::Value>,
        now_ms: u64,
    ) -> Result<Option<Option<ChangeHash>>, ReplicaError> {
        let rollover_after = self.options.rollover_after_changes;
        if let Some(idle) = self.idle.peek(doc)
            && (idle.entry.changes + 1 > rollover_after || self.store.would_compact(&idle.entry, 1))
        {
            // Rolled over below, on the cached document; or written the
            // usual way.
            self.promote(doc);
        }
        if let Some(idle) = self.idle.get_mut(doc) {
            let hash = append_flat(
                &self.store,
                batch,
                doc,
                &self.actor,
                FlatParts {
                    entry: &mut idle.entry,
                    flat: &mut idle.flat,
                    last_local: &mut idle.last_local,
                    own: &mut idle.own,
                },
                map,
                now_ms,
            );
            return Ok(hash);
        }
        let Some(loaded) = self.cache.get_mut(doc) else {
            return Ok(None);
        };
        let Some(flat) = &mut loaded.flat else {
            return Ok(None);
        };
        let rolls = loaded.entry.changes + 1 > rollover_after;
        if !rolls {
            if self.store.would_compact(&loaded.entry, 1) {
                return Ok(None);
            }
            return Ok(append_flat(
                &self.store,
                batch,
                doc,
                &self.actor,
                FlatParts {
                    entry: &mut loaded.entry,
                    flat,
                    last_local: &mut loaded.last_local,
                    own: &mut loaded.own,
                },
                map,
                now_ms,
            ));
        }
        let Some(chain) = &flat.chain else {
            return Ok(None);
        };
        if flat_ops(&self.actor, &flat.values, chain, map)
            .ops
            .is_empty()
        {
            return Ok(Some(None));
        }
        // A new generation holding only the current values: its first
        // change, stored in place of the old generation. The old one is
        // not read for this.
        let Some((change, flat)) = flat_change(&self.actor, &[], &FlatChain::empty(), map, now_ms)
        else {
            return Ok(None); // no values at all: written the usual way
        };
        let hash = change.hash();
        let bytes = change.raw_bytes().to_vec();
        let mut entry = loaded.entry.clone();
        let stored = entry.chunks;
        entry.generation += 1;
        entry.changes = 1;
        entry.heads = vec![hash.0];
        // A change chunk loads as a document.
        self.store
            .stage_replace(batch, doc, &mut entry, stored, &bytes);
        let mut fresh = AutoCommit::new();
        fresh.set_actor(self.actor.clone());
        loaded.doc = fresh;
        loaded.stale = false;
        loaded.pending.clear();
        loaded.own = vec![change];
        loaded.last_local = Some(LastLocal {
            hash: hash.0,
            deps: Vec::new(),
            bytes,
            time_ms: now_ms as i64,
        });
        loaded.flat = Some(flat);
        loaded.entry = entry;
        Ok(Some(Some(hash)))
    }

    /// The changes a peer lacks, given the generation and heads it has.
    /// Returns this replica's generation and the changes' bytes; empty when
    /// the peer is up to date or ahead.
    pub fn changes_for(
        &mut self,
        doc: &DocId,
        their_generation: u64,
        their_heads: &[[u8; 32]],
        acked_heads: &[[u8; 32]],
    ) -> Result<(u64, Vec<Vec<u8>>), ReplicaError> {
        let out = self.outgoing(doc, their_generation, their_heads, acked_heads)?;
        Ok((out.generation, out.changes))
    }

    /// [`Replica::changes_for`], with the commit time of the oldest change
    /// (for the sender's watermark), read while the changes are decoded anyway.
    pub fn outgoing(
        &mut self,
        doc: &DocId,
        their_generation: u64,
        their_heads: &[[u8; 32]],
        acked_heads: &[[u8; 32]],
    ) -> Result<Outgoing, ReplicaError> {
        let kept = match self.idle.peek(doc) {
            Some(idle) => Some((&idle.entry, &idle.last_local)),
            None => self.cache.peek(doc).map(|l| (&l.entry, &l.last_local)),
        };
        // Answered before the document is loaded: changes written since it
        // was last used need not be applied for this.
        if let Some((entry, Some(last))) = kept
            && let Some(out) = last.serves(entry, their_generation, their_heads)
        {
            return Ok(out);
        }
        let Some(loaded) = self.load(doc)? else {
            return Ok(Outgoing::default());
        };
        let generation = loaded.entry.generation;
        if their_generation > generation {
            return Ok(Outgoing {
                generation,
                ..Default::default()
            });
        }
        let have: Vec<ChangeHash> = if their_generation < generation {
            Vec::new() // a newer generation: all of it
        } else {
            // Their heads we know are exact; those we do not know mean they
            // have changes we lack, so fall back to what they acknowledged.
            let theirs: Vec<ChangeHash> = their_heads.iter().map(|h| ChangeHash(*h)).collect();
            let held = contains(&mut loaded.doc, &theirs);
            let mut known: Vec<ChangeHash> = theirs
                .iter()
                .zip(&held)
                .filter(|(_, held)| **held)
                .map(|(h, _)| *h)
                .collect();
            if known.len() < theirs.len() {
                let acked: Vec<ChangeHash> = acked_heads.iter().map(|h| ChangeHash(*h)).collect();
                let held = contains(&mut loaded.doc, &acked);
                for (hash, held) in acked.into_iter().zip(held) {
                    if held && !known.contains(&hash) {
                        known.push(hash);
                    }
                }
            }
            known
        };
        let have = sorted_heads(&have);
        if have == loaded.entry.heads {
            // The peer has everything.
            return Ok(Outgoing {
                generation,
                ..Default::default()
            });
        }
        if let Some(out) = loaded
            .last_local
            .as_ref()
            .and_then(|last| last.serves(&loaded.entry, their_generation, &have))
        {
            return Ok(out);
        }
        let have: Vec<ChangeHash> = have.into_iter().map(ChangeHash).collect();
        let changes = loaded.doc.get_changes(&have);
        Ok(Outgoing {
            generation,
            oldest_commit_ms: changes.iter().map(Change::timestamp).min(),
            changes: changes.iter().map(|c| c.raw_bytes().to_vec()).collect(),
        })
    }

    /// Applies a batch of a peer's changes to a document and persists them
    /// in one atomic write. Changes of an older generation are ignored; a
    /// newer generation replaces the document. Nothing is stored when any
    /// change is malformed.
    pub fn apply(
        &mut self,
        doc: &DocId,
        generation: u64,
        changes: &[Vec<u8>],
    ) -> Result<Applied, ReplicaError> {
        let decoded = decode_changes(doc, changes.iter().cloned())?;
        self.apply_batch(vec![Incoming {
            doc: doc.clone(),
            generation,
            changes: decoded,
        }])?
        .into_iter()
        .next()
        .unwrap_or_else(|| Ok(Applied::default()))
    }

    /// Applies decoded changes of many documents and persists all of them in
    /// one atomic write. Each document gets its own result: one that fails
    /// (automerge refuses its changes, its stored form is corrupt) is left as
    /// it was, the others proceed. The outer error is the store failing to
    /// write, and then nothing is persisted.
    pub fn apply_batch(
        &mut self,
        items: Vec<Incoming>,
    ) -> Result<Vec<Result<Applied, ReplicaError>>, ReplicaError> {
        self.with_room(items.len(), |r| r.stage_and_commit_applies(items))
    }

    /// [`Replica::apply_batch`] with room in the caches.
    fn stage_and_commit_applies(
        &mut self,
        items: Vec<Incoming>,
    ) -> Result<Vec<Result<Applied, ReplicaError>>, ReplicaError> {
        let mut batch = Batch::default();
        let mut touched: Vec<DocId> = Vec::new();
        let mut results = Vec::with_capacity(items.len());
        // A document named twice in one batch is applied through the cache
        // each time: an append staged without loading it is not in the
        // store yet when the second item reads the store.
        let mut seen = std::collections::HashSet::new();
        let repeated: std::collections::HashSet<DocId> = items
            .iter()
            .filter(|i| !seen.insert(&i.doc))
            .map(|i| i.doc.clone())
            .collect();
        for item in items {
            let doc = item.doc.clone();
            let straight_line = !repeated.contains(&doc);
            let result = self.stage_apply(&mut batch, item, straight_line);
            match &result {
                Ok(applied) if applied.new_changes > 0 => touched.push(doc),
                Ok(_) => {}
                // The loaded document may be half-changed: read it again.
                Err(_) => self.discard(std::slice::from_ref(&doc)),
            }
            results.push(result);
        }
        if let Err(e) = self.store.commit(batch) {
            self.discard(&touched);
            return Err(e.into());
        }
        for doc in touched {
            self.publish(doc);
        }
        Ok(results)
    }

    /// Stages one document's changes; `straight_line` allows
    /// [`Replica::stage_successors`].
    fn stage_apply(
        &mut self,
        batch: &mut Batch,
        item: Incoming,
        straight_line: bool,
    ) -> Result<Applied, ReplicaError> {
        let Incoming {
            doc,
            generation,
            changes: decoded,
        } = item;
        let doc = &doc;
        let batch_heads = batch_heads(&decoded);
        // The index decides between generations: a newer one replaces the
        // document without loading (or applying changes to) the old one.
        let entry = self.entry(doc)?;
        if straight_line
            && let Some(applied) =
                self.stage_successors(batch, doc, generation, &decoded, entry.as_ref())?
        {
            return Ok(Applied {
                batch_heads,
                ..applied
            });
        }
        let current = entry.as_ref().map(|e| (e.generation, e.chunks));
        let am_err = |e: automerge::AutomergeError| ReplicaError::Automerge {
            doc: doc.clone(),
            reason: e.to_string(),
        };
        match current {
            Some((g, _)) if generation < g => {
                return Ok(Applied {
                    stale: true,
                    entry: entry.unwrap_or_default(),
                    ..Default::default()
                });
            }
            Some((g, _)) if generation == g => {}
            _ => {
                // A document or a generation new to this replica.
                let stored = current.map_or(0, |(_, chunks)| chunks);
                let mut am = self.new_doc();
                let times = decoded.iter().map(Change::timestamp).collect();
                let n = decoded.len();
                let tail = decoded.last().map(ChainLink::of);
                apply_changes_quietly(&mut am, decoded).map_err(am_err)?;
                let missing_deps = !am.get_missing_deps(&[]).is_empty();
                let entry = IndexEntry {
                    generation,
                    changes: n as u64,
                    ..Default::default()
                };
                let entry = self.stage_whole(batch, doc, entry, stored, am);
                self.remember_link(&entry, tail);
                return Ok(Applied {
                    new_changes: n,
                    entry,
                    missing_deps,
                    stale: false,
                    commit_times_ms: times,
                    batch_heads,
                });
            }
        }
        if self.load(doc)?.is_none() {
            return Ok(Applied::default());
        }
        let Some(loaded) = self.cache.get_mut(doc) else {
            return Ok(Applied::default());
        };
        let hashes: Vec<ChangeHash> = decoded.iter().map(Change::hash).collect();
        let held = contains(&mut loaded.doc, &hashes);
        let fresh: Vec<Change> = decoded
            .into_iter()
            .zip(held)
            .filter(|(_, held)| !held)
            .map(|(c, _)| c)
            .collect();
        if fresh.is_empty() {
            let missing_deps = !loaded.doc.get_missing_deps(&[]).is_empty();
            return Ok(Applied {
                entry: loaded.entry.clone(),
                missing_deps,
                batch_heads,
                ..Default::default()
            });
        }
        let bytes: Vec<Vec<u8>> = fresh.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let times: Vec<i64> = fresh.iter().map(Change::timestamp).collect();
        let n = fresh.len();
        let tail = fresh.last().map(ChainLink::of);
        loaded.last_local = None;
        loaded.flat = None;
        apply_changes_quietly(&mut loaded.doc, fresh).map_err(am_err)?;
        let mut entry = loaded.entry.clone();
        entry.heads = sorted_heads(&loaded.doc.get_heads());
        entry.changes += n as u64;
        let missing_deps = !loaded.doc.get_missing_deps(&[]).is_empty();
        let doc_ref = &mut loaded.doc;
        self.store
            .stage_append(batch, doc, &mut entry, &bytes, || doc_ref.save_nocompress());
        loaded.entry = entry.clone();
        self.remember_link(&entry, tail);
        Ok(Applied {
            new_changes: n,
            entry,
            missing_deps,
            stale: false,
            commit_times_ms: times,
            batch_heads,
        })
    }

    /// Keeps `tail`, a just-stored change, for the next change of a straight
    /// line, when it is the document's only head.
    fn remember_link(&mut self, entry: &IndexEntry, tail: Option<ChainLink>) {
        if let Some(tail) = tail
            && entry.heads == [tail.hash]
        {
            self.links.put(tail.hash, tail);
        }
    }

    /// The receiving fast path: when `changes` extend
    /// the document's only head in a straight line (same writer, next
    /// sequence numbers and op counters, each depending on the one before),
    /// or start a document new to this replica in one (from the first
    /// change of a writer, depending on nothing), they are appended to the
    /// store as they are and applied to the loaded document only when it is
    /// next used. Nothing is loaded: a replica receiving reports of many
    /// devices does not read each one from the store, and a live change is
    /// persisted without waiting for automerge. `entry` is the document's
    /// index entry as this replica has it, `None` for a new document.
    /// Returns `None` where that is not certain, and the caller
    /// applies the changes as usual (which checks them in full).
    fn stage_successors(
        &mut self,
        batch: &mut Batch,
        doc: &DocId,
        generation: u64,
        changes: &[Change],
        entry: Option<&IndexEntry>,
    ) -> Result<Option<Applied>, ReplicaError> {
        if changes.is_empty() || self.held_in_memory(doc) {
            // A document with own flat writes not applied: the changes are
            // applied the usual way, once it is read again.
            return Ok(None);
        }
        let (mut entry, mut head) = match entry {
            // A document this replica does not hold (and has nothing of
            // loaded): the line starts from nothing.
            None if !self.cache.contains(doc) => (
                IndexEntry {
                    generation,
                    ..Default::default()
                },
                None,
            ),
            None => return Ok(None),
            Some(entry) => {
                if entry.generation != generation || entry.heads.len() != 1 {
                    return Ok(None);
                }
                let pending = self
                    .cache
                    .peek(doc)
                    .and_then(|loaded| loaded.pending.last())
                    .map(ChainLink::of);
                let head = match pending {
                    Some(head) => head,
                    None => match entry.heads.first().and_then(|h| self.links.get(h)) {
                        Some(link) => link.clone(),
                        None => match self.store.last_chunk(doc, entry)? {
                            Some(last) => ChainLink::of(&last),
                            None => return Ok(None),
                        },
                    },
                };
                if entry.heads.first() != Some(&head.hash) {
                    return Ok(None);
                }
                (entry.clone(), Some(head))
            }
        };
        for change in changes {
            let extends = change.author().is_none()
                && match &head {
                    Some(head) => {
                        change.actor_id() == &head.actor
                            && change.seq() == head.seq + 1
                            && change.start_op().get() == head.max_op + 1
                            && change.deps() == [ChangeHash(head.hash)]
                    }
                    None => {
                        change.seq() == 1
                            && change.start_op().get() == 1
                            && change.deps().is_empty()
                    }
                };
            if !extends {
                return Ok(None);
            }
            head = Some(ChainLink::of(change));
        }
        // `changes` is not empty: the loop set the head.
        let Some(head) = head else {
            return Ok(None);
        };
        let bytes: Vec<Vec<u8>> = changes.iter().map(|c| c.raw_bytes().to_vec()).collect();
        let stored = entry.chunks;
        entry.heads = vec![head.hash];
        entry.changes += changes.len() as u64;
        // Compacting is left for later (when the engine has nothing to
        // send): it reads and rewrites the document's chunks, and on the
        // way from a peer's commit to this replica's acknowledgement it
        // would hold one change in `compact_after_chunks` by that much. Up
        // to twice the threshold; past it, or with too many documents
        // waiting, it is done here.
        let due = self.store.would_compact(&entry, changes.len());
        let defer = due
            && !self.store.would_compact_twice(&entry, changes.len())
            && (self.deferred.len() < DEFERRED_MAX || self.deferred.contains_key(doc));
        if due && !defer {
            // Compacted without automerge: the stored chunks and these
            // changes appended to the snapshot as they are. Loading the
            // document and saving it whole would cost milliseconds here. A
            // snapshot past `RAW_SNAPSHOT_MAX` is compacted the usual way.
            let Some(mut saved) = self.store.stored_bytes(doc, &entry, RAW_SNAPSHOT_MAX)? else {
                return Ok(None);
            };
            for b in &bytes {
                saved.extend_from_slice(b);
            }
            self.store
                .stage_replace(batch, doc, &mut entry, stored, &saved);
            self.deferred.remove(doc);
        } else {
            self.store.stage_chunks(batch, doc, &mut entry, &bytes);
            if defer {
                self.deferred
                    .insert(doc.clone(), (entry.generation, entry.chunks, head.hash));
            }
        }
        if let Some(loaded) = self.cache.peek_mut(doc) {
            loaded.pending.extend(changes.iter().cloned());
            loaded.last_local = None;
            loaded.flat = None;
            loaded.entry = entry.clone();
        }
        self.links.put(head.hash, head);
        Ok(Some(Applied {
            new_changes: changes.len(),
            entry,
            missing_deps: false,
            stale: false,
            commit_times_ms: changes.iter().map(Change::timestamp).collect(),
            batch_heads: Vec::new(),
        }))
    }

    /// Whether the replica holds writes of `doc` in memory that its stored
    /// record does not have in full (own flat writes not applied, or a
    /// stale loaded copy): its stored chunks are then not to be extended or
    /// compacted without automerge.
    fn held_in_memory(&self, doc: &DocId) -> bool {
        self.idle.contains(doc)
            || self
                .cache
                .peek(doc)
                .is_some_and(|l| l.stale || !l.own.is_empty())
    }

    /// Compacts up to `max` of the documents a peer's straight line left
    /// past the compaction threshold (see [`Replica::stage_successors`]),
    /// each in one atomic write: its stored chunks appended to its snapshot
    /// as they are, or, for a snapshot past `RAW_SNAPSHOT_MAX`, the document
    /// loaded and saved whole (one such a call). A document changed since in any other way is
    /// skipped: the path that changed it compacts it when due. Returns how
    /// many documents are still waiting. The engine calls it when a session
    /// has nothing to send.
    pub fn compact_deferred(&mut self, max: usize) -> Result<usize, ReplicaError> {
        let due: Vec<DocId> = self.deferred.keys().take(max).cloned().collect();
        let mut loaded_one = false;
        for doc in due {
            let Some((generation, chunks, head)) = self.deferred.remove(&doc) else {
                continue;
            };
            let Some(mut entry) = self.store.index(&doc)? else {
                continue;
            };
            let unchanged =
                entry.generation == generation && entry.chunks == chunks && entry.heads == [head];
            if !unchanged || self.held_in_memory(&doc) || !self.store.would_compact(&entry, 0) {
                continue;
            }
            let saved = match self.store.stored_bytes(&doc, &entry, RAW_SNAPSHOT_MAX)? {
                Some(saved) => saved,
                // Past the cap: loaded and saved whole, which takes
                // milliseconds; one such document a call, the others left
                // for the next.
                None if !loaded_one => {
                    loaded_one = true;
                    match self.store.load(&doc)? {
                        Some((mut am, _)) => am.save_nocompress(),
                        None => continue,
                    }
                }
                None => {
                    self.deferred.insert(doc, (generation, chunks, head));
                    continue;
                }
            };
            let mut batch = Batch::default();
            self.store
                .stage_replace(&mut batch, &doc, &mut entry, chunks, &saved);
            self.store.commit(batch)?;
            if let Some(loaded) = self.cache.peek_mut(&doc) {
                loaded.entry = entry;
            }
        }
        Ok(self.deferred.len())
    }

    /// Whether the replica holds a change of a document (in its current generation).
    pub fn has_change(&mut self, doc: &DocId, hash: &ChangeHash) -> Result<bool, ReplicaError> {
        Ok(match self.load(doc)? {
            Some(loaded) => contains(&mut loaded.doc, std::slice::from_ref(hash))
                .first()
                .copied()
                .unwrap_or(false),
            None => false,
        })
    }
}

/// Fast-changing single-writer documents (the kinds that roll over) are
/// stored flat: each root value is one automerge scalar, a nested object or
/// list encoded as JSON bytes. With one writer nothing merges inside a
/// value, so its structure would only cost operations: a report of eight
/// reported values is one operation per changed value, not three per value.
fn write_flat(
    am: &mut AutoCommit,
    map: &serde_json::Map<String, serde_json::Value>,
    mirror: Option<&[FlatValue]>,
) -> Result<Vec<FlatValue>, automerge::AutomergeError> {
    let mut values = Vec::with_capacity(map.len());
    for (key, value) in map {
        let new = flat_scalar(value);
        let same = match mirror {
            Some(mirror) => mirror.iter().any(|(k, v)| k == key && *v == new),
            None => matches!(
                am.get(automerge::ROOT, key.as_str())?,
                Some((automerge::Value::Scalar(cur), _)) if *cur == new
            ),
        };
        if !same {
            am.put(automerge::ROOT, key.as_str(), new.clone())?;
        }
        values.push((key.clone(), new));
    }
    let stale: Vec<String> = match mirror {
        Some(mirror) => mirror
            .iter()
            .filter(|(k, _)| !map.contains_key(k))
            .map(|(k, _)| k.clone())
            .collect(),
        None => am
            .keys(automerge::ROOT)
            .filter(|k| !map.contains_key(k))
            .collect(),
    };
    for key in stale {
        am.delete(automerge::ROOT, key.as_str())?;
    }
    Ok(values)
}

/// The parts of a kept flat document that a direct write changes.
struct FlatParts<'a> {
    entry: &'a mut IndexEntry,
    flat: &'a mut Flat,
    last_local: &'a mut Option<LastLocal>,
    own: &'a mut Vec<Change>,
}

/// Stages a direct write of a flat document that neither rolls over nor
/// compacts: the change [`flat_change`] builds, appended to the store as a
/// chunk. `None` when the document's chain is not known (the caller writes
/// through automerge); `Some(None)` when nothing changed.
fn append_flat(
    store: &Store,
    batch: &mut Batch,
    doc: &DocId,
    actor: &ActorId,
    parts: FlatParts<'_>,
    map: &serde_json::Map<String, serde_json::Value>,
    now_ms: u64,
) -> Option<Option<ChangeHash>> {
    let chain = parts.flat.chain.as_ref()?;
    let Some((change, flat)) = flat_change(actor, &parts.flat.values, chain, map, now_ms) else {
        return Some(None);
    };
    let hash = change.hash();
    let bytes = change.raw_bytes().to_vec();
    let deps = chain.head.iter().map(|h| h.0).collect();
    parts.entry.heads = vec![hash.0];
    parts.entry.changes += 1;
    store.stage_chunks(batch, doc, parts.entry, std::slice::from_ref(&bytes));
    *parts.last_local = Some(LastLocal {
        hash: hash.0,
        deps,
        bytes,
        time_ms: now_ms as i64,
    });
    parts.own.push(change);
    *parts.flat = flat;
    Some(Some(hash))
}

/// The automerge scalar that holds a root value of a flat document: a
/// nested object or list as its JSON bytes.
fn flat_scalar(value: &serde_json::Value) -> automerge::ScalarValue {
    match value {
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => {
            // Serializing a JSON value cannot fail.
            automerge::ScalarValue::Bytes(serde_json::to_vec(value).unwrap_or_default())
        }
        scalar => match json_value(scalar) {
            hydrate::Value::Scalar(s) => s,
            _ => automerge::ScalarValue::Null,
        },
    }
}

/// The JSON of a flat document's root value.
fn flat_value_json(key: &str, value: &automerge::ScalarValue) -> Result<serde_json::Value, String> {
    match value {
        automerge::ScalarValue::Bytes(b) => {
            serde_json::from_slice(b).map_err(|e| format!("value {key:?} is not JSON: {e}"))
        }
        // automerge serializes its scalars as JSON values.
        other => {
            serde_json::to_value(other).map_err(|e| format!("value {key:?} does not convert: {e}"))
        }
    }
}

/// A flat document as JSON, from the values this replica wrote.
fn flat_json(values: &[FlatValue]) -> Result<serde_json::Value, String> {
    values
        .iter()
        .map(|(key, value)| Ok((key.clone(), flat_value_json(key, value)?)))
        .collect::<Result<serde_json::Map<_, _>, String>>()
        .map(serde_json::Value::Object)
}

/// The change [`write_flat`] would make through automerge when the document
/// is as `values` and `chain` say, and the values afterwards: one put for
/// each value that differs (in the report's order, as `write_flat` makes
/// them), then one delete for each value the report no longer has. `None`
/// when nothing differs.
fn flat_change(
    actor: &ActorId,
    values: &[FlatValue],
    chain: &FlatChain,
    map: &serde_json::Map<String, serde_json::Value>,
    now_ms: u64,
) -> Option<(Change, Flat)> {
    let FlatOps {
        ops,
        values: new_values,
        op_ids: new_ops,
        next,
    } = flat_ops(actor, values, chain, map);
    let start_op = std::num::NonZeroU64::new(chain.max_op + 1)?;
    if ops.is_empty() {
        return None;
    }
    let change = Change::from(automerge::ExpandedChange {
        operations: ops,
        actor_id: actor.clone(),
        hash: None,
        seq: chain.seq + 1,
        start_op,
        time: now_ms as i64,
        message: None,
        deps: chain.head.into_iter().collect(),
        extra_bytes: Vec::new(),
        author: None,
    });
    let chain = FlatChain {
        ops: new_ops,
        seq: chain.seq + 1,
        max_op: next - 1,
        head: Some(change.hash()),
    };
    Some((
        change,
        Flat {
            values: new_values,
            chain: Some(chain),
        },
    ))
}

/// The ops of [`flat_change`], before a change is built of them.
struct FlatOps {
    ops: Vec<automerge::legacy::Op>,
    /// The values afterwards, and the op of each.
    values: Vec<FlatValue>,
    op_ids: Vec<automerge::legacy::OpId>,
    /// The counter after the last op.
    next: u64,
}

/// One put for each value of `map` that differs from `values`, in the
/// report's order, then one delete for each value `map` no longer has.
fn flat_ops(
    actor: &ActorId,
    values: &[FlatValue],
    chain: &FlatChain,
    map: &serde_json::Map<String, serde_json::Value>,
) -> FlatOps {
    use automerge::legacy::{Key, ObjectId, Op, OpId, OpType, SortedVec};
    let mut ops = Vec::new();
    let mut next = chain.max_op + 1;
    let mut new_values = Vec::with_capacity(map.len());
    let mut new_ops = Vec::with_capacity(map.len());
    let op = |action: OpType, key: &str, pred: Option<&OpId>| Op {
        action,
        obj: ObjectId::Root,
        key: Key::Map(key.into()),
        pred: pred.cloned().into_iter().collect::<SortedVec<OpId>>(),
        insert: false,
    };
    for (key, value) in map {
        let new = flat_scalar(value);
        let current = values.iter().position(|(k, _)| k == key);
        match current {
            Some(i) if values[i].1 == new => new_ops.push(chain.ops[i].clone()),
            _ => {
                ops.push(op(
                    OpType::Put(new.clone()),
                    key,
                    current.map(|i| &chain.ops[i]),
                ));
                new_ops.push(OpId(next, actor.clone()));
                next += 1;
            }
        }
        new_values.push((key.clone(), new));
    }
    for (i, (key, _)) in values.iter().enumerate() {
        if !map.contains_key(key) {
            ops.push(op(OpType::Delete, key, Some(&chain.ops[i])));
            next += 1;
        }
    }
    FlatOps {
        ops,
        values: new_values,
        op_ids: new_ops,
        next,
    }
}

/// The [`FlatChain`] of a flat document that holds `values`, written by
/// `actor`: known when the document's only head is a change of `actor`
/// (or it has none) and each value is the only one under its key.
fn flat_chain(am: &mut AutoCommit, values: &[FlatValue], actor: &ActorId) -> Option<FlatChain> {
    let heads = am.get_heads();
    let (seq, max_op, head) = match heads.as_slice() {
        [] => (0, 0, None),
        [head] => {
            let meta = am.get_change_meta_by_hash(head)?;
            if meta.actor.as_ref() != actor {
                return None;
            }
            (meta.seq, meta.max_op, Some(*head))
        }
        _ => return None,
    };
    let mut ops = Vec::with_capacity(values.len());
    for (key, _) in values {
        let all = am.get_all(automerge::ROOT, key.as_str()).ok()?;
        let [(_, automerge::ObjId::Id(counter, op_actor, _))] = all.as_slice() else {
            return None;
        };
        ops.push(automerge::legacy::OpId(*counter, op_actor.clone()));
    }
    if am.length(automerge::ROOT) != values.len() {
        return None;
    }
    Some(FlatChain {
        ops,
        seq,
        max_op,
        head,
    })
}

/// Reads a document written by [`write_flat`] back as JSON.
fn read_flat(am: &AutoCommit) -> Result<serde_json::Value, String> {
    let mut out = serde_json::Map::new();
    for key in am.keys(automerge::ROOT) {
        let Ok(Some((value, _))) = am.get(automerge::ROOT, key.as_str()) else {
            continue;
        };
        let json = match value {
            automerge::Value::Scalar(s) => flat_value_json(&key, s.as_ref())?,
            // Written by an older form of the document: read it whole.
            automerge::Value::Object(_) => serde_json::to_value(AutoSerde::from(am))
                .ok()
                .and_then(|v| v.get(&key).cloned())
                .unwrap_or(serde_json::Value::Null),
        };
        out.insert(key, json);
    }
    Ok(serde_json::Value::Object(out))
}

/// Which of `hashes` the document holds (applied, not merely queued).
/// Asking automerge for a change by hash rebuilds the change from the
/// document's columns; the change graph answers membership far cheaper.
fn contains(doc: &mut AutoCommit, hashes: &[ChangeHash]) -> Vec<bool> {
    if hashes.is_empty() {
        return Vec::new();
    }
    if !doc.get_missing_deps(&[]).is_empty() {
        // Changes wait in the queue: a queued change is not held, and the
        // graph walk below would not say so. Ask the slow, exact way.
        return hashes
            .iter()
            .map(|h| doc.get_change_by_hash(h).is_some())
            .collect();
    }
    let missing: std::collections::HashSet<ChangeHash> =
        doc.get_missing_deps(hashes).into_iter().collect();
    hashes.iter().map(|h| !missing.contains(h)).collect()
}

/// The root key marking a deleted document.
const TOMBSTONE_KEY: &str = "$deleted";

fn is_tombstone(doc: &AutoCommit) -> bool {
    matches!(
        doc.get(automerge::ROOT, TOMBSTONE_KEY),
        Ok(Some((automerge::Value::Scalar(v), _))) if matches!(v.as_ref(), automerge::ScalarValue::Boolean(true))
    )
}

fn check_kind<T: Schema>(doc: &DocId) -> Result<(), ReplicaError> {
    if doc.kind() == T::KIND {
        Ok(())
    } else {
        Err(ReplicaError::WrongKind {
            doc: doc.clone(),
            expected: T::KIND.as_str(),
            found: doc.kind().as_str(),
        })
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn json_map(map: &serde_json::Map<String, serde_json::Value>) -> hydrate::Map {
    let entries: std::collections::HashMap<String, hydrate::Value> = map
        .iter()
        .map(|(k, v)| (k.clone(), json_value(v)))
        .collect();
    hydrate::Map::from(entries)
}

/// JSON to automerge: strings are scalar strings (atomic, last writer wins),
/// never collaborative text; numbers keep their integer-ness.
fn json_value(v: &serde_json::Value) -> hydrate::Value {
    use automerge::ScalarValue;
    match v {
        serde_json::Value::Null => hydrate::Value::Scalar(ScalarValue::Null),
        serde_json::Value::Bool(b) => hydrate::Value::Scalar(ScalarValue::Boolean(*b)),
        serde_json::Value::Number(n) => hydrate::Value::Scalar(if let Some(i) = n.as_i64() {
            ScalarValue::Int(i)
        } else if let Some(u) = n.as_u64() {
            ScalarValue::Uint(u)
        } else {
            ScalarValue::F64(n.as_f64().unwrap_or_default())
        }),
        serde_json::Value::String(s) => hydrate::Value::Scalar(ScalarValue::Str(s.as_str().into())),
        serde_json::Value::Array(items) => hydrate::Value::List(hydrate::List::from(
            items.iter().map(json_value).collect::<Vec<_>>(),
        )),
        serde_json::Value::Object(map) => hydrate::Value::Map(json_map(map)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A report: some of five keys, each a small scalar or a nested object.
    fn report() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
        let value = prop_oneof![
            (0..4i64).prop_map(serde_json::Value::from),
            "[ab]{0,2}".prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
            Just(serde_json::Value::Bool(true)),
            (0..3u8, 0..3u8).prop_map(|(v, t)| serde_json::json!({"value": v, "t": t})),
        ];
        proptest::collection::btree_map("k[0-4]", value, 0..5).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// The change built for a flat write is byte for byte the one
        /// automerge's transaction makes for the same write, so peers and
        /// the store cannot tell them apart.
        #[test]
        fn a_built_flat_change_is_automerges_own(reports in proptest::collection::vec(report(), 1..12)) {
            let actor = ActorId::random();
            let mut am = AutoCommit::new();
            am.set_actor(actor.clone());
            let mut flat = Flat::empty();
            for (i, map) in reports.iter().enumerate() {
                let time = 1_000 + i as u64;
                let chain = flat.chain.as_ref().expect("the chain is always known here");
                let built = flat_change(&actor, &flat.values, chain, map, time);
                let values = write_flat(&mut am, map, Some(&flat.values)).unwrap();
                let committed = am.commit_with(CommitOptions::default().with_time(time as i64));
                match (built, committed) {
                    (None, None) => {}
                    (Some((change, next)), Some(hash)) => {
                        let own = am.get_change_by_hash(&hash).unwrap();
                        prop_assert_eq!(change.raw_bytes(), own.raw_bytes());
                        prop_assert_eq!(&next.values, &values);
                        // The chain derived from automerge's document is the
                        // one carried along.
                        let derived = flat_chain(&mut am, &values, &actor).unwrap();
                        let carried = next.chain.as_ref().unwrap();
                        prop_assert_eq!(&derived.ops, &carried.ops);
                        prop_assert_eq!(derived.seq, carried.seq);
                        prop_assert_eq!(derived.max_op, carried.max_op);
                        prop_assert_eq!(derived.head, carried.head);
                        flat = next;
                    }
                    (built, committed) => prop_assert!(
                        false,
                        "built {:?}, automerge committed {:?}",
                        built.map(|b| b.0.hash()),
                        committed
                    ),
                }
            }
            prop_assert_eq!(flat_json(&flat.values).unwrap(), read_flat(&am).unwrap());
        }
    }
}
