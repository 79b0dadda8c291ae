//! Smoke test of the test environment's Kubernetes control plane: the API
//! server answers `/readyz`, and a Pod can be created and read back through
//! kube-rs.

mod support;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use outpost_sync::test_utils::unique_name;
use support::client;

#[tokio::test]
async fn apiserver_is_ready_and_stores_a_pod() {
    let client = client().await;

    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .expect("request");
    let ready = client.request_text(request).await.expect("/readyz answers");
    assert_eq!(ready.trim(), "ok");

    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37")
    );

    let ns_name = unique_name("smoke");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns_name}
    }))
    .expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "smoke", "labels": {"app": "smoke"}},
        "spec": {
            // Bound to a node that does not exist, so that nothing tries to run it.
            "nodeName": "outpost-smoke-nowhere",
            "containers": [{"name": "main", "image": "docker.io/outpost/busybox:1", "command": ["sleep", "1"]}]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let read = pods.get("smoke").await.expect("read pod back");
    let spec = read.spec.expect("spec");
    assert_eq!(spec.node_name.as_deref(), Some("outpost-smoke-nowhere"));
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("docker.io/outpost/busybox:1")
    );
    assert!(read.metadata.uid.is_some());

    namespaces
        .delete(&ns_name, &DeleteParams::default())
        .await
        .expect("delete namespace");
}
