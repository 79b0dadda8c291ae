//! Offline autonomy against the real containerd: with no cloud, the edge
//! adopts the containers that still run after an `outpost-edge` restart
//! (restarting only the one that crashed meanwhile), keeps its pods through
//! a containerd restart, and after a reboot (every container, containerd and
//! its shims gone) brings every pod back from its replica alone. What it
//! records offline reaches the cloud when the link returns.
//!
//! The containerd restart and reboot tests run a private containerd each
//! (own root, state and socket under /tmp, sharing the environment's CNI
//! network and images), so they never disturb other tests.

#![allow(clippy::unwrap_used)]

#[path = "support/edge.rs"]
mod support;

use std::time::Duration;

use k8s_cri::v1 as cri;
use outpost_edge_node::cri::CriClient;
use outpost_edge_node::pods::{LABEL_NODE, LABEL_POD_UID};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{PodSpecDoc, PodStatusDoc};
use outpost_sync::transport::memory::{self, DEFAULT_LINK_BUFFER};
use support::{Edge, PrivateContainerd, all_running, container_ids, pod};

async fn containers_of(cri: &CriClient, node: &str, uid: &str) -> Vec<cri::Container> {
    let mut runtime = cri.runtime.clone();
    runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: [
                    (LABEL_NODE.to_owned(), node.to_owned()),
                    (LABEL_POD_UID.to_owned(), uid.to_owned()),
                ]
                .into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers
}

async fn stop(cri: &CriClient, container_id: &str) {
    let mut runtime = cri.runtime.clone();
    runtime
        .stop_container(cri::StopContainerRequest {
            container_id: container_id.trim_start_matches("containerd://").to_owned(),
            timeout: 0,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_adopts_running_containers_and_restarts_only_the_crashed_one() {
    let mut edge = Edge::start("adopt").await;
    let healthy = pod("healthy", "exec sleep 600");
    let crashing = pod("crashing", "exec sleep 600");
    edge.put_pod(&healthy);
    edge.put_pod(&crashing);
    let before = edge
        .wait_status(
            &healthy,
            Duration::from_secs(20),
            "healthy runs",
            all_running,
        )
        .await;
    let crashing_before = edge
        .wait_status(
            &crashing,
            Duration::from_secs(20),
            "crashing runs",
            all_running,
        )
        .await;

    // The agent goes away; meanwhile one container dies.
    edge.stop_agent().await;
    let cri = edge.cri().await;
    stop(&cri, &container_ids(&crashing_before)[0]).await;

    let t0 = tokio::time::Instant::now();
    edge.start_agent().await;
    let after = edge
        .wait_status(
            &crashing,
            Duration::from_secs(20),
            "crashed one restarted",
            |s| all_running(s) && s.container_statuses[0].restart_count == 1,
        )
        .await;
    eprintln!(
        "crashed container running again {:?} after the agent started",
        t0.elapsed()
    );
    assert_ne!(container_ids(&after), container_ids(&crashing_before));

    // Give the manager a few more passes: the healthy one stays untouched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = edge.status(&healthy).unwrap();
    assert!(all_running(&now), "{now:#?}");
    assert_eq!(
        container_ids(&now),
        container_ids(&before),
        "adopted, not restarted"
    );
    assert_eq!(now.container_statuses[0].restart_count, 0);
    let listed = containers_of(&cri, &edge.node, &healthy.uid).await;
    assert_eq!(listed.len(), 1, "no second container: {listed:?}");
    assert_eq!(
        listed[0].state,
        cri::ContainerState::ContainerRunning as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restart_keeps_pods_running_and_the_agent_reconnects() {
    let mut ctrd = PrivateContainerd::start().await;
    let edge = Edge::start_on("ctrd", ctrd.socket.clone()).await;
    let a = pod("a", "exec sleep 600");
    let b = pod("b", "exec sleep 600");
    edge.put_pod(&a);
    edge.put_pod(&b);
    let a_before = edge
        .wait_status(&a, Duration::from_secs(20), "a runs", all_running)
        .await;
    let b_before = edge
        .wait_status(&b, Duration::from_secs(20), "b runs", all_running)
        .await;

    ctrd.crash();
    // The agent notices the runtime is gone and keeps trying.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ctrd.launch().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a_now = edge
        .wait_status(&a, Duration::from_secs(10), "a still runs", all_running)
        .await;
    assert_eq!(
        container_ids(&a_now),
        container_ids(&a_before),
        "not restarted"
    );
    assert_eq!(a_now.container_statuses[0].restart_count, 0);

    // The agent talks to the new containerd: a crash is still handled.
    let cri = CriClient::connect(&ctrd.socket).await.unwrap();
    stop(&cri, &container_ids(&b_before)[0]).await;
    edge.wait_status(&b, Duration::from_secs(20), "b restarted", |s| {
        all_running(s) && s.container_statuses[0].restart_count == 1
    })
    .await;
}

fn open_cloud(dir: &std::path::Path) -> Engine {
    let key = outpost_sync::identity::load_or_create(dir).unwrap();
    let replica = Replica::open(
        dir.join("replica"),
        PeerId::from(key.public()),
        ReplicaOptions::default(),
    )
    .unwrap();
    Engine::new(replica, Roster::new(), SyncMetrics::default())
}

fn cloud_status(cloud: &Engine, node: &str, spec: &PodSpecDoc) -> Option<PodStatusDoc> {
    let id = DocId::new(
        DocKind::PodStatus,
        Owner::Node(node),
        &[&spec.namespace, &spec.name, &spec.uid],
    )
    .unwrap();
    cloud.with_replica(|r| r.get::<PodStatusDoc>(&id)).unwrap()
}

async fn wait_cloud(
    cloud: &Engine,
    node: &str,
    spec: &PodSpecDoc,
    what: &str,
    ok: impl Fn(&PodStatusDoc) -> bool,
) {
    for _ in 0..200 {
        if cloud_status(cloud, node, spec).as_ref().is_some_and(&ok) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {:#?}", cloud_status(cloud, node, spec));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_while_offline_brings_every_pod_back_and_the_cloud_sees_it_after_reconnect() {
    let mut ctrd = PrivateContainerd::start().await;
    let mut edge = Edge::start_on("reboot", ctrd.socket.clone()).await;
    let cloud = open_cloud(&edge.dir.join("cloud"));
    let mut edge_roster = Roster::new();
    edge_roster.insert(cloud.me(), Role::Cloud);
    edge.roster = edge_roster.clone();
    edge.engine().set_roster(edge_roster);
    let mut cloud_roster = Roster::new();
    cloud_roster.insert(
        edge.engine().me(),
        Role::Edge {
            node: edge.node.clone(),
            site: None,
        },
    );
    cloud.set_roster(cloud_roster);

    // Pods arrive the production way: written in the cloud, synced down.
    let link = memory::connect(edge.engine(), &cloud, DEFAULT_LINK_BUFFER);
    let pods: Vec<PodSpecDoc> = (0..3)
        .map(|i| pod(&format!("p{i}"), "exec sleep 600"))
        .collect();
    for p in &pods {
        let id = DocId::new(
            DocKind::PodSpec,
            Owner::Node(&edge.node),
            &[&p.namespace, &p.name, &p.uid],
        )
        .unwrap();
        cloud.put(&id, p).unwrap();
    }
    let mut before = Vec::new();
    for p in &pods {
        before.push(
            edge.wait_status(p, Duration::from_secs(30), "pod runs", all_running)
                .await,
        );
        wait_cloud(&cloud, &edge.node, p, "cloud sees it running", all_running).await;
    }

    // Offline, then the machine reboots: every container dies, containerd
    // and its shims die, the runtime's state dir is wiped.
    link.cut();
    edge.stop_agent().await;
    ctrd.power_off().await;
    ctrd.launch().await;
    let t0 = tokio::time::Instant::now();
    edge.start_agent().await;
    for (p, old) in pods.iter().zip(&before) {
        let s = edge
            .wait_status(p, Duration::from_secs(30), "pod back after reboot", |s| {
                all_running(s) && s.container_statuses[0].restart_count == 1
            })
            .await;
        assert_ne!(container_ids(&s), container_ids(old), "a new container");
    }
    eprintln!(
        "{} pods running again {:?} after the agent started on the rebooted node",
        pods.len(),
        t0.elapsed()
    );
    // One sandbox per pod: the dead ones were removed.
    let cri = CriClient::connect(&ctrd.socket).await.unwrap();
    let mut runtime = cri.runtime.clone();
    let sandboxes = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(sandboxes.len(), pods.len(), "{sandboxes:#?}");
    assert!(
        sandboxes
            .iter()
            .all(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
    );

    // Back online: what the edge recorded offline reaches the cloud.
    let _link = memory::connect(edge.engine(), &cloud, DEFAULT_LINK_BUFFER);
    for p in &pods {
        wait_cloud(&cloud, &edge.node, p, "cloud sees the restart", |s| {
            all_running(s) && s.container_statuses[0].restart_count == 1
        })
        .await;
    }
}
