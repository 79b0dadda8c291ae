//! Projections between Kubernetes objects and Outpost's documents, free of
//! I/O: what the bridge writes into documents for an object, and the
//! server-side-apply patches it sends for a document.
//!
//! Document schemas use Kubernetes' JSON field names where the data comes
//! from the API, so a `PodSpec` converts through `serde_json`; a few
//! edge-written fields differ in case (`podIp` for `podIP`), so the patches
//! going back are built field by field.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use outpost_sync::document::{DocId, DocIdError, DocKind, Owner};
use outpost_sync::schema::{
    Condition, ConfigMapDoc, Deletion, NodeStatusDoc, PodSpecDoc, PodStatusDoc, SecretDoc,
};
use serde_json::{Map, Value, json};

use crate::admission::{Admitted, PEER_KEY_ANNOTATION, SITE_ANNOTATION};

/// Label every edge Node carries (empty value), as KubeEdge sets it.
pub const EDGE_ROLE_LABEL: &str = "node-role.kubernetes.io/edge";
/// Label naming the bridge that manages a Node.
pub const MANAGED_BY_LABEL: &str = "outpost.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "outpost-cloud";
/// The namespace of node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Annotations never copied into pod-spec documents (large, and of no use
/// at the edge).
const SKIPPED_ANNOTATIONS: &[&str] = &["kubectl.kubernetes.io/last-applied-configuration"];

/// Why an object cannot be projected.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// The object lacks a field the projection needs.
    #[error("{object}: missing {field}")]
    Missing {
        /// The object, `<ns>/<name>`.
        object: String,
        /// The field.
        field: &'static str,
    },
    /// The object does not fit the document schema.
    #[error("{object}: cannot be projected to a document: {reason}")]
    Schema {
        /// The object.
        object: String,
        /// What did not fit.
        reason: String,
    },
    /// A name does not make a valid document id.
    #[error("{object}: {source}")]
    DocId {
        /// The object.
        object: String,
        /// Why the id is invalid.
        #[source]
        source: DocIdError,
    },
}

/// The Node the bridge applies for an admitted edge (metadata only; the
/// status goes through the status subresource).
pub fn node_object(edge: &Admitted) -> Value {
    let mut labels = Map::new();
    labels.insert(EDGE_ROLE_LABEL.into(), json!(""));
    labels.insert(MANAGED_BY_LABEL.into(), json!(MANAGED_BY));
    labels.insert("kubernetes.io/hostname".into(), json!(edge.node));
    let mut annotations = Map::new();
    annotations.insert(PEER_KEY_ANNOTATION.into(), json!(edge.key.to_string()));
    if let Some(site) = &edge.site {
        labels.insert(SITE_ANNOTATION.into(), json!(site));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": edge.node, "labels": labels, "annotations": annotations},
    })
}

/// A valid RFC 3339 time from a document, normalised; `None` for garbage
/// (the API would refuse the whole patch for one bad time).
fn time(s: Option<&str>) -> Option<String> {
    s.and_then(|s| s.parse::<Timestamp>().ok())
        .map(|t| t.to_string())
}

fn ms_time(ms: u64) -> Option<String> {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
}

fn condition(c: &Condition, heartbeat: Option<&str>) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), json!(c.kind));
    out.insert("status".into(), json!(c.status));
    if let Some(t) = time(c.last_transition_time.as_deref()) {
        out.insert("lastTransitionTime".into(), json!(t));
    }
    if let Some(t) = heartbeat {
        out.insert("lastHeartbeatTime".into(), json!(t));
    }
    if let Some(r) = &c.reason {
        out.insert("reason".into(), json!(r));
    }
    if let Some(m) = &c.message {
        out.insert("message".into(), json!(m));
    }
    Value::Object(out)
}

/// The Ready status a node-status document asks for (`True` when the edge
/// reports no Ready condition: its heartbeat says it is alive).
pub fn desired_ready(doc: &NodeStatusDoc) -> String {
    doc.conditions
        .iter()
        .find(|c| c.kind == "Ready")
        .map(|c| c.status.clone())
        .unwrap_or_else(|| "True".into())
}

/// The node status patch (server-side apply on `nodes/<name>/status`) for a
/// node-status document. With `heartbeat` false the conditions carry no
/// heartbeat time: that form serves to tell whether anything but the
/// heartbeat changed.
pub fn node_status_patch(node: &str, doc: &NodeStatusDoc, heartbeat: bool) -> Value {
    let hb = if heartbeat {
        ms_time(doc.heartbeat_ms)
    } else {
        None
    };
    let mut conditions: Vec<Value> = doc
        .conditions
        .iter()
        .map(|c| condition(c, hb.as_deref()))
        .collect();
    if !doc.conditions.iter().any(|c| c.kind == "Ready") {
        conditions.push(condition(
            &Condition {
                kind: "Ready".into(),
                status: "True".into(),
                reason: Some("EdgeHeartbeat".into()),
                message: Some("the Outpost edge agent is sending heartbeats".into()),
                last_transition_time: None,
            },
            hb.as_deref(),
        ));
    }
    let info = &doc.node_info;
    // An edge that reports no allocatable gives its pods all of its capacity.
    let allocatable = if doc.allocatable.is_empty() {
        &doc.capacity
    } else {
        &doc.allocatable
    };
    let addresses: Vec<Value> = doc
        .addresses
        .iter()
        .map(|a| json!({"type": a.kind, "address": a.address}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node},
        "status": {
            "conditions": conditions,
            "capacity": doc.capacity,
            "allocatable": allocatable,
            "addresses": addresses,
            "nodeInfo": {
                "machineID": info.machine_id,
                "systemUUID": "",
                "bootID": info.boot_id,
                "kernelVersion": info.kernel_version,
                "osImage": info.os_image,
                "containerRuntimeVersion": info.container_runtime_version,
                "kubeletVersion": info.kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": info.operating_system,
                "architecture": info.architecture,
            },
        },
    })
}

/// The node Lease patch (server-side apply in `kube-node-lease`), renewed at
/// `renew`, owned by the Node as the kubelet's Lease is.
pub fn lease_patch(node: &str, node_uid: Option<&str>, renew: Timestamp, duration_s: i32) -> Value {
    let mut metadata = json!({"name": node, "namespace": NODE_LEASE_NAMESPACE});
    if let Some(uid) = node_uid {
        metadata["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration_s,
            "renewTime": MicroTime(renew),
        },
    })
}

fn object_name(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// The pod-spec document id of a pod bound to `node`.
pub fn pod_spec_id(node: &str, ns: &str, name: &str, uid: &str) -> Result<DocId, DocIdError> {
    DocId::new(DocKind::PodSpec, Owner::Node(node), &[ns, name, uid])
}

/// The pod-status document id of a pod bound to `node`.
pub fn pod_status_id(node: &str, ns: &str, name: &str, uid: &str) -> Result<DocId, DocIdError> {
    DocId::new(DocKind::PodStatus, Owner::Node(node), &[ns, name, uid])
}

/// The node-status document id of `node`.
pub fn node_status_id(node: &str) -> Result<DocId, DocIdError> {
    DocId::new(DocKind::NodeStatus, Owner::Node(node), &[])
}

/// A pod's namespace, name, uid and node, if it is bound.
pub struct PodKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// The node it is bound to.
    pub node: String,
}

impl PodKey {
    /// The key of a bound pod; `None` for an unbound or nameless one.
    pub fn of(pod: &Pod) -> Option<Self> {
        Some(Self {
            namespace: pod.metadata.namespace.clone()?,
            name: pod.metadata.name.clone()?,
            uid: pod.metadata.uid.clone()?,
            node: pod.spec.as_ref()?.node_name.clone()?,
        })
    }

    /// Its pod-spec document.
    pub fn spec_doc(&self) -> Result<DocId, DocIdError> {
        pod_spec_id(&self.node, &self.namespace, &self.name, &self.uid)
    }

    /// Its pod-status document.
    pub fn status_doc(&self) -> Result<DocId, DocIdError> {
        pod_status_id(&self.node, &self.namespace, &self.name, &self.uid)
    }
}

/// The pod-spec document of a pod: its spec through `serde_json` (the
/// schema has the API's field names), plus identity and, when the pod is
/// being deleted, the deletion request.
pub fn pod_spec_doc(pod: &Pod) -> Result<PodSpecDoc, ProjectError> {
    let meta = &pod.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let object = object_name(&ns, &name);
    let missing = |field| ProjectError::Missing {
        object: object.clone(),
        field,
    };
    let uid = meta.uid.clone().ok_or_else(|| missing("metadata.uid"))?;
    let spec = pod.spec.as_ref().ok_or_else(|| missing("spec"))?;
    let schema = |reason: String| ProjectError::Schema {
        object: object.clone(),
        reason,
    };
    let mut value = serde_json::to_value(spec).map_err(|e| schema(e.to_string()))?;
    let fields = value
        .as_object_mut()
        .ok_or_else(|| schema("the spec is not an object".into()))?;
    fields.insert("namespace".into(), json!(ns));
    fields.insert("name".into(), json!(name));
    fields.insert("uid".into(), json!(uid));
    if let Some(labels) = &meta.labels {
        fields.insert("labels".into(), json!(labels));
    }
    if let Some(annotations) = &meta.annotations {
        let kept: std::collections::BTreeMap<_, _> = annotations
            .iter()
            .filter(|(k, _)| !SKIPPED_ANNOTATIONS.contains(&k.as_str()))
            .collect();
        fields.insert("annotations".into(), json!(kept));
    }
    let mut doc: PodSpecDoc = serde_json::from_value(value).map_err(|e| schema(e.to_string()))?;
    if let Some(at) = &meta.deletion_timestamp {
        doc.deletion = Some(Deletion {
            requested_at: at.0.to_string(),
            grace_period_seconds: meta
                .deletion_grace_period_seconds
                .or(spec.termination_grace_period_seconds)
                .unwrap_or(30),
        });
    }
    Ok(doc)
}

/// A ConfigMap or Secret a pod uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reference {
    /// A ConfigMap of the pod's namespace.
    ConfigMap(String),
    /// A Secret of the pod's namespace.
    Secret(String),
}

/// The ConfigMaps and Secrets a pod spec uses: volumes, `env[].valueFrom`
/// and `envFrom`, of every container and init container.
pub fn references(spec: &PodSpecDoc) -> BTreeSet<Reference> {
    let mut out = BTreeSet::new();
    for v in &spec.volumes {
        if let Some(cm) = &v.config_map {
            out.insert(Reference::ConfigMap(cm.name.clone()));
        }
        if let Some(s) = &v.secret {
            out.insert(Reference::Secret(s.secret_name.clone()));
        }
        for source in v.projected.iter().flat_map(|p| &p.sources) {
            if let Some(cm) = &source.config_map {
                out.insert(Reference::ConfigMap(cm.name.clone()));
            }
            if let Some(s) = &source.secret {
                out.insert(Reference::Secret(s.name.clone()));
            }
        }
    }
    for c in spec.containers.iter().chain(&spec.init_containers) {
        for e in &c.env {
            if let Some(from) = &e.value_from {
                if let Some(r) = &from.config_map_key_ref {
                    out.insert(Reference::ConfigMap(r.name.clone()));
                }
                if let Some(r) = &from.secret_key_ref {
                    out.insert(Reference::Secret(r.name.clone()));
                }
            }
        }
        for e in &c.env_from {
            if let Some(r) = &e.config_map_ref {
                out.insert(Reference::ConfigMap(r.name.clone()));
            }
            if let Some(r) = &e.secret_ref {
                out.insert(Reference::Secret(r.name.clone()));
            }
        }
    }
    out
}

/// The document id of a referenced object for `node`.
pub fn reference_id(node: &str, ns: &str, r: &Reference) -> Result<DocId, DocIdError> {
    match r {
        Reference::ConfigMap(name) => {
            DocId::new(DocKind::ConfigMap, Owner::Node(node), &[ns, name])
        }
        Reference::Secret(name) => DocId::new(DocKind::Secret, Owner::Node(node), &[ns, name]),
    }
}

/// The document of a ConfigMap.
pub fn configmap_doc(cm: &ConfigMap) -> ConfigMapDoc {
    ConfigMapDoc {
        namespace: cm.metadata.namespace.clone().unwrap_or_default(),
        name: cm.metadata.name.clone().unwrap_or_default(),
        data: cm.data.clone().unwrap_or_default(),
        binary_data: cm
            .binary_data
            .iter()
            .flatten()
            .filter_map(|(k, v)| {
                Some((
                    k.clone(),
                    serde_json::to_value(v).ok()?.as_str()?.to_owned(),
                ))
            })
            .collect(),
    }
}

/// The document of a Secret (values base64, as the API writes them).
pub fn secret_doc(secret: &Secret) -> SecretDoc {
    SecretDoc {
        namespace: secret.metadata.namespace.clone().unwrap_or_default(),
        name: secret.metadata.name.clone().unwrap_or_default(),
        kind: secret.type_.clone(),
        data: secret
            .data
            .iter()
            .flatten()
            .filter_map(|(k, v)| {
                Some((
                    k.clone(),
                    serde_json::to_value(v).ok()?.as_str()?.to_owned(),
                ))
            })
            .collect(),
    }
}

/// The pod status patch (server-side apply on `pods/<name>/status`) for a
/// pod-status document.
pub fn pod_status_patch(ns: &str, name: &str, doc: &PodStatusDoc) -> Value {
    let mut status = Map::new();
    status.insert("phase".into(), json!(doc.phase));
    if !doc.conditions.is_empty() {
        let conditions: Vec<Value> = doc.conditions.iter().map(|c| condition(c, None)).collect();
        status.insert("conditions".into(), json!(conditions));
    }
    if !doc.container_statuses.is_empty() {
        let statuses: Vec<Value> = doc
            .container_statuses
            .iter()
            .map(|c| {
                let mut s = json!({
                    "name": c.name,
                    "ready": c.ready,
                    "restartCount": c.restart_count,
                    "state": c.state,
                    "image": c.image,
                    "imageID": c.image_id.clone().unwrap_or_default(),
                });
                if let Some(last) = &c.last_state {
                    s["lastState"] = json!(last);
                }
                if let Some(id) = &c.container_id {
                    s["containerID"] = json!(id);
                }
                if let Some(started) = c.started {
                    s["started"] = json!(started);
                }
                s
            })
            .collect();
        status.insert("containerStatuses".into(), json!(statuses));
    }
    if let Some(ip) = &doc.pod_ip {
        status.insert("podIP".into(), json!(ip));
        status.insert("podIPs".into(), json!([{"ip": ip}]));
    }
    if let Some(ip) = &doc.host_ip {
        status.insert("hostIP".into(), json!(ip));
        status.insert("hostIPs".into(), json!([{"ip": ip}]));
    }
    if let Some(t) = time(doc.start_time.as_deref()) {
        status.insert("startTime".into(), json!(t));
    }
    if let Some(r) = &doc.reason {
        status.insert("reason".into(), json!(r));
    }
    if let Some(m) = &doc.message {
        status.insert("message".into(), json!(m));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_spec_converts_with_its_references_and_deletion() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1",
                         "labels": {"app": "web"},
                         "deletionTimestamp": "2030-01-01T00:00:00Z", "deletionGracePeriodSeconds": 5},
            "spec": {
                "nodeName": "edge-1",
                "containers": [{"name": "c", "image": "img", "ports": [{"containerPort": 80}],
                    "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}],
                    "envFrom": [{"configMapRef": {"name": "cm2"}}],
                    "livenessProbe": {"httpGet": {"port": "http", "path": "/"}},
                    "resources": {"limits": {"memory": "64Mi"}}}],
                "volumes": [{"name": "v", "configMap": {"name": "cm1"}}],
                "tolerations": [{"operator": "Exists"}]
            }
        }))
        .expect("pod");
        let doc = pod_spec_doc(&pod).expect("projects");
        assert_eq!((doc.namespace.as_str(), doc.uid.as_str()), ("ns", "u1"));
        assert_eq!(
            doc.containers[0].resources.as_ref().expect("res").limits["memory"],
            "64Mi"
        );
        assert_eq!(
            doc.deletion
                .as_ref()
                .expect("deleting")
                .grace_period_seconds,
            5
        );
        let refs = references(&doc);
        assert!(refs.contains(&Reference::ConfigMap("cm1".into())));
        assert!(refs.contains(&Reference::ConfigMap("cm2".into())));
        assert!(refs.contains(&Reference::Secret("s1".into())));
    }

    #[test]
    fn a_pod_without_spec_is_an_error_not_a_panic() {
        let pod: Pod = serde_json::from_value(
            json!({"metadata": {"name": "x", "namespace": "n", "uid": "u"}}),
        )
        .expect("pod");
        let err = pod_spec_doc(&pod).expect_err("no spec");
        assert!(err.to_string().contains("n/x: missing spec"), "{err}");
    }

    #[test]
    fn bad_times_are_dropped_from_status_patches() {
        let doc = PodStatusDoc {
            uid: "u".into(),
            phase: "Running".into(),
            start_time: Some("yesterday".into()),
            pod_ip: Some("10.0.0.2".into()),
            ..Default::default()
        };
        let patch = pod_status_patch("n", "p", &doc);
        assert!(patch["status"].get("startTime").is_none());
        assert_eq!(patch["status"]["podIP"], "10.0.0.2");
    }
}
