//! `outpost-edge`: the Outpost edge agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use iroh::EndpointAddr;
use outpost_sync::transport::iroh::{self as transport, PeerAddr, SYNC_ALPN};
use tracing::{info, warn};

/// `outpost-edge`: the Outpost edge agent.
///
/// It keeps a replica of what its node owns, runs the node's pods through
/// containerd, reads and writes its devices, and keeps doing all of that when
/// the network to the cloud is gone. When the link returns, its changes merge
/// with the cloud's and nothing is lost.
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
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the agent keeps its identity and replica.
    #[arg(long, env = "OUTPOST_DATA_DIR", default_value = "/var/lib/outpost")]
    data_dir: PathBuf,
    /// The cloud bridge, as `<endpoint id>@<ip:port>` (its data dir's `peer-addr` file).
    #[arg(long, env = "OUTPOST_CLOUD")]
    cloud: PeerAddr,
    /// This node's name [default: the host name].
    #[arg(long, env = "OUTPOST_NODE_NAME")]
    node_name: Option<String>,
    /// UDP address of this agent's iroh endpoint.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Seconds between link checks with the cloud.
    #[arg(long, default_value_t = 5)]
    heartbeat_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = match args.node_name.clone() {
        Some(name) => name,
        None => std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "edge".into()),
    };
    let key = outpost_sync::identity::load_or_create(&args.data_dir)?;
    let endpoint = transport::bind(key, args.listen).await?;
    info!(%node, id = %endpoint.id(), cloud = %args.cloud, "edge agent started");
    let link = tokio::spawn(keep_link(
        endpoint.clone(),
        args.cloud.clone(),
        node,
        args.heartbeat_s,
    ));
    outpost_sync::signal::shutdown().await;
    info!("shutting down");
    link.abort();
    endpoint.close().await;
    Ok(())
}

/// Keeps a connection to the cloud, checking it every `heartbeat_s` and
/// reconnecting with capped exponential back-off. The edge never needs this
/// link to work: losing it is logged, nothing else stops.
async fn keep_link(endpoint: iroh::Endpoint, cloud: PeerAddr, node: String, heartbeat_s: u64) {
    let mut backoff = Duration::from_millis(500);
    loop {
        match endpoint
            .connect(EndpointAddr::from(&cloud), SYNC_ALPN)
            .await
        {
            Ok(conn) => {
                info!(cloud = %cloud.id, "connected to the cloud");
                backoff = Duration::from_millis(500);
                let mut n: u64 = 0;
                loop {
                    n += 1;
                    match check(&conn, &node, n).await {
                        Ok(()) => tracing::debug!(n, "link check ok"),
                        Err(e) => {
                            warn!(reason = %e, "link to the cloud lost");
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(heartbeat_s)).await;
                }
            }
            Err(e) => {
                warn!(reason = %e, retry_in_ms = backoff.as_millis() as u64, "cloud unreachable")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn check(conn: &iroh::endpoint::Connection, node: &str, n: u64) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(format!("heartbeat {node} {n}").as_bytes())
            .await?;
        send.finish()?;
        let reply = recv.read_to_end(64).await?;
        anyhow::ensure!(reply == b"ok", "unexpected reply");
        Ok(())
    })
    .await?
}
