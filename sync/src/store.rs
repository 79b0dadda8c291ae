//! The event store: automerge changes on RocksDB.
//!
//! Column families:
//! - `chunks`: `<doc id> 0x00 <position>` → the bytes of one change since the snapshot;
//! - `snapshots`: `<doc id> 0x00` → the saved document (compaction's output);
//! - `index`: `<doc id>` → [`IndexEntry`]: generation, heads, chunk count, snapshot;
//! - `peers`: `<peer id> <doc id>` → what that peer acknowledged of the document;
//! - `meta`: the replica's own facts (incarnation, clock).
//!
//! Every write of changes puts the chunks and the index entry in one atomic
//! write batch, so a crash at any point leaves a store that loads, with every
//! change whose write returned present. Document ids are printable ASCII, so
//! `0x00` cannot occur inside one and `<doc id> 0x00` is an exact prefix.

use std::path::{Path, PathBuf};

use automerge::{AutoCommit, Change, ChangeHash};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch,
    WriteOptions,
};
use serde::{Deserialize, Serialize};

use crate::document::DocId;

const CF_CHUNKS: &str = "chunks";
const CF_SNAPSHOTS: &str = "snapshots";
const CF_INDEX: &str = "index";
const CF_PEERS: &str = "peers";
const CF_META: &str = "meta";
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"outpost-store-2";
/// Default memtable size of each column family ([`StoreOptions::memtable_bytes`];
/// RocksDB's default is 64 MB).
pub const MEMTABLE_BYTES: usize = 1 << 20;
/// Bound on the memtables of all column families together.
const DB_WRITE_BUFFER_BYTES: usize = 4 << 20;
/// Default size of the block cache ([`StoreOptions::block_cache_bytes`]).
pub const BLOCK_CACHE_BYTES: usize = 2 << 20;

/// Errors of the event store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed (I/O, a lock held by another process, corruption it detected).
    #[error("store {path}: {source}")]
    Db {
        /// The store's directory.
        path: PathBuf,
        /// What RocksDB said.
        #[source]
        source: rocksdb::Error,
    },
    /// Stored data does not decode. The store is left as it is for inspection.
    #[error("store {path}: corrupt {what} for {doc}: {reason}")]
    Corrupt {
        /// The store's directory.
        path: PathBuf,
        /// The document concerned.
        doc: String,
        /// Which record.
        what: &'static str,
        /// Why it does not decode.
        reason: String,
    },
    /// The directory holds something that is not an Outpost store.
    #[error("{path} is not an Outpost store (format {found:?}); refusing to touch it")]
    Format {
        /// The store's directory.
        path: PathBuf,
        /// The format marker found.
        found: String,
    },
}

/// What the index knows of one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IndexEntry {
    /// The document's generation. Rolling documents start a new one, holding
    /// only current values, when their history grows; a higher generation
    /// supersedes every lower one.
    pub generation: u64,
    /// The document's heads, sorted.
    pub heads: Vec<[u8; 32]>,
    /// Change chunks stored since the last snapshot.
    pub chunks: u32,
    /// The heads hash of the snapshot the chunks apply to, if any.
    pub snapshot: Option<[u8; 32]>,
    /// Changes in this generation (for roll-over decisions).
    pub changes: u64,
}

impl IndexEntry {
    /// The heads as automerge hashes.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.heads.iter().map(|h| ChangeHash(*h)).collect()
    }

    /// A digest of generation and heads: equal digests mean equal documents.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.generation.to_le_bytes());
        for head in &self.heads {
            hasher.update(head);
        }
        *hasher.finalize().as_bytes()
    }
}

/// Sorted, raw heads of a document.
pub fn sorted_heads(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    let mut raw: Vec<[u8; 32]> = heads.iter().map(|h| h.0).collect();
    raw.sort_unstable();
    raw
}

/// What a peer acknowledged of a document: its generation and heads.
pub type PeerAck = (u64, Vec<[u8; 32]>);

/// How the store writes.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync the write-ahead log on every write. Without it a write survives
    /// a crash of the process but not of the machine.
    pub sync_writes: bool,
    /// Fold change chunks into a snapshot once a document has this many
    /// (up to twice as many when a peer's straight line of changes leaves
    /// the compaction for the engine's idle turn: see
    /// `Replica::compact_deferred`).
    pub compact_after_chunks: u32,
    /// Keep the store's files in memory instead of on disk (simulation and
    /// tests). Stores reopened with the same [`MemoryDisk`] and path find
    /// what was written before, as after a process restart.
    pub memory: Option<MemoryDisk>,
    /// One block cache for all column families of a store, index and filter
    /// blocks included: decompressed blocks read recently. What it does not
    /// hold is read through the operating system's page cache, which is not
    /// the process's memory. Default [`BLOCK_CACHE_BYTES`].
    pub block_cache_bytes: usize,
    /// Memtable size of each column family: writes gather in memory up to
    /// this much before they are flushed to a table file. Default
    /// [`MEMTABLE_BYTES`].
    pub memtable_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            sync_writes: false,
            compact_after_chunks: 64,
            memory: None,
            block_cache_bytes: BLOCK_CACHE_BYTES,
            memtable_bytes: MEMTABLE_BYTES,
        }
    }
}

/// An in-memory file system for stores: RocksDB's memory environment. Clones
/// share the same files. Many stores (a simulated fleet) can live in one.
#[derive(Clone)]
pub struct MemoryDisk(rocksdb::Env);

impl MemoryDisk {
    /// A new, empty in-memory file system.
    pub fn new() -> Result<Self, StoreError> {
        rocksdb::Env::mem_env()
            .map(Self)
            .map_err(|source| StoreError::Db {
                path: PathBuf::from("<memory>"),
                source,
            })
    }
}

impl std::fmt::Debug for MemoryDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryDisk")
    }
}

/// Writes staged for one atomic commit ([`Store::commit`]), so that many
/// documents' changes cost one write.
#[derive(Default)]
pub struct Batch(WriteBatch, usize);

impl Batch {
    /// Records staged so far.
    pub fn len(&self) -> usize {
        self.1
    }

    /// Nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.1 == 0
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("records", &self.1).finish()
    }
}

/// The RocksDB event store of one replica.
pub struct Store {
    db: DB,
    path: PathBuf,
    options: StoreOptions,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// `<doc id> 0x00 <position, u32 big-endian>`: chunks load in order.
fn chunk_key(doc: &DocId, seq: u32) -> Vec<u8> {
    let mut key = chunk_prefix(doc);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn chunk_prefix(doc: &DocId) -> Vec<u8> {
    let mut key = doc.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

impl Store {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(256);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(64 << 20);
        db_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if let Some(disk) = &options.memory {
            db_opts.set_env(&disk.0);
        }
        // Memory is bounded for every store, on disk or not: an edge node has
        // little of it, and a simulated fleet holds many stores. Without
        // this, each column family's memtable could grow to RocksDB's default
        // 64 MB and each would have its own 32 MB block cache.
        db_opts.set_write_buffer_size(options.memtable_bytes);
        db_opts.set_max_write_buffer_number(2);
        db_opts.set_db_write_buffer_size(DB_WRITE_BUFFER_BYTES);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&Cache::new_lru_cache(options.block_cache_bytes));
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        db_opts.set_block_based_table_factory(&table);
        let cfs = [CF_CHUNKS, CF_SNAPSHOTS, CF_INDEX, CF_PEERS, CF_META]
            .into_iter()
            .map(|name| {
                let mut cf = Options::default();
                cf.set_write_buffer_size(options.memtable_bytes);
                cf.set_max_write_buffer_number(2);
                cf.set_block_based_table_factory(&table);
                ColumnFamilyDescriptor::new(name, cf)
            });
        let db =
            DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(|source| StoreError::Db {
                path: path.clone(),
                source,
            })?;
        let store = Self { db, path, options };
        match store.meta(FORMAT_KEY)? {
            None => store.put_meta(FORMAT_KEY, FORMAT)?,
            Some(found) if found == FORMAT => {}
            Some(found) => {
                return Err(StoreError::Format {
                    path: store.path.clone(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                });
            }
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db_err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, doc: &DocId, what: &'static str, reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            doc: doc.to_string(),
            what,
            reason: reason.to_string(),
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // The column families are created by `open`; a missing one is a bug.
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(self.options.sync_writes);
        self.db.write_opt(batch, &opts).map_err(|e| self.db_err(e))
    }

    /// A replica fact from the `meta` family.
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| self.db_err(e))
    }

    /// Records a replica fact, durably (fsync) whatever the store's options.
    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), key, value);
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts).map_err(|e| self.db_err(e))
    }

    /// The index entry of a document.
    pub fn index(&self, doc: &DocId) -> Result<Option<IndexEntry>, StoreError> {
        match self
            .db
            .get_cf(self.cf(CF_INDEX), doc.as_str())
            .map_err(|e| self.db_err(e))?
        {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(doc, "index entry", e)),
        }
    }

    /// Every document id and index entry, in id order.
    pub fn scan_index(&self) -> impl Iterator<Item = Result<(DocId, IndexEntry), StoreError>> + '_ {
        self.scan_index_prefix("")
    }

    /// The documents whose id starts with `prefix` and their index entries,
    /// in id order.
    pub fn scan_index_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = Result<(DocId, IndexEntry), StoreError>> + 'a {
        self.db
            .iterator_cf(
                self.cf(CF_INDEX),
                IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward),
            )
            .take_while(move |item| {
                item.as_ref()
                    .map_or(true, |(key, _)| key.starts_with(prefix.as_bytes()))
            })
            .map(move |item| {
                let (key, value) = item.map_err(|e| self.db_err(e))?;
                let text = String::from_utf8_lossy(&key).into_owned();
                let doc: DocId =
                    text.parse()
                        .map_err(|e: crate::document::DocIdError| StoreError::Corrupt {
                            path: self.path.clone(),
                            doc: text.clone(),
                            what: "index key",
                            reason: e.to_string(),
                        })?;
                let entry = postcard::from_bytes(&value)
                    .map_err(|e| self.corrupt(&doc, "index entry", e))?;
                Ok((doc, entry))
            })
    }

    /// Loads a document: its snapshot, then its change chunks. `None` when the
    /// store has no such document.
    pub fn load(&self, doc: &DocId) -> Result<Option<(AutoCommit, IndexEntry)>, StoreError> {
        let Some(entry) = self.index(doc)? else {
            return Ok(None);
        };
        let prefix = chunk_prefix(doc);
        let mut am = match entry.snapshot {
            Some(_) => {
                let bytes = self
                    .db
                    .get_cf(self.cf(CF_SNAPSHOTS), &prefix)
                    .map_err(|e| self.db_err(e))?
                    .ok_or_else(|| self.corrupt(doc, "snapshot", "missing"))?;
                AutoCommit::load(&bytes).map_err(|e| self.corrupt(doc, "snapshot", e))?
            }
            None => AutoCommit::new(),
        };
        if entry.chunks == 0 {
            // Nothing since the snapshot.
            return Ok(Some((am, entry)));
        }
        let mut changes = Vec::with_capacity(entry.chunks as usize);
        for value in self.chunk_values(doc, &entry)? {
            changes.push(
                Change::from_bytes(value.to_vec())
                    .map_err(|e| self.corrupt(doc, "change chunk", e))?,
            );
        }
        apply_changes_quietly(&mut am, changes)
            .map_err(|e| self.corrupt(doc, "change chunk", e))?;
        Ok(Some((am, entry)))
    }

    /// Appends changes of a document and its new index entry in one atomic
    /// batch. When the document has accumulated enough chunks, `snapshot`
    /// is called to fold them into a snapshot in the same batch.
    pub fn append(
        &self,
        doc: &DocId,
        entry: &mut IndexEntry,
        changes: &[Vec<u8>],
        snapshot: impl FnOnce() -> Vec<u8>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        self.stage_append(&mut batch, doc, entry, changes, snapshot);
        self.commit(batch)
    }

    /// Stages [`Store::append`] in `batch`, to be written with others by
    /// [`Store::commit`].
    pub fn stage_append(
        &self,
        batch: &mut Batch,
        doc: &DocId,
        entry: &mut IndexEntry,
        changes: &[Vec<u8>],
        snapshot: impl FnOnce() -> Vec<u8>,
    ) {
        if self.would_compact(entry, changes.len()) {
            let stored = entry.chunks;
            entry.chunks = stored.saturating_add(changes.len() as u32);
            self.put_snapshot(&mut batch.0, doc, entry, stored, &snapshot());
            self.put_index(&mut batch.0, doc, entry);
            batch.1 += 1;
        } else {
            self.stage_chunks(batch, doc, entry, changes);
        }
    }

    /// Whether appending `n` changes to a document with `entry` folds its
    /// chunks into a snapshot (which needs the whole document).
    pub fn would_compact(&self, entry: &IndexEntry, n: usize) -> bool {
        entry.chunks.saturating_add(n as u32) > self.options.compact_after_chunks
    }

    /// Whether appending `n` changes to a document with `entry` takes it
    /// past twice the compaction threshold: the most chunks a document
    /// whose compaction was left for later may hold.
    pub fn would_compact_twice(&self, entry: &IndexEntry, n: usize) -> bool {
        entry.chunks.saturating_add(n as u32) > self.options.compact_after_chunks.saturating_mul(2)
    }

    /// Stages changes as chunks after the ones stored, and the new index
    /// entry, without compacting: for callers that checked
    /// [`Store::would_compact`] and do not hold the document.
    pub fn stage_chunks(
        &self,
        batch: &mut Batch,
        doc: &DocId,
        entry: &mut IndexEntry,
        changes: &[Vec<u8>],
    ) {
        let stored = entry.chunks;
        entry.chunks = stored.saturating_add(changes.len() as u32);
        for (seq, bytes) in (stored..).zip(changes) {
            batch
                .0
                .put_cf(self.cf(CF_CHUNKS), chunk_key(doc, seq), bytes);
        }
        self.put_index(&mut batch.0, doc, entry);
        batch.1 += 1;
    }

    /// The change stored last for a document (chunk `entry.chunks - 1`),
    /// decoded; `None` when only a snapshot is stored.
    pub fn last_chunk(
        &self,
        doc: &DocId,
        entry: &IndexEntry,
    ) -> Result<Option<Change>, StoreError> {
        let Some(seq) = entry.chunks.checked_sub(1) else {
            return Ok(None);
        };
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_CHUNKS), chunk_key(doc, seq))
            .map_err(|e| self.db_err(e))?
            .ok_or_else(|| self.corrupt(doc, "change chunk", "missing"))?;
        Change::try_from(&value[..])
            .map(Some)
            .map_err(|e| self.corrupt(doc, "change chunk", e))
    }

    /// A document's `entry.chunks` change chunks, in order.
    fn chunk_values(
        &self,
        doc: &DocId,
        entry: &IndexEntry,
    ) -> Result<Vec<rocksdb::DBPinnableSlice<'_>>, StoreError> {
        let keys: Vec<Vec<u8>> = (0..entry.chunks).map(|seq| chunk_key(doc, seq)).collect();
        self.db
            .batched_multi_get_cf(self.cf(CF_CHUNKS), &keys, true)
            .into_iter()
            .map(|value| {
                value
                    .map_err(|e| self.db_err(e))?
                    .ok_or_else(|| self.corrupt(doc, "change chunk", "missing"))
            })
            .collect()
    }

    /// A document's stored form as one byte string, its snapshot and then
    /// its change chunks in order: what [`Store::load`] reads, and a valid
    /// saved document in itself (automerge loads a document or change chunk
    /// followed by change chunks). `None` when it is longer than `max`
    /// bytes.
    pub fn stored_bytes(
        &self,
        doc: &DocId,
        entry: &IndexEntry,
        max: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let prefix = chunk_prefix(doc);
        let mut out = Vec::new();
        if entry.snapshot.is_some() {
            let snapshot = self
                .db
                .get_pinned_cf(self.cf(CF_SNAPSHOTS), &prefix)
                .map_err(|e| self.db_err(e))?
                .ok_or_else(|| self.corrupt(doc, "snapshot", "missing"))?;
            if snapshot.len() > max {
                return Ok(None);
            }
            out.extend_from_slice(&snapshot);
        }
        for value in self.chunk_values(doc, entry)? {
            if out.len() + value.len() > max {
                return Ok(None);
            }
            out.extend_from_slice(&value);
        }
        Ok(Some(out))
    }

    /// Replaces a document wholesale with a saved document: compaction, a
    /// new generation, or a generation received from a peer.
    pub fn replace(
        &self,
        doc: &DocId,
        entry: &mut IndexEntry,
        saved: &[u8],
    ) -> Result<(), StoreError> {
        // The chunks stored now, whatever generation `entry` describes.
        let stored = self.index(doc)?.map_or(0, |e| e.chunks);
        let mut batch = Batch::default();
        self.stage_replace(&mut batch, doc, entry, stored, saved);
        self.commit(batch)
    }

    /// Stages [`Store::replace`] in `batch`. `stored_chunks` is how many
    /// chunks the document has in the store now (the caller's index entry
    /// says), so that they are deleted with it.
    pub fn stage_replace(
        &self,
        batch: &mut Batch,
        doc: &DocId,
        entry: &mut IndexEntry,
        stored_chunks: u32,
        saved: &[u8],
    ) {
        self.put_snapshot(&mut batch.0, doc, entry, stored_chunks, saved);
        self.put_index(&mut batch.0, doc, entry);
        batch.1 += 1;
    }

    /// Writes everything staged in `batch` in one atomic write: all of it
    /// survives a crash, or none of it.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.1 == 0 {
            return Ok(());
        }
        self.write(batch.0)
    }

    /// Stages a snapshot of a document in place of its `stored` chunks.
    /// Keys are fixed per document (the snapshot) and per position (the
    /// chunks), so rewriting them overwrites: no tombstones pile up under a
    /// document however often it is compacted or rolled over.
    fn put_snapshot(
        &self,
        batch: &mut WriteBatch,
        doc: &DocId,
        entry: &mut IndexEntry,
        stored: u32,
        saved: &[u8],
    ) {
        for seq in 0..stored {
            batch.delete_cf(self.cf(CF_CHUNKS), chunk_key(doc, seq));
        }
        batch.put_cf(self.cf(CF_SNAPSHOTS), chunk_prefix(doc), saved);
        entry.chunks = 0;
        entry.snapshot = Some(*blake3::hash(&entry.heads.concat()).as_bytes());
    }

    fn put_index(&self, batch: &mut WriteBatch, doc: &DocId, entry: &IndexEntry) {
        // postcard cannot fail on this plain struct of integers and byte arrays.
        let bytes = postcard::to_allocvec(entry).unwrap_or_default();
        batch.put_cf(self.cf(CF_INDEX), doc.as_str(), bytes);
    }

    /// What `peer` acknowledged of `doc`: (generation, heads).
    pub fn peer_ack(&self, peer: &[u8; 32], doc: &DocId) -> Result<Option<PeerAck>, StoreError> {
        let mut key = peer.to_vec();
        key.extend_from_slice(doc.as_str().as_bytes());
        match self
            .db
            .get_cf(self.cf(CF_PEERS), key)
            .map_err(|e| self.db_err(e))?
        {
            None => Ok(None),
            Some(bytes) => postcard::from_bytes(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(doc, "peer state", e)),
        }
    }

    /// Records what `peer` acknowledged of `doc`.
    pub fn put_peer_ack(
        &self,
        peer: &[u8; 32],
        doc: &DocId,
        generation: u64,
        heads: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        self.stage_peer_ack(&mut batch, peer, doc, generation, heads);
        self.commit(batch)
    }

    /// Stages [`Store::put_peer_ack`] in `batch`.
    pub fn stage_peer_ack(
        &self,
        batch: &mut Batch,
        peer: &[u8; 32],
        doc: &DocId,
        generation: u64,
        heads: &[[u8; 32]],
    ) {
        let mut key = peer.to_vec();
        key.extend_from_slice(doc.as_str().as_bytes());
        // postcard cannot fail on a tuple of an integer and byte arrays.
        let bytes = postcard::to_allocvec(&(generation, heads)).unwrap_or_default();
        batch.0.put_cf(self.cf(CF_PEERS), key, bytes);
        batch.1 += 1;
    }

    /// Bytes of one document's records: index entry, snapshot and chunks
    /// (what the document itself costs, without RocksDB's fixed overhead).
    pub fn doc_bytes(&self, doc: &DocId) -> Result<u64, StoreError> {
        let mut total = self
            .db
            .get_cf(self.cf(CF_INDEX), doc.as_str())
            .map_err(|e| self.db_err(e))?
            .map_or(0, |v| (v.len() + doc.as_str().len()) as u64);
        let prefix = chunk_prefix(doc);
        for cf in [CF_CHUNKS, CF_SNAPSHOTS] {
            let iter = self.db.iterator_cf(
                self.cf(cf),
                IteratorMode::From(&prefix, rocksdb::Direction::Forward),
            );
            for item in iter {
                let (key, value) = item.map_err(|e| self.db_err(e))?;
                if !key.starts_with(&prefix) {
                    break;
                }
                total += (key.len() + value.len()) as u64;
            }
        }
        Ok(total)
    }

    /// Bytes the store occupies on disk (SST files and logs), for measurements.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.path)
    }

    /// Flushes memtables to SST files and compacts every family, so that
    /// deleted data stops taking space (for measurements and maintenance).
    pub fn flush_and_compact(&self) -> Result<(), StoreError> {
        for name in [CF_CHUNKS, CF_SNAPSHOTS, CF_INDEX, CF_PEERS, CF_META] {
            self.db
                .flush_cf(self.cf(name))
                .map_err(|e| self.db_err(e))?;
            self.db
                .compact_range_cf(self.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Applies `changes` to `doc` and drops what automerge recorded of them for
/// patches: its batch apply records every operation even when nobody asked
/// for patches, and a document kept in a cache would hold that record (a
/// kilobyte per document, growing with every change applied) for as long as
/// it stays there.
pub(crate) fn apply_changes_quietly(
    doc: &mut AutoCommit,
    changes: Vec<Change>,
) -> Result<(), automerge::AutomergeError> {
    let applied = doc.apply_changes_batch(changes);
    doc.reset_diff_cursor();
    applied
}
