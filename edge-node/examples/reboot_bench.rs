//! Benchmark: time from `outpost-edge` start after an offline reboot to N
//! pods running again, against the time containerd alone takes to start the
//! same sandboxes and containers (driven straight through CRI, all pods in
//! parallel), measured in the same run on a private containerd.
//!
//! ```text
//! scripts/env up
//! cargo build --workspace --examples   # not `cargo run -p`: that rebuilds RocksDB
//! /var/cache/outpost/target/debug/examples/reboot_bench 20
//! ```

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/edge.rs"]
mod support;

use std::time::Duration;

use k8s_cri::v1 as cri;
use outpost_edge_node::cri::CriClient;
use support::{Edge, PrivateContainerd, all_running, image, pod};
use tokio::time::Instant;

async fn containerd_alone(socket: &std::path::Path, n: usize) -> Duration {
    let cri = CriClient::connect(socket).await.unwrap();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let cri = cri.clone();
        tasks.spawn(async move {
            let mut runtime = cri.runtime.clone();
            let name = format!("alone-{i}");
            let config = cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: name.clone(),
                    uid: format!("uid-{name}-{}", std::process::id()),
                    namespace: "bench".into(),
                    attempt: 0,
                }),
                hostname: name.clone(),
                log_directory: format!("/tmp/{name}"),
                ..Default::default()
            };
            let sandbox = runtime
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .pod_sandbox_id;
            let id = runtime
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox,
                    config: Some(cri::ContainerConfig {
                        metadata: Some(cri::ContainerMetadata {
                            name: "main".into(),
                            attempt: 0,
                        }),
                        image: Some(cri::ImageSpec {
                            image: image(),
                            ..Default::default()
                        }),
                        command: vec!["sh".into(), "-c".into(), "exec sleep 600".into()],
                        log_path: "main/0.log".into(),
                        ..Default::default()
                    }),
                    sandbox_config: Some(config),
                })
                .await
                .unwrap()
                .into_inner()
                .container_id;
            runtime
                .start_container(cri::StartContainerRequest { container_id: id })
                .await
                .unwrap();
        });
    }
    while tasks.join_next().await.is_some() {}
    t0.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let mut ctrd = PrivateContainerd::start().await;
    let mut edge = Edge::start_on("bench", ctrd.socket.clone()).await;
    let pods: Vec<_> = (0..n)
        .map(|i| pod(&format!("p{i}"), "exec sleep 600"))
        .collect();
    let t0 = Instant::now();
    for p in &pods {
        edge.put_pod(p);
    }
    for p in &pods {
        edge.wait_status(p, Duration::from_secs(120), "first start", all_running)
            .await;
    }
    let first = t0.elapsed();

    edge.stop_agent().await;
    ctrd.power_off().await;
    ctrd.launch().await;
    let t0 = Instant::now();
    edge.start_agent().await;
    for p in &pods {
        edge.wait_status(p, Duration::from_secs(120), "after reboot", |s| {
            all_running(s) && s.container_statuses[0].restart_count == 1
        })
        .await;
    }
    let after_reboot = t0.elapsed();
    edge.stop_agent().await;

    let alone = containerd_alone(&ctrd.socket, n).await;
    println!("pods: {n}");
    println!("first start through outpost-edge (replica to Running in the status): {first:?}");
    println!("outpost-edge start after an offline reboot to all Running: {after_reboot:?}");
    println!("containerd alone, same sandboxes and containers via CRI in parallel: {alone:?}");
    // One line for scripts/bench's summary table (the issue sets no number:
    // the comparison is the figure).
    println!(
        "BENCH|edge reboot: {n} pods Running again after an offline reboot|{:.2} s|{:.2} s (containerd alone)|compare ({:.2}x)|-",
        after_reboot.as_secs_f64(),
        alone.as_secs_f64(),
        after_reboot.as_secs_f64() / alone.as_secs_f64().max(1e-9)
    );
}
