//! Typed schemas: Kubernetes-shaped JSON reads into them, every kind writes
//! and reads back, unchanged values make no change, a wrong kind is refused.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::collections::BTreeMap;

use outpost_sync::PeerId;
use outpost_sync::document::DocId;
use outpost_sync::replica::{Replica, ReplicaError, ReplicaOptions};
use outpost_sync::schema::*;
use serde_json::json;

fn replica(name: &str, me: u8) -> Replica {
    let d = std::env::temp_dir().join(format!("outpost-schema-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    Replica::open(&d, PeerId([me; 32]), ReplicaOptions::default()).unwrap()
}

fn id(s: &str) -> DocId {
    s.parse().unwrap()
}

#[test]
fn a_kubernetes_pod_spec_reads_into_the_pod_schema() {
    // A PodSpec as the API serves it, with fields Outpost does not replicate.
    let spec = json!({
        "namespace": "default", "name": "web", "uid": "u-1",
        "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
        "restartPolicy": "OnFailure",
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "app", "image": "docker.io/outpost/busybox:1",
            "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c"], "args": ["sleep 3600"],
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "b"}}},
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "c", "optional": true}}},
                {"name": "POD", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
            ],
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "volumeMounts": [{"name": "conf", "mountPath": "/etc/app", "readOnly": true}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
            "readinessProbe": {"tcpSocket": {"port": 8080}},
            "startupProbe": {"exec": {"command": ["true"]}, "failureThreshold": 30},
            "terminationMessagePath": "/dev/termination-log"
        }],
        "volumes": [
            {"name": "conf", "configMap": {"name": "cfg", "items": [{"key": "b", "path": "b.txt"}]}},
            {"name": "creds", "secret": {"secretName": "sec", "defaultMode": 420}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "host", "hostPath": {"path": "/var/log", "type": "Directory"}}
        ]
    });
    let pod: PodSpecDoc = serde_json::from_value(spec).unwrap();
    assert_eq!(pod.restart_policy, RestartPolicy::OnFailure);
    let c = &pod.containers[0];
    assert_eq!(c.env.len(), 4);
    assert_eq!(
        c.env[1]
            .value_from
            .as_ref()
            .unwrap()
            .config_map_key_ref
            .as_ref()
            .unwrap()
            .key,
        "b"
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .port,
        PortRef::Name("http".into())
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        PortRef::Number(8080)
    );
    assert_eq!(
        pod.volumes[1].secret.as_ref().unwrap().default_mode,
        Some(420)
    );
    assert_eq!(
        pod.volumes[3].host_path.as_ref().unwrap().kind.as_deref(),
        Some("Directory")
    );
}

#[test]
fn every_kind_writes_and_reads_back_and_an_unchanged_value_makes_no_change() {
    let mut r = replica("roundtrip", 1);
    let pod = PodSpecDoc {
        namespace: "default".into(),
        name: "web".into(),
        uid: "u-1".into(),
        containers: vec![Container {
            name: "app".into(),
            image: "busybox".into(),
            ..Container::default()
        }],
        ..PodSpecDoc::default()
    };
    let status = PodStatusDoc {
        uid: "u-1".into(),
        phase: "Running".into(),
        container_statuses: vec![ContainerStatus {
            name: "app".into(),
            ready: true,
            restart_count: 2,
            state: ContainerState {
                running: Some(StateRunning {
                    started_at: Some("2026-11-25T10:00:00Z".into()),
                }),
                ..ContainerState::default()
            },
            image: "busybox".into(),
            ..ContainerStatus::default()
        }],
        ..PodStatusDoc::default()
    };
    let node = NodeStatusDoc {
        heartbeat_ms: 42,
        capacity: BTreeMap::from([("cpu".into(), "2".into())]),
        ..NodeStatusDoc::default()
    };
    let cm = ConfigMapDoc {
        namespace: "default".into(),
        name: "cfg".into(),
        data: BTreeMap::from([("b".into(), "x".into())]),
        ..ConfigMapDoc::default()
    };
    let secret = SecretDoc {
        namespace: "default".into(),
        name: "sec".into(),
        kind: Some("Opaque".into()),
        data: BTreeMap::from([("c".into(), "eA==".into())]),
    };
    let model = DeviceModelDoc {
        namespace: "default".into(),
        name: "thermo".into(),
        protocol: "modbus".into(),
        properties: vec![ModelProperty {
            name: "temp".into(),
            kind: "INT".into(),
            minimum: Some("1".into()),
            maximum: Some("100".into()),
            ..ModelProperty::default()
        }],
    };
    let desired = DeviceDesiredDoc {
        namespace: "default".into(),
        name: "thermo-1".into(),
        model: "thermo".into(),
        protocol: ProtocolConfig {
            protocol_name: "modbus".into(),
            config_data: json!({"ip": "127.0.0.1", "port": 1502, "scale": 0.5}),
        },
        properties: vec![DeviceProperty {
            name: "temp".into(),
            collect_cycle: Some(1_000_000_000),
            ..DeviceProperty::default()
        }],
        ..DeviceDesiredDoc::default()
    };
    let reported = DeviceReportedDoc {
        state: "online".into(),
        last_online_ms: Some(7),
        error: None,
        unservable: false,
        twins: BTreeMap::from([(
            "temp".into(),
            ReportedValue {
                value: "21".into(),
                timestamp_ms: 7,
                kind: Some("INT".into()),
                observed_desired: None,
            },
        )]),
    };
    macro_rules! roundtrip {
        ($doc:expr, $value:expr, $t:ty) => {{
            let doc = id($doc);
            assert!(r.put(&doc, &$value, 1).unwrap().is_some());
            assert_eq!(r.get::<$t>(&doc).unwrap().unwrap(), $value);
            assert!(
                r.put(&doc, &$value, 2).unwrap().is_none(),
                "{} changed",
                $doc
            );
        }};
    }
    roundtrip!("pod-spec/edge-1/default/web/u-1", pod, PodSpecDoc);
    roundtrip!("pod-status/edge-1/default/web/u-1", status, PodStatusDoc);
    roundtrip!("node-status/edge-1", node, NodeStatusDoc);
    roundtrip!("configmap/edge-1/default/cfg", cm, ConfigMapDoc);
    roundtrip!("secret/edge-1/default/sec", secret, SecretDoc);
    roundtrip!("device-model/edge-1/default/thermo", model, DeviceModelDoc);
    roundtrip!(
        "device-desired/edge-1/default/thermo-1",
        desired,
        DeviceDesiredDoc
    );
    roundtrip!(
        "device-reported/edge-1/default/thermo-1",
        reported,
        DeviceReportedDoc
    );

    // Dropping an optional field removes it from the document.
    let doc = id("device-reported/edge-1/default/thermo-1");
    let mut less = reported.clone();
    less.last_online_ms = None;
    r.put(&doc, &less, 3).unwrap();
    assert_eq!(r.get::<DeviceReportedDoc>(&doc).unwrap().unwrap(), less);
}

#[test]
fn a_document_of_another_kind_is_refused() {
    let mut r = replica("kind", 1);
    let doc = id("pod-status/edge-1/default/web/u-1");
    let err = r.put(&doc, &PodSpecDoc::default(), 1).unwrap_err();
    assert!(matches!(err, ReplicaError::WrongKind { .. }), "{err}");
    assert!(err.to_string().contains("pod-status"), "{err}");
    assert!(r.get::<PodSpecDoc>(&doc).is_err());
    assert!(r.read_json(&doc).unwrap().is_none(), "nothing was written");
}

#[test]
fn a_config_write_keeps_a_concurrent_desired_value_of_the_other_writer() {
    use outpost_sync::desired::{resolve, set_desired};
    let mut cloud = replica("cfg-cloud", 1);
    let mut edge = replica("cfg-edge", 2);
    let doc = id("device-desired/edge-1/default/thermo-1");
    let mut cfg = DeviceDesiredDoc {
        namespace: "default".into(),
        name: "thermo-1".into(),
        ..DeviceDesiredDoc::default()
    };
    cloud.put(&doc, &cfg, 1).unwrap();
    let sync = |from: &mut Replica, to: &mut Replica| {
        let e = to.entry(&doc).unwrap().unwrap_or_default();
        let (g, changes) = from.changes_for(&doc, e.generation, &e.heads, &[]).unwrap();
        to.apply(&doc, g, &changes).unwrap();
    };
    sync(&mut cloud, &mut edge);
    // Concurrently: the edge sets a desired value, the cloud changes the
    // config (read-modify-write of its own view).
    set_desired(&mut edge, &doc, "temp", "30", 10).unwrap();
    cfg = cloud.get(&doc).unwrap().unwrap();
    cfg.model = "thermo-v2".into();
    cloud.put(&doc, &cfg, 11).unwrap();
    sync(&mut cloud, &mut edge);
    sync(&mut edge, &mut cloud);
    let merged: DeviceDesiredDoc = cloud.get(&doc).unwrap().unwrap();
    assert_eq!(merged.model, "thermo-v2");
    let values = resolve(&cloud.read_json(&doc).unwrap().unwrap());
    assert_eq!(values["temp"].winner.value, "30");
    assert_eq!(
        cloud.read_json(&doc).unwrap(),
        edge.read_json(&doc).unwrap()
    );
}

#[test]
fn status_schemas_use_the_apis_json_names() {
    // As the API serves them: `podIP`, `imageID`, `machineID`...
    let status: PodStatusDoc = serde_json::from_value(json!({
        "uid": "u", "phase": "Running", "podIP": "10.244.77.5", "hostIP": "127.0.0.1",
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "state": {},
            "image": "busybox", "imageID": "sha256:abc", "containerID": "containerd://1"}]
    }))
    .unwrap();
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.77.5"));
    assert_eq!(
        status.container_statuses[0].image_id.as_deref(),
        Some("sha256:abc")
    );
    let info: NodeInfo =
        serde_json::from_value(json!({"machineID": "m", "bootID": "b", "kubeletVersion": "v"}))
            .unwrap();
    assert_eq!(
        (info.machine_id.as_str(), info.boot_id.as_str()),
        ("m", "b")
    );
    let back = serde_json::to_value(&status).unwrap();
    assert_eq!(back["podIP"], "10.244.77.5");
    assert_eq!(
        back["containerStatuses"][0]["containerID"],
        "containerd://1"
    );
}
