//! Typed schemas of the replicated documents, one per [`DocKind`].
//!
//! These are Outpost's own types, free of Kubernetes and CRI crates. Where a
//! value comes from the Kubernetes API the field names are the API's
//! (camelCase JSON), so that the JSON of a Kubernetes object deserializes
//! into the matching schema, ignoring what Outpost does not replicate.
//! Strings stay automerge scalar strings (atomic, last writer wins).
//!
//! Write with [`crate::replica::Replica::put`] (diffed: an unchanged value
//! makes no change) and read with [`crate::replica::Replica::get`]; both
//! refuse a document of another kind.
//!
//! Device-desired documents have two writers. Write their configuration
//! read-modify-write (get, change, put) so that the other writer's values are
//! kept, and change desired values only with [`crate::desired::set_desired`].

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::document::DocKind;

/// A typed document: its kind and its shape.
pub trait Schema: Serialize + DeserializeOwned {
    /// The kind of document this schema describes.
    const KIND: DocKind;
}

/// A map of strings, ordered so that its JSON is stable.
pub type StringMap = BTreeMap<String, String>;

// ---------------------------------------------------------------- pod spec

/// A pod to run, as the cloud bridge projects it from the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecDoc {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub name: String,
    /// The pod's uid in the API.
    pub uid: String,
    /// The pod's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: StringMap,
    /// The pod's annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: StringMap,
    /// Containers run before the others, in order, each to completion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
    /// The pod's containers.
    pub containers: Vec<Container>,
    /// Volumes the containers may mount.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// `Always` (the default), `OnFailure` or `Never`.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Seconds a container gets to stop before it is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_grace_period_seconds: Option<i64>,
    /// Use the node's network namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    /// Set when the pod is being deleted: the edge stops its containers
    /// within the grace period and then reports them stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion: Option<Deletion>,
}

impl Schema for PodSpecDoc {
    const KIND: DocKind = DocKind::PodSpec;
}

/// A graceful deletion request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Deletion {
    /// When the deletion was requested (RFC 3339).
    pub requested_at: String,
    /// Seconds the containers get to stop.
    pub grace_period_seconds: i64,
}

/// A pod's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RestartPolicy {
    /// Restart every container that exits.
    #[default]
    Always,
    /// Restart containers that exit with a non-zero code.
    OnFailure,
    /// Never restart.
    Never,
}

/// A container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Name, unique in the pod.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Entrypoint (replaces the image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments (replace the image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Whole ConfigMaps or Secrets as environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Ports the container listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// Volumes mounted into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Restart the container when this fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    /// The container is ready while this succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    /// The other probes wait until this succeeds once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
    /// Resource requests and limits (quantities as the API writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// Requests and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Upper bounds, e.g. `{"memory": "64Mi"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: StringMap,
    /// What the scheduler reserves.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: StringMap,
}

/// One environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    /// Its name.
    pub name: String,
    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A value taken from a ConfigMap, a Secret or the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeyRef>,
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeyRef>,
    /// A field of the pod, e.g. `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_ref: Option<FieldRef>,
}

/// A key of a named ConfigMap or Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyRef {
    /// The object's name.
    pub name: String,
    /// The key.
    pub key: String,
    /// The pod may start without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A field of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    /// The field's path, e.g. `metadata.namespace`.
    pub field_path: String,
}

/// A whole ConfigMap or Secret as environment variables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromSource {
    /// Prepended to every key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<NameRef>,
    /// The Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<NameRef>,
}

/// A named ConfigMap or Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NameRef {
    /// The object's name.
    pub name: String,
    /// The pod may start without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A port a container listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port number in the container.
    pub container_port: i32,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// A volume mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    /// The volume's name.
    pub name: String,
    /// Where it appears in the container.
    pub mount_path: String,
    /// Mounted read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// A path inside the volume to mount instead of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// A pod volume. Exactly one source is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// Its name.
    pub name: String,
    /// The keys of a ConfigMap as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolume>,
    /// The keys of a Secret as files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolume>,
    /// A scratch directory living as long as the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDir>,
    /// A directory of the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPath>,
    /// Several sources in one directory (as the API server's service
    /// account admission injects into every pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected: Option<ProjectedVolume>,
}

/// A projected volume: the files of several sources in one directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProjectedVolume {
    /// The sources, in order.
    #[serde(default)]
    pub sources: Vec<VolumeProjection>,
    /// File mode bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<i32>,
}

/// One source of a projected volume. Exactly one is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeProjection {
    /// Keys of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ObjectProjection>,
    /// Keys of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectProjection>,
    /// Pod fields as files.
    #[serde(
        default,
        rename = "downwardAPI",
        skip_serializing_if = "Option::is_none"
    )]
    pub downward_api: Option<DownwardApiProjection>,
    /// A service account token: the edge has none to give (its pods do not
    /// reach the API server), so no file is written for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token: Option<serde_json::Value>,
}

/// A ConfigMap's or Secret's keys in a projected volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ObjectProjection {
    /// The object.
    pub name: String,
    /// Only these keys, at these paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// The pod may start without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// Pod fields as files of a projected volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DownwardApiProjection {
    /// The files.
    #[serde(default)]
    pub items: Vec<DownwardApiFile>,
}

/// One pod field as a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DownwardApiFile {
    /// The relative file path.
    pub path: String,
    /// The field (`metadata.namespace`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_ref: Option<FieldRef>,
}

/// A ConfigMap volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapVolume {
    /// The ConfigMap.
    pub name: String,
    /// Only these keys, at these paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// File mode bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<i32>,
    /// The pod may start without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A Secret volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolume {
    /// The Secret.
    pub secret_name: String,
    /// Only these keys, at these paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
    /// File mode bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_mode: Option<i32>,
    /// The pod may start without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// A key projected to a file path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    /// The key.
    pub key: String,
    /// The relative file path.
    pub path: String,
}

/// A scratch directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDir {
    /// `Memory` for a tmpfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    /// A size limit, as the API writes quantities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<String>,
}

/// A directory of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HostPath {
    /// The path on the node.
    pub path: String,
    /// `Directory`, `DirectoryOrCreate`, ...
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A health check of a container. Exactly one handler is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Run a command in the container; exit 0 is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// An HTTP GET; a 2xx or 3xx status is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// A TCP connection that opens is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Seconds after the container starts before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<i32>,
    /// Seconds between probes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_seconds: Option<i32>,
    /// Seconds before a probe times out (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    /// Successes in a row to count as passing (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<i32>,
    /// Failures in a row to count as failing (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i32>,
}

/// A command run in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExecAction {
    /// The command and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
}

/// A port by number or by the container port's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    /// A port number.
    Number(i32),
    /// A named container port.
    Name(String),
}

impl Default for PortRef {
    fn default() -> Self {
        PortRef::Number(0)
    }
}

/// An HTTP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetAction {
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The port.
    pub port: PortRef,
    /// The host (default: the pod's IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `HTTP` (default) or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

/// A TCP probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct TcpSocketAction {
    /// The port.
    pub port: PortRef,
    /// The host (default: the pod's IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

// -------------------------------------------------------------- pod status

/// A pod's status, as the owning edge runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusDoc {
    /// The pod's uid this status is of.
    pub uid: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: String,
    /// `PodScheduled`, `Initialized`, `ContainersReady`, `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One per init container of the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_container_statuses: Vec<ContainerStatus>,
    /// One per container of the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
    /// The pod's IP.
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// The node's IP.
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// When the edge accepted the pod (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// A reason in one word, when the pod is not running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Every container of a pod being deleted has stopped and been removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminated: bool,
}

impl Schema for PodStatusDoc {
    const KIND: DocKind = DocKind::PodStatus;
}

/// A condition of a pod or a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Its type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// A reason in one word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The status of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    /// The container's name.
    pub name: String,
    /// Passing its readiness probe.
    pub ready: bool,
    /// Times it was restarted.
    pub restart_count: i32,
    /// Its current state.
    pub state: ContainerState,
    /// Its previous state, after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_state: Option<ContainerState>,
    /// The image it runs.
    pub image: String,
    /// The image's id in the runtime.
    #[serde(default, rename = "imageID", skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// `containerd://<id>`.
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_id: Option<String>,
    /// Passed its startup probe (or has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<bool>,
}

/// A container state. Exactly one is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    /// Not running yet, or waiting to be restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<StateWaiting>,
    /// Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<StateRunning>,
    /// Exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<StateTerminated>,
}

/// A waiting container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateWaiting {
    /// E.g. `ContainerCreating`, `CrashLoopBackOff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateRunning {
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
}

/// An exited container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct StateTerminated {
    /// Its exit code.
    pub exit_code: i32,
    /// E.g. `Completed`, `Error`, `OOMKilled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it exited (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

// ------------------------------------------------------------- node status

/// A node's own status and heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusDoc {
    /// When the edge last said it was alive (ms since the epoch).
    pub heartbeat_ms: u64,
    /// `Ready`, `MemoryPressure`, `DiskPressure`, `PIDPressure`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Total resources, e.g. `{"cpu": "2", "memory": "4Gi", "pods": "110"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capacity: StringMap,
    /// Resources available to pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub allocatable: StringMap,
    /// The node's addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    /// Versions and machine facts.
    #[serde(default)]
    pub node_info: NodeInfo,
}

impl Schema for NodeStatusDoc {
    const KIND: DocKind = DocKind::NodeStatus;
}

/// A node address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// `InternalIP`, `Hostname`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The address.
    pub address: String,
}

/// Versions and machine facts of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// `/etc/machine-id`.
    #[serde(default, rename = "machineID")]
    pub machine_id: String,
    /// Changes at every boot.
    #[serde(default, rename = "bootID")]
    pub boot_id: String,
    /// `uname -r`.
    #[serde(default)]
    pub kernel_version: String,
    /// The distribution.
    #[serde(default)]
    pub os_image: String,
    /// `containerd://<version>`.
    #[serde(default)]
    pub container_runtime_version: String,
    /// The agent's version (where a kubelet would put its own).
    #[serde(default)]
    pub kubelet_version: String,
    /// `linux`.
    #[serde(default)]
    pub operating_system: String,
    /// `amd64`, `arm64`, ...
    #[serde(default)]
    pub architecture: String,
}

// ---------------------------------------------------- configmap and secret

/// A ConfigMap an edge's pods reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapDoc {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Text values.
    #[serde(default)]
    pub data: StringMap,
    /// Binary values, base64 as the API writes them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub binary_data: StringMap,
}

impl Schema for ConfigMapDoc {
    const KIND: DocKind = DocKind::ConfigMap;
}

/// A Secret an edge's pods reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretDoc {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// E.g. `Opaque`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Values, base64 as the API writes them.
    #[serde(default)]
    pub data: StringMap,
}

impl Schema for SecretDoc {
    const KIND: DocKind = DocKind::Secret;
}

// ----------------------------------------------------------------- devices

/// A device model (KubeEdge `DeviceModel` spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelDoc {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `modbus`, `opcua`, `mqtt`, ...
    #[serde(default)]
    pub protocol: String,
    /// The model's properties.
    #[serde(default)]
    pub properties: Vec<ModelProperty>,
}

impl Schema for DeviceModelDoc {
    const KIND: DocKind = DocKind::DeviceModel;
}

/// A property of a device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    /// Its name.
    pub name: String,
    /// A description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `INT`, `FLOAT`, `DOUBLE`, `STRING`, `BOOLEAN`, `BYTES` or `STREAM`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `ReadWrite` or `ReadOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    /// The smallest value a write may set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    /// The largest value a write may set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<String>,
    /// The unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A device's configuration and desired values (KubeEdge `Device` spec).
/// Two writers: see the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDesiredDoc {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The device model's name.
    #[serde(default)]
    pub model: String,
    /// How to reach the device.
    #[serde(default)]
    pub protocol: ProtocolConfig,
    /// The device's properties and how to read them.
    #[serde(default)]
    pub properties: Vec<DeviceProperty>,
    /// How often the device's state is reported, ns (0: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report_cycle: Option<i64>,
    /// Desired values: each writer's slots under its own root key
    /// (`desired:<writer>`), managed by [`crate::desired`]; resolve with
    /// [`crate::desired::resolve`]. Every root key this schema does not name
    /// lands here and is written back unchanged.
    #[serde(flatten)]
    pub slots: BTreeMap<String, serde_json::Value>,
}

impl Schema for DeviceDesiredDoc {
    const KIND: DocKind = DocKind::DeviceDesired;
}

/// A protocol and its free-form configuration (KubeEdge `protocolName`,
/// `configData`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    /// `modbus`, `opcua`, `mqtt`, ...
    #[serde(default)]
    pub protocol_name: String,
    /// Free-form, as the Device YAML has it.
    #[serde(default)]
    pub config_data: serde_json::Value,
}

/// A property of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    /// Its name, as in the model.
    pub name: String,
    /// How to read it (register, offset, node id, ...).
    #[serde(default)]
    pub visitors: ProtocolConfig,
    /// How often to read it, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<i64>,
    /// How often to report it, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    /// Whether reported values go to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Where a mapper pushes telemetry (free-form, as the YAML has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_method: Option<serde_json::Value>,
}

/// A device's reported values and state, written by its edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReportedDoc {
    /// `online`, `offline` or `unknown`.
    pub state: String,
    /// When the device last answered (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_ms: Option<u64>,
    /// Reported values by property.
    #[serde(default)]
    pub twins: BTreeMap<String, ReportedValue>,
    /// Why the device is offline or not served, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The device's configuration cannot be used here (unknown protocol, a
    /// property its model lacks, a visitor that does not fit): the node
    /// does not try it until the configuration changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unservable: bool,
}

impl Schema for DeviceReportedDoc {
    const KIND: DocKind = DocKind::DeviceReported;
}

/// One reported value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReportedValue {
    /// The value, as a string (KubeEdge twin values are strings).
    pub value: String,
    /// When it was read (ms since the epoch).
    pub timestamp_ms: u64,
    /// The property's type, e.g. `INT`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The desired value the device had when read, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<String>,
}
