//! The real-process mode against the test environment: a real outpost-cloud
//! and real outpost-edge agents in network namespaces this test creates,
//! the environment's Kubernetes API server and containerd, partitions and
//! loss by nftables, a crash by SIGKILL. Needs `scripts/env up` and the
//! workspace's binaries (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_simulation::processes::{Options, ProcessError, check_scenario, run};
use outpost_simulation::scenario::Scenario;
use outpost_sync::test_utils::env_value;

/// The binaries: this build's, or those in `OUTPOST_SIM_BIN_DIR` (to run
/// the mode against other builds, e.g. release binaries).
fn options() -> Options {
    let bin_dir = match std::env::var_os("OUTPOST_SIM_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_BIN_EXE_outpost-sim"))
            .parent()
            .unwrap()
            .to_path_buf(),
    };
    for bin in ["outpost-cloud", "outpost-edge"] {
        assert!(
            bin_dir.join(bin).is_file(),
            "{} is missing: build the workspace (cargo build --workspace --bins)",
            bin_dir.join(bin).display()
        );
    }
    let env = |k: &str| env_value(k).expect("test environment: run scripts/env up");
    Options {
        bin_dir,
        work_dir: std::env::temp_dir().join("outpost-sim-test"),
        kubeconfig: env("KUBECONFIG").into(),
        containerd_socket: env("OUTPOST_CONTAINERD_SOCK").into(),
        image: env("OUTPOST_IMAGE"),
        pause_image: env("OUTPOST_PAUSE_IMAGE"),
    }
}

fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, Path::new("test.toml")).unwrap()
}

/// The namespaces of this process that are still there.
fn our_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("osim{}r", std::process::id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// One run at a time: two fleets at once would only slow each other down
/// on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_crashed_and_lossy_fleet_converges_and_is_cleaned_up() {
    let _one = SERIAL.lock().await;
    let s = scenario(
        r#"
        name = "processes-test"
        duration = "30s"
        [fleet]
        edges = 2
        sites = 2
        [workload]
        api_interval = "200ms"
        api_desired_share = 0.3
        report_interval = "1500ms"
        edge_desired_prob = 1.0
        [checks]
        liveness_bound = "20s"
        settle_timeout = "60s"
        [[event]]
        kind = "crash"
        at = "3s"
        node = "edge-1"
        restart_after = "4s"
        [[event]]
        kind = "network"
        at = "9s"
        for = "5s"
        loss = 0.2
        [[event]]
        kind = "partition"
        at = "16s"
        for = "14s"
        a = "clouds"
        b = "edge-0"
        "#,
    );
    let report = run(7, s, options(), true).await.unwrap();
    print!("{}", report.table());
    assert!(report.passed(), "{:#?}", report.report.failures);
    let r = &report.report;
    assert!(r.lag_ms.count > 50, "lag samples: {}", r.lag_ms.count);
    // The partition held edge-0's writes back for up to its whole length.
    assert!(
        r.lag_ms.max >= 5_000,
        "the partition did not delay anything: max lag {} ms",
        r.lag_ms.max
    );
    assert_eq!(r.heals.len(), 3, "{:?}", r.heals);
    assert!(r.heals.iter().all(|h| h.caught_up_after_ms.is_some()));
    assert_eq!(report.processes["edge-1"].starts, 2, "edge-1 was restarted");
    // Storage stays small: a few objects per edge, however many writes.
    for (node, p) in &report.processes {
        assert!(
            p.data_bytes > 0 && p.data_bytes < 64 << 20,
            "{node}'s data dir holds {} bytes",
            p.data_bytes
        );
    }
    assert!(r.messages > 0 && r.bytes > 0);
    assert!(report.edge_writes > 0, "the edges' apps wrote nothing");
    assert!(
        r.writes.get("desired (edge)").copied().unwrap_or(0) > 0,
        "no edge write was acknowledged: {:?}",
        r.writes
    );
    // edge-0's last writes of both sides fall in the partition: the loser
    // was found in the DeviceStatus (the run passed).
    assert!(
        report.conflicts_expected >= 1,
        "no concurrent writes were checked"
    );
    assert_eq!(report.conflicts_expected, r.conflicts_visible);
    assert!(
        our_namespaces().is_empty(),
        "namespaces left behind: {:?}",
        our_namespaces()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_cannot_converge_in_time_fails_the_convergence_checker() {
    let _one = SERIAL.lock().await;
    // The partition lasts to the end and the fleet gets no time to settle:
    // edge-0 is still behind when the checker looks.
    let s = scenario(
        r#"
        name = "processes-too-soon"
        duration = "12s"
        [fleet]
        edges = 1
        sites = 1
        [workload]
        api_interval = "200ms"
        api_desired_share = 0.0
        [checks]
        settle_timeout = "1ms"
        [[event]]
        kind = "partition"
        at = "2s"
        for = "10s"
        a = "clouds"
        b = "edges"
        "#,
    );
    let report = run(1, s, options(), false).await.unwrap();
    assert!(!report.passed());
    let f = &report.report.failures[0];
    assert_eq!(f.checker, "convergence", "{f:?}");
    assert!(
        f.explanation.contains("edge-0"),
        "the explanation names the edge: {}",
        f.explanation
    );
    assert!(our_namespaces().is_empty());
}

#[test]
fn scenarios_this_mode_cannot_apply_are_refused_with_the_reason() {
    for (text, says) in [
        ("[fleet]\nclouds = 2\nedges = 2", "one cloud bridge"),
        (
            "[[event]]\nkind = \"skew\"\nat = \"1s\"\nnode = \"edge-0\"\nskew_ms = 500",
            "skew",
        ),
        (
            "[[event]]\nkind = \"network\"\nat = \"1s\"\nfor = \"2s\"\ndelay = { dist = \"fixed\", value = \"50ms\" }",
            "netem",
        ),
        ("[nemesis]", "nemesis"),
    ] {
        let err = check_scenario(&scenario(text)).unwrap_err();
        assert!(matches!(err, ProcessError::Scenario(_)));
        assert!(err.to_string().contains(says), "{text:?}: {err}");
    }
}
