//! The pod manager against the test environment's containerd: pods written
//! into the edge's replica run with their environment and volumes, crash
//! and restart under their policy with back-off, are probed, report clear
//! reasons when they cannot run, and are stopped and removed on deletion.

#![allow(clippy::unwrap_used)]

#[path = "support/edge.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use k8s_cri::v1 as cri;
use outpost_edge_node::cri::CriClient;
use outpost_edge_node::pods::{LABEL_MANAGED, LABEL_NODE, LABEL_POD_UID};
use outpost_sync::document::DocKind;
use outpost_sync::schema::{
    ConfigMapDoc, ConfigMapVolume, Container, ContainerPort, Deletion, EnvFromSource, EnvVar,
    EnvVarSource, ExecAction, FieldRef, HttpGetAction, KeyRef, NameRef, PodSpecDoc, PortRef, Probe,
    RestartPolicy, SecretDoc, SecretVolume, TcpSocketAction, Volume, VolumeMount,
};
use support::{Edge, all_running, image, pod};

async fn exec(cri: &CriClient, container_id: &str, cmd: &[&str]) -> (i32, String) {
    let mut runtime = cri.runtime.clone();
    let reply = runtime
        .exec_sync(cri::ExecSyncRequest {
            container_id: container_id.trim_start_matches("containerd://").to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 5,
        })
        .await
        .unwrap()
        .into_inner();
    (
        reply.exit_code,
        String::from_utf8_lossy(&reply.stdout).into_owned(),
    )
}

async fn sandboxes(cri: &CriClient, node: &str) -> Vec<cri::PodSandbox> {
    let mut runtime = cri.runtime.clone();
    runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: [(LABEL_NODE.to_owned(), node.to_owned())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_gets_env_and_volumes_from_configmaps_and_secrets_then_is_deleted() {
    let edge = Edge::start("env").await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    edge.put(
        DocKind::ConfigMap,
        &["default", "app"],
        &ConfigMapDoc {
            namespace: "default".into(),
            name: "app".into(),
            data: [
                ("mode".to_owned(), "fast".to_owned()),
                ("app.conf".to_owned(), "level=1\n".to_owned()),
            ]
            .into(),
            binary_data: BTreeMap::new(),
        },
    );
    edge.put(
        DocKind::Secret,
        &["default", "creds"],
        &SecretDoc {
            namespace: "default".into(),
            name: "creds".into(),
            kind: Some("Opaque".into()),
            data: [("password".to_owned(), b64("s3cret"))].into(),
        },
    );
    let mut spec = pod("env", "exec sleep 600");
    let c = &mut spec.containers[0];
    c.args = vec![];
    c.command = vec![
        "sh".into(),
        "-c".into(),
        "echo started $(GREETING); exec sleep 600".into(),
    ];
    c.env = vec![
        EnvVar {
            name: "GREETING".into(),
            value: Some("hello".into()),
            value_from: None,
        },
        EnvVar {
            name: "PASSWORD".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(KeyRef {
                    name: "creds".into(),
                    key: "password".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        },
        EnvVar {
            name: "MODE".into(),
            value: None,
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(KeyRef {
                    name: "app".into(),
                    key: "mode".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
        },
        EnvVar {
            name: "POD_NAME".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(FieldRef {
                    field_path: "metadata.name".into(),
                }),
                ..Default::default()
            }),
        },
        EnvVar {
            name: "COMBINED".into(),
            value: Some("$(MODE)-$(POD_NAME)".into()),
            value_from: None,
        },
    ];
    c.env_from = vec![EnvFromSource {
        prefix: Some("CM_".into()),
        config_map_ref: Some(NameRef {
            name: "app".into(),
            optional: None,
        }),
        secret_ref: None,
    }];
    c.volume_mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: "/etc/app".into(),
            ..Default::default()
        },
        VolumeMount {
            name: "secret".into(),
            mount_path: "/etc/secret".into(),
            ..Default::default()
        },
        VolumeMount {
            name: "kube-api-access-x1".into(),
            mount_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    spec.volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolume {
                name: "app".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "secret".into(),
            secret: Some(SecretVolume {
                secret_name: "creds".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
        // What the API server's service account admission adds to every
        // pod, as the bridge projects it.
        serde_json::from_value(serde_json::json!({
            "name": "kube-api-access-x1",
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "app", "items": [{"key": "app.conf", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                ]
            }
        }))
        .unwrap(),
    ];
    edge.put_pod(&spec);

    let status = edge
        .wait_status(&spec, Duration::from_secs(20), "pod running", all_running)
        .await;
    assert!(
        status
            .pod_ip
            .as_deref()
            .unwrap_or_default()
            .starts_with("10.244."),
        "pod IP from CNI: {status:?}"
    );
    let cri = edge.cri().await;
    let id = status.container_statuses[0].container_id.clone().unwrap();
    let (_, env) = exec(&cri, &id, &["env"]).await;
    for want in [
        "GREETING=hello",
        "PASSWORD=s3cret",
        "MODE=fast",
        "POD_NAME=env",
        "COMBINED=fast-env",
        "CM_mode=fast",
    ] {
        assert!(env.lines().any(|l| l == want), "{want} in {env}");
    }
    let (_, conf) = exec(&cri, &id, &["cat", "/etc/app/app.conf"]).await;
    assert_eq!(conf, "level=1\n");
    let (_, password) = exec(&cri, &id, &["cat", "/etc/secret/password"]).await;
    assert_eq!(password, "s3cret");
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (_, namespace) = exec(&cri, &id, &["cat", &format!("{sa}/namespace")]).await;
    assert_eq!(namespace, "default");
    let (_, ca) = exec(&cri, &id, &["cat", &format!("{sa}/ca.crt")]).await;
    assert_eq!(ca, "level=1\n");
    let (code, _) = exec(&cri, &id, &["cat", &format!("{sa}/token")]).await;
    assert_ne!(code, 0, "no token at the edge");
    let (code, _) = exec(&cri, &id, &["touch", "/etc/app/x"]).await;
    assert_ne!(code, 0, "ConfigMap volumes are read-only");

    // Everything it created carries the labels to rebuild state from.
    let sbs = sandboxes(&cri, &edge.node).await;
    assert_eq!(sbs.len(), 1);
    assert_eq!(
        sbs[0].labels.get(LABEL_MANAGED).map(String::as_str),
        Some("true")
    );
    assert_eq!(sbs[0].labels.get(LABEL_POD_UID), Some(&spec.uid));

    // A changed ConfigMap reaches the running container's files.
    edge.put(
        DocKind::ConfigMap,
        &["default", "app"],
        &ConfigMapDoc {
            namespace: "default".into(),
            name: "app".into(),
            data: [
                ("mode".to_owned(), "fast".to_owned()),
                ("app.conf".to_owned(), "level=2\n".to_owned()),
            ]
            .into(),
            binary_data: BTreeMap::new(),
        },
    );
    let mut conf = String::new();
    for _ in 0..50 {
        conf = exec(&cri, &id, &["cat", "/etc/app/app.conf"]).await.1;
        if conf == "level=2\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(conf, "level=2\n", "updated ConfigMap file");

    // Deletion: stopped, removed, then reported.
    spec.deletion = Some(Deletion {
        requested_at: "2026-01-01T00:00:00Z".into(),
        grace_period_seconds: 1,
    });
    edge.put_pod(&spec);
    let status = edge
        .wait_status(&spec, Duration::from_secs(20), "terminated", |s| {
            s.terminated
        })
        .await;
    assert!(
        status.container_statuses[0].state.terminated.is_some(),
        "{status:?}"
    );
    assert!(
        sandboxes(&cri, &edge.node).await.is_empty(),
        "sandbox removed before terminated was reported"
    );
    // The cloud deletes the spec once the pod left the API: the edge then
    // deletes the status, and nothing of the pod stays in the replica.
    let spec_id = edge.id(DocKind::PodSpec, &[&spec.namespace, &spec.name, &spec.uid]);
    let status_id = edge.id(
        DocKind::PodStatus,
        &[&spec.namespace, &spec.name, &spec.uid],
    );
    edge.engine().delete(&spec_id).unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if edge
            .engine()
            .with_replica(|r| r.is_deleted(&status_id))
            .unwrap()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the status document of a forgotten pod is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_containers_restart_under_their_policy_with_backoff() {
    let edge = Edge::start("crash").await;
    let mut always = pod("always", "sleep 0.2; exit 3");
    always.restart_policy = RestartPolicy::Always;
    let mut on_failure_ok = pod("onfailure", "exit 0");
    on_failure_ok.restart_policy = RestartPolicy::OnFailure;
    let mut never = pod("never", "exit 1");
    never.restart_policy = RestartPolicy::Never;
    for p in [&always, &on_failure_ok, &never] {
        edge.put_pod(p);
    }
    let t0 = tokio::time::Instant::now();
    let mut saw_backoff = false;
    let mut restarts_at = Vec::new();
    let mut last = 0;
    let deadline = t0 + Duration::from_secs(30);
    while last < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:#?}",
            edge.status(&always)
        );
        if let Some(s) = edge.status(&always) {
            let c = &s.container_statuses[0];
            if c.state.waiting.as_ref().and_then(|w| w.reason.as_deref())
                == Some("CrashLoopBackOff")
            {
                saw_backoff = true;
            }
            if c.restart_count > last {
                last = c.restart_count;
                restarts_at.push(t0.elapsed());
                let term = c.last_state.as_ref().and_then(|l| l.terminated.as_ref());
                assert_eq!(term.map(|t| t.exit_code), Some(3), "{c:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_backoff, "CrashLoopBackOff reported while waiting");
    // Back-off 0, 0.5, 1, 2 s between restarts (plus the 0.2 s run): the
    // fourth restart comes at least 3.5 s after the first.
    let spread = restarts_at[3] - restarts_at[0];
    assert!(
        spread >= Duration::from_millis(3300),
        "restarts at {restarts_at:?}"
    );
    eprintln!("restarts observed at {restarts_at:?}");

    let s = edge
        .wait_status(&on_failure_ok, Duration::from_secs(10), "succeeded", |s| {
            s.phase == "Succeeded"
        })
        .await;
    assert_eq!(s.container_statuses[0].restart_count, 0);
    let s = edge
        .wait_status(&never, Duration::from_secs(10), "failed", |s| {
            s.phase == "Failed"
        })
        .await;
    assert_eq!(
        s.container_statuses[0]
            .state
            .terminated
            .as_ref()
            .map(|t| t.exit_code),
        Some(1)
    );
    assert_eq!(s.container_statuses[0].restart_count, 0);
}

fn probe(kind: &str, port: i32, cmd: &[&str]) -> Probe {
    Probe {
        exec: (kind == "exec").then(|| ExecAction {
            command: cmd.iter().map(|s| s.to_string()).collect(),
        }),
        http_get: (kind == "http").then(|| HttpGetAction {
            path: Some("/".into()),
            port: PortRef::Number(port),
            host: None,
            scheme: None,
        }),
        tcp_socket: (kind == "tcp").then(|| TcpSocketAction {
            port: PortRef::Name("listener".into()),
            host: None,
        }),
        period_seconds: Some(1),
        failure_threshold: Some(1),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_over_exec_http_and_tcp_set_readiness_and_restart_unhealthy_containers() {
    let edge = Edge::start("probe").await;
    let mut spec = pod("probes", "");
    let container = |name: &str, script: &str| Container {
        name: name.into(),
        image: image(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let mut web = container(
        "web",
        "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www",
    );
    web.readiness_probe = Some(probe("http", 8080, &[]));
    let mut tcp = container("tcp", "exec nc -ll -p 9000 -e true");
    tcp.ports = vec![ContainerPort {
        name: Some("listener".into()),
        container_port: 9000,
        protocol: None,
    }];
    tcp.readiness_probe = Some(probe("tcp", 0, &[]));
    let mut live = container(
        "live",
        "touch /tmp/healthy; sleep 2; rm /tmp/healthy; exec sleep 600",
    );
    live.liveness_probe = Some(probe("exec", 0, &["cat", "/tmp/healthy"]));
    let mut unready = container("unready", "exec sleep 600");
    unready.readiness_probe = Some(probe("exec", 0, &["false"]));
    spec.containers = vec![web, tcp, live, unready];
    edge.put_pod(&spec);

    let by_name = |s: &outpost_sync::schema::PodStatusDoc, n: &str| {
        s.container_statuses
            .iter()
            .find(|c| c.name == n)
            .cloned()
            .unwrap()
    };
    let status = edge
        .wait_status(&spec, Duration::from_secs(30), "http and tcp ready", |s| {
            s.container_statuses.len() == 4 && by_name(s, "web").ready && by_name(s, "tcp").ready
        })
        .await;
    assert!(!by_name(&status, "unready").ready, "{status:#?}");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False", "a container is not ready");

    let status = edge
        .wait_status(&spec, Duration::from_secs(30), "liveness restart", |s| {
            let c = by_name(s, "live");
            c.restart_count >= 1 && c.state.running.is_some()
        })
        .await;
    assert_eq!(by_name(&status, "web").restart_count, 0);
    assert!(by_name(&status, "web").ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_cannot_run_get_clear_reasons_and_the_others_run() {
    let edge = Edge::start("bad").await;
    let mut bad_command = pod("badcmd", "");
    bad_command.containers[0].command = vec!["/no/such/binary".into()];
    let mut missing_config = pod("nocm", "exec sleep 600");
    missing_config.containers[0].env = vec![EnvVar {
        name: "X".into(),
        value: None,
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(KeyRef {
                name: "absent".into(),
                key: "k".into(),
                optional: None,
            }),
            ..Default::default()
        }),
    }];
    let mut missing_image = pod("noimage", "exec sleep 600");
    missing_image.containers[0].image = "docker.io/outpost/does-not-exist:1".into();
    let good = pod("good", "exec sleep 600");
    for p in [&bad_command, &missing_config, &missing_image, &good] {
        edge.put_pod(p);
    }
    // A pod spec that does not parse: reported, nothing panics.
    let bad_id = edge.id(DocKind::PodSpec, &["default", "garbled", "uid-garbled"]);
    edge.engine()
        .write_json(&bad_id, &serde_json::json!({"containers": "not a list"}))
        .unwrap();

    edge.wait_status(&good, Duration::from_secs(20), "good pod runs", all_running)
        .await;
    let reason = |s: &outpost_sync::schema::PodStatusDoc| {
        let c = &s.container_statuses[0];
        c.state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.clone())
            .unwrap_or_default()
    };
    let s = edge
        .wait_status(
            &missing_config,
            Duration::from_secs(20),
            "config error",
            |s| !s.container_statuses.is_empty() && reason(s) == "CreateContainerConfigError",
        )
        .await;
    let message = s.container_statuses[0]
        .state
        .waiting
        .clone()
        .unwrap()
        .message
        .unwrap();
    assert!(message.contains("absent"), "{message}");
    edge.wait_status(
        &missing_image,
        Duration::from_secs(60),
        "image error",
        |s| !s.container_statuses.is_empty() && reason(s) == "ErrImagePull",
    )
    .await;
    let s = edge
        .wait_status(&bad_command, Duration::from_secs(20), "start error", |s| {
            !s.container_statuses.is_empty()
                && s.container_statuses[0].state.running.is_none()
                && (reason(s) == "CrashLoopBackOff" || reason(s) == "RunContainerError")
        })
        .await;
    eprintln!("bad command: {:?}", s.container_statuses[0]);
    let garbled = edge.id(DocKind::PodStatus, &["default", "garbled", "uid-garbled"]);
    let status = edge
        .engine()
        .with_replica(|r| r.get::<outpost_sync::schema::PodStatusDoc>(&garbled))
        .unwrap()
        .expect("a status for the unreadable spec");
    assert_eq!(status.reason.as_deref(), Some("InvalidPodSpec"));
    // The stored spec is left as it was.
    assert!(edge.engine().read_json(&bad_id).unwrap().is_some());
    let _ = PodSpecDoc::default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_containers_run_in_order_before_the_app_and_a_failed_one_fails_the_pod() {
    let edge = Edge::start("init").await;
    let shared = |name: &str, script: &str| Container {
        name: name.into(),
        image: image(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        volume_mounts: vec![VolumeMount {
            name: "work".into(),
            mount_path: "/work".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut spec = pod("init", "");
    spec.volumes = vec![Volume {
        name: "work".into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }];
    spec.init_containers = vec![
        shared("first", "sleep 0.5; echo one > /work/log"),
        shared("second", "test -f /work/log && echo two >> /work/log"),
    ];
    spec.containers = vec![shared("app", "cat /work/log; exec sleep 600")];
    edge.put_pod(&spec);
    let s = edge
        .wait_status(&spec, Duration::from_secs(20), "initializing", |s| {
            s.phase == "Pending"
                && s.conditions
                    .iter()
                    .any(|c| c.kind == "Initialized" && c.status == "False")
        })
        .await;
    assert_eq!(
        s.container_statuses[0]
            .state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.as_deref()),
        Some("PodInitializing"),
        "{s:#?}"
    );
    let s = edge
        .wait_status(&spec, Duration::from_secs(20), "app runs", all_running)
        .await;
    let cri = edge.cri().await;
    let (_, log) = exec(
        &cri,
        &s.container_statuses[0].container_id.clone().unwrap(),
        &["cat", "/work/log"],
    )
    .await;
    assert_eq!(log, "one\ntwo\n", "both init containers ran, in order");

    let mut failing = pod("initfail", "exec sleep 600");
    failing.restart_policy = RestartPolicy::Never;
    failing.init_containers = vec![Container {
        name: "check".into(),
        image: image(),
        command: vec!["sh".into(), "-c".into(), "exit 2".into()],
        ..Default::default()
    }];
    edge.put_pod(&failing);
    let s = edge
        .wait_status(&failing, Duration::from_secs(20), "failed", |s| {
            s.phase == "Failed"
        })
        .await;
    let init = s
        .conditions
        .iter()
        .find(|c| c.kind == "Initialized")
        .unwrap();
    assert_eq!(init.reason.as_deref(), Some("Init:Error"), "{s:#?}");
    assert!(s.container_statuses[0].state.running.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pods_run_in_the_node_network_namespace() {
    let edge = Edge::start("hostnet").await;
    let mut spec = pod("hostnet", "exec sleep 600");
    spec.host_network = true;
    edge.put_pod(&spec);
    let s = edge
        .wait_status(&spec, Duration::from_secs(20), "runs", all_running)
        .await;
    assert_eq!(s.pod_ip.as_deref(), Some("127.0.0.1"), "the node's IP");
    let cri = edge.cri().await;
    let id = s.container_statuses[0].container_id.clone().unwrap();
    let (_, links) = exec(&cri, &id, &["cat", "/proc/net/dev"]).await;
    assert!(
        links.contains("outpost0"),
        "sees the node's interfaces: {links}"
    );
}
