//! Outpost's cloud bridge.
//!
//! Projects the merged replicated state to and from the Kubernetes API: it
//! watches Nodes, Pods, ConfigMaps, Secrets and KubeEdge Devices through
//! kube-runtime, writes them into outpost-sync documents, and writes what the
//! edges report (node and pod status, leases, device twins) back with
//! server-side apply. It owns edge admission (join tokens and the roster of
//! admitted keys), the projections between Kubernetes objects and documents,
//! the CRD types and the split of nodes between bridge replicas. It never
//! talks to containerd or devices, and it learns nothing from the API by
//! polling: watch streams and reflector stores on one side, replica
//! subscriptions on the other.
//!
//! - [`admission`]: join tokens, admitting an edge's key, the roster;
//! - [`join`]: the join protocol on its own iroh ALPN (both sides);
//! - [`project`]: object ↔ document projections, free of I/O;
//! - [`crd`]: KubeEdge's device CRDs (`devices.kubeedge.io/v1beta1`:
//!   Device, DeviceModel, DeviceStatus) as Rust types, the CRD manifests
//!   generated from them (`outpost-cloud crds`, `deploy/crds.yaml`) and their
//!   installation;
//! - [`devices`]: Devices and DeviceModels into device-desired and
//!   device-model documents; reported twins back to `DeviceStatus` and
//!   `Device.status`, coalesced behind a rate bound; merged desired values
//!   back to the Device, with losing writes as Events;
//! - [`bridge`]: the running loops (admission, nodes and leases, pods,
//!   devices);
//! - [`shard`]: several replicas of one group splitting the admitted nodes
//!   with Leases in `outpost-system`; each keeps the whole replicated state
//!   (sessions with every admitted edge and with the other replicas) and
//!   writes only the nodes whose Lease it holds; a dead replica's nodes are
//!   taken over once its Leases expire;
//! - [`metrics`]: heartbeats, admitted edges, leases and status writes, for
//!   Prometheus (`outpost-cloud run --metrics-listen`).
//!
//! The replica lives in RocksDB: a restarted bridge loses nothing, keeps its
//! replica id (derived from its key) and its Leases, and re-listing the API
//! rewrites no unchanged document (the engine's `put` diffs).
//!
//! Not yet here: an edge reaches the one replica its configuration names,
//! so a dead replica's edges wait for it (their Nodes go NotReady) even
//! though another replica holds their Leases.

pub mod admission;
pub mod bridge;
pub mod crd;
pub mod devices;
pub mod join;
pub mod metrics;
pub mod project;
pub mod shard;

pub use bridge::{Bridge, BridgeConfig, BridgeError};
