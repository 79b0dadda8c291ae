//! The bridge's manifests in `deploy/`: accepted by the API server of
//! `scripts/env up` (a server-side dry run, so admission and schema
//! validation run and nothing is created), the RBAC of
//! `deploy/cloud-bridge.yaml` the same as `deploy/cloud-rbac.yaml`'s, and
//! every flag the workload passes known to `outpost-cloud run`.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::process::Command;

use outpost_sync::test_utils::env_value;
use serde_json::Value;

const KUBECTL: &str = "/var/cache/outpost/bin/kubectl";

fn deploy(file: &str) -> String {
    format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn the_bridge_manifests_pass_a_server_side_dry_run() {
    let out = Command::new(KUBECTL)
        .args(["apply", "--dry-run=server", "-f"])
        .arg(deploy("cloud-bridge.yaml"))
        .arg("-f")
        .arg(deploy("crds.yaml"))
        .env(
            "KUBECONFIG",
            env_value("KUBECONFIG").expect("test environment"),
        )
        .output()
        .expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server failed:\n{stdout}\n{stderr}"
    );
    for object in [
        "namespace/outpost-system",
        "serviceaccount/outpost-cloud",
        "clusterrole.rbac.authorization.k8s.io/outpost-cloud",
        "statefulset.apps/outpost-cloud",
        "customresourcedefinition.apiextensions.k8s.io/devices.devices.kubeedge.io",
    ] {
        assert!(stdout.contains(object), "{object} missing:\n{stdout}");
    }
}

#[test]
fn the_bridge_manifest_repeats_the_rbac_unchanged() {
    let bridge = documents("cloud-bridge.yaml");
    for doc in documents("cloud-rbac.yaml") {
        assert!(
            bridge.contains(&doc),
            "deploy/cloud-bridge.yaml lacks or changed {} {}",
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    // The replicas' Leases are in the system namespace's Role.
    let role = bridge
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "outpost-system")
        .unwrap();
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"][0] == "leases"
                && r["verbs"].as_array().unwrap().contains(&"update".into())),
        "{role}"
    );
}

#[test]
fn every_flag_of_the_workload_is_known_to_outpost_cloud_run() {
    let bridge = documents("cloud-bridge.yaml");
    let set = bridge.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert_eq!(set["spec"]["replicas"], 2);
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    let help = Command::new(env!("CARGO_BIN_EXE_outpost-cloud"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(help.contains(flag), "{flag} is not a flag of run:\n{help}");
    }
    let data_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--data-dir="))
        .unwrap();
    assert!(
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == data_dir),
        "the data dir is on the claimed volume"
    );
}
