//! The edge's own metrics, beside outpost-sync's (`outpost_sync_*`):
//!
//! - `outpost_edge_pods{phase}`: this node's pods by phase;
//! - `outpost_edge_container_restarts_total`: container restarts seen in
//!   the pod statuses since the agent started;
//! - `outpost_edge_devices{state}`: devices by state (`online`, `offline`,
//!   `unknown`);
//! - `outpost_mapper_errors_total{protocol,op}`: failed connects, reads
//!   (a read with any property failing counts) and writes;
//! - `outpost_mapper_operation_duration_seconds{protocol,op}`: how long
//!   they took.
//!
//! Pod and device gauges are computed when scraped, from the replica and
//! the twins, so they cannot drift. Labels are bounded: phases, states,
//! protocols and operations, never a pod or device name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_mappers::device::{Observer, Op};
use outpost_sync::document::DocKind;
use outpost_sync::engine::Engine;
use outpost_sync::schema::PodStatusDoc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::twins::TwinView;

/// The `phase` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PhaseLabel {
    /// A pod phase.
    pub phase: String,
}

/// The `state` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabel {
    /// A device state.
    pub state: String,
}

/// The `protocol` and `op` labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OpLabel {
    /// `modbus`, `opcua`, `mqtt`.
    pub protocol: String,
    /// `connect`, `read`, `write`.
    pub op: String,
}

type DurationFamily = Family<OpLabel, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 100 µs .. ~6.5 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Mapper operation metrics; cheap to clone (shared series).
#[derive(Debug, Clone)]
pub struct MapperMetrics {
    errors: Family<OpLabel, Counter>,
    duration: DurationFamily,
}

impl Default for MapperMetrics {
    fn default() -> Self {
        Self {
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
        }
    }
}

impl MapperMetrics {
    /// An observer for the device tasks of one protocol.
    pub fn observer(&self, protocol: &str) -> Arc<dyn Observer> {
        Arc::new(ProtocolObserver {
            metrics: self.clone(),
            protocol: protocol.to_ascii_lowercase(),
        })
    }
}

#[derive(Debug)]
struct ProtocolObserver {
    metrics: MapperMetrics,
    protocol: String,
}

impl Observer for ProtocolObserver {
    fn observe(&self, op: Op, elapsed: Duration, ok: bool) {
        let label = OpLabel {
            protocol: self.protocol.clone(),
            op: op.as_str().to_owned(),
        };
        self.metrics
            .duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        // The series exists from the first operation on, at zero, so that
        // a dashboard shows "no errors" rather than "no data".
        let errors = self.metrics.errors.get_or_create(&label);
        if !ok {
            errors.inc();
        }
    }
}

/// Every edge metric.
#[derive(Debug, Clone, Default)]
pub struct EdgeMetrics {
    /// Pods by phase.
    pub pods: Family<PhaseLabel, Gauge>,
    /// Container restarts seen.
    pub container_restarts: Counter,
    /// Devices by state.
    pub devices: Family<StateLabel, Gauge>,
    /// Mapper operations.
    pub mappers: MapperMetrics,
    /// Restart counts last seen, by pod uid and container name.
    restarts_seen: Arc<Mutex<HashMap<(String, String), u32>>>,
}

impl EdgeMetrics {
    /// Registers every metric (and `engine`'s sync metrics) in `registry`.
    pub fn register(&self, registry: &mut Registry, engine: &Engine) {
        engine.metrics().register(registry);
        let edge = registry.sub_registry_with_prefix("outpost_edge");
        edge.register("pods", "This node's pods by phase", self.pods.clone());
        edge.register(
            "container_restarts",
            "Container restarts seen in this node's pod statuses",
            self.container_restarts.clone(),
        );
        edge.register(
            "devices",
            "This node's devices by state",
            self.devices.clone(),
        );
        let mapper = registry.sub_registry_with_prefix("outpost_mapper");
        mapper.register(
            "errors",
            "Failed device connects, reads and writes",
            self.mappers.errors.clone(),
        );
        mapper.register(
            "operation_duration_seconds",
            "How long device connects, reads and writes took",
            self.mappers.duration.clone(),
        );
    }

    /// Recomputes the pod and device gauges (and counts new restarts).
    pub fn refresh(&self, engine: &Engine, node: &str, twins: &TwinView) {
        let prefix = format!("{}/{node}/", DocKind::PodStatus.as_str());
        let statuses: Vec<PodStatusDoc> = engine.with_replica(|r| {
            let ids: Vec<_> = r
                .scan_prefix(&prefix)
                .filter_map(Result::ok)
                .map(|(id, _)| id)
                .collect();
            ids.iter()
                .filter_map(|id| r.get::<PodStatusDoc>(id).ok().flatten())
                .collect()
        });
        let mut phases: HashMap<String, i64> =
            ["Pending", "Running", "Succeeded", "Failed", "Unknown"]
                .into_iter()
                .map(|p| (p.to_owned(), 0))
                .collect();
        let mut seen = self
            .restarts_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in &statuses {
            if s.terminated {
                continue;
            }
            *phases.entry(s.phase.clone()).or_default() += 1;
            for c in &s.container_statuses {
                let count = c.restart_count.max(0) as u32;
                let before = seen.insert((s.uid.clone(), c.name.clone()), count);
                // The first sight of a container (after an agent restart)
                // sets the base; only increases count.
                if let Some(before) = before
                    && count > before
                {
                    self.container_restarts.inc_by(u64::from(count - before));
                }
            }
        }
        for (phase, n) in phases {
            self.pods.get_or_create(&PhaseLabel { phase }).set(n);
        }
        let mut states: HashMap<String, i64> = ["online", "offline", "unknown"]
            .into_iter()
            .map(|s| (s.to_owned(), 0))
            .collect();
        for t in twins.snapshot().values() {
            *states.entry(t.state.clone()).or_default() += 1;
        }
        for (state, n) in states {
            self.devices.get_or_create(&StateLabel { state }).set(n);
        }
    }
}
