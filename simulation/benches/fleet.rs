//! The scale target of the deterministic simulation: 1,000 edges through
//! ten simulated minutes with partitions (`scenarios/fleet-1000.toml`),
//! printed beside a baseline measured in the same run: the same fleet and
//! workload with no faults.
//!
//! `cargo bench --profile dev -p outpost-simulation --bench fleet`
//! `OUTPOST_BENCH_EDGES=N` runs N edges instead (a quick look).
//!
//! Wall time is host time; peak memory is the process's VmHWM after each run
//! (the high-water mark only grows, so the second figure covers both).

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark that fails should stop loudly

use std::path::Path;

use outpost_simulation::report::peak_rss_kib;
use outpost_simulation::{Report, Scenario, run};

fn line(name: &str, r: &Report) {
    let host: Vec<String> = r
        .host_ms
        .iter()
        .filter(|(_, v)| **v >= 100)
        .map(|(k, v)| format!("{k} {:.1}s", *v as f64 / 1e3))
        .collect();
    println!(
        "| {name} | {} edges | {:.1} s | {} MiB | {} writes | {} msgs | lag p50/p99 {}/{} ms | {} |",
        r.edges,
        r.wall_ms as f64 / 1e3,
        peak_rss_kib().unwrap_or(0) / 1024,
        r.writes.values().sum::<u64>(),
        r.messages,
        r.lag_ms.p50,
        r.lag_ms.p99,
        if r.passed() { "passed" } else { "FAILED" },
    );
    println!("    host time by activity: {}", host.join(", "));
    for f in &r.failures {
        println!("    FAILED {}: {}", f.checker, f.explanation);
    }
}

fn main() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/fleet-1000.toml");
    let mut scenario = Scenario::load(&path).unwrap();
    if let Some(n) = std::env::var("OUTPOST_BENCH_EDGES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        scenario.fleet.edges = n;
    }
    let mut baseline = scenario.clone();
    baseline.events.clear();
    baseline.name = "fleet-1000, no faults".into();
    println!("| run | fleet | wall | peak RSS | writes | messages | sync lag | checkers |");
    println!("|---|---|---|---|---|---|---|---|");
    let b = run(1, baseline).unwrap();
    line("baseline: no faults", &b);
    let r = run(1, scenario).unwrap();
    line("partitions, isolation, flaps, cloud crash", &r);
    let met = if r.wall_ms <= 60_000 {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "ratio of wall times (faults / no faults): {:.2}; target: faulted run <= 60 s: {met}",
        r.wall_ms as f64 / b.wall_ms.max(1) as f64,
    );
    // One line for scripts/bench's summary table.
    println!(
        "BENCH|simulation: {} edges, 10 simulated minutes with faults, wall time|{:.1} s|{:.1} s (same fleet, no faults)|<= 60 s|{met}",
        r.edges,
        r.wall_ms as f64 / 1000.0,
        b.wall_ms as f64 / 1000.0,
    );
}
