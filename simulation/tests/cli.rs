//! The `outpost-sim` binary: its help (and the quic mode's), a run, a soak with per-seed reports, a failing scenario file, a report.

use std::process::Command;

fn sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outpost-sim"))
}

#[test]
fn help_describes_the_binary() {
    let out = sim()
        .arg("--help")
        .output()
        .expect("run outpost-sim --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("simulation harness"),
        "--help says what outpost-sim is: {text}"
    );
    assert!(text.contains("Usage: outpost-sim"), "{text}");
    assert!(text.contains("run") && text.contains("soak"), "{text}");
    let out = sim().args(["run", "--help"]).output().expect("run --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--seed",
        "--scenario",
        "--nemesis",
        "--edges",
        "--sites",
        "--duration",
        "--report",
    ] {
        assert!(text.contains(flag), "run --help names {flag}: {text}");
    }
}

#[test]
fn quic_help_says_what_it_is_and_the_nemesis_is_refused() {
    let out = sim()
        .args(["quic", "--help"])
        .output()
        .expect("quic --help");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("iroh") && text.contains("in-memory network"),
        "{text}"
    );
    assert!(text.contains("NOT bit for bit deterministic"), "{text}");
    for flag in [
        "--seed",
        "--scenario",
        "--edges",
        "--duration",
        "--report",
        "--plot",
    ] {
        assert!(text.contains(flag), "quic --help names {flag}: {text}");
    }
    let out = sim()
        .args(["quic", "--nemesis"])
        .output()
        .expect("quic --nemesis");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nemesis"), "{err}");
}

#[test]
fn a_run_prints_a_table_and_writes_json() {
    let dir = std::env::temp_dir().join(format!("outpost-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report = dir.join("report.json");
    let out = sim()
        .args([
            "run",
            "--seed",
            "5",
            "--edges",
            "4",
            "--sites",
            "1",
            "--duration",
            "30s",
            "--nemesis",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("run outpost-sim run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("sync lag ms") && stdout.contains("all checkers passed"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written"))
            .expect("JSON");
    assert_eq!(json["seed"], 5);
    assert!(
        json["lag_ms"]["p99"].is_u64() && json["messages"].as_u64() > Some(0),
        "{json}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_malformed_scenario_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("outpost-sim-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[fleet]\nedges = \"many\"\n").expect("write");
    let out = sim()
        .args(["run", "--scenario"])
        .arg(&bad)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr.contains("bad.toml") && stderr.contains("edges"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::write(
        &bad,
        "[[event]]\nkind = \"crash\"\nat = \"1s\"\nnode = \"edge-zz\"\n",
    )
    .expect("write");
    let out = sim()
        .args(["run", "--scenario"])
        .arg(&bad)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr.contains("edge-zz"), "{stderr}");
    let out = sim()
        .args(["run", "--scenario", "/nonexistent/x.toml"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_soak_writes_a_report_and_a_plot_per_seed_and_a_summary() {
    let dir = std::env::temp_dir().join(format!("outpost-sim-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = sim()
        .args([
            "soak",
            "--seeds",
            "3",
            "--from",
            "11",
            "--edges",
            "3",
            "--sites",
            "1",
            "--duration",
            "20s",
        ])
        .arg("--reports")
        .arg(&dir)
        .output()
        .expect("run outpost-sim soak");
    assert!(out.status.success(), "{out:?}");
    for seed in 11..14 {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("seed-{seed}.json"))).expect("report"),
        )
        .expect("JSON");
        assert_eq!(json["seed"], seed);
        let svg = std::fs::read_to_string(dir.join(format!("seed-{seed}.svg"))).expect("plot");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary"))
            .expect("JSON");
    assert_eq!(summary["seeds"].as_array().map(Vec::len), Some(3));
    assert!(
        summary["seeds"][0]["replay"]
            .as_str()
            .is_some_and(|r| r.starts_with("outpost-sim run --seed 11")),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
