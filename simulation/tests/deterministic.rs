//! The deterministic simulation: one seed gives one history, the checkers
//! pass on many seeds of random faults, and every example scenario runs.
//!
//! `OUTPOST_SIM_SEEDS=N` runs N nemesis seeds instead of the defaults;
//! `cargo test -p outpost-simulation -- --ignored` adds a longer soak.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

use std::path::{Path, PathBuf};

use outpost_simulation::scenario::{Dur, Fleet, Nemesis, Scenario};
use outpost_simulation::{Report, run};

fn small_nemesis() -> Scenario {
    Scenario {
        name: "test-nemesis".into(),
        duration: Dur(90_000),
        fleet: Fleet {
            edges: 8,
            sites: 2,
            ..Fleet::default()
        },
        nemesis: Some(Nemesis {
            mean_interval: Dur(8_000),
            max_length: Dur(30_000),
            ..Nemesis::default()
        }),
        ..Scenario::default()
    }
}

fn explain(r: &Report) -> String {
    let mut s = String::new();
    for f in &r.failures {
        s.push_str(&format!(
            "\nseed {} checker {} at {} ms: {}",
            r.seed, f.checker, f.at_ms, f.explanation
        ));
    }
    s.push_str(&format!(
        "\nreplay: outpost-sim run --seed {} --nemesis --edges 8 --sites 2 --duration 90s (with the test's nemesis settings)",
        r.seed
    ));
    s
}

#[test]
fn a_seed_replays_bit_for_bit() {
    let a = run(42, small_nemesis()).unwrap();
    let b = run(42, small_nemesis()).unwrap();
    assert_eq!(a.digest, b.digest, "same seed, different histories");
    // Everything but host time and memory is part of the history.
    let strip = |mut r: Report| {
        r.wall_ms = 0;
        r.peak_rss_kib = None;
        r.host_ms.clear();
        r
    };
    assert_eq!(strip(a.clone()), strip(b));
    assert!(
        a.messages > 0 && a.faults.values().sum::<u64>() > 0,
        "{a:?}"
    );
    let c = run(43, small_nemesis()).unwrap();
    assert_ne!(a.digest, c.digest, "different seeds, same history");
}

fn seeds(default: u64) -> u64 {
    std::env::var("OUTPOST_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn checkers_pass_under_random_faults() {
    let mut faults = 0;
    for seed in 1..=seeds(6) {
        let r = run(seed, small_nemesis()).unwrap();
        assert!(r.passed(), "{}", explain(&r));
        assert!(r.converged_after_ms.is_some());
        faults += r.faults.values().sum::<u64>();
    }
    assert!(faults > 0, "the nemesis injected nothing");
}

/// A few hundred seeds of a small fleet under the nemesis, on two threads
/// (each run is single-threaded and deterministic on its own).
#[test]
fn a_few_hundred_seeds_pass() {
    let mut s = small_nemesis();
    s.fleet.edges = 3;
    s.fleet.sites = 1;
    s.duration = Dur(20_000);
    s.nemesis = Some(Nemesis {
        mean_interval: Dur(3_000),
        max_length: Dur(10_000),
        ..Nemesis::default()
    });
    let n = seeds(200);
    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|w| {
                let s = s.clone();
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    let mut faults = 0;
                    for seed in (1..=n).filter(|k| k % 2 == w) {
                        let r = run(10_000 + seed, s.clone()).unwrap();
                        faults += r.faults.values().sum::<u64>();
                        if !r.passed() {
                            failed.push(explain(&r));
                        }
                    }
                    (failed, faults)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut faults = 0;
        for w in workers {
            let (f, k) = w.join().unwrap();
            all.extend(f);
            faults += k;
        }
        assert!(
            faults >= n,
            "the nemesis injected only {faults} faults in {n} seeds"
        );
        all
    });
    assert!(
        failures.is_empty(),
        "{} of {n} seeds failed:{}",
        failures.len(),
        failures.join("")
    );
}

#[test]
#[ignore = "soak: a few minutes; run with --ignored"]
fn soak_many_seeds_on_a_larger_fleet() {
    let mut s = small_nemesis();
    s.fleet.edges = 30;
    s.fleet.sites = 3;
    s.duration = Dur(240_000);
    for seed in 1000..1000 + seeds(40) {
        let r = run(seed, s.clone()).unwrap();
        assert!(r.passed(), "{}", explain(&r));
    }
}

fn scenarios() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn example_scenarios_parse_and_run() {
    let files = scenarios();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let s = Scenario::load(&path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        // The tour and the site isolation have their own tests; the fleet of
        // 1,000 is the benchmark's (`cargo bench --bench fleet`).
        if ["partitions", "site-isolation", "fleet-1000"].contains(&name.as_str()) {
            continue;
        }
        if name == "desired-race" {
            // Reproduces a sync bug (tests/sync_bugs.rs): the checker must see it.
            let r = run(1, s).unwrap();
            let fixed = r.passed();
            assert!(
                fixed || r.failure_counts.keys().all(|c| c == "lost-write"),
                "{}",
                explain(&r)
            );
            continue;
        }
        let r = run(7, s).unwrap();
        assert!(r.passed(), "{}: {}", path.display(), explain(&r));
        assert!(r.lag_ms.count > 0, "{}: nothing synced", path.display());
    }
}

#[test]
fn faults_of_the_tour_scenario_all_fire() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/partitions.toml");
    let r = run(1, Scenario::load(&path).unwrap()).unwrap();
    assert!(r.passed(), "{}", explain(&r));
    for kind in [
        "partition",
        "one-way",
        "flap",
        "isolate-site",
        "crash",
        "skew",
        "network",
        "join",
        "leave",
    ] {
        assert!(
            r.faults.contains_key(kind),
            "{kind} never fired: {:?}",
            r.faults
        );
    }
    assert!(r.connections_broken > 0 && r.dials_failed > 0 && r.restarts >= 2);
    assert!(r.messages_dropped > 0 && r.retransmitted > 0 && r.held_back > 0);
    // Once healed, sync is fast again.
    assert!(r.lag_after_heal_ms.p99 < 5_000, "{:?}", r.lag_after_heal_ms);
}

#[test]
fn an_isolated_site_keeps_syncing_within_itself() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/site-isolation.toml");
    let r = run(3, Scenario::load(&path).unwrap()).unwrap();
    assert!(r.passed(), "{}", explain(&r));
    // Site documents written by the isolated edges reached their site-mates
    // in well under a minute, while the cloud waited for the heal.
    assert!(r.lag_ms.p50 < 1_000, "{:?}", r.lag_ms);
    assert!(r.lag_ms.max > 60_000, "{:?}", r.lag_ms);
}
