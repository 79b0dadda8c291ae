//! The node's own status: a heartbeat every few seconds in the
//! `node-status/<node>` document, with capacity, addresses, versions and the
//! Ready condition (the runtime and its network are ready).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_cri::v1 as cri;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::schema::{Condition, NodeAddress, NodeInfo, NodeStatusDoc};
use tracing::{debug, warn};

use crate::clock;
use crate::cri::CriClient;

/// Pods a node accepts, as kubelet's default.
const MAX_PODS: &str = "110";

/// The id of a node's status document.
pub fn status_id(node: &str) -> Option<DocId> {
    DocId::new(DocKind::NodeStatus, Owner::Node(node), &[]).ok()
}

/// Writes a heartbeat every `period` until the task is dropped.
pub async fn heartbeat_loop(
    engine: Engine,
    cri: CriClient,
    node: String,
    node_ip: Option<String>,
    period: Duration,
) {
    let Some(id) = status_id(&node) else {
        warn!(%node, "no valid node-status id for this node name; no heartbeats");
        return;
    };
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let prev = engine
            .with_replica(|r| r.get::<NodeStatusDoc>(&id))
            .ok()
            .flatten();
        let status = collect(&cri, &node, node_ip.as_deref(), prev.as_ref()).await;
        match engine.put(&id, &status) {
            Ok(_) => debug!(%node, "heartbeat"),
            Err(e) => warn!(doc = %id, error = %e, "cannot write the node status"),
        }
    }
}

/// The node's status now.
pub async fn collect(
    cri: &CriClient,
    node: &str,
    node_ip: Option<&str>,
    prev: Option<&NodeStatusDoc>,
) -> NodeStatusDoc {
    let mut runtime = cri.runtime.clone();
    let version = runtime
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .ok()
        .map(|v| v.into_inner());
    let conditions = runtime
        .status(cri::StatusRequest { verbose: false })
        .await
        .ok()
        .and_then(|s| s.into_inner().status)
        .map(|s| s.conditions);
    let (ready, reason, message) = match conditions {
        None => (
            false,
            "ContainerRuntimeDown",
            "container runtime is down".to_owned(),
        ),
        Some(conds) => match conds.iter().find(|c| !c.status) {
            None => (
                true,
                "KubeletReady",
                "outpost-edge is posting ready status".to_owned(),
            ),
            Some(c) => (
                false,
                if c.r#type == "NetworkReady" {
                    "NetworkPluginNotReady"
                } else {
                    "ContainerRuntimeNotReady"
                },
                format!("{} is false: {} {}", c.r#type, c.reason, c.message)
                    .trim()
                    .to_owned(),
            ),
        },
    };
    let status = if ready { "True" } else { "False" };
    let last_transition = prev
        .and_then(|p| p.conditions.iter().find(|c| c.kind == "Ready"))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| clock::rfc3339(SystemTime::now()));
    let capacity = capacity();
    let mut addresses = Vec::new();
    if let Some(ip) = node_ip.map(str::to_owned).or_else(default_route_ip) {
        addresses.push(NodeAddress {
            kind: "InternalIP".into(),
            address: ip,
        });
    }
    addresses.push(NodeAddress {
        kind: "Hostname".into(),
        address: node.to_owned(),
    });
    NodeStatusDoc {
        heartbeat_ms: clock::now_ms(),
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: status.into(),
            last_transition_time: Some(last_transition),
            reason: Some(reason.into()),
            message: Some(message),
        }],
        allocatable: capacity.clone(),
        capacity,
        addresses,
        node_info: NodeInfo {
            machine_id: read_trimmed("/etc/machine-id"),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            os_image: os_image(),
            container_runtime_version: version
                .map(|v| format!("{}://{}", v.runtime_name, v.runtime_version))
                .or_else(|| prev.map(|p| p.node_info.container_runtime_version.clone()))
                .unwrap_or_default(),
            kubelet_version: format!("outpost-edge/{}", env!("CARGO_PKG_VERSION")),
            operating_system: std::env::consts::OS.into(),
            architecture: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "arm" => "arm",
                other => other,
            }
            .into(),
        },
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into())
}

/// CPU, memory and pods of this machine.
fn capacity() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    out.insert("cpu".into(), cpus.to_string());
    if let Some(kib) = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
    {
        out.insert("memory".into(), format!("{kib}Ki"));
    }
    out.insert("pods".into(), MAX_PODS.into());
    out
}

/// The source address of the default route, found without sending a
/// packet; `None` on a node with no route (offline).
fn default_route_ip() -> Option<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then(|| ip.to_string())
}
