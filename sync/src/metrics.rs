//! Sync metrics, Prometheus-named (`outpost_sync_` prefix, base units).
//!
//! Per-peer series carry a `peer` label (the short form of the peer's key);
//! peers are few per replica, so the label set stays bounded. No metric is
//! labelled by document.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `peer` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabel {
    /// The first 10 hex digits of the peer's key.
    pub peer: String,
}

impl PeerLabel {
    /// The label of a peer.
    pub fn of(peer: &crate::PeerId) -> Self {
        Self {
            peer: peer.to_string()[..10].to_owned(),
        }
    }
}

/// The sync metrics of one replica.
#[derive(Debug, Clone)]
pub struct SyncMetrics {
    /// Commit at the origin to persisted here, per change.
    pub lag_seconds: Histogram,
    /// Commit time of the oldest change sent to a peer and not acknowledged.
    pub watermark_timestamp_seconds: Family<PeerLabel, Gauge<f64, AtomicU64>>,
    /// Documents waiting to be pushed to a peer.
    pub pending_documents: Family<PeerLabel, Gauge>,
    /// Bytes of protocol messages sent.
    pub sent_bytes: Counter,
    /// Bytes of protocol messages received.
    pub received_bytes: Counter,
    /// Protocol messages sent.
    pub sent_messages: Counter,
    /// Protocol messages received.
    pub received_messages: Counter,
    /// Reconciliation rounds answered.
    pub reconciliation_rounds: Counter,
    /// Changes refused by the access rules.
    pub rejected_changes: Counter,
    /// Concurrent writes resolved by the conflict rule.
    pub conflicts_resolved: Counter,
    /// Peers with an open session.
    pub connected_peers: Gauge,
    /// Sessions closed because of a malformed message or a protocol error.
    pub session_errors: Counter,
}

impl Default for SyncMetrics {
    fn default() -> Self {
        Self {
            // 1 ms .. ~65 s
            lag_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            watermark_timestamp_seconds: Family::default(),
            pending_documents: Family::default(),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            sent_messages: Counter::default(),
            received_messages: Counter::default(),
            reconciliation_rounds: Counter::default(),
            rejected_changes: Counter::default(),
            conflicts_resolved: Counter::default(),
            connected_peers: Gauge::default(),
            session_errors: Counter::default(),
        }
    }
}

impl SyncMetrics {
    /// Registers every metric under the `outpost_sync` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outpost_sync");
        r.register(
            "lag_seconds",
            "Commit at the origin to persisted at this replica",
            self.lag_seconds.clone(),
        );
        r.register(
            "peer_watermark_timestamp_seconds",
            "Commit time of the oldest change sent to the peer and not yet acknowledged (now, refreshed every few seconds, when all is acknowledged)",
            self.watermark_timestamp_seconds.clone(),
        );
        r.register(
            "pending_documents",
            "Documents waiting to be pushed to the peer",
            self.pending_documents.clone(),
        );
        r.register(
            "sent_bytes",
            "Bytes of sync messages sent",
            self.sent_bytes.clone(),
        );
        r.register(
            "received_bytes",
            "Bytes of sync messages received",
            self.received_bytes.clone(),
        );
        r.register(
            "sent_messages",
            "Sync messages sent",
            self.sent_messages.clone(),
        );
        r.register(
            "received_messages",
            "Sync messages received",
            self.received_messages.clone(),
        );
        r.register(
            "reconciliation_rounds",
            "Reconciliation rounds answered",
            self.reconciliation_rounds.clone(),
        );
        r.register(
            "rejected_changes",
            "Changes refused by the access rules",
            self.rejected_changes.clone(),
        );
        r.register(
            "conflicts_resolved",
            "Concurrent writes resolved by the conflict rule",
            self.conflicts_resolved.clone(),
        );
        r.register(
            "connected_peers",
            "Peers with an open sync session",
            self.connected_peers.clone(),
        );
        r.register(
            "session_errors",
            "Sessions closed on a malformed message or protocol error",
            self.session_errors.clone(),
        );
    }
}
