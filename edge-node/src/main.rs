//! `outpost-edge`: the Outpost edge agent.

use clap::{Parser, Subcommand};
use outpost_edge_node::agent::Agent;
use outpost_edge_node::config::{Config, RunArgs};
use tracing::info;

/// `outpost-edge`: the Outpost edge agent.
///
/// It keeps a replica of what its node owns, runs the node's pods through
/// containerd, reads and writes its devices, and keeps doing all of that when
/// the network to the cloud is gone. When the link returns, its changes merge
/// with the cloud's and nothing is lost.
///
/// Settings come from a TOML file (--config), overridden by OUTPOST_*
/// environment variables, overridden by flags.
#[derive(Debug, Parser)]
#[command(name = "outpost-edge", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge agent until interrupted (Ctrl-C or SIGTERM).
    Run(RunArgs),
    /// Print the effective configuration (file, environment and flags
    /// merged) as TOML, and exit.
    Config(RunArgs),
    /// Present a join token to the cloud bridge once, so that it admits
    /// this node's key (kept in the data dir, created if missing). Then
    /// start the agent with `run --cloud <the same address>`.
    Join(JoinArgs),
    /// Print the running agent's peers, connection state and sync backlog,
    /// its pods and its devices, as tables (read from its local API, so it
    /// works offline).
    Status(StatusArgs),
}

/// Arguments of `outpost-edge status`.
#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The agent's data dir: its local API address is read from there.
    #[arg(long, env = "OUTPOST_DATA_DIR", default_value = "/var/lib/outpost")]
    data_dir: std::path::PathBuf,
    /// The local API's address, instead of the one in the data dir
    /// [default: the data dir's, else 127.0.0.1:10550].
    #[arg(long)]
    api: Option<std::net::SocketAddr>,
    /// Print the API's JSON as it is.
    #[arg(long)]
    json: bool,
}

/// Arguments of `outpost-edge join`.
#[derive(Debug, clap::Args)]
struct JoinArgs {
    /// The join token `outpost-cloud token create` printed.
    #[arg(long, env = "OUTPOST_JOIN_TOKEN")]
    token: String,
    /// The cloud bridge, as `<endpoint id>@<ip:port>` (its `peer-addr` file).
    #[arg(long)]
    cloud: String,
    /// Where the node's key and replica live.
    #[arg(long, env = "OUTPOST_DATA_DIR", default_value = "/var/lib/outpost")]
    data_dir: std::path::PathBuf,
}

/// Worker threads of the runtime, at most: the agent is mostly idle, and
/// each thread that allocates can hold a malloc arena of its own.
const WORKER_THREADS_MAX: usize = 2;
/// Threads for blocking work (name lookups, file I/O in dependencies), at
/// most; tokio's default is 512.
const BLOCKING_THREADS_MAX: usize = 4;

fn main() -> anyhow::Result<()> {
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(WORKER_THREADS_MAX);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .enable_all()
        .build()?
        .block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Join(args) => join(args).await,
        Command::Status(args) => status(args).await,
        Command::Config(args) => {
            let config = Config::resolve(&args)?;
            print!("{}", toml::to_string(&config)?);
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::resolve(&args)?;
    let agent = Agent::start(&config).await?;
    tokio::spawn(return_freed_memory());
    outpost_sync::signal::shutdown().await;
    info!("shutting down; containers keep running");
    agent.shutdown().await;
    Ok(())
}

/// How often the agent hands freed heap memory back to the system.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Hands the heap's free pages back to the system, now and then.
///
/// glibc's malloc returns memory by itself only from the top of the heap.
/// Starting a node's pods and devices, and answering the local API's lists,
/// allocate much for a short while among what lives on; freed, that memory
/// stays resident in holes between live allocations (about 0.6 MB with 100
/// pods and 1,000 devices). `malloc_trim` releases the whole pages of those
/// holes; it takes well under a millisecond on a node's heap.
async fn return_freed_memory() {
    let mut every = tokio::time::interval(TRIM_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        trim_heap();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "glibc's malloc_trim has no safe binding")]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointer and has no precondition; it locks
    // the allocator's arenas as malloc and free do.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return freed memory by themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use outpost_sync::transport::join::{JoinReply, request};
    let cloud: outpost_sync::transport::iroh::PeerAddr = args
        .cloud
        .parse()
        .with_context(|| format!("--cloud {:?} is not <endpoint id>@<ip:port>", args.cloud))?;
    let key = outpost_sync::identity::load_or_create(&args.data_dir)
        .with_context(|| format!("the node's key in {}", args.data_dir.display()))?;
    // Any local port, on loopback when the bridge is there.
    let local: std::net::SocketAddr = if cloud.addr.ip().is_loopback() {
        ([127, 0, 0, 1], 0).into()
    } else {
        ([0, 0, 0, 0], 0).into()
    };
    let endpoint = outpost_sync::transport::iroh::bind(key, local).await?;
    info!(id = %endpoint.id(), cloud = %cloud, "presenting the join token");
    let reply = request(&endpoint, &cloud, &args.token).await;
    endpoint.close().await;
    match reply? {
        JoinReply::Admitted { node, site } => {
            println!(
                "admitted as node {node}{}; now run: outpost-edge run --data-dir {} --node-name {node} --cloud {}",
                site.map(|s| format!(" of site {s}")).unwrap_or_default(),
                args.data_dir.display(),
                args.cloud
            );
            Ok(())
        }
        JoinReply::Refused { reason, message } => {
            anyhow::bail!("the cloud refused this node ({reason}): {message}")
        }
    }
}

/// GET `path` from the local API.
async fn api_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("the agent's local API at {addr} does not answer; is outpost-edge running?")
        })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let code = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(code.is_success(), "{path}: {code}: {text}");
    Ok(text)
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    use serde_json::Value;
    let addr = match args.api {
        Some(addr) => addr,
        None => {
            std::fs::read_to_string(args.data_dir.join(outpost_edge_node::agent::API_ADDR_FILE))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| ([127, 0, 0, 1], 10550).into())
        }
    };
    let text = api_get(addr, "/api/v1/status").await?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let v: Value = serde_json::from_str(&text)?;
    let s = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!("node {}  (key {})\n", s(&v["node"]), s(&v["id"]));
    let empty = Vec::new();
    let peers: Vec<Vec<String>> = v["peers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|p| {
            vec![
                s(&p["peer"]).chars().take(16).collect(),
                if p["connected"] == true {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_owned(),
                s(&p["pending"]),
                p["oldest_unacked_age_ms"]
                    .as_i64()
                    .map_or("-".to_owned(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
            ]
        })
        .collect();
    if peers.is_empty() {
        println!("no cloud configured: running alone\n");
    } else {
        print!(
            "{}",
            table(
                &[
                    "PEER",
                    "STATE",
                    "PENDING",
                    "SYNC LAG (oldest unacknowledged)"
                ],
                &peers
            )
        );
        println!();
    }
    let pods: Vec<Vec<String>> = v["pods"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|p| {
            vec![
                s(&p["namespace"]),
                s(&p["name"]),
                s(&p["phase"]),
                s(&p["ready"]),
                s(&p["restarts"]),
                s(&p["reason"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NAMESPACE", "POD", "PHASE", "READY", "RESTARTS", "REASON"],
            &pods
        )
    );
    println!();
    let devices: Vec<Vec<String>> = v["devices"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|d| {
            let props = d["properties"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, p)| {
                            let actual = s(&p["actual"]);
                            match &p["desired"] {
                                Value::String(want) if *want != actual => {
                                    format!("{k}={actual} (desired {want})")
                                }
                                _ => format!("{k}={actual}"),
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            vec![s(&d["id"]), s(&d["protocol"]), s(&d["state"]), props]
        })
        .collect();
    print!(
        "{}",
        table(&["DEVICE", "PROTOCOL", "STATE", "PROPERTIES"], &devices)
    );
    Ok(())
}
