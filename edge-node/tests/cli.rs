//! The `outpost-edge` binary: it explains itself, merges its configuration
//! (file, then environment, then flags), refuses a bad file clearly, and
//! `run` starts the node's pods from its replica, writes heartbeats, and
//! exits on SIGTERM leaving the containers running.

#![allow(clippy::unwrap_used)]

#[path = "support/http.rs"]
mod http;
#[path = "support/edge.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use http::{http_get, http_get_first_line};
use k8s_cri::v1 as cri;
use outpost_edge_node::agent::open_replica;
use outpost_edge_node::cri::CriClient;
use outpost_edge_node::pods::{LABEL_NODE, LABEL_POD_UID};
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::schema::{NodeStatusDoc, PodStatusDoc};
use outpost_sync::test_utils::unique_name;
use support::{Cleanup, env, pod};

fn edge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outpost-edge"));
    // The test environment's variables must not leak into what is checked.
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTPOST_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn help_describes_the_binary() {
    let out = edge()
        .arg("--help")
        .output()
        .expect("run outpost-edge --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("edge agent"),
        "--help says what outpost-edge is: {text}"
    );
    assert!(text.contains("Usage: outpost-edge"), "{text}");
    let out = edge().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--data-dir",
        "--containerd-socket",
        "--backoff-base-ms",
    ] {
        assert!(text.contains(flag), "{flag} in {text}");
    }
    assert!(text.contains("[default: /var/lib/outpost]"), "{text}");
}

#[test]
fn join_explains_itself_and_refuses_a_bad_cloud_address() {
    let out = edge().args(["join", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--token", "--cloud", "--data-dir"] {
        assert!(text.contains(flag), "{flag} in {text}");
    }
    let dir = std::env::temp_dir().join(unique_name("edge-join"));
    let out = edge()
        .args(["join", "--token", "abcd1234.x", "--cloud", "not-an-address"])
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cloud") && err.contains("not-an-address"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn file_then_environment_then_flags() {
    let dir = std::env::temp_dir().join(unique_name("edge-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("edge.toml");
    std::fs::write(
        &file,
        "node_name = \"from-file\"\nheartbeat_s = 3\ndata_dir = \"/from/file\"\nbackoff_base_ms = 100\n",
    )
    .unwrap();
    let out = edge()
        .args(["config", "--config"])
        .arg(&file)
        .env("OUTPOST_HEARTBEAT_S", "7")
        .env("OUTPOST_DATA_DIR", "/from/env")
        .args(["--data-dir", "/from/flag"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let config: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(config["node_name"].as_str(), Some("from-file"));
    assert_eq!(config["heartbeat_s"].as_integer(), Some(7), "env over file");
    assert_eq!(
        config["data_dir"].as_str(),
        Some("/from/flag"),
        "flag over env"
    );
    assert_eq!(config["backoff_base_ms"].as_integer(), Some(100));
    assert_eq!(
        config["backoff_max_ms"].as_integer(),
        Some(300_000),
        "default"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(unique_name("edge-config"));
    std::fs::create_dir_all(&dir).unwrap();
    for (body, expect) in [
        ("heartbeat = 3\n", "heartbeat"),
        ("heartbeat_s = \"often\"\n", "heartbeat_s"),
        ("node_name = [\n", "edge.toml"),
    ] {
        let file = dir.join("edge.toml");
        std::fs::write(&file, body).unwrap();
        let out = edge()
            .arg("run")
            .arg("--config")
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect) && !err.contains("panicked"), "{err}");
    }
    let out = edge()
        .args(["run", "--config", "/no/such/edge.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/edge.toml"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_pods_from_the_replica_heartbeats_and_stops_on_sigterm() {
    let node = unique_name("bin");
    let dir = std::env::temp_dir().join("outpost-edge-tests").join(&node);
    let socket = std::path::PathBuf::from(env("OUTPOST_CONTAINERD_SOCK"));
    let _cleanup = Cleanup {
        socket: socket.clone(),
        node: node.clone(),
        dir: dir.clone(),
    };
    // A pod already in the replica (as after an offline reboot).
    let spec = pod("bin", "exec sleep 600");
    let spec_id = DocId::new(
        DocKind::PodSpec,
        Owner::Node(&node),
        &[&spec.namespace, &spec.name, &spec.uid],
    )
    .unwrap();
    {
        let mut replica = open_replica(&dir).unwrap();
        replica.put(&spec_id, &spec, 1).unwrap();
    }
    let mut child = edge()
        .arg("run")
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "--node-name",
            &node,
            "--heartbeat-s",
            "1",
            "--sync-interval-ms",
            "300",
        ])
        .arg("--containerd-socket")
        .arg(&socket)
        .args(["--pause-image", &env("OUTPOST_PAUSE_IMAGE")])
        .arg("--pod-log-dir")
        .arg(dir.join("logs"))
        .args(["--api-listen", "127.0.0.1:0", "--mqtt", "off"])
        .spawn()
        .unwrap();

    let cri = CriClient::connect(&socket).await.unwrap();
    let mut running = false;
    for _ in 0..100 {
        let mut runtime = cri.runtime.clone();
        let list = runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    label_selector: [
                        (LABEL_NODE.to_owned(), node.clone()),
                        (LABEL_POD_UID.to_owned(), spec.uid.clone()),
                    ]
                    .into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .containers;
        if list
            .iter()
            .any(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(running, "the pod's container runs");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The local API, its metrics and `outpost-edge status`, with no cloud.
    let api: std::net::SocketAddr = std::fs::read_to_string(dir.join("api-addr"))
        .unwrap()
        .parse()
        .unwrap();
    let pods = http_get(api, "/api/v1/pods").await;
    assert!(
        pods.contains("\"kind\":\"PodList\"") && pods.contains("\"name\":\"bin\""),
        "{pods}"
    );
    let metrics = http_get(api, "/metrics").await;
    for line in [
        "outpost_edge_pods{phase=\"Running\"} 1",
        "outpost_edge_devices{state=\"online\"} 0",
        "outpost_sync_connected_peers 0",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let watch = http_get_first_line(api, "/api/v1/pods?watch=true").await;
    assert!(
        watch.starts_with("{\"object\"") || watch.contains("\"type\":\"ADDED\""),
        "{watch}"
    );
    let out = edge()
        .arg("status")
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("node {node}")), "{text}");
    assert!(text.contains("no cloud configured"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("bin") && l.contains("Running") && l.contains("1/1")),
        "{text}"
    );
    assert!(text.contains("DEVICE"), "{text}");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(exited.expect("exits on SIGTERM").success());

    let mut replica = open_replica(&dir).unwrap();
    let node_status: NodeStatusDoc = replica
        .get(&DocId::new(DocKind::NodeStatus, Owner::Node(&node), &[]).unwrap())
        .unwrap()
        .expect("a heartbeat");
    let ready = node_status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .unwrap();
    assert_eq!(ready.status, "True", "{node_status:#?}");
    assert!(
        node_status
            .node_info
            .container_runtime_version
            .starts_with("containerd://"),
        "{node_status:#?}"
    );
    assert!(node_status.capacity.contains_key("cpu"));
    assert!(node_status.capacity.contains_key("memory"));
    assert!(node_status.heartbeat_ms > 0);
    let pod_status: PodStatusDoc = replica
        .get(
            &DocId::new(
                DocKind::PodStatus,
                Owner::Node(&node),
                &[&spec.namespace, &spec.name, &spec.uid],
            )
            .unwrap(),
        )
        .unwrap()
        .expect("pod status");
    assert_eq!(pod_status.phase, "Running", "{pod_status:#?}");
    // The containers outlive the agent.
    let mut runtime = cri.runtime.clone();
    let list = runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: [(LABEL_NODE.to_owned(), node.clone())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(
        list.iter()
            .any(|c| c.state == cri::ContainerState::ContainerRunning as i32)
    );
}

#[test]
fn the_shipped_example_config_is_valid() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge.toml");
    let out = edge()
        .args(["config", "--node-name", "n", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/outpost-edge.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/outpost-edge run --config /etc/outpost/edge.toml")
    );
}
