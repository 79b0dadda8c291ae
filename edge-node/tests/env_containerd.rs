//! Smoke test of the test environment's containerd: through the CRI v1 API a
//! pod sandbox (with its own network namespace from CNI) and a busybox
//! container start, run, log, stop and are removed.

use std::time::Duration;

use k8s_cri::v1 as cri;
use outpost_edge_node::cri::CriClient;
use outpost_sync::test_utils::{env_value, unique_name};

#[tokio::test]
async fn container_starts_and_stops_through_cri() {
    let socket = env_value("OUTPOST_CONTAINERD_SOCK").expect("test environment");
    let image = env_value("OUTPOST_IMAGE").expect("test environment");
    let log_root = env_value("OUTPOST_POD_LOG_DIR").expect("test environment");
    let mut cri = CriClient::connect(&socket)
        .await
        .expect("connect to containerd");

    let version = cri
        .runtime
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .expect("version")
        .into_inner();
    assert_eq!(version.runtime_api_version, "v1");

    let status = cri
        .runtime
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner();
    let conditions = status.status.expect("runtime status").conditions;
    assert!(
        conditions.iter().all(|c| c.status),
        "runtime and network ready: {conditions:?}"
    );

    let name = unique_name("smoke");
    let log_directory = format!("{log_root}/{name}");
    let sandbox_config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: name.clone(),
            namespace: "outpost-smoke".into(),
            attempt: 0,
        }),
        log_directory: log_directory.clone(),
        labels: [("outpost.io/test".to_owned(), "smoke".to_owned())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sandbox_id = cri
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("run pod sandbox")
        .into_inner()
        .pod_sandbox_id;

    let sandbox = cri
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.clone(),
            verbose: false,
        })
        .await
        .expect("sandbox status")
        .into_inner()
        .status
        .expect("sandbox status body");
    let ip = sandbox.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        ip.starts_with("10.244."),
        "pod got an address from CNI: {ip:?}"
    );

    let container_id = cri
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "main".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo hello-from-outpost; exec sleep 30".into(),
                ],
                log_path: "main/0.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .expect("create container")
        .into_inner()
        .container_id;
    cri.runtime
        .start_container(cri::StartContainerRequest {
            container_id: container_id.clone(),
        })
        .await
        .expect("start container");

    let running = cri::ContainerState::ContainerRunning as i32;
    let mut state = -1;
    for _ in 0..50 {
        state = cri
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: container_id.clone(),
                verbose: false,
            })
            .await
            .expect("container status")
            .into_inner()
            .status
            .expect("status body")
            .state;
        if state == running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, running, "container reached RUNNING");

    let log_path = format!("{log_directory}/main/0.log");
    let mut log = String::new();
    for _ in 0..50 {
        log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("hello-from-outpost") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log.contains(" stdout F hello-from-outpost"),
        "CRI log line in {log_path}: {log:?}"
    );

    cri.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: container_id.clone(),
            timeout: 2,
        })
        .await
        .expect("stop container");
    let exited = cri
        .runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: container_id.clone(),
            verbose: false,
        })
        .await
        .expect("container status")
        .into_inner()
        .status
        .expect("status body");
    assert_eq!(exited.state, cri::ContainerState::ContainerExited as i32);

    cri.runtime
        .remove_container(cri::RemoveContainerRequest { container_id })
        .await
        .expect("remove container");
    cri.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        })
        .await
        .expect("stop sandbox");
    cri.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: sandbox_id.clone(),
        })
        .await
        .expect("remove sandbox");
    let left = cri
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                id: sandbox_id,
                ..Default::default()
            }),
        })
        .await
        .expect("list sandboxes")
        .into_inner()
        .items;
    assert!(left.is_empty(), "sandbox removed");
}
