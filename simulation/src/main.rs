//! `outpost-sim`: the Outpost network-chaos simulation harness.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use outpost_simulation::scenario::{Dur, Nemesis, Scenario};
use outpost_simulation::{Report, run};

/// `outpost-sim`: the Outpost network-chaos simulation harness.
///
/// It runs fleets of Outpost replicas (cloud replicas and edges grouped into
/// sites, each a real replica on an in-memory store) over a simulated network
/// in simulated time, under partitions, loss, reordering, crashes and clock
/// skew, every choice drawn from one seed. Once the faults heal it checks
/// that every replica converges, no acknowledged write is lost, desired-value
/// conflicts follow the hybrid-logical-clock rule, storage stays bounded and
/// sync resumes. A failure prints its seed and the command that replays it.
#[derive(Debug, Parser)]
#[command(name = "outpost-sim", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs one seed of a scenario and prints its report; exits 1 when a checker fails.
    Run {
        /// The seed: the same seed and scenario give the same history.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
        /// Also write the report as JSON to this file, and its sync-lag plot
        /// as SVG next to it (the same name ending in .svg) unless --plot names another file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the sync-lag plot (SVG: lag over simulated time, fault windows
        /// shaded, heals marked) to this file. Default: next to --report, none without it.
        /// The plot depends only on the seed and the scenario.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Runs one seed of a scenario on the real QUIC stack: real engines on
    /// real iroh endpoints over a seeded in-memory network; exits 1 when a checker fails.
    ///
    /// Every node is a real sync engine on an in-memory store, bound to a real
    /// iroh endpoint (QUIC, TLS, the production session code) whose only
    /// transport is an in-memory network that delays, loses, reorders,
    /// duplicates and partitions datagrams, every draw from the seed. It runs
    /// in real time (the scenario's durations are wall time) and is NOT bit
    /// for bit deterministic: the workload and the fault timeline follow the
    /// seed, but tokio's scheduling, QUIC's timers and the host's clock do
    /// not, so two runs of one seed differ in detail (the report's workload
    /// digest is equal, its state digest is not). Skew, join and leave events
    /// and the nemesis are refused; use `run` for them.
    Quic {
        /// The seed: the workload, the faults' targets and the network's draws follow it.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
        /// Also write the report as JSON to this file, and its sync-lag plot
        /// as SVG next to it (the same name ending in .svg) unless --plot names another file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the sync-lag plot (SVG: lag over the run's time, fault windows
        /// shaded, heals marked) to this file. Default: next to --report, none without it.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Runs many seeds (with the nemesis unless the scenario has its own
    /// timeline) and prints one line per seed and a summary; exits 1 when any seed fails.
    Soak {
        /// How many seeds.
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Write each seed's report (seed-N.json) and lag plot (seed-N.svg)
        /// into this directory, and the summary (summary.json).
        #[arg(long)]
        reports: Option<PathBuf>,
        #[command(flatten)]
        shape: Shape,
    },
    /// Runs one seed of a scenario as real processes: a real outpost-cloud
    /// and real outpost-edge agents, each in a network namespace of its own,
    /// syncing over real UDP, with the scenario's partitions, loss and
    /// crashes applied by nftables and SIGKILL (Linux, as root).
    ///
    /// Needs the test environment (`scripts/env up`: the Kubernetes API
    /// server and containerd) and the workspace's binaries. The fleet gets a
    /// Pod, a ConfigMap and a KubeEdge Device per edge; the workload writes
    /// them through the Kubernetes API. Once the faults heal it checks that
    /// every edge and the API converge on the last acknowledged values and
    /// that nothing acknowledged was undone, then deletes everything it made
    /// (namespaces, pods, Nodes, admission records), also when it fails.
    /// Supported events: partition, one-way, flap, isolate-site, crash, and
    /// network loss; others are refused (use `run`). Exits 1 when a checker fails.
    Processes {
        /// The seed: it draws the selectors' nodes and the workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[command(flatten)]
        shape: Shape,
        #[command(flatten)]
        parts: Parts,
        /// Also write the report as JSON to this file, and its plot next to it (.svg).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write the lag plot (SVG) to this file.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Joins a TCP address and a unix socket (used inside the real-process
    /// mode's namespaces; `tcp:IP:PORT` or `unix:PATH`).
    #[command(hide = true)]
    Relay {
        /// Where to accept connections.
        #[arg(long)]
        listen: outpost_simulation::relay::End,
        /// Where to take each of them.
        #[arg(long)]
        connect: outpost_simulation::relay::End,
    },
}

/// Where the real-process mode finds its parts.
#[derive(Debug, Args, Clone)]
struct Parts {
    /// Directory of outpost-cloud, outpost-edge and outpost-sim [default: this program's].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Data dirs, logs and sockets of the run go under this directory.
    #[arg(long, default_value = "/tmp/outpost-sim")]
    work_dir: PathBuf,
    /// The Kubernetes API server's (admin) kubeconfig.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// containerd's CRI socket.
    #[arg(
        long,
        env = "OUTPOST_CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// The image of the workload's pods (containerd must have it).
    #[arg(
        long,
        env = "OUTPOST_IMAGE",
        default_value = "docker.io/library/busybox:latest"
    )]
    image: String,
    /// containerd's sandbox image.
    #[arg(
        long,
        env = "OUTPOST_PAUSE_IMAGE",
        default_value = "registry.k8s.io/pause:3.9"
    )]
    pause_image: String,
}

impl Parts {
    fn options(self) -> anyhow::Result<outpost_simulation::processes::Options> {
        let bin_dir = match self.bin_dir {
            Some(d) => d,
            None => std::env::current_exe()?
                .parent()
                .map(PathBuf::from)
                .context("this program's directory")?,
        };
        Ok(outpost_simulation::processes::Options {
            bin_dir,
            work_dir: self.work_dir,
            kubeconfig: self.kubeconfig,
            containerd_socket: self.containerd_socket,
            image: self.image,
            pause_image: self.pause_image,
        })
    }
}

/// The scenario and what the command line overrides of it.
#[derive(Debug, Args, Clone)]
struct Shape {
    /// Scenario file (TOML; see simulation/scenarios/). Default: 1 cloud, 10 edges in 2 sites, 2 minutes, no faults.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Add random faults drawn from the seed (the scenario's [nemesis] settings, or the defaults).
    #[arg(long)]
    nemesis: bool,
    /// Number of edges (overrides fleet.edges).
    #[arg(long)]
    edges: Option<usize>,
    /// Number of sites (overrides fleet.sites).
    #[arg(long)]
    sites: Option<usize>,
    /// Number of cloud replicas (overrides fleet.clouds).
    #[arg(long)]
    clouds: Option<usize>,
    /// Simulated time with workload and faults, e.g. 90s, 10m (overrides duration).
    #[arg(long)]
    duration: Option<Dur>,
}

impl Shape {
    fn scenario(&self) -> anyhow::Result<Scenario> {
        let mut s = match &self.scenario {
            Some(path) => Scenario::load(path)?,
            None => Scenario::default(),
        };
        if let Some(n) = self.edges {
            s.fleet.edges = n;
        }
        if let Some(n) = self.sites {
            s.fleet.sites = n;
        }
        if let Some(n) = self.clouds {
            s.fleet.clouds = n;
        }
        if let Some(d) = self.duration {
            s.duration = d;
        }
        if self.nemesis && s.nemesis.is_none() {
            s.nemesis = Some(Nemesis::default());
        }
        let origin = self
            .scenario
            .as_ref()
            .map_or("the command line".to_string(), |p| p.display().to_string());
        s.validate()
            .map_err(|e| anyhow::anyhow!("scenario from {origin} with the overrides: {e}"))?;
        Ok(s)
    }

    /// The command line that replays `seed` with this shape.
    fn replay(&self, seed: u64) -> String {
        self.replay_with("run", seed)
    }

    /// The command line of `subcommand` that replays `seed` with this shape.
    fn replay_with(&self, subcommand: &str, seed: u64) -> String {
        let mut cmd = format!("outpost-sim {subcommand} --seed {seed}");
        if let Some(p) = &self.scenario {
            cmd.push_str(&format!(" --scenario {}", p.display()));
        }
        if self.nemesis {
            cmd.push_str(" --nemesis");
        }
        for (flag, v) in [
            ("--edges", self.edges),
            ("--sites", self.sites),
            ("--clouds", self.clouds),
        ] {
            if let Some(v) = v {
                cmd.push_str(&format!(" {flag} {v}"));
            }
        }
        if let Some(d) = self.duration {
            cmd.push_str(&format!(" --duration {d}"));
        }
        cmd
    }
}

fn print_failures(report: &Report, replay: &str) {
    for f in &report.failures {
        eprintln!(
            "FAILED seed {} checker {} at {} ms: {}",
            report.seed, f.checker, f.at_ms, f.explanation
        );
    }
    eprintln!("replay: {replay}");
}

/// Ends a one-seed subcommand: prints its table, writes the report (`json`)
/// to `report_path` and the sync-lag plot of `report` to `plot` (default: next
/// to the report, ending in .svg), and when a checker failed prints the
/// failures with the `replay` command and exits 1.
fn finish<T: serde::Serialize>(
    table: &str,
    json: &T,
    report: &Report,
    passed: bool,
    report_path: Option<PathBuf>,
    plot: Option<PathBuf>,
    replay: &str,
) -> anyhow::Result<()> {
    print!("{table}");
    if let Some(path) = &report_path {
        let json = serde_json::to_string_pretty(json)?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if let Some(path) = plot.or_else(|| report_path.map(|r| r.with_extension("svg"))) {
        std::fs::write(&path, outpost_simulation::plot::lag_svg(report))
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
    }
    if !passed {
        print_failures(report, replay);
        std::process::exit(1);
    }
    Ok(())
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        None => {
            use clap::CommandFactory;
            Cli::command().print_long_help()?;
        }
        Some(Command::Run {
            seed,
            shape,
            report,
            plot,
        }) => {
            let scenario = shape.scenario()?;
            let result = run(seed, scenario)?;
            finish(
                &result.table(),
                &result,
                &result,
                result.passed(),
                report,
                plot,
                &shape.replay(seed),
            )?;
        }
        Some(Command::Relay { listen, connect }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let l = outpost_simulation::relay::bind(&listen).await?;
                // The parent waits for this line before it starts what connects.
                println!("{}", outpost_simulation::relay::READY);
                std::io::Write::flush(&mut std::io::stdout())?;
                l.serve(connect).await
            })
            .with_context(|| format!("relay on {listen}"))?;
        }
        Some(Command::Processes {
            seed,
            shape,
            parts,
            report,
            plot,
        }) => {
            let scenario = shape.scenario()?;
            let opts = parts.options()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let result = rt.block_on(outpost_simulation::processes::run(
                seed, scenario, opts, true,
            ))?;
            finish(
                &result.table(),
                &result,
                &result.report,
                result.passed(),
                report,
                plot,
                &shape.replay_with("processes", seed),
            )?;
        }
        Some(Command::Quic {
            seed,
            shape,
            report,
            plot,
        }) => {
            if shape.nemesis {
                anyhow::bail!(
                    "the quic mode does not support the random nemesis; use `outpost-sim run --nemesis`"
                );
            }
            let scenario = shape.scenario()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let result = runtime.block_on(outpost_simulation::quic::run(seed, scenario))?;
            finish(
                &result.table(),
                &result,
                &result.report,
                result.passed(),
                report,
                plot,
                &shape.replay_with("quic", seed),
            )?;
        }
        Some(Command::Soak {
            seeds,
            from,
            reports,
            shape,
        }) => {
            if let Some(dir) = &reports {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let mut summary = Vec::new();
            let mut shape = shape;
            let base = shape.scenario()?;
            if base.events.is_empty() && base.nemesis.is_none() {
                shape.nemesis = true;
            }
            let scenario = shape.scenario()?;
            let started = tokio::time::Instant::now();
            let mut failed = Vec::new();
            println!(
                "| seed | verdict | faults | lag p99 ms | converged after ms | host s | digest |"
            );
            println!("|---|---|---|---|---|---|---|");
            for seed in from..from + seeds {
                let r = run(seed, scenario.clone())?;
                let faults: u64 = r.faults.values().sum();
                println!(
                    "| {seed} | {} | {faults} | {} | {} | {:.2} | {} |",
                    if r.passed() { "ok" } else { "FAILED" },
                    r.lag_ms.p99,
                    r.converged_after_ms.map_or("-".into(), |v| v.to_string()),
                    r.wall_ms as f64 / 1e3,
                    &r.digest[..12]
                );
                if let Some(dir) = &reports {
                    let json = dir.join(format!("seed-{seed}.json"));
                    std::fs::write(&json, serde_json::to_string_pretty(&r)?)
                        .with_context(|| format!("cannot write {}", json.display()))?;
                    let svg = dir.join(format!("seed-{seed}.svg"));
                    std::fs::write(&svg, outpost_simulation::plot::lag_svg(&r))
                        .with_context(|| format!("cannot write {}", svg.display()))?;
                    summary.push(serde_json::json!({
                        "seed": seed,
                        "passed": r.passed(),
                        "faults": faults,
                        "lag_p99_ms": r.lag_ms.p99,
                        "converged_after_ms": r.converged_after_ms,
                        "failures": r.failure_counts,
                        "digest": r.digest,
                        "replay": shape.replay(seed),
                    }));
                }
                if !r.passed() {
                    print_failures(&r, &shape.replay(seed));
                    failed.push(seed);
                }
            }
            let secs = started.elapsed().as_secs_f64();
            if let Some(dir) = &reports {
                let path = dir.join("summary.json");
                let doc = serde_json::json!({
                    "seeds": summary,
                    "failed": failed,
                    "host_s": secs,
                    "seeds_per_s": seeds as f64 / secs.max(1e-9),
                });
                std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("reports in {}", dir.display());
            }
            println!(
                "{} seeds, {} failed, {:.1} s, {:.2} seeds/s",
                seeds,
                failed.len(),
                secs,
                seeds as f64 / secs.max(1e-9)
            );
            if !failed.is_empty() {
                eprintln!("failing seeds: {failed:?}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
