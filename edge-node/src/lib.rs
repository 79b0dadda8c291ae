//! Outpost's edge agent.
//!
//! Keeps a full replica of what its node owns, runs the node's pods through
//! the CRI API of containerd, hands devices to mappers and keeps their twins,
//! serves KubeEdge's MQTT event bus and a local read API to edge apps, and
//! exposes metrics. It must keep working with no network: nothing here waits
//! on the cloud. It never talks to the Kubernetes API.

pub mod cri;
