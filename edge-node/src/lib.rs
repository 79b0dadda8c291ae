//! Outpost's edge agent.
//!
//! Keeps a full replica of what its node owns, runs the node's pods through
//! the CRI API of containerd, hands devices to mappers and keeps their twins,
//! serves KubeEdge's MQTT event bus and a local read API to edge apps, and
//! exposes metrics. It must keep working with no network: nothing here waits
//! on the cloud. It never talks to the Kubernetes API.
//!
//! It owns the node's side of the pod lifecycle: the sandboxes and
//! containers it creates (all labelled `io.outpost.managed=true`, see
//! [`pods`]), the files of their ConfigMap and Secret volumes under the data
//! dir, and the documents an edge writes (`pod-status`, `node-status`).
//!
//! Modules:
//! - [`config`]: the TOML file, environment and flags of `outpost-edge run`;
//! - [`agent`]: identity, replica, sync engine and the tasks below, wired;
//! - [`cri`]: the CRI v1 gRPC channel to containerd;
//! - [`pods`]: the pod manager (sandboxes, containers, restart back-off,
//!   probes, volumes, status, deletion, adoption after restarts);
//! - [`node`]: the node heartbeat and status;
//! - [`twins`]: device twins over in-process mapper drivers;
//! - [`eventbus`]: KubeEdge's MQTT event bus over the twins;
//! - [`dmi`]: KubeEdge's DMI DeviceManagerService, for external mappers;
//! - [`api`]: the local read API and `/metrics`, on loopback;
//! - [`metrics`]: pod, device and mapper metrics.

pub mod agent;
pub mod api;
pub mod clock;
pub mod config;
pub mod cri;
pub mod dmi;
pub mod eventbus;
pub mod metrics;
pub mod node;
pub mod pods;
pub mod twins;
