//! The sync engine: drives [`Session`]s over real connections.
//!
//! One engine per replica. It owns the replica and the roster, runs one
//! session per connected peer, frames protocol messages on a byte stream
//! (a QUIC stream over iroh, or any `AsyncRead + AsyncWrite` in tests), and
//! fans changes applied from one peer out to the others. Each session's
//! writer pulls the next message only when the stream can take it, so a slow
//! or backlogged peer never makes the others wait: every peer has its own
//! task and its own bounded work.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::PeerId;
use crate::access::Roster;
use crate::document::DocId;
use crate::metrics::{PeerLabel, SyncMetrics};
use crate::protocol::{
    Event, Item, MAX_MESSAGE_BYTES, Message, Session, SessionError, decode, encode,
};
use crate::replica::{Replica, ReplicaError};
use crate::transport::iroh::{PeerAddr, SYNC_ALPN};

/// QUIC close code for a peer that is not on the roster.
const CLOSE_UNKNOWN_PEER: u32 = 403;
/// QUIC close code for a protocol violation.
const CLOSE_PROTOCOL: u32 = 400;

struct PeerSlot {
    session: Session,
    wake: Arc<Notify>,
    /// Distinguishes a reconnection from the session it replaced.
    epoch: u64,
}

struct Inner {
    replica: Replica,
    roster: Roster,
    peers: HashMap<PeerId, PeerSlot>,
    next_epoch: u64,
    /// Losing desired-value writes already counted as resolved conflicts:
    /// (document, property, writer, time). Bounded; an entry that falls out
    /// may be counted again, which only overstates the counter.
    conflicts_seen: lru::LruCache<(DocId, String, String, crate::hlc::Hlc), ()>,
}

/// Conflicts remembered for counting.
const CONFLICTS_REMEMBERED: usize = 4096;

/// How long a session holds an acknowledgement back, so that those of a
/// stream of changes go out together (and with the next message, when there
/// is one) instead of one message each. A peer's watermark lags by this much
/// more.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// How long after the first unsaved acknowledgement a session saves those
/// it received (see [`Session::save_acks`]): when its writer next runs after
/// that, or sooner when the session ends or holds too many.
const ACK_SAVE_DELAY: Duration = Duration::from_secs(1);

/// Documents whose acknowledgements are held at most (a few hundred KB):
/// more go out at once.
const ACKS_HELD_MAX: usize = 4096;

/// Documents an idle session compacts (see [`Replica::compact_deferred`])
/// before it lets the other tasks run. The simulation compacts as many.
pub const COMPACT_PER_TURN: usize = 8;

/// How often an idle session refreshes its per-peer gauges.
const IDLE_REFRESH: Duration = Duration::from_secs(5);

/// A replica with its sync sessions.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Mutex<Inner>>,
    /// At most one session at a time takes (or waits for) the replica
    /// lock; the others wait here without blocking a runtime thread, so a
    /// thousand sessions applying a reconnect backlog leave the other
    /// threads to the rest of the process (a bridge's API writes, its Lease
    /// renewals).
    gate: Arc<Gate>,
    metrics: SyncMetrics,
    me: PeerId,
    /// When the last local write that changed a document was committed.
    last_commit: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("me", &self.me).finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Engine {
    /// An engine over `replica`, trusting the peers on `roster`.
    pub fn new(replica: Replica, roster: Roster, metrics: SyncMetrics) -> Self {
        let me = replica.me();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                replica,
                roster,
                peers: HashMap::new(),
                next_epoch: 0,
                conflicts_seen: lru::LruCache::sparse(
                    std::num::NonZeroUsize::new(CONFLICTS_REMEMBERED)
                        .unwrap_or(std::num::NonZeroUsize::MIN),
                ),
            })),
            gate: Arc::new(Gate::default()),
            metrics,
            me,
            last_commit: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug that already failed loudly;
        // the state it guards stays usable (every write is one atomic batch).
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This replica's identity.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &SyncMetrics {
        &self.metrics
    }

    /// Runs `f` with the replica (for reads and tools).
    pub fn with_replica<T>(&self, f: impl FnOnce(&mut Replica) -> T) -> T {
        f(&mut self.lock().replica)
    }

    /// When the last local write that changed a document was committed
    /// (persisted here, before it is pushed): where its propagation to the
    /// peers starts, for measuring it.
    pub fn last_commit(&self) -> Option<tokio::time::Instant> {
        *self
            .last_commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn committed(&self) {
        *self
            .last_commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now());
    }

    /// Replaces the roster (a peer admitted or removed).
    pub fn set_roster(&self, roster: Roster) {
        self.lock().roster = roster;
    }

    /// Peers with an open session.
    pub fn connected(&self) -> Vec<PeerId> {
        self.lock().peers.keys().copied().collect()
    }

    /// Documents waiting to be pushed to `peer`; `None` when not connected.
    pub fn pending(&self, peer: &PeerId) -> Option<usize> {
        self.lock().peers.get(peer).map(|p| p.session.pending())
    }

    /// Commit time (ms) of the oldest change sent to `peer` and not acknowledged.
    pub fn watermark_ms(&self, peer: &PeerId) -> Option<i64> {
        self.lock()
            .peers
            .get(peer)
            .and_then(|p| p.session.watermark_ms())
    }

    /// Runs a local write on the replica and, when `f` says it changed
    /// `doc`, pushes the document to connected peers that may read it.
    fn write_local<T, E>(
        &self,
        doc: &DocId,
        f: impl FnOnce(&mut Replica, u64) -> Result<(T, bool), E>,
    ) -> Result<T, E> {
        let mut wakes = Vec::new();
        let out = {
            let mut inner = self.lock();
            let (out, changed) = f(&mut inner.replica, now_ms())?;
            if changed {
                self.committed();
                mark_dirty(&mut inner, self.me, doc, None, &mut wakes);
            }
            out
        };
        wake_all(wakes);
        Ok(out)
    }

    /// Writes a document locally (persisted before this returns) and pushes
    /// it to connected peers that may read it.
    pub fn write_json(&self, doc: &DocId, value: &serde_json::Value) -> Result<bool, ReplicaError> {
        self.write_local(doc, |r, now| {
            let changed = r.write_json(doc, value, now)?.is_some();
            Ok((changed, changed))
        })
    }

    /// Writes many documents in one store write (a report cycle of many
    /// devices) and pushes them. Returns how many changed.
    pub fn write_many(&self, items: &[(DocId, serde_json::Value)]) -> Result<usize, ReplicaError> {
        let mut wakes = Vec::new();
        let mut changed = 0;
        {
            let mut inner = self.lock();
            let hashes = inner
                .replica
                .write_many(items.iter().map(|(d, v)| (d, v)), now_ms())?;
            for ((doc, _), hash) in items.iter().zip(hashes) {
                if hash.is_some() {
                    changed += 1;
                    mark_dirty(&mut inner, self.me, doc, None, &mut wakes);
                }
            }
            if changed > 0 {
                self.committed();
            }
        }
        wake_all(wakes);
        Ok(changed)
    }

    /// Writes a typed document locally and pushes it; `false` when nothing
    /// changed.
    pub fn put<T: crate::schema::Schema>(
        &self,
        doc: &DocId,
        value: &T,
    ) -> Result<bool, ReplicaError> {
        self.write_local(doc, |r, now| {
            let changed = r.put(doc, value, now)?.is_some();
            Ok((changed, changed))
        })
    }

    /// Sets this replica's desired value of a device property (see
    /// [`crate::desired::set_desired`]) and pushes it.
    pub fn set_desired(
        &self,
        doc: &DocId,
        property: &str,
        value: &str,
    ) -> Result<crate::hlc::Hlc, crate::desired::DesiredError> {
        self.set_desired_at(doc, property, value, None)
    }

    /// [`Engine::set_desired`] for a value its source took at `written_ms`
    /// (see [`crate::desired::set_desired_at`]).
    pub fn set_desired_at(
        &self,
        doc: &DocId,
        property: &str,
        value: &str,
        written_ms: Option<u64>,
    ) -> Result<crate::hlc::Hlc, crate::desired::DesiredError> {
        self.write_local(doc, |r, now| {
            Ok((
                crate::desired::set_desired_at(r, doc, property, value, now, written_ms)?,
                true,
            ))
        })
    }

    /// Deletes a document (see [`Replica::delete`]) and pushes the
    /// tombstone; `false` when there was nothing to delete.
    pub fn delete(&self, doc: &DocId) -> Result<bool, ReplicaError> {
        self.write_local(doc, |r, now| {
            let deleted = r.delete(doc, now)?;
            Ok((deleted, deleted))
        })
    }

    /// Reads a document as JSON.
    pub fn read_json(&self, doc: &DocId) -> Result<Option<serde_json::Value>, ReplicaError> {
        self.lock().replica.read_json(doc)
    }

    /// Runs one session with `peer` over a byte stream until either side
    /// closes it or a protocol error occurs. The caller authenticated the peer
    /// (iroh does, by key).
    pub async fn run_session<R, W>(
        &self,
        peer: PeerId,
        initiate: bool,
        mut recv: R,
        mut send: W,
    ) -> Result<(), SessionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (wake, epoch) = {
            // Starting indexes the peer's scope in the store: many peers
            // connecting at once (a reconnect storm) wait here without a
            // thread, as the sessions' reads and writes do.
            let _pass = self.gate.enter().await;
            let mut inner = self.lock();
            let mut session = Session::new(peer, &inner.roster)?;
            session.start(&inner.replica, &inner.roster, initiate)?;
            let wake = Arc::new(Notify::new());
            inner.next_epoch += 1;
            let epoch = inner.next_epoch;
            // A reconnection replaces the previous session with this peer.
            if let Some(mut old) = inner.peers.insert(
                peer,
                PeerSlot {
                    session,
                    wake: wake.clone(),
                    epoch,
                },
            ) {
                if let Err(e) = old.session.save_acks(&inner.replica) {
                    warn!(%peer, error = %e, "cannot save the replaced session's acknowledgements");
                }
                old.wake.notify_one();
            }
            (wake, epoch)
        };
        self.metrics
            .connected_peers
            .set(self.lock().peers.len() as i64);
        // Ends the session's slot however this future ends: returning, or
        // dropped (a task aborted, a connection torn down).
        let closing = SessionSlot {
            engine: self,
            peer,
            epoch,
        };
        let label = PeerLabel::of(&peer);
        info!(%peer, "sync session open");

        let writer = async {
            let mut held = HeldAcks::default();
            // When the peer's unsaved acknowledgements are to be saved.
            let mut save_due: Option<tokio::time::Instant> = None;
            loop {
                let mut compact_more = false;
                let next = {
                    let _pass = self.gate.enter().await;
                    let mut guard = self.lock();
                    let inner = &mut *guard;
                    let Some(slot) = inner.peers.get_mut(&peer).filter(|s| s.epoch == epoch) else {
                        return Ok::<(), SessionError>(());
                    };
                    let msg = slot
                        .session
                        .poll_transmit(&mut inner.replica, &inner.roster)?;
                    // Nothing to send: compact what receiving left due. A
                    // failure there is the store's, not this peer's: the
                    // session goes on, and the document stays as chunks.
                    if msg.is_none() {
                        match inner.replica.compact_deferred(COMPACT_PER_TURN) {
                            Ok(left) => compact_more = left > 0,
                            Err(e) => warn!(error = %e, "cannot compact a received document"),
                        }
                    }
                    if slot.session.unsaved_acks() == 0 {
                        save_due = None;
                    } else {
                        let now = tokio::time::Instant::now();
                        let due = *save_due.get_or_insert(now + ACK_SAVE_DELAY);
                        if now >= due {
                            slot.session.save_acks(&inner.replica)?;
                            save_due = None;
                        }
                    }
                    self.metrics
                        .pending_documents
                        .get_or_create(&label)
                        .set(slot.session.pending() as i64);
                    // Nothing unacknowledged: the peer is caught up to now.
                    let w = slot.session.watermark_ms().unwrap_or(now_ms() as i64);
                    self.metrics
                        .watermark_timestamp_seconds
                        .get_or_create(&label)
                        .set(w as f64 / 1000.0);
                    msg
                };
                let out = match next {
                    Some(Message::Ack(items)) => {
                        if held.hold(items) < ACKS_HELD_MAX {
                            continue;
                        }
                        vec![held.release()]
                    }
                    // Anything else carries the held acknowledgements along.
                    Some(msg) if held.until.is_none() => vec![msg],
                    Some(msg) => vec![held.release(), msg],
                    None => match held.until {
                        Some(due) if tokio::time::Instant::now() >= due => vec![held.release()],
                        // More documents to compact: after the other tasks.
                        _ if compact_more => {
                            tokio::task::yield_now().await;
                            continue;
                        }
                        // Idle: wake now and then to refresh the watermark, so
                        // that a caught-up peer's watermark age stays near zero.
                        until => {
                            let due = [until, save_due]
                                .into_iter()
                                .flatten()
                                .min()
                                .unwrap_or_else(|| tokio::time::Instant::now() + IDLE_REFRESH);
                            let _ = tokio::time::timeout_at(due, wake.notified()).await;
                            continue;
                        }
                    },
                };
                let mut frames = Vec::new();
                for msg in &out {
                    let bytes = encode(msg);
                    frames.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                    frames.extend_from_slice(&bytes);
                    self.metrics.sent_messages.inc();
                }
                if send.write_all(&frames).await.is_err() || send.flush().await.is_err() {
                    // The peer went away: the session just ends.
                    return Ok(());
                }
                self.metrics.sent_bytes.inc_by(frames.len() as u64);
            }
        };
        let reader = async {
            let mut len = [0u8; 4];
            let mut buf = Vec::new();
            loop {
                if recv.read_exact(&mut len).await.is_err() {
                    return Ok::<(), SessionError>(());
                }
                let n = u32::from_be_bytes(len) as usize;
                if n > MAX_MESSAGE_BYTES {
                    return Err(SessionError::Malformed {
                        peer,
                        reason: format!("frame of {n} bytes exceeds {MAX_MESSAGE_BYTES}"),
                    });
                }
                buf.resize(n, 0);
                if recv.read_exact(&mut buf).await.is_err() {
                    return Err(SessionError::Malformed {
                        peer,
                        reason: "truncated frame".into(),
                    });
                }
                self.metrics.received_messages.inc();
                self.metrics.received_bytes.inc_by(n as u64 + 4);
                let msg =
                    decode(&buf).map_err(|reason| SessionError::Malformed { peer, reason })?;
                // Heartbeats go past the gate: a node-status change waits
                // for the replica's current holder only, not behind every
                // other session's backlog (the gate lets waiters in in no
                // particular order). They are small and come once a period.
                let heartbeat = matches!(&msg, Message::Changes(docs)
                    if !docs.is_empty()
                        && docs.iter().all(|d| d.doc.kind() == crate::document::DocKind::NodeStatus));
                let _pass = if heartbeat {
                    None
                } else {
                    Some(self.gate.enter().await)
                };
                let mut guard = self.lock();
                let inner = &mut *guard;
                let Some(slot) = inner.peers.get_mut(&peer).filter(|s| s.epoch == epoch) else {
                    return Ok(());
                };
                let events = slot
                    .session
                    .handle(msg, &mut inner.replica, &inner.roster)?;
                let mut wakes = vec![slot.wake.clone()];
                let now = now_ms() as i64;
                for event in events {
                    match event {
                        Event::Applied { doc, lag_ms } => {
                            for lag in lag_ms {
                                self.metrics
                                    .lag_seconds
                                    .observe((now - lag).max(0) as f64 / 1000.0);
                            }
                            if doc.kind() == crate::document::DocKind::DeviceDesired {
                                self.count_conflicts(inner, &doc);
                            }
                            mark_dirty(inner, self.me, &doc, Some(peer), &mut wakes);
                        }
                        Event::Rejected { doc, reason } => {
                            self.metrics.rejected_changes.inc();
                            warn!(%peer, %doc, %reason, "changes rejected");
                        }
                        Event::Round => {
                            self.metrics.reconciliation_rounds.inc();
                        }
                    }
                }
                drop(guard);
                wake_all(wakes);
            }
        };
        let result = tokio::select! {
            r = writer => r,
            r = reader => r,
        };
        drop(closing);
        match &result {
            Ok(()) => info!(%peer, "sync session closed"),
            Err(e) => {
                self.metrics.session_errors.inc();
                warn!(%peer, error = %e, "sync session closed on error");
            }
        }
        result
    }

    /// Counts the losing writes of a merged device-desired document that
    /// were not counted before.
    fn count_conflicts(&self, inner: &mut Inner, doc: &DocId) {
        let Ok(Some(json)) = inner.replica.read_json(doc) else {
            return;
        };
        for (property, resolved) in crate::desired::resolve(&json) {
            for loser in resolved.losers {
                let key = (doc.clone(), property.clone(), loser.writer, loser.at);
                if inner.conflicts_seen.put(key, ()).is_none() {
                    self.metrics.conflicts_resolved.inc();
                    info!(%doc, %property, value = %loser.value, "desired-value conflict resolved; the losing write stays visible");
                }
            }
        }
    }

    /// Serves a connection accepted by an iroh endpoint: refuses unknown
    /// peers, otherwise runs the session on the stream the peer opens.
    pub async fn serve_connection(&self, conn: Connection) {
        let peer = PeerId::from(conn.remote_id());
        if self.lock().roster.role(&peer).is_none() {
            warn!(%peer, "refusing unknown peer");
            conn.close(CLOSE_UNKNOWN_PEER.into(), b"unknown peer");
            return;
        }
        let (send, recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                debug!(%peer, error = %e, "no stream");
                return;
            }
        };
        if let Err(e) = self.run_session(peer, false, recv, send).await {
            let code = match e {
                SessionError::UnknownPeer(_) => CLOSE_UNKNOWN_PEER,
                _ => CLOSE_PROTOCOL,
            };
            conn.close(code.into(), e.to_string().as_bytes());
        }
    }

    /// Accepts connections on `endpoint` until it closes.
    pub async fn accept_loop(&self, endpoint: Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let engine = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => engine.serve_connection(conn).await,
                    Err(e) => debug!(error = %e, "incoming connection failed"),
                }
            });
        }
    }

    /// Keeps a session with `peer` open, reconnecting with capped exponential
    /// back-off and jitter, until the endpoint closes.
    pub async fn dial_loop(&self, endpoint: Endpoint, peer: PeerAddr) {
        let mut backoff = Duration::from_millis(200);
        let id = PeerId::from(peer.id);
        loop {
            match endpoint.connect(EndpointAddr::from(&peer), SYNC_ALPN).await {
                Ok(conn) => {
                    backoff = Duration::from_millis(200);
                    match conn.open_bi().await {
                        Ok((send, recv)) => {
                            if let Err(e) = self.run_session(id, true, recv, send).await {
                                conn.close(CLOSE_PROTOCOL.into(), e.to_string().as_bytes());
                            }
                        }
                        Err(e) => debug!(%id, error = %e, "cannot open stream"),
                    }
                }
                Err(e) => debug!(%id, error = %e, "cannot connect"),
            }
            if endpoint.is_closed() {
                return;
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Lets one session at a time on to the replica lock. Not first come,
/// first served: a session that finds the gate free goes through at once
/// (a queue handing the gate to a task that has yet to be scheduled would
/// leave the replica idle meanwhile); one waiter is woken each time the gate
/// is left.
#[derive(Default)]
struct Gate {
    busy: std::sync::atomic::AtomicBool,
    left: Notify,
}

/// Passage through the [`Gate`]; leaving it wakes a waiter.
struct Pass<'a>(&'a Gate);

impl Gate {
    fn try_enter(&self) -> Option<Pass<'_>> {
        use std::sync::atomic::Ordering;
        (!self.busy.swap(true, Ordering::Acquire)).then(|| Pass(self))
    }

    async fn enter(&self) -> Pass<'_> {
        loop {
            if let Some(pass) = self.try_enter() {
                return pass;
            }
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            // Left between the first try and enabling: try again.
            if let Some(pass) = self.try_enter() {
                return pass;
            }
            left.await;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.0
            .busy
            .store(false, std::sync::atomic::Ordering::Release);
        self.0.left.notify_one();
    }
}

/// Removes a session's slot when the session ends.
struct SessionSlot<'a> {
    engine: &'a Engine,
    peer: PeerId,
    epoch: u64,
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        let mut inner = self.engine.lock();
        if inner
            .peers
            .get(&self.peer)
            .is_some_and(|s| s.epoch == self.epoch)
        {
            if let Some(mut slot) = inner.peers.remove(&self.peer)
                && let Err(e) = slot.session.save_acks(&inner.replica)
            {
                warn!(peer = %self.peer, error = %e, "cannot save the session's acknowledgements");
            }
            // A closed session has no pending documents or watermark: its
            // series go, so that a peer gone for good raises no alert.
            let label = PeerLabel::of(&self.peer);
            self.engine.metrics.pending_documents.remove(&label);
            self.engine
                .metrics
                .watermark_timestamp_seconds
                .remove(&label);
        }
        self.engine
            .metrics
            .connected_peers
            .set(inner.peers.len() as i64);
    }
}

/// Marks a document dirty in every session (but the one it came from) and
/// adds their writers to `wakes`, to be woken once the lock is released (a
/// writer woken under it would only wait for it).
fn mark_dirty(
    inner: &mut Inner,
    me: PeerId,
    doc: &DocId,
    except: Option<PeerId>,
    wakes: &mut Vec<Arc<Notify>>,
) {
    // Only the sessions of peers that may read the document: a cloud with
    // a thousand edges does not visit a thousand sessions per change.
    for peer in inner.roster.readers(doc) {
        if Some(peer) == except {
            continue;
        }
        if let Some(slot) = inner.peers.get_mut(&peer) {
            slot.session.local_change(&me, &inner.roster, doc);
            if !wakes.iter().any(|w| Arc::ptr_eq(w, &slot.wake)) {
                wakes.push(slot.wake.clone());
            }
        }
    }
}

/// Acknowledgements a session's writer holds back to send together (see
/// [`ACK_DELAY`]), the latest per document.
#[derive(Default)]
struct HeldAcks {
    items: BTreeMap<DocId, Item>,
    /// When they are due; `None` when none are held.
    until: Option<tokio::time::Instant>,
}

impl HeldAcks {
    /// Holds `items` (due `ACK_DELAY` after the first held); returns how
    /// many documents' acknowledgements are held.
    fn hold(&mut self, items: Vec<Item>) -> usize {
        self.items
            .extend(items.into_iter().map(|item| (item.doc.clone(), item)));
        self.until
            .get_or_insert_with(|| tokio::time::Instant::now() + ACK_DELAY);
        self.items.len()
    }

    /// All held, as one message; none are held after.
    fn release(&mut self) -> Message {
        self.until = None;
        Message::Ack(std::mem::take(&mut self.items).into_values().collect())
    }
}

/// Wakes the writers [`mark_dirty`] collected.
fn wake_all(wakes: Vec<Arc<Notify>>) {
    for wake in wakes {
        wake.notify_one();
    }
}
