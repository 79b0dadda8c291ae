//! The pod manager: runs this node's pods through CRI, from the replica
//! alone.
//!
//! It watches the pod-spec documents of its node in the replica and, at
//! every change and every `sync_interval`, reconciles them with what the
//! runtime runs:
//!
//! - **State lives in the runtime and the replica, not in memory.** Every
//!   sandbox and container the manager creates carries labels
//!   (`io.outpost.managed`, `io.outpost.node`, `io.outpost.pod-uid`, ...)
//!   and its restart count as an annotation, so a restarted agent rebuilds
//!   its view by listing, adopts the containers that still run (it never
//!   restarts a healthy container because *it* restarted), and after a
//!   reboot creates a new sandbox for every pod whose sandbox died.
//! - **Restart policy with kubelet's back-off**: the first restart of a
//!   crashed container is immediate, the next waits `base`, then twice as
//!   long each time up to `max`; a container that ran `reset_after` before
//!   exiting starts over. Waiting containers report `CrashLoopBackOff`.
//! - **Init containers** run in order, each to completion, before the app
//!   containers, and again in every new sandbox. The status schema has no
//!   init container statuses: their progress shows in the `Initialized`
//!   condition (`Init:0/2`, `Init:Error`, ...) and a failed one with policy
//!   `Never` fails the pod.
//! - **Probes** (exec through CRI `ExecSync`, HTTP, TCP) run in one worker
//!   per container, see [`probe`].
//! - **Status**: container states, restart counts, readiness and the pod's
//!   phase and conditions are written to the pod's `pod-status` document.
//! - **Deletion**: a spec with `deletion` set (or a pod the replica no longer
//!   has) is stopped within its grace period, its containers and sandbox are
//!   removed, and its status then says `terminated: true`.
//!
//! Each pod is synced by its own task, so one slow pod (an image pull, a
//! long grace period) never holds up the others. A pod that cannot run
//! (missing image, bad command, missing ConfigMap) gets a waiting reason in
//! its status and the other pods go on.

pub mod inputs;
pub(crate) mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_cri::v1 as cri;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::replica::Scope;
use outpost_sync::schema::{
    Condition, Container, ContainerState, ContainerStatus, PodSpecDoc, PodStatusDoc, RestartPolicy,
    StateRunning, StateTerminated, StateWaiting,
};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::clock;
use crate::cri::CriClient;

/// Label on everything the manager creates.
pub const LABEL_MANAGED: &str = "io.outpost.managed";
/// The node that created a sandbox or container.
pub const LABEL_NODE: &str = "io.outpost.node";
/// The pod's uid.
pub const LABEL_POD_UID: &str = "io.outpost.pod-uid";
/// The pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.outpost.pod-namespace";
/// The pod's name.
pub const LABEL_POD_NAME: &str = "io.outpost.pod-name";
/// A container's name in its pod.
pub const LABEL_CONTAINER: &str = "io.outpost.container-name";
/// A container's restart count (annotation).
pub const ANNOTATION_RESTART_COUNT: &str = "io.outpost.restart-count";
/// A hash of the container's spec (annotation): a changed spec replaces it.
pub const ANNOTATION_SPEC_HASH: &str = "io.outpost.container-hash";

/// Grace period for pods that have no spec any more.
const ORPHAN_GRACE_S: i64 = 30;

/// Kubelet-like restart back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the second restart; doubled at each crash after.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// A container that ran this long before exiting starts over at `base`.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

/// What the pod manager needs to know.
#[derive(Debug, Clone)]
pub struct PodManagerConfig {
    /// This node's name: its pod specs are `pod-spec/<node>/...`.
    pub node: String,
    /// The site whose shared ConfigMaps and Secrets the pods may use.
    pub site: Option<String>,
    /// Volumes live under `<data_dir>/pods/<uid>/`.
    pub data_dir: PathBuf,
    /// Container logs, `<pod_log_dir>/<ns>_<name>_<uid>/<container>/<n>.log`.
    pub pod_log_dir: PathBuf,
    /// The sandbox image to keep present (pulled at start when missing).
    pub pause_image: Option<String>,
    /// The node's IP, reported as the pods' host IP.
    pub node_ip: Option<String>,
    /// Time between two reconciliations when nothing changes.
    pub sync_interval: Duration,
    /// Restart back-off.
    pub backoff: Backoff,
}

/// A failure recorded for a container that has no container to show it.
#[derive(Debug, Clone)]
struct Failure {
    reason: String,
    message: String,
    at: SystemTime,
}

struct ProbeHandle {
    results: Arc<Mutex<probe::ProbeResults>>,
    task: tokio::task::JoinHandle<()>,
    created: Instant,
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct State {
    /// Current back-off per (pod uid, container name).
    backoff: HashMap<(String, String), Duration>,
    /// Why a container could not be created, per (pod uid, container name).
    failures: HashMap<(String, String), Failure>,
    /// Why a pod's sandbox could not be made, per pod uid.
    pod_failures: HashMap<String, Failure>,
    /// Probe workers by container id.
    probes: HashMap<String, ProbeHandle>,
}

struct Shared {
    engine: Engine,
    cri: CriClient,
    config: PodManagerConfig,
    state: Mutex<State>,
    wake: Arc<Notify>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running pod manager. Dropping it stops its tasks; [`PodManager::shutdown`]
/// also waits for them. Containers keep running either way.
pub struct PodManager {
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for PodManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodManager").finish_non_exhaustive()
    }
}

impl PodManager {
    /// Starts managing the pods of `config.node` found in `engine`'s replica.
    pub fn spawn(engine: Engine, cri: CriClient, config: PodManagerConfig) -> Self {
        let shared = Arc::new(Shared {
            engine,
            cri,
            config,
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(reconcile_loop(shared));
        Self { tasks }
    }

    /// Stops the manager and waits until its tasks are gone (and with them
    /// their handles on the replica). Containers keep running.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// A pod's sandboxes and containers in the runtime.
#[derive(Debug, Default, Clone)]
struct Runtime {
    sandboxes: Vec<cri::PodSandbox>,
    containers: Vec<cri::Container>,
}

fn managed_selector(node: &str) -> HashMap<String, String> {
    [
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_NODE.to_owned(), node.to_owned()),
    ]
    .into()
}

/// Lists what the runtime runs for `node`, grouped by pod uid.
async fn list_runtime(
    cri: &CriClient,
    node: &str,
) -> Result<HashMap<String, Runtime>, tonic::Status> {
    let mut runtime = cri.runtime.clone();
    let sandboxes = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: managed_selector(node),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .items;
    let containers = runtime
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: managed_selector(node),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers;
    let mut pods: HashMap<String, Runtime> = HashMap::new();
    for sb in sandboxes {
        let uid = sb.labels.get(LABEL_POD_UID).cloned().unwrap_or_default();
        pods.entry(uid).or_default().sandboxes.push(sb);
    }
    for c in containers {
        let uid = c.labels.get(LABEL_POD_UID).cloned().unwrap_or_default();
        pods.entry(uid).or_default().containers.push(c);
    }
    Ok(pods)
}

/// Pod specs as last read, by document, with the generation and heads they
/// were read at (`None`: deleted, or naming no pod): a pass reads again (and
/// loads into the replica's cache) only the specs that changed since, so the
/// cache need not hold every pod, nor every pod the node ever ran.
#[derive(Default)]
struct ReadSpecs(HashMap<DocId, (DocVersion, Option<PodSpecDoc>)>);

/// Pod-status documents found deleted, at the generation and heads they were
/// found so: tombstones stay in the replica, one per pod the node ever ran,
/// and are not loaded again each pass to learn it.
#[derive(Default)]
struct Tombstones(HashMap<DocId, DocVersion>);

/// A document's generation and sorted heads: equal, the same content.
type DocVersion = (u64, Vec<[u8; 32]>);

/// The documents under `prefix` in the replica's index, with their
/// versions; what `known` holds of documents no longer there is dropped.
fn listed_versions<V>(
    r: &outpost_sync::replica::Replica,
    prefix: &str,
    known: &mut HashMap<DocId, V>,
) -> Vec<(DocId, DocVersion)> {
    let listed: Vec<(DocId, DocVersion)> = r
        .scan_prefix(prefix)
        .filter_map(Result::ok)
        .map(|(id, entry)| (id, (entry.generation, entry.heads)))
        .collect();
    let present: HashSet<&DocId> = listed.iter().map(|(id, _)| id).collect();
    known.retain(|id, _| present.contains(id));
    listed
}

/// The pod specs of `node` in the replica, by uid. A document that does not
/// parse is reported and skipped (what runs for it is left alone).
fn desired_pods(
    engine: &Engine,
    node: &str,
    read: &mut ReadSpecs,
) -> (HashMap<String, (DocId, PodSpecDoc)>, HashSet<String>) {
    let prefix = format!("{}/{node}/", DocKind::PodSpec.as_str());
    let listed = engine.with_replica(|r| listed_versions(r, &prefix, &mut read.0));
    let mut pods = HashMap::new();
    let mut unreadable = HashSet::new();
    for (id, version) in listed {
        if let Some((at, spec)) = read.0.get(&id)
            && *at == version
        {
            if let Some(spec) = spec {
                pods.insert(spec.uid.clone(), (id, spec.clone()));
            }
            continue;
        }
        read.0.remove(&id);
        match engine.with_replica(|r| r.get::<PodSpecDoc>(&id)) {
            Ok(Some(spec)) if !spec.uid.is_empty() => {
                read.0.insert(id.clone(), (version, Some(spec.clone())));
                pods.insert(spec.uid.clone(), (id, spec));
            }
            Ok(_) => {
                read.0.insert(id, (version, None));
            }
            Err(e) => {
                // The uid is the last segment of the id: keep its containers.
                if let Some(uid) = id.as_str().rsplit('/').next() {
                    unreadable.insert(uid.to_owned());
                }
                warn!(doc = %id, error = %e, "pod spec cannot be read; its pod is left as it is");
                write_unreadable_status(engine, node, &id, &e.to_string());
            }
        }
    }
    (pods, unreadable)
}

/// Deletes the pod-status documents of pods whose spec the cloud deleted
/// (after the pod left the API) once nothing of them runs: the edge's part
/// of keeping the replica bounded.
fn forget_deleted_pods(
    engine: &Engine,
    node: &str,
    tombstones: &mut Tombstones,
    busy: impl Fn(&str) -> bool,
) {
    let prefix = format!("{}/{node}/", DocKind::PodStatus.as_str());
    let done: Vec<DocId> = engine.with_replica(|r| {
        listed_versions(r, &prefix, &mut tombstones.0)
            .into_iter()
            .filter(|(status, version)| {
                if tombstones.0.get(status) == Some(version) {
                    return false;
                }
                // Written since it was found deleted, if it was.
                tombstones.0.remove(status);
                let parts: Vec<&str> = status.as_str().split('/').collect();
                let [_, _, ns, name, uid] = parts[..] else {
                    return false;
                };
                if busy(uid) {
                    return false;
                }
                match r.is_deleted(status) {
                    Ok(false) => {}
                    Ok(true) => {
                        tombstones.0.insert(status.clone(), version.clone());
                        return false;
                    }
                    Err(_) => return false,
                }
                DocId::new(DocKind::PodSpec, Owner::Node(node), &[ns, name, uid])
                    .ok()
                    .is_some_and(|spec| r.is_deleted(&spec).unwrap_or(false))
            })
            .map(|(status, _)| status)
            .collect()
    });
    for status in done {
        match engine.delete(&status) {
            Ok(_) => debug!(doc = %status, "pod gone from the cloud and the node: status deleted"),
            Err(e) => warn!(doc = %status, error = %e, "cannot delete a finished pod's status"),
        }
    }
}

fn write_unreadable_status(engine: &Engine, node: &str, spec_id: &DocId, error: &str) {
    let parts: Vec<&str> = spec_id.as_str().split('/').collect();
    if parts.len() != 5 {
        return;
    }
    let Ok(id) = DocId::new(DocKind::PodStatus, Owner::Node(node), &parts[2..]) else {
        return;
    };
    let mut status: PodStatusDoc = engine
        .with_replica(|r| r.get::<PodStatusDoc>(&id))
        .ok()
        .flatten()
        .unwrap_or_else(|| PodStatusDoc {
            uid: parts[4].to_owned(),
            phase: "Pending".into(),
            ..Default::default()
        });
    status.reason = Some("InvalidPodSpec".into());
    status.message = Some(format!("the pod spec cannot be read: {error}"));
    if let Err(e) = engine.put(&id, &status) {
        warn!(doc = %id, error = %e, "cannot write pod status");
    }
}

async fn reconcile_loop(shared: Arc<Shared>) {
    let node = shared.config.node.clone();
    // Any change, and a lag alike, only starts a pass over every pod: a
    // short queue does.
    let mut changes = shared.engine.with_replica(|r| {
        r.subscribe_scope_queued(
            Scope::all()
                .kinds([DocKind::PodSpec, DocKind::ConfigMap, DocKind::Secret])
                .node(node.clone()),
            16,
        )
    });
    if let Some(image) = shared.config.pause_image.clone() {
        let cri = shared.cri.clone();
        tokio::spawn(async move {
            if let Err(e) = ensure_image(&cri, &image, false).await {
                warn!(%image, reason = %e.1, "the pause image is not present and cannot be pulled");
            }
        });
    }
    let mut workers: JoinSet<String> = JoinSet::new();
    let mut read_specs = ReadSpecs::default();
    let mut tombstones = Tombstones::default();
    let mut inflight: HashSet<String> = HashSet::new();
    let mut runtime_down = false;
    // What each pod looked like when last synced, and when: a pod whose
    // spec and runtime state are unchanged is synced again only at the
    // resync period, or when woken (a probe result, a back-off that ended,
    // a changed document).
    let mut synced: HashMap<String, (u64, Instant)> = HashMap::new();
    let resync = shared.config.sync_interval * RESYNC_PASSES;
    let mut force = true;
    info!(%node, "pod manager started");
    loop {
        // Reap finished pod syncs.
        while let Some(done) = workers.try_join_next() {
            if let Ok(uid) = done {
                inflight.remove(&uid);
            }
        }
        let listed_at = Instant::now();
        let (desired, unreadable) = desired_pods(&shared.engine, &node, &mut read_specs);
        match list_runtime(&shared.cri, &node).await {
            Err(e) => {
                if !runtime_down {
                    warn!(reason = %e.message(), "the container runtime does not answer; pods are reconciled when it is back");
                }
                runtime_down = true;
            }
            Ok(mut runtime) => {
                let in_runtime: HashSet<String> = runtime.keys().cloned().collect();
                if runtime_down {
                    info!("the container runtime answers again");
                }
                runtime_down = false;
                // Syncs that finished while we listed may have changed the
                // runtime after the listing: their pods wait for the next pass.
                let mut fresh_done = HashSet::new();
                while let Some(done) = workers.try_join_next() {
                    if let Ok(uid) = done {
                        inflight.remove(&uid);
                        fresh_done.insert(uid);
                    }
                }
                drop_stale_probes(&shared, &runtime, listed_at);
                synced.retain(|uid, _| desired.contains_key(uid));
                for (uid, (_, spec)) in desired.iter() {
                    if inflight.contains(uid) || fresh_done.contains(uid) {
                        continue;
                    }
                    let rt = runtime.remove(uid).unwrap_or_default();
                    let print = fingerprint(spec, &rt);
                    if !force
                        && synced
                            .get(uid)
                            .is_some_and(|(p, at)| *p == print && at.elapsed() < resync)
                    {
                        continue;
                    }
                    synced.insert(uid.clone(), (print, Instant::now()));
                    inflight.insert(uid.clone());
                    let (shared, spec, uid) = (shared.clone(), spec.clone(), uid.clone());
                    workers.spawn(async move {
                        sync_pod(&shared, &spec, rt).await;
                        uid
                    });
                }
                for (uid, rt) in runtime {
                    if desired.contains_key(&uid)
                        || unreadable.contains(&uid)
                        || inflight.contains(&uid)
                        || fresh_done.contains(&uid)
                    {
                        continue;
                    }
                    inflight.insert(uid.clone());
                    let shared = shared.clone();
                    workers.spawn(async move {
                        remove_orphan(&shared, &uid, rt).await;
                        uid
                    });
                }
                forget_deleted_pods(&shared.engine, &node, &mut tombstones, |uid| {
                    desired.contains_key(uid)
                        || in_runtime.contains(uid)
                        || unreadable.contains(uid)
                        || inflight.contains(uid)
                });
            }
        }
        // Wait for a change, a wake-up or the interval; reap finished syncs
        // meanwhile (their pods are synced again at the next pass).
        let next_pass = Instant::now() + shared.config.sync_interval;
        force = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_pass) => break,
                _ = shared.wake.notified() => {
                    force = true;
                    break;
                }
                got = changes.recv() => {
                    if let Err(outpost_sync::replica::SubscriptionError::Closed) = got {
                        return;
                    }
                    force = true;
                    break;
                }
                Some(done) = workers.join_next(), if !workers.is_empty() => {
                    if let Ok(uid) = done {
                        inflight.remove(&uid);
                    }
                }
            }
        }
    }
}

fn drop_stale_probes(shared: &Shared, runtime: &HashMap<String, Runtime>, listed_at: Instant) {
    let running: HashSet<&str> = runtime
        .values()
        .flat_map(|r| r.containers.iter())
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .map(|c| c.id.as_str())
        .collect();
    shared
        .state()
        .probes
        .retain(|id, h| running.contains(id.as_str()) || h.created > listed_at);
}

fn status_id(node: &str, ns: &str, name: &str, uid: &str) -> Option<DocId> {
    DocId::new(DocKind::PodStatus, Owner::Node(node), &[ns, name, uid]).ok()
}

fn pod_dir(config: &PodManagerConfig, uid: &str) -> PathBuf {
    config.data_dir.join("pods").join(uid)
}

/// Passes between two syncs of a pod that did not change.
const RESYNC_PASSES: u32 = 10;

/// FNV-1a, 64 bits: stable across builds and Rust versions.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

const FNV_OFFSET: u64 = 0xcbf29ce484222325;

/// A stable hash of a container's spec.
fn spec_hash(c: &Container) -> String {
    let json = serde_json::to_vec(c).unwrap_or_default();
    format!("{:016x}", fnv(FNV_OFFSET, &json))
}

/// What a pod's sync depends on: its spec and the states of its sandboxes
/// and containers.
fn fingerprint(spec: &PodSpecDoc, rt: &Runtime) -> u64 {
    let mut h = fnv(FNV_OFFSET, &serde_json::to_vec(spec).unwrap_or_default());
    let mut parts: Vec<(String, i32)> = rt
        .sandboxes
        .iter()
        .map(|s| (s.id.clone(), s.state))
        .chain(rt.containers.iter().map(|c| (c.id.clone(), c.state)))
        .collect();
    parts.sort();
    for (id, state) in parts {
        h = fnv(h, id.as_bytes());
        h = fnv(h, &state.to_le_bytes());
    }
    h
}

fn restart_count(c: &cri::Container) -> i32 {
    c.annotations
        .get(ANNOTATION_RESTART_COUNT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn container_name(c: &cri::Container) -> &str {
    c.labels
        .get(LABEL_CONTAINER)
        .map(String::as_str)
        .unwrap_or_default()
}

fn sandbox_config(shared: &Shared, spec: &PodSpecDoc, attempt: u32) -> cri::PodSandboxConfig {
    let node = &shared.config.node;
    let mut labels: HashMap<String, String> = spec
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with("io.outpost."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_NODE.to_owned(), node.clone()),
        (LABEL_POD_UID.to_owned(), spec.uid.clone()),
        (LABEL_POD_NAMESPACE.to_owned(), spec.namespace.clone()),
        (LABEL_POD_NAME.to_owned(), spec.name.clone()),
    ]);
    let network = if spec.host_network {
        cri::NamespaceMode::Node
    } else {
        cri::NamespaceMode::Pod
    };
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: spec.name.clone(),
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            attempt,
        }),
        // runc refuses a hostname without a private UTS namespace.
        hostname: if spec.host_network {
            String::new()
        } else {
            spec.name.chars().take(63).collect()
        },
        log_directory: shared
            .config
            .pod_log_dir
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid))
            .to_string_lossy()
            .into_owned(),
        labels,
        annotations: spec
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: network as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Makes sure `image` is present: pulled when missing, or always when
/// `always` (falling back to the present image when the pull fails, so that
/// a node offline keeps running what it has). Errors are (reason, message).
async fn ensure_image(
    cri: &CriClient,
    image: &str,
    always: bool,
) -> Result<String, (String, String)> {
    let mut images = cri.images.clone();
    let spec = cri::ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    };
    let present = images
        .image_status(cri::ImageStatusRequest {
            image: Some(spec.clone()),
            verbose: false,
        })
        .await
        .map_err(|e| ("ErrImagePull".to_owned(), e.message().to_owned()))?
        .into_inner()
        .image
        .map(|i| i.id);
    if let Some(id) = &present
        && !always
    {
        return Ok(id.clone());
    }
    match images
        .pull_image(cri::PullImageRequest {
            image: Some(spec),
            ..Default::default()
        })
        .await
    {
        Ok(reply) => Ok(reply.into_inner().image_ref),
        Err(e) => match present {
            Some(id) => {
                debug!(%image, reason = %e.message(), "pull failed; using the image present");
                Ok(id)
            }
            None => Err((
                "ErrImagePull".to_owned(),
                format!("failed to pull image {image:?}: {}", e.message()),
            )),
        },
    }
}

fn should_restart(policy: RestartPolicy, exit_code: i32) -> bool {
    match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => exit_code != 0,
        RestartPolicy::Never => false,
    }
}

/// Syncs one pod with the runtime: sandbox, containers, probes, status.
async fn sync_pod(shared: &Arc<Shared>, spec: &PodSpecDoc, rt: Runtime) {
    if let Some(deletion) = &spec.deletion {
        let statuses = terminate(shared, &spec.uid, &rt, deletion.grace_period_seconds).await;
        write_terminated(
            shared,
            &spec.namespace,
            &spec.name,
            &spec.uid,
            statuses,
            true,
        );
        return;
    }
    let uid = spec.uid.clone();
    let lookup = inputs::Lookup {
        engine: &shared.engine,
        node: &shared.config.node,
        site: shared.config.site.as_deref(),
    };
    let dir = pod_dir(&shared.config, &uid);
    // Volumes are refreshed at every sync so changed ConfigMaps reach the pod.
    if let Err(e) = inputs::prepare_volumes(&lookup, spec, &dir) {
        record_pod_failure(shared, &uid, "CreateContainerConfigError", &e.0);
        write_status(shared, spec, None, "", &rt).await;
        return;
    }
    // A failure of an earlier sync is either gone or recorded again below.
    shared.state().pod_failures.remove(&uid);
    let ready_sandboxes: Vec<&cri::PodSandbox> = {
        let mut v: Vec<&cri::PodSandbox> = rt
            .sandboxes
            .iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        v
    };
    let sandbox_id = match ready_sandboxes.first() {
        Some(sb) => {
            for extra in &ready_sandboxes[1..] {
                remove_sandbox(shared, &extra.id).await;
            }
            sb.id.clone()
        }
        None => {
            let attempt = rt
                .sandboxes
                .iter()
                .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
                .max()
                .unwrap_or(0);
            for old in &rt.sandboxes {
                info!(pod = %spec.name, sandbox = %old.id, "the pod's sandbox is not ready; replacing it");
                remove_sandbox(shared, &old.id).await;
            }
            let config = sandbox_config(shared, spec, attempt);
            let _ = std::fs::create_dir_all(&config.log_directory);
            let mut runtime = shared.cri.runtime.clone();
            match runtime
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                })
                .await
            {
                Ok(reply) => {
                    shared.state().pod_failures.remove(&uid);
                    let id = reply.into_inner().pod_sandbox_id;
                    info!(pod = %format!("{}/{}", spec.namespace, spec.name), sandbox = %id, attempt, "sandbox started");
                    id
                }
                Err(e) => {
                    warn!(pod = %spec.name, reason = %e.message(), "cannot create the pod sandbox");
                    record_pod_failure(shared, &uid, "FailedCreatePodSandBox", e.message());
                    write_status(shared, spec, None, "", &rt).await;
                    return;
                }
            }
        }
    };
    let attempt = rt
        .sandboxes
        .iter()
        .find(|s| s.id == sandbox_id)
        .and_then(|s| s.metadata.as_ref().map(|m| m.attempt))
        .unwrap_or_else(|| {
            rt.sandboxes
                .iter()
                .filter_map(|s| s.metadata.as_ref().map(|m| m.attempt + 1))
                .max()
                .unwrap_or(0)
        });
    let sandbox_cfg = sandbox_config(shared, spec, attempt);
    let pod_ip = sandbox_ip(shared, &sandbox_id).await.unwrap_or_default();
    let host_ip = shared.config.node_ip.clone().unwrap_or_default();
    let prev = read_status(shared, spec);
    let ctx = SyncContext {
        sandbox_id: &sandbox_id,
        sandbox_cfg: &sandbox_cfg,
        pod_ip: &pod_ip,
        host_ip: &host_ip,
        rt: &rt,
        prev: prev.as_ref(),
    };
    let init = sync_init(shared, spec, &ctx).await;
    if init.is_none() {
        let role = Role {
            policy: spec.restart_policy,
            init: false,
        };
        for container in &spec.containers {
            sync_container(
                shared,
                spec,
                container,
                &sandbox_id,
                &sandbox_cfg,
                &pod_ip,
                &host_ip,
                &rt,
                prev.as_ref(),
                role,
            )
            .await;
        }
    }
    write_status_with(shared, spec, Some(&sandbox_id), &pod_ip, &rt, init.as_ref()).await;
}

/// What a container is in its pod.
#[derive(Debug, Clone, Copy)]
struct Role {
    /// The restart policy that applies to it.
    policy: RestartPolicy,
    /// An init container: it runs to completion before the others, again in
    /// every new sandbox.
    init: bool,
}

struct SyncContext<'a> {
    sandbox_id: &'a str,
    sandbox_cfg: &'a cri::PodSandboxConfig,
    pod_ip: &'a str,
    host_ip: &'a str,
    rt: &'a Runtime,
    prev: Option<&'a PodStatusDoc>,
}

/// Why a pod's app containers wait for its init containers.
#[derive(Debug, Clone)]
struct InitBlock {
    reason: String,
    message: String,
    /// An init container failed and will not be restarted (policy Never).
    failed: bool,
}

/// Runs the init containers in order, each to completion. `None` once all
/// have succeeded in the current sandbox.
async fn sync_init(
    shared: &Arc<Shared>,
    spec: &PodSpecDoc,
    ctx: &SyncContext<'_>,
) -> Option<InitBlock> {
    // Init containers restart on failure unless the pod never restarts.
    let role = Role {
        policy: if spec.restart_policy == RestartPolicy::Never {
            RestartPolicy::Never
        } else {
            RestartPolicy::OnFailure
        },
        init: true,
    };
    for (i, ic) in spec.init_containers.iter().enumerate() {
        let current = ctx
            .rt
            .containers
            .iter()
            .filter(|c| container_name(c) == ic.name && c.pod_sandbox_id == ctx.sandbox_id)
            .max_by_key(|c| c.created_at);
        let progress = format!("Init:{i}/{}", spec.init_containers.len());
        if let Some(c) = current
            && c.state == cri::ContainerState::ContainerExited as i32
        {
            let code = container_status(shared, &c.id)
                .await
                .map(|s| s.exit_code)
                .unwrap_or(-1);
            if code == 0 {
                continue;
            }
            if role.policy == RestartPolicy::Never {
                return Some(InitBlock {
                    reason: "Init:Error".into(),
                    message: format!("init container {:?} exited with code {code}", ic.name),
                    failed: true,
                });
            }
        }
        sync_container(
            shared,
            spec,
            ic,
            ctx.sandbox_id,
            ctx.sandbox_cfg,
            ctx.pod_ip,
            ctx.host_ip,
            ctx.rt,
            ctx.prev,
            role,
        )
        .await;
        let key = (spec.uid.clone(), ic.name.clone());
        let failure = shared.state().failures.get(&key).cloned();
        return Some(match failure {
            Some(f) => InitBlock {
                reason: format!("Init:{}", f.reason),
                message: format!("init container {:?}: {}", ic.name, f.message),
                failed: false,
            },
            None => InitBlock {
                reason: progress,
                message: format!("init container {:?} is running", ic.name),
                failed: false,
            },
        });
    }
    None
}

fn record_pod_failure(shared: &Shared, uid: &str, reason: &str, message: &str) {
    shared.state().pod_failures.insert(
        uid.to_owned(),
        Failure {
            reason: reason.to_owned(),
            message: message.to_owned(),
            at: SystemTime::now(),
        },
    );
}

fn read_status(shared: &Shared, spec: &PodSpecDoc) -> Option<PodStatusDoc> {
    let id = status_id(&shared.config.node, &spec.namespace, &spec.name, &spec.uid)?;
    shared
        .engine
        .with_replica(|r| r.get::<PodStatusDoc>(&id))
        .ok()
        .flatten()
}

async fn sandbox_ip(shared: &Shared, sandbox_id: &str) -> Option<String> {
    let mut runtime = shared.cri.runtime.clone();
    runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            verbose: false,
        })
        .await
        .ok()?
        .into_inner()
        .status?
        .network
        .map(|n| n.ip)
}

async fn container_status(shared: &Shared, id: &str) -> Option<cri::ContainerStatus> {
    let mut runtime = shared.cri.runtime.clone();
    runtime
        .container_status(cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        })
        .await
        .ok()?
        .into_inner()
        .status
}

async fn remove_container(shared: &Shared, id: &str) {
    let mut runtime = shared.cri.runtime.clone();
    if let Err(e) = runtime
        .remove_container(cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        })
        .await
    {
        debug!(container = %id, reason = %e.message(), "cannot remove container");
    }
}

async fn remove_sandbox(shared: &Shared, id: &str) {
    let mut runtime = shared.cri.runtime.clone();
    if let Err(e) = runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })
        .await
    {
        debug!(sandbox = %id, reason = %e.message(), "cannot stop sandbox");
    }
    if let Err(e) = runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })
        .await
    {
        warn!(sandbox = %id, reason = %e.message(), "cannot remove sandbox");
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync_container(
    shared: &Arc<Shared>,
    spec: &PodSpecDoc,
    container: &Container,
    sandbox_id: &str,
    sandbox_cfg: &cri::PodSandboxConfig,
    pod_ip: &str,
    host_ip: &str,
    rt: &Runtime,
    prev: Option<&PodStatusDoc>,
    role: Role,
) {
    let policy = role.policy;
    let key = (spec.uid.clone(), container.name.clone());
    let mut mine: Vec<&cri::Container> = rt
        .containers
        .iter()
        .filter(|c| container_name(c) == container.name)
        .collect();
    mine.sort_by_key(|c| std::cmp::Reverse(c.created_at));
    let current = mine
        .iter()
        .find(|c| c.pod_sandbox_id == sandbox_id)
        .copied();
    let newest = mine.first().copied();
    let backoff = shared.config.backoff;
    let hash = spec_hash(container);

    let next_count = match newest {
        Some(old) => restart_count(old) + 1,
        // Nothing left in the runtime (a wiped runtime): go on from the
        // count the status last reported.
        None => prev
            .and_then(|p| {
                p.container_statuses
                    .iter()
                    .find(|s| s.name == container.name)
            })
            .map(|s| s.restart_count)
            .unwrap_or(0),
    };

    match current {
        Some(c) if c.state == cri::ContainerState::ContainerRunning as i32 => {
            if c.annotations.get(ANNOTATION_SPEC_HASH) != Some(&hash) {
                info!(pod = %spec.name, container = %container.name, "the container's spec changed; replacing it");
                stop_container(shared, &c.id, grace(spec)).await;
            } else {
                ensure_probes(shared, spec, container, &c.id, pod_ip);
            }
            return;
        }
        Some(c) if c.state == cri::ContainerState::ContainerCreated as i32 => {
            // Created by a sync that was interrupted: start it.
            let mut runtime = shared.cri.runtime.clone();
            if let Err(e) = runtime
                .start_container(cri::StartContainerRequest {
                    container_id: c.id.clone(),
                })
                .await
            {
                record_failure(shared, &key, "RunContainerError", e.message());
                backoff_next(shared, &key, backoff);
            }
            return;
        }
        Some(c) => {
            // Exited (or unknown): restart under the policy and the back-off.
            let status = container_status(shared, &c.id).await;
            let exit_code = status.as_ref().map(|s| s.exit_code).unwrap_or(-1);
            if !should_restart(policy, exit_code) {
                return;
            }
            let started = status.as_ref().map(|s| s.started_at).unwrap_or(0);
            let finished = status.as_ref().map(|s| s.finished_at).unwrap_or(0);
            let finished_at = if finished > 0 {
                clock::from_unix_nanos(finished)
            } else {
                SystemTime::now()
            };
            if started > 0 && finished > started {
                let ran = Duration::from_nanos((finished - started) as u64);
                if ran >= backoff.reset_after {
                    shared.state().backoff.remove(&key);
                }
            }
            if let Some(wait) = in_backoff(shared, &key, finished_at) {
                let delay = shared
                    .state()
                    .backoff
                    .get(&key)
                    .copied()
                    .unwrap_or(backoff.base);
                shared.state().failures.insert(
                    key.clone(),
                    Failure {
                        reason: "CrashLoopBackOff".into(),
                        message: format!(
                            "back-off {} restarting failed container={} pod={}_{}({})",
                            human(delay),
                            container.name,
                            spec.name,
                            spec.namespace,
                            spec.uid
                        ),
                        at: finished_at,
                    },
                );
                // Come back when the back-off is over.
                let wake = shared.wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    wake.notify_one();
                });
                return;
            }
        }
        None => {
            if let Some(old) = newest {
                // The container of a dead sandbox (a reboot, a runtime
                // restart that lost the pod): restart it under the policy,
                // without back-off.
                let exit_code = container_status(shared, &old.id)
                    .await
                    .map(|s| s.exit_code)
                    .unwrap_or(-1);
                // Init containers run again in every new sandbox.
                if !role.init
                    && !should_restart(policy, exit_code)
                    && old.state == cri::ContainerState::ContainerExited as i32
                    && exit_code >= 0
                {
                    return;
                }
            } else if let Some(at) = failure_time(shared, &key)
                && let Some(wait) = in_backoff(shared, &key, at)
            {
                let wake = shared.wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    wake.notify_one();
                });
                return;
            }
        }
    }

    // Create and start a new container.
    let lookup = inputs::Lookup {
        engine: &shared.engine,
        node: &shared.config.node,
        site: shared.config.site.as_deref(),
    };
    let facts = inputs::PodFacts {
        spec,
        node: &shared.config.node,
        pod_ip,
        host_ip,
    };
    let always = container.image_pull_policy.as_deref() == Some("Always");
    if let Err((reason, message)) = ensure_image(&shared.cri, &container.image, always).await {
        warn!(pod = %spec.name, container = %container.name, %message, "image not available");
        record_failure(shared, &key, &reason, &message);
        backoff_next(shared, &key, backoff);
        return;
    }
    let env = match inputs::environment(&lookup, &facts, container) {
        Ok(env) => env,
        Err(e) => {
            record_failure(shared, &key, "CreateContainerConfigError", &e.0);
            return;
        }
    };
    let mounts = match inputs::mounts(spec, container, &pod_dir(&shared.config, &spec.uid)) {
        Ok(m) => m,
        Err(e) => {
            record_failure(shared, &key, "CreateContainerConfigError", &e.0);
            return;
        }
    };
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: container.name.clone(),
            attempt: next_count.max(0) as u32,
        }),
        image: Some(cri::ImageSpec {
            image: container.image.clone(),
            ..Default::default()
        }),
        command: container
            .command
            .iter()
            .map(|s| inputs::expand(s, &vars))
            .collect(),
        args: container
            .args
            .iter()
            .map(|s| inputs::expand(s, &vars))
            .collect(),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: env
            .into_iter()
            .map(|(key, value)| cri::KeyValue { key, value })
            .collect(),
        mounts,
        labels: [
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_NODE.to_owned(), shared.config.node.clone()),
            (LABEL_POD_UID.to_owned(), spec.uid.clone()),
            (LABEL_POD_NAMESPACE.to_owned(), spec.namespace.clone()),
            (LABEL_POD_NAME.to_owned(), spec.name.clone()),
            (LABEL_CONTAINER.to_owned(), container.name.clone()),
        ]
        .into(),
        annotations: [
            (ANNOTATION_RESTART_COUNT.to_owned(), next_count.to_string()),
            (ANNOTATION_SPEC_HASH.to_owned(), hash),
        ]
        .into(),
        log_path: format!("{}/{}.log", container.name, next_count),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: sandbox_cfg
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut runtime = shared.cri.runtime.clone();
    let id = match runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_owned(),
            config: Some(config),
            sandbox_config: Some(sandbox_cfg.clone()),
        })
        .await
    {
        Ok(reply) => reply.into_inner().container_id,
        Err(e) => {
            warn!(pod = %spec.name, container = %container.name, reason = %e.message(), "cannot create container");
            record_failure(shared, &key, "CreateContainerError", e.message());
            backoff_next(shared, &key, backoff);
            return;
        }
    };
    let started = runtime
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await;
    // A restart happened: the next crash waits longer. (A first start
    // does not count, as in kubelet.)
    if newest.is_some() || failure_time(shared, &key).is_some() {
        backoff_next(shared, &key, backoff);
    }
    match started {
        Ok(_) => {
            shared.state().failures.remove(&key);
            info!(pod = %format!("{}/{}", spec.namespace, spec.name), container = %container.name, id = %id, restarts = next_count, "container started");
        }
        Err(e) => {
            warn!(pod = %spec.name, container = %container.name, reason = %e.message(), "cannot start container");
            record_failure(shared, &key, "RunContainerError", e.message());
        }
    }
    // Keep the newest dead container of this name (the last state); remove
    // older ones so the runtime's list stays bounded.
    for old in mine.iter().skip(1) {
        if old.state != cri::ContainerState::ContainerRunning as i32 {
            remove_container(shared, &old.id).await;
        }
    }
}

/// `10s`, `1m20s`, `500ms`: a back-off as kubelet prints it.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match (s, d.subsec_millis()) {
        (0, ms) => format!("{ms}ms"),
        (s, _) if s >= 60 => format!("{}m{}s", s / 60, s % 60),
        (s, _) => format!("{s}s"),
    }
}

fn failure_time(shared: &Shared, key: &(String, String)) -> Option<SystemTime> {
    shared.state().failures.get(key).map(|f| f.at)
}

fn record_failure(shared: &Shared, key: &(String, String), reason: &str, message: &str) {
    shared.state().failures.insert(
        key.clone(),
        Failure {
            reason: reason.to_owned(),
            message: message.to_owned(),
            at: SystemTime::now(),
        },
    );
}

/// The remaining wait when `key` is in back-off for an event at `since`.
fn in_backoff(shared: &Shared, key: &(String, String), since: SystemTime) -> Option<Duration> {
    let delay = *shared.state().backoff.get(key)?;
    let until = since + delay;
    until
        .duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

fn backoff_next(shared: &Shared, key: &(String, String), backoff: Backoff) {
    let mut state = shared.state();
    let next = match state.backoff.get(key) {
        Some(d) => (*d * 2).min(backoff.max),
        None => backoff.base,
    };
    state.backoff.insert(key.clone(), next);
}

fn grace(spec: &PodSpecDoc) -> i64 {
    spec.termination_grace_period_seconds.unwrap_or(30).max(0)
}

async fn stop_container(shared: &Shared, id: &str, grace_s: i64) {
    let mut runtime = shared.cri.runtime.clone();
    if let Err(e) = runtime
        .stop_container(cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: grace_s,
        })
        .await
    {
        warn!(container = %id, reason = %e.message(), "cannot stop container");
    }
}

fn ensure_probes(
    shared: &Shared,
    spec: &PodSpecDoc,
    container: &Container,
    id: &str,
    pod_ip: &str,
) {
    let probes = probe::Probes {
        startup: container.startup_probe.clone(),
        liveness: container.liveness_probe.clone(),
        readiness: container.readiness_probe.clone(),
    };
    if !probes.any() {
        return;
    }
    let mut state = shared.state();
    if state.probes.contains_key(id) {
        return;
    }
    let results = Arc::new(Mutex::new(probe::initial(&probes)));
    let target = probe::Target {
        container_id: id.to_owned(),
        container_name: container.name.clone(),
        host: if spec.host_network || pod_ip.is_empty() {
            "127.0.0.1".into()
        } else {
            pod_ip.to_owned()
        },
        ports: container.ports.clone(),
        grace_s: grace(spec),
    };
    let task = tokio::spawn(probe::run(
        shared.cri.clone(),
        target,
        probes,
        results.clone(),
        shared.wake.clone(),
    ));
    state.probes.insert(
        id.to_owned(),
        ProbeHandle {
            results,
            task,
            created: Instant::now(),
        },
    );
}

/// Stops and removes everything of a pod; returns the final container
/// statuses by container name.
async fn terminate(
    shared: &Shared,
    uid: &str,
    rt: &Runtime,
    grace_s: i64,
) -> BTreeMap<String, cri::ContainerStatus> {
    let running: Vec<&cri::Container> = rt
        .containers
        .iter()
        .filter(|c| c.state == cri::ContainerState::ContainerRunning as i32)
        .collect();
    if !rt.sandboxes.is_empty() || !rt.containers.is_empty() {
        info!(%uid, containers = running.len(), grace_s, "stopping the pod");
    }
    let stops = running
        .iter()
        .map(|c| stop_container(shared, &c.id, grace_s));
    join_all(stops).await;
    let mut finals: BTreeMap<String, cri::ContainerStatus> = BTreeMap::new();
    let mut newest: BTreeMap<String, i64> = BTreeMap::new();
    for c in &rt.containers {
        let name = container_name(c).to_owned();
        if newest.get(&name).is_some_and(|t| *t >= c.created_at) {
            continue;
        }
        if let Some(status) = container_status(shared, &c.id).await {
            newest.insert(name.clone(), c.created_at);
            finals.insert(name, status);
        }
    }
    for c in &rt.containers {
        shared.state().probes.remove(&c.id);
        remove_container(shared, &c.id).await;
    }
    for sb in &rt.sandboxes {
        remove_sandbox(shared, &sb.id).await;
    }
    {
        let mut state = shared.state();
        state.backoff.retain(|(u, _), _| u != uid);
        state.failures.retain(|(u, _), _| u != uid);
        state.pod_failures.remove(uid);
    }
    let _ = std::fs::remove_dir_all(pod_dir(&shared.config, uid));
    finals
}

async fn join_all<F: std::future::Future<Output = ()>>(futures: impl IntoIterator<Item = F>) {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    for f in set {
        f.await;
    }
}

async fn remove_orphan(shared: &Shared, uid: &str, rt: Runtime) {
    let labels = rt
        .sandboxes
        .first()
        .map(|s| s.labels.clone())
        .or_else(|| rt.containers.first().map(|c| c.labels.clone()))
        .unwrap_or_default();
    info!(%uid, "the replica has no spec for this pod; removing it");
    let finals = terminate(shared, uid, &rt, ORPHAN_GRACE_S).await;
    if let (Some(ns), Some(name)) = (labels.get(LABEL_POD_NAMESPACE), labels.get(LABEL_POD_NAME)) {
        write_terminated(shared, ns, name, uid, finals, false);
    }
}

fn terminated_state(s: &cri::ContainerStatus) -> StateTerminated {
    StateTerminated {
        exit_code: s.exit_code,
        reason: Some(if s.reason.is_empty() {
            if s.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .to_owned()
        } else {
            s.reason.clone()
        }),
        message: (!s.message.is_empty()).then(|| s.message.clone()),
        started_at: clock::rfc3339_nanos(s.started_at),
        finished_at: clock::rfc3339_nanos(s.finished_at),
    }
}

/// Writes the status of a deleted pod: its containers terminated, and
/// `terminated: true`. With `create` false, only an existing status is
/// updated (an orphan may never have had one).
fn write_terminated(
    shared: &Shared,
    ns: &str,
    name: &str,
    uid: &str,
    finals: BTreeMap<String, cri::ContainerStatus>,
    create: bool,
) {
    let Some(id) = status_id(&shared.config.node, ns, name, uid) else {
        return;
    };
    let prev = shared
        .engine
        .with_replica(|r| r.get::<PodStatusDoc>(&id))
        .ok()
        .flatten();
    if prev.is_none() && !create {
        return;
    }
    let mut status = prev.unwrap_or_else(|| PodStatusDoc {
        uid: uid.to_owned(),
        phase: "Pending".into(),
        ..Default::default()
    });
    if status.terminated && finals.is_empty() {
        return;
    }
    for cs in status.container_statuses.iter_mut() {
        cs.ready = false;
        if let Some(f) = finals.get(&cs.name) {
            cs.state = ContainerState {
                terminated: Some(terminated_state(f)),
                ..Default::default()
            };
        } else if cs.state.terminated.is_none() {
            cs.state = ContainerState {
                terminated: Some(StateTerminated {
                    exit_code: 0,
                    reason: Some("Completed".into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
        }
    }
    let failed = status.container_statuses.iter().any(|c| {
        c.state
            .terminated
            .as_ref()
            .is_some_and(|t| t.exit_code != 0)
    });
    if status.phase == "Running" || status.phase == "Pending" {
        status.phase = if failed { "Failed" } else { "Succeeded" }.into();
    }
    let now = clock::rfc3339(SystemTime::now());
    for cond in status.conditions.iter_mut() {
        if (cond.kind == "Ready" || cond.kind == "ContainersReady") && cond.status != "False" {
            cond.status = "False".into();
            cond.reason = Some("PodCompleted".into());
            cond.last_transition_time = Some(now.clone());
        }
    }
    status.terminated = true;
    match shared.engine.put(&id, &status) {
        Ok(true) => info!(pod = %format!("{ns}/{name}"), %uid, "pod terminated"),
        Ok(false) => {}
        Err(e) => warn!(doc = %id, error = %e, "cannot write pod status"),
    }
}

/// Builds the pod's status from the runtime and writes it.
async fn write_status(
    shared: &Shared,
    spec: &PodSpecDoc,
    sandbox_id: Option<&str>,
    pod_ip: &str,
    rt_before: &Runtime,
) {
    write_status_with(shared, spec, sandbox_id, pod_ip, rt_before, None).await
}

/// [`write_status`], with the pod's init containers still to complete.
async fn write_status_with(
    shared: &Shared,
    spec: &PodSpecDoc,
    sandbox_id: Option<&str>,
    pod_ip: &str,
    rt_before: &Runtime,
    init: Option<&InitBlock>,
) {
    let Some(id) = status_id(&shared.config.node, &spec.namespace, &spec.name, &spec.uid) else {
        return;
    };
    let prev = shared
        .engine
        .with_replica(|r| r.get::<PodStatusDoc>(&id))
        .ok()
        .flatten();
    // The runtime after this sync's changes.
    let containers: Vec<cri::Container> = {
        let mut runtime = shared.cri.runtime.clone();
        let mut selector = managed_selector(&shared.config.node);
        selector.insert(LABEL_POD_UID.to_owned(), spec.uid.clone());
        match runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    label_selector: selector,
                    ..Default::default()
                }),
            })
            .await
        {
            Ok(r) => r.into_inner().containers,
            Err(_) => rt_before.containers.clone(),
        }
    };
    let mut statuses = Vec::new();
    for container in &spec.containers {
        let key = (spec.uid.clone(), container.name.clone());
        let mut mine: Vec<&cri::Container> = containers
            .iter()
            .filter(|c| container_name(c) == container.name)
            .collect();
        mine.sort_by_key(|c| std::cmp::Reverse(c.created_at));
        let prev_cs = prev.as_ref().and_then(|p| {
            p.container_statuses
                .iter()
                .find(|s| s.name == container.name)
        });
        let current = mine
            .iter()
            .find(|c| Some(c.pod_sandbox_id.as_str()) == sandbox_id)
            .copied();
        let failure = shared.state().failures.get(&key).cloned();
        let mut cs = ContainerStatus {
            name: container.name.clone(),
            image: container.image.clone(),
            restart_count: prev_cs.map(|p| p.restart_count).unwrap_or(0),
            last_state: prev_cs.and_then(|p| p.last_state.clone()),
            ..Default::default()
        };
        let dead_before = |exclude: &str| -> Option<&cri::Container> {
            mine.iter()
                .find(|c| {
                    c.id != exclude && c.state != cri::ContainerState::ContainerRunning as i32
                })
                .copied()
        };
        match current {
            Some(c) => {
                cs.restart_count = restart_count(c);
                cs.container_id = Some(format!("containerd://{}", c.id));
                cs.image_id = (!c.image_ref.is_empty()).then(|| c.image_ref.clone());
                let status = container_status(shared, &c.id).await;
                if let Some(old) = dead_before(&c.id)
                    && let Some(s) = container_status(shared, &old.id).await
                {
                    cs.last_state = Some(ContainerState {
                        terminated: Some(terminated_state(&s)),
                        ..Default::default()
                    });
                }
                if c.state == cri::ContainerState::ContainerRunning as i32 {
                    let results = shared
                        .state()
                        .probes
                        .get(&c.id)
                        .and_then(|h| h.results.lock().ok().map(|r| r.clone()));
                    let has_probes =
                        container.readiness_probe.is_some() || container.startup_probe.is_some();
                    let (started, ready) = match results {
                        Some(r) => (r.started, r.ready),
                        None => (container.startup_probe.is_none(), !has_probes),
                    };
                    cs.started = Some(started);
                    cs.ready = ready;
                    cs.state = ContainerState {
                        running: Some(StateRunning {
                            started_at: status
                                .as_ref()
                                .and_then(|s| clock::rfc3339_nanos(s.started_at)),
                        }),
                        ..Default::default()
                    };
                } else if c.state == cri::ContainerState::ContainerCreated as i32 {
                    cs.started = Some(false);
                    cs.state = waiting(failure.as_ref(), "ContainerCreating");
                } else {
                    cs.started = Some(false);
                    let term = status.as_ref().map(terminated_state).unwrap_or_default();
                    let restarting = should_restart(spec.restart_policy, term.exit_code);
                    if restarting {
                        cs.last_state = Some(ContainerState {
                            terminated: Some(term),
                            ..Default::default()
                        });
                        cs.state = waiting(failure.as_ref(), "ContainerCreating");
                    } else {
                        cs.state = ContainerState {
                            terminated: Some(term),
                            ..Default::default()
                        };
                    }
                }
            }
            None => {
                cs.started = Some(false);
                if let Some(old) = mine.first() {
                    cs.restart_count = restart_count(old);
                }
                let pod_failure = shared.state().pod_failures.get(&spec.uid).cloned();
                let default = if init.is_some() {
                    "PodInitializing"
                } else {
                    "ContainerCreating"
                };
                cs.state = waiting(failure.as_ref().or(pod_failure.as_ref()), default);
            }
        }
        statuses.push(cs);
    }
    let pod_failure = shared.state().pod_failures.get(&spec.uid).cloned();
    let status = PodStatusDoc {
        uid: spec.uid.clone(),
        phase: match init {
            Some(b) if b.failed => "Failed".into(),
            Some(_) => "Pending".into(),
            None => phase(spec.restart_policy, &statuses, sandbox_id.is_some()),
        },
        conditions: conditions(prev.as_ref(), &statuses, sandbox_id.is_some(), init),
        // Init progress is reported through the Initialized condition.
        init_container_statuses: Vec::new(),
        container_statuses: statuses,
        pod_ip: (!pod_ip.is_empty()).then(|| pod_ip.to_owned()).or_else(|| {
            if spec.host_network {
                shared.config.node_ip.clone()
            } else {
                None
            }
        }),
        host_ip: shared.config.node_ip.clone(),
        start_time: prev
            .as_ref()
            .and_then(|p| p.start_time.clone())
            .or_else(|| Some(clock::rfc3339(SystemTime::now()))),
        reason: pod_failure.as_ref().map(|f| f.reason.clone()),
        message: pod_failure.as_ref().map(|f| f.message.clone()),
        terminated: false,
    };
    if let Err(e) = shared.engine.put(&id, &status) {
        warn!(doc = %id, error = %e, "cannot write pod status");
    }
}

fn waiting(failure: Option<&Failure>, default_reason: &str) -> ContainerState {
    ContainerState {
        waiting: Some(match failure {
            Some(f) => StateWaiting {
                reason: Some(f.reason.clone()),
                message: Some(f.message.clone()),
            },
            None => StateWaiting {
                reason: Some(default_reason.to_owned()),
                message: None,
            },
        }),
        ..Default::default()
    }
}

/// The pod's phase from its containers, as kubelet computes it.
fn phase(policy: RestartPolicy, statuses: &[ContainerStatus], has_sandbox: bool) -> String {
    if !has_sandbox || statuses.is_empty() {
        return "Pending".into();
    }
    let running = statuses
        .iter()
        .filter(|s| s.state.running.is_some())
        .count();
    let never_ran = statuses
        .iter()
        .filter(|s| s.state.waiting.is_some() && s.restart_count == 0 && s.last_state.is_none())
        .count();
    let terminated: Vec<&StateTerminated> = statuses
        .iter()
        .filter_map(|s| s.state.terminated.as_ref())
        .collect();
    if never_ran > 0 {
        return "Pending".into();
    }
    if running > 0 {
        return "Running".into();
    }
    if terminated.len() == statuses.len() {
        let failed = terminated.iter().any(|t| t.exit_code != 0);
        return match (policy, failed) {
            (RestartPolicy::Always, _) => "Running",
            (_, false) => "Succeeded",
            (RestartPolicy::Never, true) => "Failed",
            (RestartPolicy::OnFailure, true) => "Running",
        }
        .into();
    }
    "Running".into()
}

fn conditions(
    prev: Option<&PodStatusDoc>,
    statuses: &[ContainerStatus],
    has_sandbox: bool,
    init: Option<&InitBlock>,
) -> Vec<Condition> {
    let all_ready = has_sandbox && !statuses.is_empty() && statuses.iter().all(|s| s.ready);
    let now = clock::rfc3339(SystemTime::now());
    let cond = |kind: &str, ok: bool, reason: Option<&str>, message: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let last = prev
            .and_then(|p| p.conditions.iter().find(|c| c.kind == kind))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            kind: kind.to_owned(),
            status: status.to_owned(),
            last_transition_time: Some(last),
            reason: if ok { None } else { reason.map(str::to_owned) },
            message: if ok { None } else { message.map(str::to_owned) },
        }
    };
    let (init_reason, init_message) = match init {
        Some(b) => (b.reason.as_str(), Some(b.message.as_str())),
        None => ("PodInitializing", None),
    };
    vec![
        cond("PodScheduled", true, None, None),
        cond(
            "Initialized",
            has_sandbox && init.is_none(),
            Some(init_reason),
            init_message,
        ),
        cond(
            "ContainersReady",
            all_ready,
            Some("ContainersNotReady"),
            None,
        ),
        cond("Ready", all_ready, Some("ContainersNotReady"), None),
    ]
}

/// Removes every sandbox and container the manager of `node` created. For
/// tests and for decommissioning a node; a running manager would recreate
/// the pods its replica still has.
pub async fn remove_all(cri: &CriClient, node: &str) -> Result<usize, tonic::Status> {
    let pods = list_runtime(cri, node).await?;
    let mut runtime = cri.runtime.clone();
    let mut n = 0;
    for rt in pods.values() {
        for c in &rt.containers {
            let _ = runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: c.id.clone(),
                    timeout: 0,
                })
                .await;
            let _ = runtime
                .remove_container(cri::RemoveContainerRequest {
                    container_id: c.id.clone(),
                })
                .await;
        }
        for sb in &rt.sandboxes {
            let _ = runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await;
            runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_sync::PeerId;
    use outpost_sync::access::Roster;

    /// An engine over a replica in a fresh directory (removed by the caller).
    fn engine_in(name: &str) -> (Engine, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(outpost_sync::test_utils::unique_name(name));
        let me = PeerId::from(iroh::SecretKey::generate().public());
        let replica = outpost_sync::replica::Replica::open(&dir, me, Default::default()).unwrap();
        let engine = Engine::new(replica, Roster::new(), Default::default());
        (engine, dir)
    }

    /// The id of pod `web` (uid `u1`) on node `n1`, of `kind`.
    fn web(kind: DocKind) -> DocId {
        DocId::new(kind, Owner::Node("n1"), &["default", "web", "u1"]).unwrap()
    }

    fn spec(uid: &str, image: &str) -> PodSpecDoc {
        PodSpecDoc {
            namespace: "default".into(),
            name: "web".into(),
            uid: uid.into(),
            containers: vec![outpost_sync::schema::Container {
                name: "main".into(),
                image: image.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The pod manager keeps the specs it read by version: a changed,
    /// deleted or re-created spec is read again, an unchanged one is not
    /// read at all, and a deleted one is remembered as deleted.
    #[test]
    fn pod_specs_are_read_again_when_they_change() {
        let (engine, dir) = engine_in("outpost-read-specs");
        let id = web(DocKind::PodSpec);
        let mut read = ReadSpecs::default();
        let image = |pods: &HashMap<String, (DocId, PodSpecDoc)>| {
            pods.get("u1").map(|(_, s)| s.containers[0].image.clone())
        };

        engine.put(&id, &spec("u1", "busybox:1")).unwrap();
        let (pods, _) = desired_pods(&engine, "n1", &mut read);
        assert_eq!(image(&pods).as_deref(), Some("busybox:1"));
        // Unchanged: served from what was read, the same spec.
        let (pods, _) = desired_pods(&engine, "n1", &mut read);
        assert_eq!(image(&pods).as_deref(), Some("busybox:1"));

        engine.put(&id, &spec("u1", "busybox:2")).unwrap();
        let (pods, _) = desired_pods(&engine, "n1", &mut read);
        assert_eq!(image(&pods).as_deref(), Some("busybox:2"));

        assert!(engine.delete(&id).unwrap());
        let (pods, _) = desired_pods(&engine, "n1", &mut read);
        assert!(pods.is_empty(), "{pods:?}");
        assert!(
            matches!(read.0.get(&id), Some((_, None))),
            "deleted, remembered so"
        );

        engine.put(&id, &spec("u1", "busybox:3")).unwrap();
        let (pods, _) = desired_pods(&engine, "n1", &mut read);
        assert_eq!(image(&pods).as_deref(), Some("busybox:3"));
        drop(engine);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A finished pod's status is deleted once its spec is, and its
    /// tombstone is then remembered rather than read each pass.
    #[test]
    fn a_gone_pods_status_is_deleted_and_its_tombstone_remembered() {
        let (engine, dir) = engine_in("outpost-tombstones");
        let spec_id = web(DocKind::PodSpec);
        let status_id = web(DocKind::PodStatus);
        engine.put(&spec_id, &spec("u1", "busybox:1")).unwrap();
        let status = PodStatusDoc {
            uid: "u1".into(),
            phase: "Succeeded".into(),
            ..Default::default()
        };
        engine.put(&status_id, &status).unwrap();
        let mut tombstones = Tombstones::default();

        // The spec is still there: the status stays.
        forget_deleted_pods(&engine, "n1", &mut tombstones, |_| false);
        assert!(!engine.with_replica(|r| r.is_deleted(&status_id)).unwrap());
        // A busy pod's status stays whatever its spec.
        assert!(engine.delete(&spec_id).unwrap());
        forget_deleted_pods(&engine, "n1", &mut tombstones, |_| true);
        assert!(!engine.with_replica(|r| r.is_deleted(&status_id)).unwrap());

        forget_deleted_pods(&engine, "n1", &mut tombstones, |_| false);
        assert!(engine.with_replica(|r| r.is_deleted(&status_id)).unwrap());
        assert!(tombstones.0.is_empty(), "found deleted on the next pass");
        forget_deleted_pods(&engine, "n1", &mut tombstones, |_| false);
        assert!(tombstones.0.contains_key(&status_id));

        // A status written again (the pod came back) is no tombstone.
        engine.put(&status_id, &status).unwrap();
        engine.put(&spec_id, &spec("u1", "busybox:1")).unwrap();
        forget_deleted_pods(&engine, "n1", &mut tombstones, |_| false);
        assert!(!engine.with_replica(|r| r.is_deleted(&status_id)).unwrap());
        assert!(!tombstones.0.contains_key(&status_id));
        drop(engine);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn cs(state: ContainerState, restart_count: i32) -> ContainerStatus {
        ContainerStatus {
            state,
            restart_count,
            ..Default::default()
        }
    }

    #[test]
    fn phases_follow_kubelet() {
        let running = ContainerState {
            running: Some(StateRunning::default()),
            ..Default::default()
        };
        let ok = ContainerState {
            terminated: Some(StateTerminated::default()),
            ..Default::default()
        };
        let failed = ContainerState {
            terminated: Some(StateTerminated {
                exit_code: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let waiting = ContainerState {
            waiting: Some(StateWaiting::default()),
            ..Default::default()
        };
        use RestartPolicy::*;
        assert_eq!(phase(Always, &[cs(running.clone(), 0)], true), "Running");
        assert_eq!(phase(Always, &[cs(waiting.clone(), 0)], true), "Pending");
        assert_eq!(phase(Always, &[cs(waiting, 3)], true), "Running");
        assert_eq!(phase(Never, &[cs(ok.clone(), 0)], true), "Succeeded");
        assert_eq!(phase(Never, &[cs(failed.clone(), 0)], true), "Failed");
        assert_eq!(phase(OnFailure, &[cs(failed, 0)], true), "Running");
        assert_eq!(phase(Always, &[cs(ok, 0)], false), "Pending");
    }

    #[test]
    fn spec_hash_is_stable() {
        let c = Container {
            name: "a".into(),
            image: "busybox".into(),
            ..Default::default()
        };
        assert_eq!(spec_hash(&c), spec_hash(&c.clone()));
        let mut d = c.clone();
        d.image = "other".into();
        assert_ne!(spec_hash(&c), spec_hash(&d));
    }
}
