//! Benchmark: resident memory of the `outpost-edge` binary running N pods
//! and M device twins (issue #5: 100 pods, 1,000 twins, idle and at 100 twin
//! updates per second; target at most 32 MB). Every figure is printed beside
//! a baseline taken at the same moments: the same binary running with an
//! empty replica (no pods, no devices).
//!
//! The pods are busybox `exec sleep 3600` pods on the test environment's
//! containerd; the devices are MQTT devices (one connection and one
//! subscription each) on a private mosquitto, fed by a publisher in this
//! process. Memory is VmRSS and VmHWM from `/proc/<pid>/status`; MB is
//! 1,000,000 bytes.
//!
//! ```text
//! scripts/env up
//! cargo build --workspace --examples
//! /var/cache/outpost/target/debug/examples/memory_bench
//! ```
//!
//! Knobs (environment): `OUTPOST_BENCH_PODS` (100), `OUTPOST_BENCH_DEVICES`
//! (1000), `OUTPOST_BENCH_RATE` (twin updates per second, 100),
//! `OUTPOST_BENCH_SECONDS` (length of the load phase, 30),
//! `OUTPOST_BENCH_SETTLE_S` (quiet time before the idle samples, 20),
//! `OUTPOST_EDGE_BIN` (the binary to measure; by default `outpost-edge`
//! next to this example's folder). `OUTPOST_BENCH_REMOVE_NODE=<node>` only
//! removes the pods an interrupted run left behind.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/support/http.rs"]
mod http;
#[path = "../tests/support/edge.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::http_get;
use outpost_edge_node::agent::open_replica;
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::schema::{
    DeviceDesiredDoc, DeviceModelDoc, DeviceProperty, ModelProperty, ProtocolConfig,
};
use outpost_sync::test_utils::unique_name;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use support::{Cleanup, env, pod};
use tokio::time::{Instant, MissedTickBehavior};

const TARGET_MB: f64 = 32.0;
const NAMESPACE: &str = "default";
const MODEL: &str = "bench-sensor";

fn knob(key: &str, default: u64) -> u64 {
    match std::env::var(key) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number")),
        Err(_) => default,
    }
}

struct Settings {
    pods: usize,
    devices: usize,
    rate_per_s: u64,
    load_s: u64,
    settle_s: u64,
}

impl Settings {
    fn from_env() -> Self {
        Self {
            pods: knob("OUTPOST_BENCH_PODS", 100) as usize,
            devices: knob("OUTPOST_BENCH_DEVICES", 1000) as usize,
            rate_per_s: knob("OUTPOST_BENCH_RATE", 100).max(1),
            load_s: knob("OUTPOST_BENCH_SECONDS", 30).max(1),
            settle_s: knob("OUTPOST_BENCH_SETTLE_S", 20),
        }
    }
}

/// The binary to measure: `OUTPOST_EDGE_BIN`, else `outpost-edge` in the
/// profile folder this example was built into (`<target>/<profile>/examples/..`).
fn edge_binary() -> PathBuf {
    let bin = match std::env::var_os("OUTPOST_EDGE_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .expect("the example's own path")
            .parent()
            .and_then(Path::parent)
            .expect("the example lives in <target>/<profile>/examples")
            .join("outpost-edge"),
    };
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build --workspace` (or set OUTPOST_EDGE_BIN)",
        bin.display()
    );
    bin
}

// ------------------------------------------------------------ /proc

/// One reading of `/proc/<pid>/status` and `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
    cpu_ticks: u64,
}

fn sample(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15; the command name (field 2) may
    // hold spaces, so count from its closing parenthesis.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let cpu_ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    Mem {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        threads: field("Threads:"),
        cpu_ticks,
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

// ------------------------------------------------------------ agents

/// A running `outpost-edge run`; stopped with SIGTERM (then SIGKILL) when
/// dropped.
struct AgentProcess {
    child: Child,
    dir: PathBuf,
    label: &'static str,
}

impl AgentProcess {
    fn spawn(bin: &Path, label: &'static str, node: &str, dir: &Path) -> Self {
        let log = std::fs::File::create(dir.join("agent.log")).expect("create the agent's log");
        let mut cmd = Command::new(bin);
        // The test environment's variables must not configure the agent.
        for (key, _) in std::env::vars() {
            if key.starts_with("OUTPOST_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .arg("run")
            .arg("--data-dir")
            .arg(dir)
            .args(["--node-name", node, "--node-ip", "127.0.0.1"])
            .arg("--containerd-socket")
            .arg(env("OUTPOST_CONTAINERD_SOCK"))
            .args(["--pause-image", &env("OUTPOST_PAUSE_IMAGE")])
            .arg("--pod-log-dir")
            .arg(dir.join("pod-logs"))
            .args(["--api-listen", "127.0.0.1:0", "--mqtt", "off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log's handle"))
            .stderr(log)
            .spawn()
            .expect("start outpost-edge");
        Self {
            child,
            dir: dir.to_owned(),
            label,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The local API's address, once the agent has written it.
    async fn api(&mut self) -> SocketAddr {
        let file = self.dir.join("api-addr");
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("poll the agent") {
                panic!(
                    "{} agent exited ({status}); {}",
                    self.label,
                    self.log_tail()
                );
            }
            if let Some(addr) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{} agent: no API address in 30 s; {}",
            self.label,
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        format!("last lines of its log:\n{tail}")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent and what it leaves behind. Fields drop in order: the agent
/// stops before its pods and data dir are removed.
struct Run {
    agent: Option<AgentProcess>,
    node: String,
    dir: PathBuf,
    _cleanup: Cleanup,
}

/// Removes every pod of `node` through CRI, waiting up to `limit` (100 pods
/// take tens of seconds on a busy machine; the tests' `Cleanup` waits 30 s).
fn remove_pods(node: &str, limit: Duration) {
    let node = node.to_owned();
    // A runtime of its own: this may run inside the benchmark's runtime.
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the clean-up");
        rt.block_on(async {
            let socket = PathBuf::from(env("OUTPOST_CONTAINERD_SOCK"));
            if let Ok(cri) = outpost_edge_node::cri::CriClient::connect(&socket).await {
                match tokio::time::timeout(limit, outpost_edge_node::pods::remove_all(&cri, &node))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => eprintln!("removing the pods of {node}: {e}"),
                    Err(_) => eprintln!(
                        "the pods of {node} were not all removed within {limit:?}: \
                         run again with OUTPOST_BENCH_REMOVE_NODE={node}"
                    ),
                }
            }
        });
    })
    .join();
}

impl Drop for Run {
    fn drop(&mut self) {
        // The agent first: a running agent would start the pods again.
        self.agent = None;
        remove_pods(&self.node, Duration::from_secs(300));
    }
}

impl Run {
    fn new(prefix: &str) -> Self {
        let node = unique_name(prefix);
        let dir = std::env::temp_dir()
            .join("outpost-memory-bench")
            .join(&node);
        std::fs::create_dir_all(&dir).expect("create the data dir");
        Self {
            agent: None,
            _cleanup: Cleanup {
                socket: PathBuf::from(env("OUTPOST_CONTAINERD_SOCK")),
                node: node.clone(),
                dir: dir.clone(),
            },
            node,
            dir,
        }
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("agent started")
    }
}

// ------------------------------------------------------------ seeding

fn telemetry_topic(node: &str, device: usize) -> String {
    format!("bench/{node}/d{device}/telemetry")
}

fn device_name(device: usize) -> String {
    format!("sensor-{device}")
}

/// Writes the pods, the model and the devices into the replica before the
/// agent starts (the agent holds the replica's lock while it runs).
fn seed(run: &Run, pods: usize, devices: usize, broker: SocketAddr) {
    let mut replica = open_replica(&run.dir).expect("open the replica");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let id = |kind, object: &[&str]| DocId::new(kind, Owner::Node(&run.node), object).unwrap();
    for i in 0..pods {
        let spec = pod(&format!("mem-{i}"), "exec sleep 3600");
        replica
            .put(
                &id(DocKind::PodSpec, &[&spec.namespace, &spec.name, &spec.uid]),
                &spec,
                now_ms,
            )
            .expect("write a pod spec");
    }
    if devices == 0 {
        return;
    }
    let model = DeviceModelDoc {
        namespace: NAMESPACE.into(),
        name: MODEL.into(),
        protocol: "mqtt".into(),
        properties: vec![ModelProperty {
            name: "temperature".into(),
            kind: "DOUBLE".into(),
            access_mode: Some("ReadOnly".into()),
            unit: Some("Cel".into()),
            ..Default::default()
        }],
    };
    replica
        .put(
            &id(DocKind::DeviceModel, &[NAMESPACE, MODEL]),
            &model,
            now_ms,
        )
        .expect("write the device model");
    for i in 0..devices {
        let name = device_name(i);
        let device = DeviceDesiredDoc {
            namespace: NAMESPACE.into(),
            name: name.clone(),
            model: MODEL.into(),
            protocol: ProtocolConfig {
                protocol_name: "mqtt".into(),
                config_data: json!({
                    "broker": broker.to_string(),
                    "telemetryTopic": telemetry_topic(&run.node, i),
                    "clientId": format!("{}-{name}", run.node),
                    "qos": 0,
                }),
            },
            properties: vec![DeviceProperty {
                name: "temperature".into(),
                visitors: ProtocolConfig {
                    protocol_name: "mqtt".into(),
                    config_data: json!({"jsonKey": "temperature"}),
                },
                collect_cycle: Some(1_000_000_000),
                report_cycle: Some(1_000_000_000),
                report_to_cloud: Some(true),
                push_method: None,
            }],
            ..Default::default()
        };
        replica
            .put(
                &id(DocKind::DeviceDesired, &[NAMESPACE, &name]),
                &device,
                now_ms,
            )
            .expect("write a device");
    }
}

// ------------------------------------------------------------ the local API

async fn metric(api: SocketAddr, series: &str) -> u64 {
    let text = http_get(api, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waits until the agent reports every pod Running and every device online.
async fn wait_ready(run: &mut Run, pods: usize, devices: usize, timeout: Duration) -> Duration {
    let api = run.agent().api().await;
    let t0 = Instant::now();
    let mut last_print = t0;
    loop {
        let running = metric(api, "outpost_edge_pods{phase=\"Running\"}").await as usize;
        let online = metric(api, "outpost_edge_devices{state=\"online\"}").await as usize;
        if running >= pods && online >= devices {
            return t0.elapsed();
        }
        if t0.elapsed() > timeout {
            panic!(
                "after {timeout:?}: {running}/{pods} pods Running, {online}/{devices} devices online; {}",
                run.agent().log_tail()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            eprintln!("waiting: {running}/{pods} pods Running, {online}/{devices} devices online");
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ------------------------------------------------------------ telemetry

struct Publisher {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    node: String,
    devices: usize,
    next: usize,
    seq: u64,
    /// The last value sent to each device.
    last: HashMap<usize, u64>,
}

impl Publisher {
    fn start(broker: SocketAddr, node: &str, devices: usize) -> Self {
        let options = MqttOptions::new(
            unique_name("bench-publisher"),
            broker.ip().to_string(),
            broker.port(),
        );
        let (client, mut events) = AsyncClient::new(options, 4096);
        let task = tokio::spawn(async move {
            loop {
                if let Err(e) = events.poll().await {
                    eprintln!("publisher: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        Self {
            client,
            task,
            node: node.to_owned(),
            devices,
            next: 0,
            seq: 0,
            last: HashMap::new(),
        }
    }

    /// Sends the next device in turn a new temperature.
    async fn send_one(&mut self) {
        let device = self.next;
        self.next = (self.next + 1) % self.devices;
        self.seq += 1;
        let payload = json!({"temperature": self.seq}).to_string();
        self.client
            .publish(
                telemetry_topic(&self.node, device),
                QoS::AtMostOnce,
                false,
                payload,
            )
            .await
            .expect("queue a publish");
        self.last.insert(device, self.seq);
    }

    /// Sends `rate_per_s` updates a second for `length`, calling `each_s`
    /// once a second.
    async fn run_for(
        &mut self,
        rate_per_s: u64,
        length: Duration,
        mut each_s: impl FnMut(),
    ) -> u64 {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate_per_s as u32);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let t0 = Instant::now();
        let mut sent = 0;
        let mut next_second = t0 + Duration::from_secs(1);
        while t0.elapsed() < length {
            tick.tick().await;
            self.send_one().await;
            sent += 1;
            if Instant::now() >= next_second {
                each_s();
                next_second += Duration::from_secs(1);
            }
        }
        sent
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many devices' twins hold the last value sent to them.
async fn twins_current(api: SocketAddr, last: &HashMap<usize, u64>) -> usize {
    let status: serde_json::Value =
        serde_json::from_str(&http_get(api, "/api/v1/status").await).expect("status is JSON");
    let actual: HashMap<String, String> = status["devices"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|d| {
            let value = &d["properties"]["temperature"]["actual"];
            let text = value
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            Some((d["id"].as_str()?.to_owned(), text))
        })
        .collect();
    last.iter()
        .filter(|(device, seq)| {
            actual
                .get(&format!("{NAMESPACE}/{}", device_name(**device)))
                .and_then(|v| v.parse::<f64>().ok())
                == Some(**seq as f64)
        })
        .count()
}

// ------------------------------------------------------------ main

#[derive(Default)]
struct Series {
    agent: Vec<Mem>,
    baseline: Vec<Mem>,
}

impl Series {
    fn take(&mut self, agent: u32, baseline: u32) {
        self.agent.push(sample(agent));
        self.baseline.push(sample(baseline));
    }
}

fn row(figure: &str, value_kib: u64, baseline_kib: u64, judge: bool) {
    let (value, base) = (mb(value_kib), mb(baseline_kib));
    let verdict = if !judge {
        "-"
    } else if value <= TARGET_MB {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "| {figure} | {value:.1} MB | {base:.1} MB | {:+.1} MB | <= {TARGET_MB:.0} MB | {verdict} |",
        value - base
    );
    // One line per figure for scripts/bench's summary table.
    if judge {
        println!(
            "BENCH|edge memory: {figure}|{value:.1} MB|{base:.1} MB (empty agent)|<= {TARGET_MB:.0} MB|{verdict}"
        );
    }
}

fn split_row(phase: &str, agent: &[Mem], baseline: &[Mem]) {
    let m = |v: &[Mem], f: fn(&Mem) -> u64| mb(median(v.iter().map(f).collect()));
    println!(
        "| {phase} | {:.1} / {:.1} MB | {:.1} / {:.1} MB | {} | {} |",
        m(agent, |s| s.anon_kib),
        m(agent, |s| s.file_kib),
        m(baseline, |s| s.anon_kib),
        m(baseline, |s| s.file_kib),
        median(agent.iter().map(|s| s.threads).collect()),
        median(baseline.iter().map(|s| s.threads).collect()),
    );
}

fn cpu_s(series: &[Mem]) -> f64 {
    match (series.first(), series.last()) {
        (Some(a), Some(b)) => (b.cpu_ticks - a.cpu_ticks) as f64 / 100.0,
        _ => 0.0,
    }
}

async fn bench(settings: &Settings, bin: &Path, base: &mut Run, edge: &mut Run) {
    let broker = SimProcess::mosquitto()
        .await
        .expect("start a private mosquitto");
    let broker_addr = broker.addr();

    // The baseline: the same binary on an empty replica, alive for the
    // whole run and sampled at the same moments as the measured agent.
    base.agent = Some(AgentProcess::spawn(bin, "baseline", &base.node, &base.dir));
    wait_ready(base, 0, 0, Duration::from_secs(60)).await;

    seed(edge, settings.pods, settings.devices, broker_addr);
    edge.agent = Some(AgentProcess::spawn(bin, "measured", &edge.node, &edge.dir));
    let ready = wait_ready(
        edge,
        settings.pods,
        settings.devices,
        Duration::from_secs(600),
    )
    .await;
    let api = edge.agent().api().await;
    let (pid, base_pid) = (edge.agent().pid(), base.agent().pid());
    eprintln!(
        "{} pods Running and {} devices online {ready:.1?} after the agent's API came up",
        settings.pods, settings.devices
    );

    // Every twin gets a first value, so that idle means twins holding values.
    let mut publisher = Publisher::start(broker_addr, &edge.node, settings.devices.max(1));
    if settings.devices > 0 {
        let prime = Duration::from_secs_f64(settings.devices as f64 / 500.0);
        publisher.run_for(500, prime, || {}).await;
    }

    eprintln!("idle: settling {} s, then 5 samples", settings.settle_s);
    tokio::time::sleep(Duration::from_secs(settings.settle_s)).await;
    let mut idle = Series::default();
    for _ in 0..5 {
        idle.take(pid, base_pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    idle.take(pid, base_pid);
    let idle_current = if settings.devices > 0 {
        twins_current(api, &publisher.last).await
    } else {
        0
    };

    eprintln!(
        "load: {} twin updates/s for {} s",
        settings.rate_per_s, settings.load_s
    );
    let mut load = Series::default();
    load.take(pid, base_pid);
    let t0 = Instant::now();
    let sent = if settings.devices > 0 {
        publisher
            .run_for(
                settings.rate_per_s,
                Duration::from_secs(settings.load_s),
                || load.take(pid, base_pid),
            )
            .await
    } else {
        tokio::time::sleep(Duration::from_secs(settings.load_s)).await;
        0
    };
    let load_elapsed = t0.elapsed();
    load.take(pid, base_pid);
    // The last report cycle, then check the twins hold what was sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load_current = if settings.devices > 0 {
        twins_current(api, &publisher.last).await
    } else {
        0
    };
    let running = metric(api, "outpost_edge_pods{phase=\"Running\"}").await;
    let online = metric(api, "outpost_edge_devices{state=\"online\"}").await;
    let end = sample(pid);
    let base_end = sample(base_pid);

    // With no devices the load phase is the same wait with nothing sent.
    let rate = if settings.devices > 0 {
        settings.rate_per_s
    } else {
        0
    };
    let med = |v: &[Mem]| median(v.iter().map(|s| s.rss_kib).collect());
    let peak = |v: &[Mem]| v.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    println!();
    println!(
        "outpost-edge: {} ({})",
        bin.display(),
        // Known from the path (scripts/bench copies it into a `release` folder).
        match bin.to_string_lossy() {
            p if p.contains("/release/") => "release build",
            p if p.contains("/debug/") => "debug build",
            _ => "build profile not in its path",
        }
    );
    println!(
        "pods: {} (all Running: {}), devices: {} (online: {online}), MQTT devices on a private mosquitto",
        settings.pods,
        if running as usize >= settings.pods {
            "yes"
        } else {
            "no"
        },
        settings.devices,
    );
    println!(
        "load: {sent} twin updates in {load_elapsed:.1?} ({:.0}/s); twins holding the last value sent: {idle_current}/{} after priming, {load_current}/{} after the load",
        sent as f64 / load_elapsed.as_secs_f64(),
        publisher.last.len(),
        publisher.last.len(),
    );
    println!();
    println!(
        "| figure | outpost-edge | baseline: empty agent, same moments | difference | target | |"
    );
    println!("|---|---|---|---|---|---|");
    row(
        "idle, VmRSS median of 6 samples",
        med(&idle.agent),
        med(&idle.baseline),
        true,
    );
    row(
        &format!(
            "{} updates/s, VmRSS median of {} samples",
            rate,
            load.agent.len()
        ),
        med(&load.agent),
        med(&load.baseline),
        true,
    );
    row(
        &format!("{rate} updates/s, VmRSS peak sample"),
        peak(&load.agent),
        peak(&load.baseline),
        true,
    );
    row(
        "VmHWM at the end (peak since start, start-up included)",
        end.hwm_kib,
        base_end.hwm_kib,
        false,
    );
    println!();
    println!(
        "| phase | outpost-edge anon / file-backed | baseline anon / file-backed | threads | baseline threads |"
    );
    println!("|---|---|---|---|---|");
    split_row("idle", &idle.agent, &idle.baseline);
    split_row("load", &load.agent, &load.baseline);
    println!();
    println!(
        "CPU while idle: outpost-edge {:.1} s, baseline {:.1} s (of 5 s)",
        cpu_s(&idle.agent),
        cpu_s(&idle.baseline),
    );
    println!(
        "CPU during the load: outpost-edge {:.1} s, baseline {:.1} s (of {:.0} s)",
        cpu_s(&load.agent),
        cpu_s(&load.baseline),
        load_elapsed.as_secs_f64()
    );
    drop(publisher);
    drop(broker);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(node) = std::env::var("OUTPOST_BENCH_REMOVE_NODE") {
        // The pods an interrupted run left behind.
        remove_pods(&node, Duration::from_secs(600));
        return;
    }
    let settings = Settings::from_env();
    let bin = edge_binary();
    // Declared before the work so that they drop (agents stopped, pods
    // removed, data dirs deleted) on every way out, a panic included.
    let mut base = Run::new("mem-base");
    let mut edge = Run::new("mem-edge");
    tokio::select! {
        () = bench(&settings, &bin, &mut base, &mut edge) => {}
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted: cleaning up"),
    }
    eprintln!("removing the pods and data dirs");
}
