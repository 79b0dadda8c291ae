//! Outpost's cloud bridge.
//!
//! Projects the merged replicated state to and from the Kubernetes API: it
//! watches Nodes, Pods, ConfigMaps, Secrets and KubeEdge Devices through
//! kube-runtime, writes them into outpost-sync documents, and writes what the
//! edges report (node and pod status, leases, device twins) back with
//! server-side apply. It owns the CRD types, edge admission and the split of
//! nodes between bridge replicas. It never talks to containerd or devices.
