//! Benchmarks of the cloud bridge against the real API server of
//! `scripts/env up` (issue #4), each figure beside a baseline measured in
//! the same run:
//!
//! 1. an API change (a Pod label, a ConfigMap its pods use) to the change
//!    persisted in the edge's replica, p50 / p99, with every edge connected
//!    and its pods projected; baseline: a plain kube watcher's delivery of
//!    the same writes (API write to watch event);
//! 2. the bridge's resident memory and CPU, idle (no API change; the edges
//!    heartbeat);
//! 3. a reconnect storm: most edges disconnect, write a backlog (their pod
//!    statuses) and reconnect at once, while the healthy ones heartbeat;
//!    the time to converge (in the bridge's replica, then in the API) and
//!    the worst Lease renewal gap of the healthy nodes, against the gap
//!    in the same run before the storm.
//!
//! The bridge (its engine on an on-disk replica, as deployed, and
//! [`Bridge::run`]) runs in this process; the edges run in a child process
//! (this binary, `edges-child`), each a real sync engine on an in-memory
//! replica, connected over loopback TCP carrying the sync protocol's own
//! framing (the session code that runs over iroh, without QUIC). So the
//! memory and CPU figures are the bridge's (plus the baseline watchers,
//! which keep no store), not the edges'.
//!
//! Sizes (the issue's: 1,000 edges, 10 pods each) come from the
//! environment: `OUTPOST_BENCH_EDGES`, `OUTPOST_BENCH_PODS_PER_EDGE`,
//! `OUTPOST_BENCH_SAMPLES` (latency samples), `OUTPOST_BENCH_HEALTHY`
//! (edges that stay connected in the storm; default a tenth),
//! `OUTPOST_BENCH_IDLE_S` (the idle window), `OUTPOST_BENCH_CONCURRENCY`
//! (API writes in flight while setting up). Everything created in the API
//! (a namespace, admission Secrets labelled `outpost.io/bench`, Nodes,
//! Leases) is deleted at the end, also when the benchmark fails.

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark that fails should stop loudly

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret, ServiceAccount};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use outpost_cloud_bridge::admission::{self, SYSTEM_NAMESPACE};
use outpost_cloud_bridge::project;
use outpost_cloud_bridge::{Bridge, BridgeConfig};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::document::{DocId, DocKind};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions, Scope};
use outpost_sync::schema::{
    Condition, NodeAddress, NodeInfo, NodeStatusDoc, PodSpecDoc, PodStatusDoc,
};
use outpost_sync::store::{MemoryDisk, StoreOptions};
use outpost_sync::test_utils::{env_value, unique_name};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Label on the admission Secrets this benchmark creates (value: the run).
const BENCH_LABEL: &str = "outpost.io/bench";
/// Pod label and ConfigMap key carrying a latency sample's marker.
const MARK: &str = "bench-sample";
const HOUR: Duration = Duration::from_secs(3600);
/// The edge agent's default heartbeat period.
const SLOW_HEARTBEAT: Duration = Duration::from_secs(10);
/// The healthy edges' heartbeat period (the storm watches their Leases).
const FAST_HEARTBEAT: Duration = Duration::from_secs(2);

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn row(name: &str, figure: &str, baseline: &str, target: &str, ok: Option<bool>) {
    let met = match ok {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "-",
    };
    println!("| {name} | {figure} | {baseline} | {target} | {met} |");
    // One line per figure for scripts/bench's summary table.
    println!("BENCH|bridge: {name}|{figure}|{baseline}|{target}|{met}");
}

fn node_status(heartbeat_ms: u64) -> NodeStatusDoc {
    NodeStatusDoc {
        heartbeat_ms,
        conditions: vec![Condition {
            kind: "Ready".into(),
            status: "True".into(),
            reason: Some("EdgeReady".into()),
            message: Some("the edge agent runs".into()),
            last_transition_time: Some("2030-01-01T00:00:00Z".into()),
        }],
        capacity: [("cpu", "2"), ("memory", "4Gi"), ("pods", "110")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        allocatable: Default::default(),
        addresses: vec![NodeAddress {
            kind: "InternalIP".into(),
            address: "10.1.2.3".into(),
        }],
        node_info: NodeInfo {
            machine_id: "m1".into(),
            boot_id: "b1".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Debian GNU/Linux 12".into(),
            container_runtime_version: "containerd://1.6.20".into(),
            kubelet_version: "outpost-edge/0.1.0".into(),
            operating_system: "linux".into(),
            architecture: "amd64".into(),
        },
    }
}

/// Resident memory (bytes) and CPU time (s) of a process.
fn proc_usage(pid: &str) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field of the line, stime the 15th; clock ticks of 1/100 s.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f
        .get(11..13)
        .map(|v| v.iter().filter_map(|x| x.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    (rss_kb * 1024, ticks / 100.0)
}

// ---------------------------------------------------------------------------
// The edges' process.

#[derive(serde::Serialize, serde::Deserialize)]
struct ChildSpec {
    cloud: String,
    addr: std::net::SocketAddr,
    healthy: usize,
    /// (node, key hex), in order.
    edges: Vec<(String, String)>,
}

/// One edge's connection to the bridge: reconnects after a second if the
/// session ends, until aborted (a cut).
fn connect_edge(
    engine: Engine,
    cloud: PeerId,
    addr: std::net::SocketAddr,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(mut stream) = TcpStream::connect(addr).await {
                let _ = stream.set_nodelay(true);
                if stream.write_all(&engine.me().0).await.is_ok() {
                    let (r, w) = stream.into_split();
                    let _ = engine.run_session(cloud, true, r, w).await;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

fn edges_child(spec_path: &Path) {
    let spec: ChildSpec = serde_json::from_slice(&std::fs::read(spec_path).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let cloud = admission::parse_key(&spec.cloud).unwrap();
        let disk = MemoryDisk::new().unwrap();
        let n = spec.edges.len();
        let mut engines = Vec::with_capacity(n);
        for (i, (node, key)) in spec.edges.iter().enumerate() {
            let key = admission::parse_key(key).unwrap();
            let mut roster = Roster::new();
            roster.insert(cloud, Role::Cloud);
            roster.insert(
                key,
                Role::Edge {
                    node: node.clone(),
                    site: None,
                },
            );
            let options = ReplicaOptions {
                store: StoreOptions {
                    memory: Some(disk.clone()),
                    ..StoreOptions::default()
                },
                cache_docs: std::num::NonZeroUsize::new(32).unwrap(),
                ..ReplicaOptions::default()
            };
            let replica = Replica::open(format!("/outpost-bench/edge-{i}"), key, options).unwrap();
            engines.push(Engine::new(replica, roster, SyncMetrics::default()));
        }
        let mut links: Vec<Option<tokio::task::JoinHandle<()>>> = engines
            .iter()
            .map(|e| Some(connect_edge(e.clone(), cloud, spec.addr)))
            .collect();
        for (i, (engine, (node, _))) in engines.iter().zip(&spec.edges).enumerate() {
            // Changes of pod specs and ConfigMaps, with their marker if any.
            let mut sub = engine.with_replica(|r| {
                r.subscribe_scope(Scope::all().kinds([DocKind::PodSpec, DocKind::ConfigMap]))
            });
            let e = engine.clone();
            tokio::spawn(async move {
                loop {
                    let doc = match sub.recv().await {
                        Ok(doc) => doc,
                        Err(outpost_sync::replica::SubscriptionError::Lagged(_)) => continue,
                        Err(_) => return,
                    };
                    let t = now_us();
                    let Ok(Some(v)) = e.read_json(&doc) else {
                        continue;
                    };
                    let mark = match doc.kind() {
                        DocKind::PodSpec => v["labels"][MARK].as_str().map(str::to_owned),
                        _ => v["data"][MARK].as_str().map(str::to_owned),
                    };
                    if let Some(mark) = mark {
                        println!("SEEN {mark} {t}");
                    }
                }
            });
            // Heartbeats, staggered over the period.
            let period = if i < spec.healthy {
                FAST_HEARTBEAT
            } else {
                SLOW_HEARTBEAT
            };
            let offset = period.mul_f64(i as f64 / n as f64);
            let (e, id) = (engine.clone(), project::node_status_id(node).unwrap());
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    let ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    e.put(&id, &node_status(ms)).unwrap();
                }
            });
        }
        // How many pod-spec documents the edges hold, every half second.
        {
            let engines = engines.clone();
            tokio::spawn(async move {
                let mut last = usize::MAX;
                loop {
                    let count: usize = engines
                        .iter()
                        .map(|e| {
                            e.with_replica(|r| {
                                r.scan_prefix(DocKind::PodSpec.as_str())
                                    .filter(|x| {
                                        x.as_ref().is_ok_and(|(d, _)| d.kind() == DocKind::PodSpec)
                                    })
                                    .count()
                            })
                        })
                        .sum();
                    if count != last {
                        println!("SPECS {count}");
                        last = count;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let words: Vec<&str> = line.split_whitespace().collect();
            let range = |w: &[&str]| -> std::ops::Range<usize> {
                w[1].parse().unwrap()..w[2].parse().unwrap()
            };
            match words.first().copied() {
                Some("CUT") => {
                    for link in &mut links[range(&words)] {
                        if let Some(l) = link.take() {
                            l.abort();
                        }
                    }
                    println!("DONE CUT");
                }
                Some("RECONNECT") => {
                    for i in range(&words) {
                        if links[i].is_none() {
                            links[i] = Some(connect_edge(engines[i].clone(), cloud, spec.addr));
                        }
                    }
                    println!("DONE RECONNECT");
                }
                Some("BACKLOG") => {
                    // Every pod of these edges reports Running.
                    let mut written = 0;
                    for i in range(&words) {
                        let (e, node) = (&engines[i], &spec.edges[i].0);
                        let specs: Vec<DocId> = e.with_replica(|r| {
                            r.scan_prefix(DocKind::PodSpec.as_str())
                                .filter_map(Result::ok)
                                .map(|(d, _)| d)
                                .filter(|d| d.kind() == DocKind::PodSpec)
                                .collect()
                        });
                        for doc in specs {
                            let Ok(Some(spec)) = e.with_replica(|r| r.get::<PodSpecDoc>(&doc))
                            else {
                                continue;
                            };
                            let id = project::pod_status_id(
                                node,
                                &spec.namespace,
                                &spec.name,
                                &spec.uid,
                            )
                            .unwrap();
                            let status = PodStatusDoc {
                                uid: spec.uid.clone(),
                                phase: "Running".into(),
                                conditions: vec![Condition {
                                    kind: "Ready".into(),
                                    status: "True".into(),
                                    ..Default::default()
                                }],
                                pod_ip: Some("10.1.2.40".into()),
                                host_ip: Some("10.1.2.3".into()),
                                ..Default::default()
                            };
                            e.put(&id, &status).unwrap();
                            written += 1;
                        }
                    }
                    println!("DONE BACKLOG {written}");
                }
                Some("QUIT") | None => break,
                Some(other) => eprintln!("edges-child: unknown command {other}"),
            }
        }
        let (rss, cpu) = proc_usage("self");
        eprintln!(
            "edges-child: RSS {:.0} MB, CPU {cpu:.1} s",
            rss as f64 / 1e6
        );
    });
}

// ---------------------------------------------------------------------------
// The bridge's process.

/// What the watchers and the edges' process report, by marker or name.
#[derive(Default)]
struct Seen {
    /// Marker -> when an edge's replica persisted it (us since the epoch).
    edge: HashMap<String, u64>,
    /// Marker -> when the plain watcher delivered it.
    watch: HashMap<String, u64>,
    /// Pod-spec documents the edges hold.
    specs: usize,
    /// Replies of the edges' process.
    done: Vec<String>,
    /// Pods whose status in the API says Running.
    running: HashSet<String>,
    /// Healthy node -> Lease renewTimes seen (us).
    renewals: HashMap<String, BTreeSet<i64>>,
}

type Shared = Arc<Mutex<Seen>>;

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out ({limit:?}) waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn client() -> Client {
    let path = env_value("KUBECONFIG").expect("the test environment (scripts/env up)");
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.read_timeout = Some(Duration::from_secs(300));
    Client::try_from(config).unwrap()
}

/// Names of what the run created, for the clean-up.
#[derive(Default)]
struct Created {
    secrets: Vec<String>,
    nodes: Vec<String>,
    namespace: Option<String>,
}

struct Sizes {
    edges: usize,
    pods: usize,
    samples: usize,
    healthy: usize,
    idle_s: u64,
    concurrency: usize,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if args.first().map(String::as_str) == Some("edges-child") {
        edges_child(Path::new(&args[1]));
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let edges = knob("OUTPOST_BENCH_EDGES", 1000);
    let sizes = Sizes {
        edges,
        pods: knob("OUTPOST_BENCH_PODS_PER_EDGE", 10),
        samples: knob("OUTPOST_BENCH_SAMPLES", 200),
        healthy: knob("OUTPOST_BENCH_HEALTHY", edges.div_ceil(10)).clamp(1, edges),
        idle_s: knob("OUTPOST_BENCH_IDLE_S", 30) as u64,
        concurrency: knob("OUTPOST_BENCH_CONCURRENCY", 32).max(1),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(async move {
        let client = client().await;
        let run = unique_name("obb");
        let created = Arc::new(Mutex::new(Created::default()));
        let body = tokio::spawn(bench(client.clone(), run.clone(), sizes, created.clone()));
        let failed = tokio::select! {
            r = body => r.is_err(),
            _ = tokio::signal::ctrl_c() => { eprintln!("interrupted"); true }
        };
        cleanup(&client, &run, &created).await;
        failed
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    if failed {
        std::process::exit(1);
    }
}

/// Deletes what the run created; ignores what is already gone.
async fn cleanup(client: &Client, run: &str, created: &Mutex<Created>) {
    let (secrets, nodes, namespace) = {
        let c = created.lock().unwrap();
        (c.secrets.clone(), c.nodes.clone(), c.namespace.clone())
    };
    let t = Instant::now();
    let dp = DeleteParams::default();
    // Admission records first: a running bridge then lets the nodes go.
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let _ = secret_api
        .delete_collection(
            &dp,
            &ListParams::default().labels(&format!("{BENCH_LABEL}={run}")),
        )
        .await;
    futures::stream::iter(secrets)
        .for_each_concurrent(32, |name| {
            let api = secret_api.clone();
            async move {
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        })
        .await;
    if let Some(ns) = &namespace {
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        let _ = Api::<Pod>::namespaced(client.clone(), ns)
            .delete_collection(&now, &ListParams::default())
            .await;
        let _ = Api::<Namespace>::all(client.clone()).delete(ns, &dp).await;
    }
    let node_api: Api<Node> = Api::all(client.clone());
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    futures::stream::iter(nodes)
        .for_each_concurrent(32, |name| {
            let (nodes, leases) = (node_api.clone(), lease_api.clone());
            async move {
                let _ = nodes.delete(&name, &DeleteParams::default()).await;
                let _ = leases.delete(&name, &DeleteParams::default()).await;
            }
        })
        .await;
    eprintln!("clean-up done in {:.1} s", t.elapsed().as_secs_f64());
}

async fn admit_one(client: &Client, run: &str, node: &str, created: &Mutex<Created>) -> PeerId {
    let issued = admission::create_token(client, node, None, HOUR)
        .await
        .unwrap();
    let name = admission::token_secret_name(issued.token.id());
    created.lock().unwrap().secrets.push(name.clone());
    Api::<Secret>::namespaced(client.clone(), SYSTEM_NAMESPACE)
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {BENCH_LABEL: run}}})),
        )
        .await
        .unwrap();
    let key = PeerId::from(iroh::SecretKey::generate().public());
    admission::admit(client, &issued.token.to_string(), key)
        .await
        .unwrap();
    key
}

/// Runs `f` over `items` with at most `n` in flight.
async fn concurrently<T, F>(items: Vec<T>, n: usize, f: impl Fn(T) -> F) -> Duration
where
    F: std::future::Future<Output = ()>,
{
    let t = Instant::now();
    futures::stream::iter(items).for_each_concurrent(n, f).await;
    t.elapsed()
}

/// Starts the plain watchers: ConfigMaps and Pods of the namespace (the
/// baseline, and the pods' Running status) and the healthy nodes' Leases.
fn start_watchers(client: &Client, ns: &str, healthy: HashSet<String>, seen: &Shared) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let s = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(cms, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            let t = now_us();
            if let Ok(watcher::Event::Apply(cm)) = e
                && let Some(mark) = cm.data.as_ref().and_then(|d| d.get(MARK))
            {
                s.lock().unwrap().watch.entry(mark.clone()).or_insert(t);
            }
        }
    });
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let s = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(pods, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            let t = now_us();
            let (Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod))) = e else {
                continue;
            };
            let mut s = s.lock().unwrap();
            if let Some(mark) = pod.metadata.labels.as_ref().and_then(|l| l.get(MARK)) {
                s.watch.entry(mark.clone()).or_insert(t);
            }
            if pod.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Running") {
                s.running
                    .insert(pod.metadata.name.clone().unwrap_or_default());
            }
        }
    });
    let leases: Api<Lease> = Api::namespaced(client.clone(), project::NODE_LEASE_NAMESPACE);
    let s = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher(leases, watcher::Config::default()).boxed();
        while let Some(e) = events.next().await {
            match &e {
                Err(err) => eprintln!("DIAG {} lease watch error: {err}", now_us()),
                Ok(watcher::Event::Init) => eprintln!("DIAG {} lease watch (re)list", now_us()),
                _ => {}
            }
            let (Ok(watcher::Event::Apply(l)) | Ok(watcher::Event::InitApply(l))) = e else {
                continue;
            };
            let name = l.metadata.name.clone().unwrap_or_default();
            if !healthy.contains(&name) {
                continue;
            }
            if let Some(t) = l.spec.as_ref().and_then(|s| s.renew_time.as_ref()) {
                s.lock()
                    .unwrap()
                    .renewals
                    .entry(name)
                    .or_default()
                    .insert(t.0.as_microsecond());
            }
        }
    });
}

/// The worst gap (s) between Lease renewals of any watched node, counting
/// gaps that end after `from` and start before `to` (a gap still open at
/// `to` counts up to `to`).
fn worst_gap_s(seen: &Shared, from_us: i64, to_us: i64) -> (f64, String) {
    let s = seen.lock().unwrap();
    let mut worst = (0.0, String::new());
    for (node, times) in &s.renewals {
        let mut prev: Option<i64> = None;
        for &t in times {
            if let Some(p) = prev
                && t > from_us
                && p < to_us
            {
                let gap = (t.min(to_us) - p) as f64 / 1e6;
                if gap > worst.0 {
                    worst = (gap, node.clone());
                }
            }
            prev = Some(t);
        }
        if let Some(p) = prev
            && p < to_us
        {
            let gap = (to_us - p) as f64 / 1e6;
            if gap > worst.0 {
                worst = (gap, node.clone());
            }
        }
    }
    worst
}

struct ChildProc {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

impl ChildProc {
    async fn command(&mut self, cmd: &str, seen: &Shared) -> String {
        let word = cmd.split_whitespace().next().unwrap().to_owned();
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let mut reply = String::new();
        until(
            &format!("the edges to do {cmd}"),
            Duration::from_secs(600),
            || {
                let mut s = seen.lock().unwrap();
                if let Some(i) = s.done.iter().position(|d| d.starts_with(&word)) {
                    reply = s.done.remove(i);
                    true
                } else {
                    false
                }
            },
        )
        .await;
        reply
    }
}

async fn bench(client: Client, run: String, sizes: Sizes, created: Arc<Mutex<Created>>) {
    let Sizes {
        edges: n,
        pods: per_edge,
        samples,
        healthy,
        idle_s,
        concurrency,
    } = sizes;
    println!(
        "bridge benchmark, run {run}: {n} edges x {per_edge} pods, {samples} latency samples, {healthy} healthy edges in the storm, dev profile"
    );
    let seen: Shared = Arc::new(Mutex::new(Seen::default()));
    let nodes: Vec<String> = (0..n).map(|i| format!("{run}-{i:04}")).collect();
    created.lock().unwrap().nodes = nodes.clone();

    // The bridge: its engine on an on-disk replica, and the loops.
    let dir = std::env::temp_dir().join(format!("{run}-bridge"));
    let cloud_key = PeerId::from(iroh::SecretKey::generate().public());
    let engine = Engine::new(
        Replica::open(&dir, cloud_key, ReplicaOptions::default()).unwrap(),
        Roster::new(),
        SyncMetrics::default(),
    );
    let bridge = Bridge::new(client.clone(), engine.clone(), BridgeConfig::default());
    let bridge_task = tokio::spawn({
        let b = bridge.clone();
        async move {
            if let Err(e) = b.run().await {
                panic!("bridge stopped: {e}");
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn({
        let engine = engine.clone();
        async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let engine = engine.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let mut key = [0u8; 32];
                    if stream.read_exact(&mut key).await.is_ok() {
                        let (r, w) = stream.into_split();
                        let _ = engine.run_session(PeerId(key), false, r, w).await;
                    }
                });
            }
        }
    });

    // Admission.
    let keys: Arc<Mutex<BTreeMap<usize, PeerId>>> = Arc::default();
    let took = concurrently((0..n).collect(), concurrency, |i| {
        let (client, run, node, created, keys) = (
            client.clone(),
            run.clone(),
            nodes[i].clone(),
            created.clone(),
            keys.clone(),
        );
        async move {
            let key = admit_one(&client, &run, &node, &created).await;
            keys.lock().unwrap().insert(i, key);
        }
    })
    .await;
    let mut edges_rx = bridge.edges();
    let learnt = Instant::now();
    let names: HashSet<String> = nodes.iter().cloned().collect();
    tokio::time::timeout(
        Duration::from_secs(120),
        edges_rx.wait_for(|e| names.iter().all(|n| e.contains_key(n))),
    )
    .await
    .expect("the bridge learns every admission")
    .unwrap();
    println!(
        "admitted {n} edges in {:.1} s ({} API writes in flight); in the bridge's roster {:.1} s later",
        took.as_secs_f64(),
        concurrency,
        learnt.elapsed().as_secs_f64()
    );

    // The edges' process.
    let keys = keys.lock().unwrap().clone();
    let spec = ChildSpec {
        cloud: cloud_key.to_string(),
        addr,
        healthy,
        edges: (0..n)
            .map(|i| (nodes[i].clone(), keys[&i].to_string()))
            .collect(),
    };
    let spec_path = std::env::temp_dir().join(format!("{run}-edges.json"));
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let mut proc = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("edges-child")
        .arg(&spec_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let child_pid = proc.id().unwrap().to_string();
    let stdin = proc.stdin.take().unwrap();
    let stdout = proc.stdout.take().unwrap();
    tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let w: Vec<&str> = line.split_whitespace().collect();
                let mut s = seen.lock().unwrap();
                match w.as_slice() {
                    ["SEEN", mark, t] => {
                        s.edge
                            .entry((*mark).to_owned())
                            .or_insert(t.parse().unwrap());
                    }
                    ["SPECS", c] => s.specs = c.parse().unwrap(),
                    ["DONE", ..] => s.done.push(w[1..].join(" ")),
                    _ => eprintln!("edges-child: {line}"),
                }
            }
        }
    });
    let mut child = ChildProc { proc, stdin };
    let took = until("every edge connected", Duration::from_secs(300), || {
        engine.connected().len() >= n
    })
    .await;
    println!("{n} edges connected in {:.1} s", took.as_secs_f64());

    // The namespace, a ConfigMap per node and the pods.
    let ns = run.clone();
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    created.lock().unwrap().namespace = Some(ns.clone());
    let healthy_names: HashSet<String> = nodes[..healthy].iter().cloned().collect();
    start_watchers(&client, &ns, healthy_names, &seen);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let started = Instant::now();
    loop {
        if sas.get_opt("default").await.unwrap().is_some() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no default service account"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let took = concurrently((0..n).collect(), concurrency, |i| {
        let cms = cms.clone();
        async move {
            let cm = json!({"metadata": {"name": format!("cfg-{i}")}, "data": {"mode": "fast"}});
            cms.create(&PostParams::default(), &serde_json::from_value(cm).unwrap())
                .await
                .unwrap();
        }
    })
    .await;
    println!("{n} ConfigMaps created in {:.1} s", took.as_secs_f64());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let all_pods: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..per_edge).map(move |j| (i, j)))
        .collect();
    let total = all_pods.len();
    let took = concurrently(all_pods, concurrency, |(i, j)| {
        let (pods, node) = (pods.clone(), nodes[i].clone());
        async move {
            let pod = json!({
                "metadata": {"name": format!("p-{i}-{j}"), "labels": {"app": "bench"}},
                "spec": {
                    "nodeName": node,
                    "automountServiceAccountToken": false,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{
                        "name": "main", "image": "docker.io/outpost/busybox:1",
                        "command": ["sleep", "3600"],
                        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}]
                    }],
                    "volumes": [{"name": "cfg", "configMap": {"name": format!("cfg-{i}")}}]
                }
            });
            pods.create(
                &PostParams::default(),
                &serde_json::from_value(pod).unwrap(),
            )
            .await
            .unwrap();
        }
    })
    .await;
    let created_in = took.as_secs_f64();
    let delivered = until(
        "every pod spec at its edge",
        Duration::from_secs(1200),
        || seen.lock().unwrap().specs >= total,
    )
    .await;
    println!(
        "{total} Pods created in {created_in:.1} s ({:.0}/s, {concurrency} in flight); every pod-spec document at its edge {:.1} s after the last",
        total as f64 / created_in,
        delivered.as_secs_f64()
    );

    // 2. Idle: no API change; the edges heartbeat (healthy ones every 2 s,
    // the others every 10 s, the edge agent's default).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let steady_from = now_us() as i64;
    let (_, cpu0) = proc_usage("self");
    let (_, child_cpu0) = proc_usage(&child_pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_s)).await;
    let wall = t0.elapsed().as_secs_f64();
    let (rss, cpu1) = proc_usage("self");
    let (child_rss, child_cpu1) = proc_usage(&child_pid);
    let cpu = (cpu1 - cpu0) / wall;
    let child_cpu = (child_cpu1 - child_cpu0) / wall;
    let renewals_per_s = healthy as f64 / FAST_HEARTBEAT.as_secs_f64()
        + (n - healthy) as f64 / SLOW_HEARTBEAT.as_secs_f64();

    // 1. Latency: a ConfigMap's data or a Pod's label, one edge at a time.
    let mut lags = Vec::new();
    let mut watch_lags = Vec::new();
    let mut missing = 0;
    for k in 0..samples + 10 {
        let i = (k * 7919 + 13) % n;
        let mark = format!("{run}-s{k}");
        let t0 = now_us();
        if k % 2 == 0 {
            cms.patch(
                &format!("cfg-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {MARK: mark}})),
            )
            .await
            .unwrap();
        } else {
            pods.patch(
                &format!("p-{i}-{}", k % per_edge),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {MARK: mark}}})),
            )
            .await
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            {
                let s = seen.lock().unwrap();
                if let (Some(e), Some(w)) = (s.edge.get(&mark), s.watch.get(&mark)) {
                    break Some((*e, *w));
                }
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        match got {
            Some((e, w)) if k >= 10 => {
                lags.push(e.saturating_sub(t0) as f64 / 1e3);
                watch_lags.push(w.saturating_sub(t0) as f64 / 1e3);
            }
            Some(_) => {}
            None => missing += 1,
        }
    }
    lags.sort_by(f64::total_cmp);
    watch_lags.sort_by(f64::total_cmp);
    let p99 = percentile(&lags, 0.99);
    row(
        &format!(
            "API change to persisted in the edge's replica, {n} edges x {per_edge} pods (p50 / p99)"
        ),
        &format!(
            "{:.1} / {:.1} ms ({} samples{})",
            percentile(&lags, 0.5),
            p99,
            lags.len(),
            if missing > 0 {
                format!(", {missing} not delivered in 30 s")
            } else {
                String::new()
            }
        ),
        &format!(
            "kube watch delivery p50 / p99 {:.1} / {:.1} ms",
            percentile(&watch_lags, 0.5),
            percentile(&watch_lags, 0.99)
        ),
        "p99 <= 250 ms",
        Some(p99 <= 250.0 && missing == 0),
    );
    row(
        &format!("bridge resident memory, idle, {n} edges, {total} pods"),
        &format!("{:.0} MB", rss as f64 / 1e6),
        &format!(
            "edges' process (not the bridge): {:.0} MB",
            child_rss as f64 / 1e6
        ),
        "<= 200 MB",
        Some(rss <= 200_000_000),
    );
    row(
        &format!(
            "bridge CPU, idle ({renewals_per_s:.0} heartbeats/s to Lease renewals), over {wall:.0} s"
        ),
        &format!("{:.1} % of a core", cpu * 100.0),
        &format!("edges' process: {:.1} % of a core", child_cpu * 100.0),
        "-",
        None,
    );

    // 3. Reconnect storm.
    let cut = healthy..n;
    let steady_to = now_us() as i64;
    let (steady_gap, _) = worst_gap_s(&seen, steady_from, steady_to);
    let expected: usize = cut.len() * per_edge;
    let mut statuses =
        engine.with_replica(|r| r.subscribe_scope(Scope::all().kinds([DocKind::PodStatus])));
    let arrived: Arc<Mutex<HashSet<DocId>>> = Arc::default();
    child
        .command(&format!("CUT {} {}", cut.start, cut.end), &seen)
        .await;
    until(
        "the cut edges' sessions to end",
        Duration::from_secs(60),
        || engine.connected().len() <= healthy,
    )
    .await;
    let reply = child
        .command(&format!("BACKLOG {} {}", cut.start, cut.end), &seen)
        .await;
    println!("storm: {} edges cut, backlog written ({reply})", cut.len());
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::spawn({
        let (engine, arrived) = (engine.clone(), arrived.clone());
        async move {
            loop {
                match statuses.recv().await {
                    Ok(doc) => {
                        arrived.lock().unwrap().insert(doc);
                    }
                    Err(outpost_sync::replica::SubscriptionError::Lagged(_)) => {
                        let all: Vec<DocId> = engine.with_replica(|r| {
                            r.scan_prefix(DocKind::PodStatus.as_str())
                                .filter_map(Result::ok)
                                .map(|(d, _)| d)
                                .filter(|d| d.kind() == DocKind::PodStatus)
                                .collect()
                        });
                        arrived.lock().unwrap().extend(all);
                    }
                    Err(_) => return,
                }
            }
        }
    });
    let storm_from = now_us() as i64;
    eprintln!("DIAG {storm_from} storm starts");
    tokio::spawn(async {
        // Worker threads blocked (a lock held, a long poll) show as a late wake-up.
        loop {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let late = t.elapsed().saturating_sub(Duration::from_millis(100));
            if late > Duration::from_millis(300) {
                eprintln!(
                    "DIAG {} runtime stall: woke {} ms late",
                    now_us(),
                    late.as_millis()
                );
            }
        }
    });
    child
        .command(&format!("RECONNECT {} {}", cut.start, cut.end), &seen)
        .await;
    let in_replica = until(
        "the backlog in the bridge's replica",
        Duration::from_secs(1200),
        || arrived.lock().unwrap().len() >= expected,
    )
    .await;
    let connected = engine.connected().len();
    let in_api = until("the backlog in the API", Duration::from_secs(1200), || {
        seen.lock().unwrap().running.len() >= expected
    })
    .await;
    // The healthy nodes' renewals until a heartbeat period after convergence.
    tokio::time::sleep(FAST_HEARTBEAT * 2).await;
    let storm_to = now_us() as i64;
    let (storm_gap, worst_node) = worst_gap_s(&seen, storm_from, storm_to);
    {
        let s = seen.lock().unwrap();
        if let Some(times) = s.renewals.get(&worst_node) {
            let rel: Vec<String> = times
                .iter()
                .filter(|t| **t > storm_from - 10_000_000 && **t < storm_to)
                .map(|t| format!("{:.2}", (*t - storm_from) as f64 / 1e6))
                .collect();
            eprintln!(
                "DIAG storm from {storm_from}: renewals of {worst_node} (s after the reconnect): {}",
                rel.join(" ")
            );
        }
    }
    row(
        &format!(
            "reconnect storm: {} edges with a backlog ({expected} pod statuses) reconnect at once: time to converge",
            cut.len()
        ),
        &format!(
            "{:.2} s in the bridge's replica, {:.2} s in the API (pods Running)",
            in_replica.as_secs_f64(),
            in_api.as_secs_f64()
        ),
        &format!("{connected} edges connected when the replica converged"),
        "-",
        None,
    );
    let period = FAST_HEARTBEAT.as_secs_f64();
    row(
        &format!(
            "reconnect storm: worst Lease renewal gap of the {healthy} healthy edges (heartbeat every {period:.0} s)"
        ),
        &format!("{storm_gap:.2} s ({worst_node})"),
        &format!("{steady_gap:.2} s before the storm (idle and latency phases)"),
        &format!("< {:.0} s (no heartbeat without its renewal)", 2.0 * period),
        Some(storm_gap < 2.0 * period),
    );

    let _ = child.stdin.write_all(b"QUIT\n").await;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.proc.wait()).await;
    bridge_task.abort();
    drop(engine);
    let _ = std::fs::remove_file(&spec_path);
    let _ = std::fs::remove_dir_all(&dir);
}
