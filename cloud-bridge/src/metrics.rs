//! The bridge's own metrics, beside outpost-sync's (`outpost_sync_*`):
//!
//! - `outpost_cloud_edge_heartbeat_timestamp_seconds{node}`: when this
//!   bridge last received a new heartbeat from each edge (its own clock, so
//!   an edge's skewed clock does not hide an outage);
//! - `outpost_cloud_edges_admitted`: admitted edges;
//! - `outpost_cloud_lease_renewals_total` and
//!   `outpost_cloud_lease_renewal_errors_total`;
//! - `outpost_cloud_device_status_writes_total`: API writes of device twin
//!   status, bounded by `--device-status-writes-per-s`.
//!
//! The `node` label has one value per admitted edge, which the fleet's size
//! bounds; nothing is labelled per pod or device.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `node` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NodeLabel {
    /// An edge's node name.
    pub node: String,
}

/// Every bridge metric; cheap to clone (shared series).
#[derive(Debug, Clone, Default)]
pub struct CloudMetrics {
    /// Receipt time of each edge's newest heartbeat.
    pub edge_heartbeat_timestamp_seconds: Family<NodeLabel, Gauge<f64, AtomicU64>>,
    /// Admitted edges.
    pub edges_admitted: Gauge,
    /// Node Leases renewed.
    pub lease_renewals: Counter,
    /// Node Lease renewals the API refused.
    pub lease_renewal_errors: Counter,
    /// API writes of device twin status.
    pub device_status_writes: Counter,
}

impl CloudMetrics {
    /// Registers every metric under the `outpost_cloud` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("outpost_cloud");
        r.register(
            "edge_heartbeat_timestamp_seconds",
            "When this bridge last received a new heartbeat from the edge",
            self.edge_heartbeat_timestamp_seconds.clone(),
        );
        r.register(
            "edges_admitted",
            "Admitted edges",
            self.edges_admitted.clone(),
        );
        r.register(
            "lease_renewals",
            "Node Leases renewed from edge heartbeats",
            self.lease_renewals.clone(),
        );
        r.register(
            "lease_renewal_errors",
            "Node Lease renewals the API refused",
            self.lease_renewal_errors.clone(),
        );
        r.register(
            "device_status_writes",
            "API writes of device twin status (DeviceStatus and Device.status)",
            self.device_status_writes.clone(),
        );
    }
}
