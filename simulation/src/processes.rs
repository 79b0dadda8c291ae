//! The real-process mode: a real `outpost-cloud` and real `outpost-edge`
//! processes, each in a network namespace of its own, talking iroh over
//! real UDP, with the scenario's faults applied by nftables and SIGKILL.
//!
//! # The fleet
//! One cloud bridge (`cloud-0`) and the scenario's edges (`edge-0`...), each
//! in a namespace made by [`crate::netns`]. The bridge reaches the test
//! environment's Kubernetes API server through a [`crate::relay`]; every
//! edge runs pods on the environment's containerd (its socket is a file,
//! seen from every namespace). Edges are admitted with join tokens as a user
//! admits them. Node names carry the harness's process id
//! (`osim<pid>r<run>-edge-0`), so runs never touch each other's objects.
//!
//! # The workload
//! In namespace `osim<pid>r<run>` of the cluster, every edge has a Pod bound to it
//! that mounts a ConfigMap, and a KubeEdge Device with a `setpoint`
//! property (its Modbus address is closed, so the device is offline, which
//! the edge reports). Every `workload.api_interval` the harness writes
//! through the Kubernetes API, as a user would: a new `seq` in one edge's
//! ConfigMap, or, with probability `workload.api_desired_share`, a new
//! desired setpoint in one edge's Device. Values come from one counter, so
//! each write is unique. A write counts as acknowledged when the API server
//! accepted it.
//!
//! # Faults
//! `partition`, `one-way`, `flap`, `isolate-site` and `crash` events, and
//! `network` events that change `loss` (and the base `network.loss`), are
//! applied; node selectors are resolved from the seed as in the
//! deterministic mode. Everything heals at `duration`. Delay, reordering,
//! duplication and resets need `netem`, which this kernel lacks, and clock
//! skew and membership changes need control of a process's clock and
//! lifecycle that the real binaries do not give: a scenario with any of
//! them is refused, with the reason. A crash is a SIGKILL of the process
//! (its data dir survives, and an edge's containers keep running, as after
//! a crash of the agent); it restarts after `restart_after`, or at the heal.
//!
//! Every `workload.report_interval`, each edge's local app sets its
//! device's desired setpoint with probability `workload.edge_desired_prob`,
//! the way a KubeEdge app does it: a twin update on the broker of the edge's
//! namespace (a mosquitto the harness starts there). It counts as
//! acknowledged once the edge's API shows it. The two sides never write one
//! device less than a second apart, so the harness knows their order.
//!
//! # Checkers, on what the processes report
//! Each edge is read through its local API (`/api/v1/configmaps`,
//! `/api/v1/devices`, `/api/v1/status`), the cloud through Kubernetes.
//! - **no acknowledged write lost**: a ConfigMap value an edge has shown is
//!   never replaced by an older one, and once converged each edge shows the
//!   last acknowledged value of each of its ConfigMaps, and the last
//!   acknowledged desired value of one of the two writers;
//! - **convergence**, within `checks.settle_timeout` of the heal: every
//!   edge shows the last acknowledged ConfigMap, the edge and the API's
//!   Device agree on the desired setpoint, the edge is connected to the
//!   cloud with nothing pending, and what the edge reports is in the API
//!   (its Node is Ready, its Pod Running, its device's state in the
//!   DeviceStatus);
//! - **conflict rule**: where the last desired writes of the two sides to a
//!   device were both made while its edge was cut off from the cloud, the
//!   one that lost is listed in the device's DeviceStatus as a lost
//!   conflict. Which one wins is the hybrid logical clocks' call: the
//!   cloud's write is stamped when the bridge records it, not when the API
//!   server accepted it, and the harness sees only the latter. (A bridge
//!   that records an API write late, because it was busy or down, stamps it
//!   late: an older API write can beat a newer edge write.)
//! - **liveness**: after convergence, a new write reaches every edge within
//!   `checks.liveness_bound`.
//!
//! # What the report's lag is
//! The time from sending a ConfigMap or Device write to the API to the edge
//! showing it, or a later value of the same object, on its local API's
//! watch: the API server, the bridge's watch, replication over iroh and the
//! edge's replica, end to end. A write superseded while its edge was cut
//! off counts with all the time it waited. Times are from the start of the
//! workload, in host milliseconds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::GroupVersionKind;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::netns::{Conditions, Net, NetError};
use crate::relay::End;
use crate::report::{
    Failure, FaultWindow, LagSample, Percentiles, Report, Restored, heals, lag_bin_ms,
    lag_over_time,
};
use crate::scenario::{Event, NetworkChange, Scenario};

/// The sync port of every node, on its namespace's address.
const SYNC_PORT: u16 = 7700;
/// The edges' local API, on each namespace's loopback.
const EDGE_API: &str = "127.0.0.1:10550";
/// The port of the MQTT broker each edge's namespace runs, on its loopback.
const EDGE_MQTT_PORT: &str = "1883";
/// The bridge's metrics, on the cloud namespace's loopback.
const CLOUD_METRICS: &str = "127.0.0.1:9464";
/// How long the fleet may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the end of a run waits for the edges to stop the pods.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a relay may take to bind in its namespace.
const RELAY_READY_WITHIN: Duration = Duration::from_secs(20);

/// Where the parts of a run are.
#[derive(Debug, Clone)]
pub struct Options {
    /// The directory with `outpost-cloud`, `outpost-edge` and `outpost-sim`.
    pub bin_dir: PathBuf,
    /// Data dirs, logs and sockets of the run go under this directory.
    pub work_dir: PathBuf,
    /// The Kubernetes API server's kubeconfig (admin: the harness creates
    /// namespaces, nodes' admission tokens and workload objects).
    pub kubeconfig: PathBuf,
    /// containerd's CRI socket.
    pub containerd_socket: PathBuf,
    /// The image of the workload's pods (present in containerd).
    pub image: String,
    /// containerd's sandbox image.
    pub pause_image: String,
}

/// Why a run could not be carried out (as opposed to a checker failing).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The scenario asks for something this mode cannot do.
    #[error("scenario: {0}")]
    Scenario(String),
    /// The namespaces or rules could not be set up.
    #[error("network: {0}")]
    Net(#[from] NetError),
    /// The Kubernetes API refused or failed.
    #[error("Kubernetes API: {what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// A file or process could not be handled.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The fleet did not come up.
    #[error("the fleet did not come up: {0}")]
    Start(String),
    /// Interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Io { what, source }
}

fn kerr(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Kube { what, source }
}

/// Figures of one process over the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    /// Times it was started.
    pub starts: u32,
    /// Largest peak resident memory of its incarnations, KiB (VmHWM).
    pub peak_rss_kib: u64,
    /// Size of its data dir at the end (replica, key; container logs left
    /// out), bytes.
    pub data_bytes: u64,
}

/// The report of a real-process run: the deterministic mode's report
/// (what applies of it) and the figures of each process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    /// The run's figures and verdict.
    #[serde(flatten)]
    pub report: Report,
    /// Always `processes`.
    pub mode: String,
    /// Figures of each process, by node name.
    pub processes: BTreeMap<String, ProcessFigures>,
    /// Writes the API server refused or failed (not acknowledged, not checked).
    pub api_errors: u64,
    /// Edge-side desired writes published on the edges' event buses.
    pub edge_writes: u64,
    /// Concurrent desired writes the conflict checker looked for (a loser
    /// it expected in a DeviceStatus); `report.conflicts_visible` of them were there.
    pub conflicts_expected: u64,
}

/// Checks that a scenario fits this mode, with the reason when it does not.
pub fn check_scenario(s: &Scenario) -> Result<(), ProcessError> {
    let bad = |m: String| Err(ProcessError::Scenario(m));
    if s.fleet.clouds != 1 {
        return bad(format!(
            "the real-process mode runs one cloud bridge, not {}",
            s.fleet.clouds
        ));
    }
    if s.fleet.edges == 0 || s.fleet.edges > 16 {
        return bad(format!(
            "the real-process mode runs 1 to 16 edges (each a real agent with a pod), not {}",
            s.fleet.edges
        ));
    }
    if s.nemesis.is_some() {
        return bad("the nemesis draws faults this mode cannot apply (skew, churn); write the faults as [[event]]s".into());
    }
    let net = &s.network;
    if net.reset > 0.0 || net.duplicate > 0.0 || net.reorder > 0.0 {
        return bad("network.reset, duplicate and reorder need netem, which this kernel lacks; only loss is applied".into());
    }
    for e in &s.events {
        match e {
            Event::Partition { .. }
            | Event::OneWay { .. }
            | Event::Flap { .. }
            | Event::IsolateSite { .. }
            | Event::Crash { .. } => {}
            Event::Network { change, .. } => {
                let NetworkChange {
                    delay,
                    reset,
                    duplicate,
                    reorder,
                    ..
                } = change;
                if delay.is_some() || reset.is_some() || duplicate.is_some() || reorder.is_some() {
                    return bad(format!(
                        "event at {}: only `loss` can change in the real-process mode (delay, reset, duplicate and reorder need netem)",
                        e.at()
                    ));
                }
            }
            Event::Skew { .. } | Event::Join { .. } | Event::Leave { .. } => {
                return bad(format!(
                    "event at {}: `{}` is not supported in the real-process mode (it needs control of the processes' clocks and membership); use the deterministic mode (outpost-sim run)",
                    e.at(),
                    e.kind()
                ));
            }
        }
    }
    Ok(())
}

/// One fault as applied: when, what it cuts, the loss it sets, who it crashes.
#[derive(Debug, Clone)]
struct Window {
    kind: &'static str,
    label: String,
    start: u64,
    end: u64,
    cuts: Vec<(String, String)>,
    loss: Option<f64>,
    crash: Vec<String>,
}

/// The fleet's names: `cloud-0`, then the edges.
fn names(edges: usize) -> Vec<String> {
    std::iter::once("cloud-0".to_owned())
        .chain((0..edges).map(|i| format!("edge-{i}")))
        .collect()
}

fn select(rng: &mut fastrand::Rng, sel: &str, edges: usize, sites: usize) -> Vec<String> {
    let all_edges: Vec<String> = (0..edges).map(|i| format!("edge-{i}")).collect();
    match sel {
        "clouds" => vec!["cloud-0".into()],
        "edges" => all_edges,
        "all" => names(edges),
        "random-edge" => vec![format!("edge-{}", rng.usize(0..edges))],
        _ => {
            if let Some(f) = sel.strip_prefix("fraction:") {
                let f: f64 = f.parse().unwrap_or(0.0);
                let mut pick: Vec<usize> = (0..edges).collect();
                rng.shuffle(&mut pick);
                pick.truncate((edges as f64 * f).round() as usize);
                pick.sort_unstable();
                pick.into_iter().map(|i| format!("edge-{i}")).collect()
            } else if let Some(s) = sel.strip_prefix("site:site-") {
                let s: usize = s.parse().unwrap_or(usize::MAX);
                (0..edges)
                    .filter(|i| sites > 0 && i % sites == s)
                    .map(|i| format!("edge-{i}"))
                    .collect()
            } else if names(edges).iter().any(|n| n == sel) {
                vec![sel.to_owned()]
            } else {
                vec![]
            }
        }
    }
}

fn both_ways(a: &[String], b: &[String]) -> Vec<(String, String)> {
    let mut cuts = Vec::new();
    for x in a {
        for y in b {
            if x != y {
                cuts.push((x.clone(), y.clone()));
                cuts.push((y.clone(), x.clone()));
            }
        }
    }
    cuts
}

/// The scenario's timeline as windows, every one ending by `duration`.
fn plan(rng: &mut fastrand::Rng, s: &Scenario) -> Result<Vec<Window>, ProcessError> {
    let (edges, sites, end) = (s.fleet.edges, s.fleet.sites, s.duration.0);
    let mut out = Vec::new();
    let pick = |rng: &mut fastrand::Rng, sel: &str| -> Result<Vec<String>, ProcessError> {
        let v = select(rng, sel, edges, sites);
        if v.is_empty() {
            Err(ProcessError::Scenario(format!(
                "selector {sel:?} names no node of this fleet"
            )))
        } else {
            Ok(v)
        }
    };
    for e in &s.events {
        let at = e.at().0.min(end);
        match e {
            Event::Partition { length, a, b, .. } => {
                let (x, y) = (pick(rng, a)?, pick(rng, b)?);
                out.push(Window {
                    kind: "partition",
                    label: format!("partition {a} | {b}"),
                    start: at,
                    end: (at + length.0).min(end),
                    cuts: both_ways(&x, &y),
                    loss: None,
                    crash: vec![],
                });
            }
            Event::OneWay {
                length, from, to, ..
            } => {
                let (x, y) = (pick(rng, from)?, pick(rng, to)?);
                let cuts = x
                    .iter()
                    .flat_map(|f| y.iter().map(move |t| (f.clone(), t.clone())))
                    .filter(|(f, t)| f != t)
                    .collect();
                out.push(Window {
                    kind: "one-way",
                    label: format!("one-way {from} -> {to}"),
                    start: at,
                    end: (at + length.0).min(end),
                    cuts,
                    loss: None,
                    crash: vec![],
                });
            }
            Event::Flap {
                length,
                a,
                b,
                down,
                up,
                ..
            } => {
                let (x, y) = (pick(rng, a)?, pick(rng, b)?);
                let stop = (at + length.0).min(end);
                let mut t = at;
                while t < stop {
                    out.push(Window {
                        kind: "flap",
                        label: format!("flap {a} | {b}"),
                        start: t,
                        end: (t + down.0.max(1)).min(stop),
                        cuts: both_ways(&x, &y),
                        loss: None,
                        crash: vec![],
                    });
                    t += down.0.max(1) + up.0.max(1);
                }
            }
            Event::IsolateSite { length, site, .. } => {
                let x = pick(rng, &format!("site:{site}"))?;
                out.push(Window {
                    kind: "isolate-site",
                    label: format!("isolate {site}"),
                    start: at,
                    end: (at + length.0).min(end),
                    cuts: both_ways(&["cloud-0".to_owned()], &x),
                    loss: None,
                    crash: vec![],
                });
            }
            Event::Crash {
                node,
                restart_after,
                ..
            } => {
                let x = pick(rng, node)?;
                out.push(Window {
                    kind: "crash",
                    label: format!("crash {node}"),
                    start: at,
                    end: restart_after.map_or(end, |r| (at + r.0).min(end)),
                    cuts: vec![],
                    loss: None,
                    crash: x,
                });
            }
            Event::Network { length, change, .. } => {
                out.push(Window {
                    kind: "network",
                    label: format!(
                        "loss {}",
                        crate::report::human_prob(change.loss.unwrap_or(s.network.loss))
                    ),
                    start: at,
                    end: (at + length.0).min(end),
                    cuts: vec![],
                    loss: change.loss,
                    crash: vec![],
                });
            }
            Event::Skew { .. } | Event::Join { .. } | Event::Leave { .. } => {
                // Refused by check_scenario.
            }
        }
    }
    out.sort_by_key(|w| (w.start, w.end));
    Ok(out)
}

/// The network and the crashed nodes at `t`.
fn state_at(t: u64, windows: &[Window], base_loss: f64) -> (Conditions, BTreeSet<String>) {
    let mut c = Conditions {
        cut: BTreeSet::new(),
        loss: base_loss,
    };
    let mut down = BTreeSet::new();
    for w in windows.iter().filter(|w| w.start <= t && t < w.end) {
        c.cut.extend(w.cuts.iter().cloned());
        if let Some(l) = w.loss {
            c.loss = l;
        }
        down.extend(w.crash.iter().cloned());
    }
    (c, down)
}

/// A process of the fleet, restartable.
struct Proc {
    node: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    figures: ProcessFigures,
}

impl Proc {
    fn start(&mut self, net: &Net, kubeconfig: &Path) -> Result<(), ProcessError> {
        let node = net
            .node(&self.node)
            .ok_or_else(|| ProcessError::Start(format!("no namespace for {}", self.node)))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("cannot open {}", self.log.display())))?;
        let err = log
            .try_clone()
            .map_err(io(format!("cannot open {}", self.log.display())))?;
        let mut cmd = net.command(node, &self.program);
        cmd.args(&self.args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("OUTPOST_SIM_CHILD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(io(format!(
            "cannot start {} in {}",
            self.program.display(),
            node.ns
        )))?;
        self.child = Some(child);
        self.figures.starts += 1;
        Ok(())
    }

    fn sample_rss(&mut self) {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            return;
        };
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        {
            self.figures.peak_rss_kib = self.figures.peak_rss_kib.max(kib);
        }
    }

    async fn kill(&mut self) {
        self.sample_rss();
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

/// Opens an HTTP/1 connection over a unix socket (an edge's API through its
/// relay, or a process's metrics) and sends a GET of `uri`; `timeout` bounds
/// the wait for the response's head.
async fn unix_get(
    sock: &Path,
    uri: &str,
    timeout: Option<Duration>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let sent = sender.send_request(req);
    let resp = match timeout {
        Some(limit) => tokio::time::timeout(limit, sent)
            .await
            .map_err(|_| "timed out".to_string())?,
        None => sent.await,
    };
    resp.map_err(|e| format!("request: {e}"))
}

/// An HTTP GET over a unix socket (an edge's API through its relay).
async fn http_get(sock: &Path, uri: &str) -> Result<Value, String> {
    let resp = unix_get(sock, uri, Some(Duration::from_secs(5))).await?;
    if !resp.status().is_success() {
        return Err(format!("{uri}: HTTP {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("{uri}: not JSON: {e}"))
}

/// A value seen at an edge: (edge, object kind, value, when).
#[derive(Debug, Clone)]
struct Seen {
    edge: usize,
    kind: &'static str,
    value: u64,
    at_ms: u64,
}

/// Follows one edge's ConfigMaps and devices through its API's watches and
/// reports every value of the workload's objects as it appears.
async fn watch_edge(
    sock: PathBuf,
    edge: usize,
    ns: String,
    t0: Instant,
    tx: mpsc::UnboundedSender<Seen>,
) {
    let targets = [
        ("configmap", "/api/v1/configmaps?watch=true"),
        ("desired", "/api/v1/devices?watch=true"),
    ];
    let mut tasks = Vec::new();
    for (kind, uri) in targets {
        let (sock, ns, tx) = (sock.clone(), ns.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                if tx.is_closed() {
                    return;
                }
                if let Err(e) = watch_once(&sock, uri, kind, edge, &ns, t0, &tx).await {
                    debug!(edge, kind, "watch ended: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Follows the workload's Devices in the API and reports each desired
/// setpoint as it appears there (edge-side writes come back this way).
async fn watch_api_devices(api: Api<DynamicObject>, t0: Instant, tx: mpsc::UnboundedSender<Seen>) {
    use futures::StreamExt;
    use kube::runtime::watcher;
    let mut events = watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = events.next().await {
        let obj = match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
            Ok(_) => continue,
            Err(e) => {
                debug!("device watch: {e}");
                continue;
            }
        };
        let edge = obj
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix("dev-edge-"))
            .and_then(|n| n.parse::<usize>().ok());
        let value = obj.data["spec"]["properties"][0]["desired"]["value"]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(edge), Some(value)) = (edge, value) {
            let seen = Seen {
                edge,
                kind: "api-desired",
                value,
                at_ms: t0.elapsed().as_millis() as u64,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    }
}

/// The workload's value in one watch object, if it is the edge's own.
fn value_of(kind: &str, edge: usize, ns: &str, obj: &Value) -> Option<u64> {
    if obj["namespace"] != ns {
        return None;
    }
    match kind {
        "configmap" if obj["name"] == format!("cfg-edge-{edge}") => {
            obj["data"]["seq"].as_str()?.parse().ok()
        }
        "desired" if obj["name"] == format!("dev-edge-{edge}") => {
            obj["properties"]["setpoint"]["desired"]
                .as_str()?
                .parse()
                .ok()
        }
        _ => None,
    }
}

async fn watch_once(
    sock: &Path,
    uri: &str,
    kind: &'static str,
    edge: usize,
    ns: &str,
    t0: Instant,
    tx: &mpsc::UnboundedSender<Seen>,
) -> Result<(), String> {
    let resp = unix_get(sock, uri, None).await?;
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(value) = value_of(kind, edge, ns, &ev["object"]) {
                let at_ms = t0.elapsed().as_millis() as u64;
                if tx
                    .send(Seen {
                        edge,
                        kind,
                        value,
                        at_ms,
                    })
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
    }
    Err("the watch closed".into())
}

/// An acknowledged write: its value, when it was sent, and who wrote it
/// (`true`: the edge, through its MQTT event bus).
#[derive(Debug, Clone, Copy)]
struct Write {
    value: u64,
    sent_ms: u64,
    edge: bool,
}

/// Writes to one device closer than this apart, from the two sides, are
/// not made: the harness could not tell which one the clocks ordered first.
const DESIRED_SPACING_MS: u64 = 1_000;

/// Everything a run keeps track of.
struct Run {
    seed: u64,
    scenario: Scenario,
    opts: Options,
    id: String,
    ns: String,
    dir: PathBuf,
    net: Option<Net>,
    client: kube::Client,
    cloud: Option<Proc>,
    edges: Vec<Proc>,
    relays: Vec<Child>,
    api_relay: Option<tokio::task::JoinHandle<()>>,
    cloud_addr: String,
    t0: Instant,
    /// Acknowledged writes per (edge, kind), in order of value.
    acked: BTreeMap<(usize, &'static str), Vec<Write>>,
    /// Desired values published on an edge's event bus and not yet shown by it.
    pending_edge: BTreeMap<usize, Vec<Write>>,
    /// When each edge's device was last written, from either side.
    last_desired_ms: BTreeMap<usize, u64>,
    /// Edge-side writes published.
    edge_writes: u64,
    /// Conflicts the checker expected to see, and saw, in DeviceStatus.
    conflicts: (u64, u64),
    /// The desired value each edge showed at the last convergence check.
    converged_desired: BTreeMap<usize, u64>,
    /// Highest value each edge has shown, per kind, and when.
    shown: BTreeMap<(usize, &'static str), (u64, u64)>,
    /// Per (edge, kind): how many of its acknowledged writes the edge has shown (or a later one).
    resolved: BTreeMap<(usize, &'static str), usize>,
    samples: Vec<LagSample>,
    failures: Vec<Failure>,
    failure_counts: BTreeMap<String, u64>,
    counter: u64,
    api_errors: u64,
    converged_at: Option<u64>,
    /// Sync messages and bytes sent, summed over the processes at the end.
    traffic: (u64, u64),
    progress: bool,
}

fn say(progress: bool, msg: &str) {
    if progress {
        eprintln!("outpost-sim processes: {msg}");
    }
}

impl Run {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// The run's namespace's objects of a KubeEdge `devices.kubeedge.io/v1beta1` kind.
    fn kubeedge_api(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("devices.kubeedge.io", "v1beta1", kind),
            plural,
        );
        Api::namespaced_with(self.client.clone(), &self.ns, &resource)
    }

    fn node_name(&self, edge: usize) -> String {
        format!("{}-edge-{edge}", self.id)
    }

    fn edge_sock(&self, edge: usize) -> PathBuf {
        self.dir.join(format!("edge-{edge}.api.sock"))
    }

    fn fail(&mut self, checker: &str, explanation: String) {
        let count = self.failure_counts.entry(checker.to_owned()).or_insert(0);
        *count += 1;
        if *count <= 5 {
            let at_ms = self.ms();
            self.failures.push(Failure {
                checker: checker.to_owned(),
                at_ms,
                explanation,
            });
        }
    }

    fn net(&self) -> Result<&Net, ProcessError> {
        self.net
            .as_ref()
            .ok_or_else(|| ProcessError::Start("the network is gone".into()))
    }

    /// Starts `outpost-sim relay` in `node`'s namespace and returns once it
    /// accepts connections, so that what connects through it next (the
    /// cloud, a test's client) does not race its bind.
    async fn relay(&mut self, node: &str, listen: End, connect: End) -> Result<(), ProcessError> {
        use tokio::io::AsyncBufReadExt;
        let net = self.net()?;
        let n = net
            .node(node)
            .ok_or_else(|| ProcessError::Start(format!("no namespace for {node}")))?;
        let mut cmd = net.command(n, &self.opts.bin_dir.join("outpost-sim"));
        cmd.args(["relay", "--listen", &listen.to_string()])
            .args(["--connect", &connect.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let what = format!("the relay in {} on {listen}", n.ns);
        let mut child = cmd.spawn().map_err(io(format!("cannot start {what}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ProcessError::Start(format!("{what}: no stdout")))?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match tokio::time::timeout(RELAY_READY_WITHIN, lines.next_line()).await {
            Ok(Ok(Some(line))) if line == crate::relay::READY => {}
            Ok(Ok(Some(line))) => {
                return Err(ProcessError::Start(format!("{what} said {line:?}")));
            }
            Ok(Ok(None)) => {
                let status = child.wait().await.map_err(io(what.clone()))?;
                return Err(ProcessError::Start(format!(
                    "{what} exited ({status}) before it was ready"
                )));
            }
            Ok(Err(e)) => return Err(ProcessError::Start(format!("{what}: {e}"))),
            Err(_) => {
                return Err(ProcessError::Start(format!(
                    "{what} was not ready within {RELAY_READY_WITHIN:?}"
                )));
            }
        }
        self.relays.push(child);
        Ok(())
    }

    async fn setup(&mut self) -> Result<(), ProcessError> {
        let swept = crate::netns::sweep_stale()?;
        if swept > 0 {
            say(
                self.progress,
                &format!("deleted {swept} namespaces of earlier runs that had died"),
            );
        }
        // And what such runs left in Kubernetes (their pods' containers
        // stay in containerd: only a running edge stops them).
        delete_objects(&self.client, crate::netns::owner_is_gone).await;
        for bin in ["outpost-cloud", "outpost-edge", "outpost-sim"] {
            if !self.opts.bin_dir.join(bin).is_file() {
                return Err(ProcessError::Start(format!(
                    "{} is missing: build the workspace first (cargo build --workspace --bins)",
                    self.opts.bin_dir.join(bin).display()
                )));
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(io(format!(
            "cannot create the work dir {}",
            self.dir.display()
        )))?;
        let edges = self.scenario.fleet.edges;
        say(
            self.progress,
            &format!(
                "creating {} network namespaces ({}-*) under {}",
                edges + 2,
                self.id,
                self.dir.display()
            ),
        );
        self.net = Some(Net::create(&self.id, &names(edges))?);

        // The API server, for the bridge in its namespace: a unix socket
        // served here, and a relay there on the kubeconfig's own address.
        let api = api_address(&self.opts.kubeconfig)?;
        let api_sock = self.dir.join("api.sock");
        let (listen, connect) = (End::Unix(api_sock.clone()), End::Tcp(api));
        let listener = crate::relay::bind(&listen)
            .await
            .map_err(io(format!("cannot listen on {listen}")))?;
        self.api_relay = Some(tokio::spawn(async move {
            if let Err(e) = listener.serve(connect).await {
                warn!("the API relay stopped: {e}");
            }
        }));
        self.relay("cloud-0", End::Tcp(api), End::Unix(api_sock))
            .await?;
        self.relay(
            "cloud-0",
            End::Unix(self.dir.join("cloud.metrics.sock")),
            End::Tcp(
                CLOUD_METRICS
                    .parse()
                    .map_err(|_| ProcessError::Start("bad metrics address".into()))?,
            ),
        )
        .await?;

        let cloud_ip = self
            .net()?
            .node("cloud-0")
            .map(|n| n.ip)
            .ok_or_else(|| ProcessError::Start("no cloud namespace".into()))?;
        let cloud_dir = self.dir.join("cloud-0");
        std::fs::create_dir_all(&cloud_dir).map_err(io("cannot create the cloud's data dir"))?;
        let mut cloud = Proc {
            node: "cloud-0".into(),
            program: self.opts.bin_dir.join("outpost-cloud"),
            args: vec![
                "run".into(),
                "--data-dir".into(),
                cloud_dir.display().to_string(),
                "--listen".into(),
                format!("{cloud_ip}:{SYNC_PORT}"),
                "--metrics-listen".into(),
                CLOUD_METRICS.into(),
                "--shard-group".into(),
                self.id.clone(),
                // Only this run's edges: the cluster may have others.
                "--node-prefix".into(),
                format!("{}-", self.id),
            ],
            log: self.dir.join("cloud-0.log"),
            child: None,
            figures: ProcessFigures::default(),
        };
        say(self.progress, "starting outpost-cloud");
        cloud.start(self.net()?, &self.opts.kubeconfig)?;
        self.cloud = Some(cloud);
        let peer_file = cloud_dir.join("peer-addr");
        let deadline = Instant::now() + START_TIMEOUT;
        self.cloud_addr = loop {
            if let Some(addr) = std::fs::read_to_string(&peer_file)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
            {
                break addr;
            }
            if let Some(c) = &mut self.cloud
                && !c.running()
            {
                return Err(ProcessError::Start(format!(
                    "outpost-cloud exited at start: {}",
                    log_tail(&c.log)
                )));
            }
            if Instant::now() > deadline {
                return Err(ProcessError::Start(format!(
                    "outpost-cloud wrote no peer address within {} s: {}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&self.dir.join("cloud-0.log"))
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        // The workload's namespace and model first, so that the bridge
        // finds them as soon as the edges come.
        self.create_objects().await?;

        for e in 0..edges {
            self.start_edge(e).await?;
        }
        say(
            self.progress,
            &format!(
                "waiting for {edges} Nodes Ready, Pods Running and every edge to show its objects"
            ),
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let missing = self.unmet(false).await;
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(ProcessError::Start(format!(
                    "after {} s: {} (logs in {})",
                    START_TIMEOUT.as_secs(),
                    missing.join("; "),
                    self.dir.display()
                )));
            }
            self.check_processes();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    async fn start_edge(&mut self, e: usize) -> Result<(), ProcessError> {
        let name = self.node_name(e);
        let dir = self.dir.join(format!("edge-{e}"));
        std::fs::create_dir_all(dir.join("pod-logs"))
            .map_err(io(format!("cannot create {}", dir.display())))?;
        let net = self.net()?;
        let node = net
            .node(&format!("edge-{e}"))
            .ok_or_else(|| ProcessError::Start(format!("no namespace for edge-{e}")))?
            .clone();
        // The node's own broker, for its edge apps (KubeEdge's event bus).
        let mut broker = net.command(&node, Path::new("mosquitto"));
        broker
            .args(["-p", EDGE_MQTT_PORT])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let broker = broker.spawn().map_err(io(format!(
            "cannot start mosquitto in {} (apt-get install mosquitto)",
            node.ns
        )))?;
        // Admission, once: a join token from the bridge, presented by the edge.
        let sites = self.scenario.fleet.sites;
        let mut token_cmd = tokio::process::Command::new(self.opts.bin_dir.join("outpost-cloud"));
        token_cmd
            .args(["token", "create", "--node", &name, "--ttl", "10m"])
            .env("KUBECONFIG", &self.opts.kubeconfig);
        if sites > 0 {
            token_cmd.args(["--site", &format!("{}-site-{}", self.id, e % sites)]);
        }
        let token = output(token_cmd, "outpost-cloud token create").await?;
        let mut join = net.command(&node, &self.opts.bin_dir.join("outpost-edge"));
        join.args(["join", "--token", token.trim(), "--cloud", &self.cloud_addr])
            .arg("--data-dir")
            .arg(&dir);
        output(join, &format!("outpost-edge join ({name})")).await?;
        let mut edge = Proc {
            node: format!("edge-{e}"),
            program: self.opts.bin_dir.join("outpost-edge"),
            args: vec![
                "run".into(),
                "--data-dir".into(),
                dir.display().to_string(),
                "--node-name".into(),
                name.clone(),
                "--cloud".into(),
                self.cloud_addr.clone(),
                "--listen".into(),
                format!("{}:{SYNC_PORT}", node.ip),
                "--containerd-socket".into(),
                self.opts.containerd_socket.display().to_string(),
                "--pause-image".into(),
                self.opts.pause_image.clone(),
                "--pod-log-dir".into(),
                dir.join("pod-logs").display().to_string(),
                "--node-ip".into(),
                node.ip.to_string(),
                "--mqtt".into(),
                format!("127.0.0.1:{EDGE_MQTT_PORT}"),
                "--api-listen".into(),
                EDGE_API.into(),
                "--heartbeat-s".into(),
                "2".into(),
            ],
            log: self.dir.join(format!("edge-{e}.log")),
            child: None,
            figures: ProcessFigures::default(),
        };
        if sites > 0 {
            edge.args
                .extend(["--site".into(), format!("{}-site-{}", self.id, e % sites)]);
        }
        say(self.progress, &format!("starting outpost-edge {name}"));
        edge.start(net, &self.opts.kubeconfig)?;
        self.edges.push(edge);
        self.relays.push(broker);
        let sock = self.edge_sock(e);
        self.relay(
            &format!("edge-{e}"),
            End::Unix(sock),
            End::Tcp(
                EDGE_API
                    .parse()
                    .map_err(|_| ProcessError::Start("bad API address".into()))?,
            ),
        )
        .await?;
        Ok(())
    }

    async fn create_objects(&mut self) -> Result<(), ProcessError> {
        let ns = self.ns.clone();
        let pp = PostParams::default();
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"outpost.io/simulation": "true"}}
        }))
        .map_err(|e| ProcessError::Start(e.to_string()))?;
        namespaces
            .create(&pp, &namespace)
            .await
            .map_err(kerr(format!("create namespace {ns}")))?;
        // The bridge installs the device CRDs when it starts.
        let model: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1",
            "kind": "DeviceModel",
            "metadata": {"name": "setpoint-model", "namespace": ns},
            "spec": {"protocol": "modbus", "properties": [
                {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite"}
            ]}
        }))
        .map_err(|e| ProcessError::Start(e.to_string()))?;
        let api = self.kubeedge_api("DeviceModel", "devicemodels");
        wait_for("the device CRDs", START_TIMEOUT, async || {
            api.create(&pp, &model).await.ok()
        })
        .await?;
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let devices = self.kubeedge_api("Device", "devices");
        for e in 0..self.scenario.fleet.edges {
            let node = self.node_name(e);
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": format!("cfg-edge-{e}")},
                "data": {"seq": "0"}
            }))
            .map_err(|e| ProcessError::Start(e.to_string()))?;
            cms.create(&pp, &cm)
                .await
                .map_err(kerr(format!("create ConfigMap cfg-edge-{e}")))?;
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("app-edge-{e}")},
                "spec": {
                    "nodeName": node,
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app",
                        "image": self.opts.image,
                        "command": ["sh", "-c", "while true; do cat /cfg/seq; echo; sleep 5; done"],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/cfg"}]
                    }],
                    "volumes": [{"name": "cfg", "configMap": {"name": format!("cfg-edge-{e}")}}]
                }
            }))
            .map_err(|e| ProcessError::Start(e.to_string()))?;
            pods.create(&pp, &pod)
                .await
                .map_err(kerr(format!("create Pod app-edge-{e}")))?;
            let device: DynamicObject = serde_json::from_value(device_json(&ns, e, &node, 0))
                .map_err(|e| ProcessError::Start(e.to_string()))?;
            devices
                .create(&pp, &device)
                .await
                .map_err(kerr(format!("create Device dev-edge-{e}")))?;
            self.acked.insert(
                (e, "configmap"),
                vec![Write {
                    value: 0,
                    sent_ms: 0,
                    edge: false,
                }],
            );
            self.acked.insert(
                (e, "desired"),
                vec![Write {
                    value: 0,
                    sent_ms: 0,
                    edge: false,
                }],
            );
        }
        Ok(())
    }

    /// What keeps the fleet from being converged, empty when it is.
    /// `strict` adds the sync backlog and the device state.
    async fn unmet(&mut self, strict: bool) -> Vec<String> {
        let mut out = Vec::new();
        let ns = self.ns.clone();
        let nodes: Api<Node> = Api::all(self.client.clone());
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let devices = self.kubeedge_api("Device", "devices");
        let statuses = self.kubeedge_api("DeviceStatus", "devicestatuses");
        for e in 0..self.scenario.fleet.edges {
            let name = self.node_name(e);
            let sock = self.edge_sock(e);
            let want_cm = self.last(e, "configmap");
            let want_desired = self.acceptable_desired(e);
            // The cloud's side.
            let ready = nodes.get_opt(&name).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if !ready {
                out.push(format!("{name}: Node not Ready"));
            }
            let phase = pods
                .get_opt(&format!("app-edge-{e}"))
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status.and_then(|s| s.phase));
            if phase.as_deref() != Some("Running") {
                out.push(format!("{name}: Pod phase {phase:?} in the API"));
            }
            let api_desired = devices
                .get_opt(&format!("dev-edge-{e}"))
                .await
                .ok()
                .flatten()
                .and_then(|d| {
                    d.data["spec"]["properties"][0]["desired"]["value"]
                        .as_str()
                        .and_then(|v| v.parse::<u64>().ok())
                });
            if !api_desired.is_some_and(|v| want_desired.contains(&v)) {
                out.push(format!(
                    "{name}: the API's Device desires {api_desired:?}, the last acknowledged write was {:?}",
                    want_desired.first()
                ));
            }
            // The edge's side.
            let cm = http_get(&sock, "/api/v1/configmaps").await;
            let seq = cm.as_ref().ok().and_then(|v| {
                v["items"].as_array()?.iter().find_map(|o| {
                    (o["namespace"] == ns.as_str() && o["name"] == format!("cfg-edge-{e}"))
                        .then(|| o["data"]["seq"].as_str()?.parse::<u64>().ok())
                        .flatten()
                })
            });
            if seq != Some(want_cm) {
                out.push(format!(
                    "{name}: the edge shows ConfigMap seq {seq:?}, the last acknowledged write was {want_cm}"
                ));
            }
            let status = match http_get(&sock, "/api/v1/status").await {
                Ok(s) => s,
                Err(err) => {
                    out.push(format!("{name}: local API: {err}"));
                    continue;
                }
            };
            let device = status["devices"].as_array().and_then(|ds| {
                ds.iter()
                    .find(|d| d["id"] == format!("{ns}/dev-edge-{e}"))
                    .cloned()
            });
            let edge_desired = device.as_ref().and_then(|d| {
                d["properties"]["setpoint"]["desired"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
            });
            if let Some(v) = edge_desired {
                self.converged_desired.insert(e, v);
            }
            if !edge_desired.is_some_and(|v| want_desired.contains(&v))
                || edge_desired != api_desired
            {
                out.push(format!(
                    "{name}: the edge desires {edge_desired:?}, the API {api_desired:?}, the last acknowledged write was {:?}",
                    want_desired.first()
                ));
            }
            let edge_phase = status["pods"].as_array().and_then(|ps| {
                ps.iter()
                    .find(|p| p["name"] == format!("app-edge-{e}"))
                    .and_then(|p| p["phase"].as_str().map(str::to_owned))
            });
            if edge_phase.as_deref() != Some("Running") {
                out.push(format!("{name}: the edge says its Pod is {edge_phase:?}"));
            }
            if strict {
                let peers = status["peers"].as_array().cloned().unwrap_or_default();
                if !peers
                    .iter()
                    .any(|p| p["connected"] == true && p["pending"] == 0)
                {
                    out.push(format!(
                        "{name}: not connected to the cloud with nothing pending ({peers:?})"
                    ));
                }
                let edge_state = device
                    .as_ref()
                    .and_then(|d| d["state"].as_str().map(str::to_owned));
                let api_state = statuses
                    .get_opt(&format!("dev-edge-{e}"))
                    .await
                    .ok()
                    .flatten()
                    .and_then(|d| d.data["status"]["state"].as_str().map(str::to_owned));
                if edge_state.is_none() || api_state != edge_state {
                    out.push(format!(
                        "{name}: the device is {edge_state:?} at the edge and {api_state:?} in the DeviceStatus"
                    ));
                }
            }
        }
        out
    }

    /// The desired values edge `e`'s device may end with: the last
    /// acknowledged write of either writer (the cloud's is stamped when the
    /// bridge records it, which the harness does not see), or a later edge
    /// write whose acknowledgement was not seen (the agent took it and was
    /// killed, say). First: the newest acknowledged.
    fn acceptable_desired(&self, e: usize) -> Vec<u64> {
        let acked: &[Write] = self
            .acked
            .get(&(e, "desired"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let last_of = |edge: bool| acked.iter().rev().find(|w| w.edge == edge).map(|w| w.value);
        let (cloud, edge) = (last_of(false), last_of(true));
        let mut out: Vec<u64> = [cloud, edge].into_iter().flatten().collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.extend(
            self.pending_edge
                .get(&e)
                .into_iter()
                .flatten()
                .map(|w| w.value)
                .filter(|&v| v > edge.unwrap_or(0)),
        );
        out
    }

    fn last(&self, e: usize, kind: &'static str) -> u64 {
        self.acked
            .get(&(e, kind))
            .and_then(|w| w.last())
            .map_or(0, |w| w.value)
    }

    /// Restarts processes that died by themselves (and says so).
    fn check_processes(&mut self) {
        let mut died = Vec::new();
        if let Some(c) = &mut self.cloud
            && c.child.is_some()
            && !c.running()
        {
            died.push(c.node.clone());
        }
        for p in &mut self.edges {
            if p.child.is_some() && !p.running() {
                died.push(p.node.clone());
            }
        }
        for d in died {
            self.fail(
                "processes",
                format!(
                    "{d} exited by itself (see its log in {})",
                    self.dir.display()
                ),
            );
            let _ = self.proc_mut(&d).map(|p| p.child = None);
        }
    }

    fn proc_mut(&mut self, node: &str) -> Option<&mut Proc> {
        if node == "cloud-0" {
            self.cloud.as_mut()
        } else {
            self.edges.iter_mut().find(|p| p.node == node)
        }
    }

    /// One API write of the workload.
    async fn write(&mut self, rng: &mut fastrand::Rng) {
        let e = rng.usize(0..self.scenario.fleet.edges);
        self.counter += 1;
        let value = self.counter;
        let mut desired = rng.f64() < self.scenario.workload.api_desired_share;
        if desired && self.recently_desired(e) {
            desired = false;
        }
        if desired {
            self.last_desired_ms.insert(e, self.ms());
        }
        self.write_one(e, desired, value).await;
    }

    async fn write_one(&mut self, e: usize, desired: bool, value: u64) {
        let sent_ms = self.ms();
        let pp = PatchParams::default();
        let result = if desired {
            let api = self.kubeedge_api("Device", "devices");
            let node = self.node_name(e);
            let patch = json!({"spec": device_json(&self.ns, e, &node, value)["spec"]});
            api.patch(&format!("dev-edge-{e}"), &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        } else {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
            let patch = json!({"data": {"seq": value.to_string()}});
            api.patch(&format!("cfg-edge-{e}"), &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => {
                let kind = if desired { "desired" } else { "configmap" };
                self.acked.entry((e, kind)).or_default().push(Write {
                    value,
                    sent_ms,
                    edge: false,
                });
            }
            Err(err) => {
                debug!("a workload write failed: {err}");
                self.api_errors += 1;
            }
        }
    }

    fn recently_desired(&self, e: usize) -> bool {
        self.last_desired_ms
            .get(&e)
            .is_some_and(|&t| self.ms() < t + DESIRED_SPACING_MS)
    }

    /// A desired value written at edge `e` by a local app: a KubeEdge twin
    /// update on the edge's own broker. It counts as acknowledged once the
    /// edge's API shows it.
    async fn edge_write(&mut self, e: usize) {
        if self.recently_desired(e) || self.edges.get(e).is_none_or(|p| p.child.is_none()) {
            return;
        }
        self.counter += 1;
        let value = self.counter;
        let sent_ms = self.ms();
        self.last_desired_ms.insert(e, sent_ms);
        let topic = format!("$hw/events/device/{}/dev-edge-{e}/twin/update", self.ns);
        let payload = json!({
            "event_id": format!("osim-{value}"),
            "timestamp": sent_ms,
            "twin": {"setpoint": {"expected": {"value": value.to_string()}}}
        })
        .to_string();
        let Ok(net) = self.net() else { return };
        let Some(node) = net.node(&format!("edge-{e}")) else {
            return;
        };
        let mut cmd = net.command(node, Path::new("mosquitto_pub"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            EDGE_MQTT_PORT,
            "-q",
            "1",
            "-t",
            &topic,
        ])
        .args(["-m", &payload])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        match cmd.status().await {
            Ok(st) if st.success() => {
                self.edge_writes += 1;
                self.pending_edge.entry(e).or_default().push(Write {
                    value,
                    sent_ms,
                    edge: true,
                });
            }
            Ok(st) => debug!(edge = e, "mosquitto_pub: {st}"),
            Err(err) => debug!(edge = e, "mosquitto_pub: {err}"),
        }
    }

    /// Takes in what the edges showed: lag samples, and regressions.
    fn observe(&mut self, seen: Seen) {
        if seen.kind == "desired"
            && let Some(pending) = self.pending_edge.get_mut(&seen.edge)
            && let Some(i) = pending.iter().position(|w| w.value == seen.value)
        {
            // The edge took its app's write: acknowledged.
            let w = pending.remove(i);
            let acked = self.acked.entry((seen.edge, "desired")).or_default();
            let at = acked.partition_point(|x| x.value < w.value);
            acked.insert(at, w);
        }
        if seen.kind == "api-desired" {
            self.observe_api(&seen);
        }
        let key = (seen.edge, seen.kind);
        // Desired values have two writers: an older value may win (see
        // check_conflicts); ConfigMaps have one, the API.
        if seen.kind == "configmap"
            && let Some(&(top, at)) = self.shown.get(&key)
            && seen.value < top
        {
            // Watches re-list after a reconnect: an older value shown after
            // a newer one is a write undone.
            self.fail(
                "no-acknowledged-write-lost",
                format!(
                    "edge-{} showed {} {} at {} ms after showing {} at {} ms: an acknowledged write was undone",
                    seen.edge, seen.kind, seen.value, seen.at_ms, top, at
                ),
            );
        }
        if self
            .shown
            .get(&key)
            .is_none_or(|&(top, _)| seen.value > top)
        {
            self.shown.insert(key, (seen.value, seen.at_ms));
        }
        // Every acknowledged write this value covers (itself and the older
        // ones it replaced) reached the edge now: a write superseded while
        // the edge was cut off counts with the whole time it waited.
        let from = self.resolved.get(&key).copied().unwrap_or(0);
        let ws = self.acked.get(&key).map(Vec::as_slice).unwrap_or_default();
        let upto = from + ws[from.min(ws.len())..].partition_point(|w| w.value <= seen.value);
        for w in &ws[from.min(ws.len())..upto.min(ws.len())] {
            if w.value > 0 && !w.edge {
                self.samples.push(LagSample {
                    applied_ms: seen.at_ms,
                    lag_ms: seen.at_ms.saturating_sub(w.sent_ms),
                    link: (0, seen.edge + 1),
                });
            }
        }
        self.resolved.insert(key, upto.max(from));
    }

    /// The API showed a desired value: the lag of the edge's writes it covers.
    fn observe_api(&mut self, seen: &Seen) {
        let key = (seen.edge, "api-desired");
        let from = self.resolved.get(&key).copied().unwrap_or(0);
        let ws = self
            .acked
            .get(&(seen.edge, "desired"))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let from = from.min(ws.len());
        let upto = from + ws[from..].partition_point(|w| w.value <= seen.value);
        for w in ws[from..upto].iter().filter(|w| w.edge) {
            self.samples.push(LagSample {
                applied_ms: seen.at_ms,
                lag_ms: seen.at_ms.saturating_sub(w.sent_ms),
                link: (0, seen.edge + 1),
            });
        }
        self.resolved.insert(key, upto);
    }

    /// Makes the network and the processes what the timeline says at `t`.
    async fn apply(&mut self, t: u64, windows: &[Window]) -> Result<(), ProcessError> {
        let (conditions, down) = state_at(t, windows, self.scenario.network.loss);
        let Some(net) = self.net.as_ref() else {
            return Err(ProcessError::Start("the network is gone".into()));
        };
        net.apply(&conditions)?;
        let kubeconfig = &self.opts.kubeconfig;
        for p in self.cloud.iter_mut().chain(self.edges.iter_mut()) {
            let should_run = !down.contains(&p.node);
            let running = p.child.is_some();
            if running && !should_run {
                debug!(node = %p.node, "crash: SIGKILL");
                p.kill().await;
            } else if !running && should_run {
                debug!(node = %p.node, "restart");
                p.start(net, kubeconfig)?;
            }
        }
        Ok(())
    }

    async fn stop(&mut self) {
        // Pods first, while the edges run: they stop the containers and the
        // Pods leave the API only then, as a kubelet's would.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        if pods
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .is_ok()
        {
            let gone = wait_for(
                "the edges to stop the workload's pods",
                STOP_TIMEOUT,
                async || {
                    pods.list(&ListParams::default())
                        .await
                        .ok()
                        .filter(|l| l.items.is_empty())
                },
            )
            .await;
            if gone.is_err() {
                warn!(
                    "the workload's pods were not all stopped within {} s; containers may be left in containerd",
                    STOP_TIMEOUT.as_secs()
                );
            }
        }
        if let Some(c) = &mut self.cloud {
            c.kill().await;
        }
        for e in &mut self.edges {
            e.kill().await;
        }
        for mut r in self.relays.drain(..) {
            let _ = r.start_kill();
            let _ = r.wait().await;
        }
        if let Some(h) = self.api_relay.take() {
            h.abort();
        }
        let _ = self.net.take();
        // The run's objects: its namespace, Nodes, admission records.
        let (id, prefix) = (self.id.clone(), format!("{}-", self.id));
        delete_objects(&self.client, |name| name == id || name.starts_with(&prefix)).await;
    }
}

/// Deletes the Kubernetes namespaces, Nodes and admission records whose
/// (node) name `ours` says belong to a run.
async fn delete_objects(client: &kube::Client, ours: impl Fn(&str) -> bool) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let lp = ListParams::default().labels("outpost.io/simulation=true");
    if let Ok(list) = namespaces.list(&lp).await {
        for n in list.items {
            if let Some(name) = n.metadata.name.filter(|n| ours(n)) {
                let _ = namespaces.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
    let nodes: Api<Node> = Api::all(client.clone());
    if let Ok(list) = nodes.list(&ListParams::default()).await {
        for n in list.items {
            if let Some(name) = n.metadata.name.filter(|n| ours(n)) {
                let _ = nodes.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "outpost-system");
    if let Ok(list) = secrets.list(&ListParams::default()).await {
        for s in list.items {
            let node_is_ours = s
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("outpost.io/node"))
                .is_some_and(|n| ours(n));
            if let (true, Some(name)) = (node_is_ours, s.metadata.name) {
                let _ = secrets.delete(&name, &DeleteParams::default()).await;
            }
        }
    }
}

fn device_json(ns: &str, e: usize, node: &str, value: u64) -> Value {
    json!({
        "apiVersion": "devices.kubeedge.io/v1beta1",
        "kind": "Device",
        "metadata": {"name": format!("dev-edge-{e}"), "namespace": ns},
        "spec": {
            "deviceModelRef": {"name": "setpoint-model"},
            "nodeName": node,
            "protocol": {"protocolName": "modbus", "configData": {"ip": "127.0.0.1", "port": 1, "slaveID": 1}},
            "properties": [{
                "name": "setpoint",
                "collectCycle": 2_000_000_000u64,
                "reportCycle": 2_000_000_000u64,
                "reportToCloud": true,
                "desired": {"value": value.to_string()},
                "visitors": {"protocolName": "modbus", "configData": {"register": "HoldingRegister", "offset": 0, "limit": 1}}
            }]
        }
    })
}

/// The API server's address in a kubeconfig (it must be an IP address:
/// the bridge reaches it through a relay on the same address).
fn api_address(kubeconfig: &Path) -> Result<std::net::SocketAddr, ProcessError> {
    let text = std::fs::read_to_string(kubeconfig).map_err(io(format!(
        "cannot read the kubeconfig {}",
        kubeconfig.display()
    )))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .map(str::trim)
        .and_then(|s| {
            s.strip_prefix("https://")
                .or_else(|| s.strip_prefix("http://"))
        })
        .and_then(|s| s.trim_end_matches('/').parse().ok())
        .ok_or_else(|| {
            ProcessError::Start(format!(
                "{}: no `server: https://IP:PORT` line",
                kubeconfig.display()
            ))
        })
}

/// Bytes of the files under `dir`, container logs (`pod-logs`) left out.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "pod-logs")
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("{} (log: {})", tail.join(" / "), path.display())
}

async fn output(mut cmd: tokio::process::Command, what: &str) -> Result<String, ProcessError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(io(format!("cannot run {what}")))?;
    if !out.status.success() {
        return Err(ProcessError::Start(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T, ProcessError> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(ProcessError::Start(format!(
                "timed out after {} s waiting for {what}",
                limit.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node index of a name in reports' links: `cloud-0` is 0, `edge-i` is i + 1.
fn index_of(name: &str) -> usize {
    name.strip_prefix("edge-")
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(0, |i| i + 1)
}

/// The links a window takes away: what it cuts, the links of what it crashes,
/// or every link for a change of the whole network.
fn links_of(w: &Window, edges: usize) -> Restored {
    if w.loss.is_some() {
        return Restored::All {
            count: edges as u64,
        };
    }
    let mut set = BTreeSet::new();
    for (a, b) in &w.cuts {
        let (x, y) = (index_of(a), index_of(b));
        set.insert((x.min(y), x.max(y)));
    }
    for n in &w.crash {
        match index_of(n) {
            0 => set.extend((1..=edges).map(|e| (0, e))),
            e => {
                set.insert((0, e));
            }
        }
    }
    Restored::Links(set)
}

/// Sums a counter over every series of a Prometheus text exposition.
fn counter_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Fetches a process's /metrics through its relay.
async fn metrics_text(sock: &Path) -> Option<String> {
    let resp = unix_get(sock, "/metrics", None).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

impl Run {
    async fn body(
        &mut self,
        rng: &mut fastrand::Rng,
        windows: &[Window],
    ) -> Result<(), ProcessError> {
        self.setup().await?;
        let edges = self.scenario.fleet.edges;
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.t0 = Instant::now();
        for e in 0..edges {
            tokio::spawn(watch_edge(
                self.edge_sock(e),
                e,
                self.ns.clone(),
                self.t0,
                tx.clone(),
            ));
        }
        tokio::spawn(watch_api_devices(
            self.kubeedge_api("Device", "devices"),
            self.t0,
            tx.clone(),
        ));
        drop(tx);
        let duration = self.scenario.duration.0;
        let report_every = self.scenario.workload.report_interval.0.max(100);
        let mut next_report = report_every;
        let interval = self.scenario.workload.api_interval.0.max(20);
        say(
            self.progress,
            &format!(
                "the fleet is up; {} s of workload (a write every {} ms) and {} fault windows",
                duration / 1000,
                interval,
                windows.len()
            ),
        );
        let mut next_write = interval;
        let mut applied: Option<(Conditions, BTreeSet<String>)> = None;
        let mut next_progress = 10_000;
        loop {
            let t = self.ms();
            let state = state_at(t.min(duration), windows, self.scenario.network.loss);
            if applied.as_ref() != Some(&state) {
                for w in windows.iter().filter(|w| w.start <= t && t < w.end) {
                    if applied.is_none() || w.start + 100 > t {
                        say(self.progress, &format!("{t} ms: {}", w.label));
                    }
                }
                self.apply(t.min(duration), windows).await?;
                applied = Some(state);
            }
            if t >= duration {
                break;
            }
            while let Ok(seen) = rx.try_recv() {
                self.observe(seen);
            }
            if t >= next_write {
                self.write(rng).await;
                next_write += interval;
            }
            if t >= next_report {
                for e in 0..edges {
                    if rng.f64() < self.scenario.workload.edge_desired_prob {
                        self.edge_write(e).await;
                    }
                }
                next_report += report_every;
            }
            if t >= next_progress {
                say(
                    self.progress,
                    &format!(
                        "{} s: {} writes made ({} at the edges)",
                        t / 1000,
                        self.counter,
                        self.edge_writes
                    ),
                );
                next_progress += 10_000;
            }
            self.check_processes();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        say(
            self.progress,
            &format!("{duration} ms: every fault healed; waiting for the fleet to converge"),
        );
        let settle = self.scenario.checks.settle_timeout.0;
        let mut converged_at = None;
        let mut last_unmet;
        loop {
            while let Ok(seen) = rx.try_recv() {
                self.observe(seen);
            }
            last_unmet = self.unmet(true).await;
            if last_unmet.is_empty() {
                converged_at = Some(self.ms());
                break;
            }
            if self.ms() >= duration + settle {
                break;
            }
            self.check_processes();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.converged_at = converged_at;
        match converged_at {
            None => {
                let shown: Vec<String> = last_unmet.iter().take(6).cloned().collect();
                self.fail(
                    "convergence",
                    format!(
                        "not converged {} ms after the heal: {}{}",
                        settle,
                        shown.join("; "),
                        if last_unmet.len() > 6 { "; ..." } else { "" }
                    ),
                );
            }
            Some(at) => {
                say(
                    self.progress,
                    &format!(
                        "converged {} ms after the heal; checking liveness",
                        at - duration
                    ),
                );
                self.check_conflicts(windows).await;
                self.liveness(&mut rx).await;
            }
        }
        // What the processes say of their traffic, and their memory.
        let mut messages = 0;
        let mut bytes = 0;
        let mut socks: Vec<PathBuf> = (0..edges).map(|e| self.edge_sock(e)).collect();
        socks.push(self.dir.join("cloud.metrics.sock"));
        for s in socks {
            if let Some(text) = metrics_text(&s).await {
                messages += counter_sum(&text, "outpost_sync_sent_messages_total");
                bytes += counter_sum(&text, "outpost_sync_sent_bytes_total");
            }
        }
        self.traffic = (messages, bytes);
        for p in self.cloud.iter_mut().chain(self.edges.iter_mut()) {
            p.sample_rss();
            if let Some(dir) = p.args.iter().skip_while(|a| *a != "--data-dir").nth(1) {
                p.figures.data_bytes = dir_bytes(Path::new(dir));
            }
        }
        Ok(())
    }

    /// The conflict rule, where the harness knows two writes were
    /// concurrent: the last writes of the two sides to a device, both made
    /// while its edge was cut off from the cloud. Whichever won (the fleet
    /// agrees on it: convergence checked that), the other must be visible
    /// as a lost conflict in the device's DeviceStatus.
    async fn check_conflicts(&mut self, windows: &[Window]) {
        let statuses = self.kubeedge_api("DeviceStatus", "devicestatuses");
        for e in 0..self.scenario.fleet.edges {
            let ws: Vec<Write> = self
                .acked
                .get(&(e, "desired"))
                .into_iter()
                .flatten()
                .filter(|w| w.value > 0)
                .copied()
                .collect();
            // The last write of each side; the winner is what the fleet
            // converged on.
            let last_of = |edge: bool| ws.iter().rev().find(|w| w.edge == edge).copied();
            let (Some(cloud), Some(at_edge)) = (last_of(false), last_of(true)) else {
                continue;
            };
            let converged = self.converged_desired.get(&e).copied();
            debug!(
                edge = e,
                ?cloud,
                ?at_edge,
                ?converged,
                "conflict check: the last desired writes"
            );
            let (winner, loser) = if converged == Some(at_edge.value) {
                (at_edge, cloud)
            } else if converged == Some(cloud.value) {
                (cloud, at_edge)
            } else {
                continue;
            };
            let edge = format!("edge-{e}");
            let cut = |t: u64| {
                windows.iter().position(|w| {
                    // A write just after the cut began may have synced
                    // already; one just before the heal cannot have: the
                    // other side's writes arrive only after a reconnect.
                    w.start + 1_000 <= t
                        && t + 200 <= w.end
                        && w.cuts.contains(&("cloud-0".to_owned(), edge.clone()))
                        && w.cuts.contains(&(edge.clone(), "cloud-0".to_owned()))
                })
            };
            let (Some(a), Some(b)) = (cut(winner.sent_ms), cut(loser.sent_ms)) else {
                continue;
            };
            if a != b {
                continue;
            }
            self.conflicts.0 += 1;
            let name = format!("dev-edge-{e}");
            let want = loser.value.to_string();
            let visible = wait_for("the lost conflict", Duration::from_secs(15), async || {
                let d = statuses.get_opt(&name).await.ok().flatten()?;
                d.data["status"]["twins"]
                    .as_array()?
                    .iter()
                    .filter(|t| t["propertyName"] == "setpoint")
                    .flat_map(|t| t["conflicts"].as_array().cloned().unwrap_or_default())
                    .any(|c| c["value"] == want.as_str())
                    .then_some(())
            })
            .await;
            match visible {
                Ok(()) => self.conflicts.1 += 1,
                Err(_) => self.fail(
                    "conflict-rule",
                    format!(
                        "{name}: {} wrote {} at {} ms and {} wrote {} at {} ms while edge-{e} was cut off; {} won, but the DeviceStatus does not show {} as a lost conflict",
                        if loser.edge { "the edge" } else { "the API" },
                        loser.value,
                        loser.sent_ms,
                        if winner.edge { "the edge" } else { "the API" },
                        winner.value,
                        winner.sent_ms,
                        winner.value,
                        loser.value
                    ),
                ),
            }
        }
    }

    async fn liveness(&mut self, rx: &mut mpsc::UnboundedReceiver<Seen>) {
        let bound = self.scenario.checks.liveness_bound.0;
        let edges = self.scenario.fleet.edges;
        let mut wanted = BTreeSet::new();
        for e in 0..edges {
            self.counter += 1;
            let value = self.counter;
            self.write_one(e, false, value).await;
            if self.last(e, "configmap") == value {
                wanted.insert((e, value));
            }
        }
        let start = self.ms();
        while !wanted.is_empty() && self.ms() < start + bound {
            match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                Ok(Some(seen)) => {
                    if seen.kind == "configmap" {
                        wanted.remove(&(seen.edge, seen.value));
                    }
                    self.observe(seen);
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
        for (e, value) in wanted {
            self.fail(
                "liveness",
                format!("edge-{e} did not show the write of seq {value} within {bound} ms after convergence"),
            );
        }
    }

    fn report(&self, windows: &[Window], wall_ms: u64) -> ProcessReport {
        let s = &self.scenario;
        let duration = s.duration.0;
        let edges = s.fleet.edges;
        let mut lags: Vec<u64> = self.samples.iter().map(|x| x.lag_ms).collect();
        let mut after: Vec<u64> = self
            .samples
            .iter()
            .filter(|x| x.committed_ms() >= duration)
            .map(|x| x.lag_ms)
            .collect();
        let fault_windows: Vec<FaultWindow> = windows
            .iter()
            .map(|w| FaultWindow {
                kind: w.kind.to_owned(),
                label: w.label.clone(),
                start_ms: w.start,
                end_ms: w.end,
            })
            .collect();
        let mut restored: BTreeMap<u64, Restored> = BTreeMap::new();
        for w in windows {
            let links = links_of(w, edges);
            let merged = match restored.remove(&w.end) {
                Some(r) => r.merge(links),
                None => links,
            };
            restored.insert(w.end, merged);
        }
        let converged = self.converged_at.is_some();
        let end_ms = self.ms();
        let bin = lag_bin_ms(end_ms);
        let mut writes = BTreeMap::new();
        for ((_, kind), ws) in &self.acked {
            // The initial objects are not workload writes.
            for w in ws.iter().filter(|w| w.value > 0) {
                let k = if w.edge {
                    format!("{kind} (edge)")
                } else {
                    (*kind).to_owned()
                };
                *writes.entry(k).or_insert(0) += 1;
            }
        }
        let total: u64 = writes.values().sum();
        let (messages, bytes) = self.traffic;
        let mut faults = BTreeMap::new();
        for w in windows {
            *faults.entry(w.kind.to_owned()).or_insert(0) += 1;
        }
        let mut digest = blake3::Hasher::new();
        for e in 0..edges {
            digest.update(
                format!(
                    "{e} {} {}\n",
                    self.last(e, "configmap"),
                    self.last(e, "desired")
                )
                .as_bytes(),
            );
        }
        let mut processes = BTreeMap::new();
        for p in self.cloud.iter().chain(self.edges.iter()) {
            processes.insert(p.node.clone(), p.figures.clone());
        }
        let report = Report {
            seed: self.seed,
            scenario: s.name.clone(),
            clouds: 1,
            edges,
            sites: s.fleet.sites,
            duration_ms: duration,
            simulated_ms: end_ms,
            wall_ms,
            peak_rss_kib: processes.values().map(|p| p.peak_rss_kib).max(),
            writes,
            messages,
            bytes,
            messages_per_write: messages as f64 / total.max(1) as f64,
            bytes_per_write: bytes as f64 / total.max(1) as f64,
            faults,
            crashes: windows.iter().map(|w| w.crash.len() as u64).sum(),
            restarts: processes
                .values()
                .map(|p| u64::from(p.starts.saturating_sub(1)))
                .sum(),
            lag_ms: Percentiles::of(&mut lags),
            lag_after_heal_ms: Percentiles::of(&mut after),
            converged_after_ms: self.converged_at.map(|at| at.saturating_sub(duration)),
            workload_stop_ms: duration,
            heals: heals(&fault_windows, &restored, &self.samples, converged),
            fault_windows,
            lag_bin_ms: bin,
            lag_over_time: lag_over_time(&self.samples, bin),
            digest: digest.finalize().to_hex().to_string(),
            conflicts_visible: self.conflicts.1,
            failures: self.failures.clone(),
            failure_counts: self.failure_counts.clone(),
            ..Report::default()
        };
        ProcessReport {
            report,
            mode: "processes".into(),
            processes,
            api_errors: self.api_errors,
            edge_writes: self.edge_writes,
            conflicts_expected: self.conflicts.0,
        }
    }
}

impl ProcessReport {
    /// Did every checker pass?
    pub fn passed(&self) -> bool {
        self.report.passed()
    }

    /// The report as a table, for people.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let r = &self.report;
        let ms = crate::report::human_ms;
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row("mode", "real processes in network namespaces".into());
        row("scenario", format!("{} (seed {})", r.scenario, r.seed));
        row(
            "fleet",
            format!(
                "1 outpost-cloud, {} outpost-edge, {} sites",
                r.edges, r.sites
            ),
        );
        row(
            "time",
            format!(
                "{} of workload and faults, {} in all",
                ms(r.duration_ms),
                ms(r.wall_ms)
            ),
        );
        row(
            "writes acknowledged",
            format!(
                "{} ({} refused or failed at the API)",
                r.writes
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.api_errors
            ),
        );
        row(
            "conflicts",
            format!(
                "{} concurrent cloud/edge desired writes checked, {} losers visible in DeviceStatus",
                self.conflicts_expected, r.conflicts_visible
            ),
        );
        row(
            "faults",
            r.faults
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        row(
            "lag, API to edge (ms)",
            format!(
                "p50 {} p99 {} max {} ({} samples)",
                r.lag_ms.p50, r.lag_ms.p99, r.lag_ms.max, r.lag_ms.count
            ),
        );
        row(
            "lag after the heal (ms)",
            format!(
                "p50 {} p99 {} max {}",
                r.lag_after_heal_ms.p50, r.lag_after_heal_ms.p99, r.lag_after_heal_ms.max
            ),
        );
        row(
            "converged after the heal",
            r.converged_after_ms.map_or("no".into(), ms),
        );
        for h in &r.heals {
            row(
                &format!("heal at {}", ms(h.at_ms)),
                format!(
                    "{}: caught up after {}",
                    h.healed.join(", "),
                    h.caught_up_after_ms.map_or("-".into(), ms)
                ),
            );
        }
        row(
            "sync traffic (at the end)",
            format!(
                "{} messages, {} bytes; {:.1} messages and {:.0} bytes per write",
                r.messages, r.bytes, r.messages_per_write, r.bytes_per_write
            ),
        );
        for (node, p) in &self.processes {
            row(
                node,
                format!(
                    "started {} times, peak RSS {:.1} MB, data dir {:.1} MB",
                    p.starts,
                    p.peak_rss_kib as f64 / 1024.0,
                    p.data_bytes as f64 / 1e6
                ),
            );
        }
        row(
            "verdict",
            if r.passed() {
                "passed".into()
            } else {
                format!(
                    "FAILED: {}",
                    r.failure_counts
                        .iter()
                        .map(|(k, v)| format!("{k} x{v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        );
        s
    }
}

/// Runs `scenario` with `seed` as real processes in network namespaces
/// (see the module documentation), cleans up, and returns the report.
/// `progress` prints a line on each step to standard error.
pub async fn run(
    seed: u64,
    scenario: Scenario,
    opts: Options,
    progress: bool,
) -> Result<ProcessReport, ProcessError> {
    check_scenario(&scenario)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let windows = plan(&mut rng, &scenario)?;
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&opts.kubeconfig).map_err(|e| {
            ProcessError::Start(format!(
                "cannot read the kubeconfig {}: {e}",
                opts.kubeconfig.display()
            ))
        })?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| ProcessError::Start(format!("kubeconfig: {e}")))?;
    let client = kube::Client::try_from(config).map_err(kerr("client"))?;
    // Unique among this host's runs: the process id, and a count of the
    // process's runs (tests make several in one process).
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let k = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("{}{}r{k}", crate::netns::PREFIX, std::process::id());
    let started = Instant::now();
    let mut run = Run {
        seed,
        ns: id.clone(),
        dir: opts.work_dir.join(&id),
        id,
        scenario,
        opts,
        net: None,
        client,
        cloud: None,
        edges: Vec::new(),
        relays: Vec::new(),
        api_relay: None,
        cloud_addr: String::new(),
        t0: Instant::now(),
        acked: BTreeMap::new(),
        shown: BTreeMap::new(),
        resolved: BTreeMap::new(),
        samples: Vec::new(),
        failures: Vec::new(),
        failure_counts: BTreeMap::new(),
        counter: 0,
        api_errors: 0,
        pending_edge: BTreeMap::new(),
        last_desired_ms: BTreeMap::new(),
        edge_writes: 0,
        conflicts: (0, 0),
        converged_desired: BTreeMap::new(),
        converged_at: None,
        traffic: (0, 0),
        progress,
    };
    let result = tokio::select! {
        r = run.body(&mut rng, &windows) => r,
        _ = tokio::signal::ctrl_c() => Err(ProcessError::Interrupted),
    };
    say(
        progress,
        "stopping the fleet; deleting its pods, namespaces, Nodes and admission records",
    );
    run.stop().await;
    result?;
    Ok(run.report(&windows, started.elapsed().as_millis() as u64))
}
