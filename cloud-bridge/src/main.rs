//! `outpost-cloud`: the cloud bridge between the Kubernetes API and Outpost's
//! replicated edge state.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost_sync::transport::iroh::{self as transport, PeerAddr};
use tracing::{info, warn};

/// `outpost-cloud`: the cloud bridge between the Kubernetes API and Outpost's
/// replicated edge state.
///
/// It watches the Kubernetes API for the nodes, pods and devices of Outpost's
/// edges, replicates them to the edges over iroh (QUIC), and writes what the
/// edges report back to the API.
#[derive(Debug, Parser)]
#[command(name = "outpost-cloud", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bridge until interrupted (Ctrl-C or SIGTERM).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the bridge keeps its identity and replica.
    #[arg(
        long,
        env = "OUTPOST_DATA_DIR",
        default_value = "/var/lib/outpost-cloud"
    )]
    data_dir: PathBuf,
    /// UDP address the bridge's iroh endpoint listens on.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// kubeconfig of the cluster to bridge [default: in-cluster config, then ~/.kube/config].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
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

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube_client(args.kubeconfig.as_ref()).await?;
    let version = client
        .apiserver_version()
        .await
        .context("the Kubernetes API server does not answer")?;
    info!(version = %version.git_version, "connected to the Kubernetes API");

    let key = outpost_sync::identity::load_or_create(&args.data_dir)?;
    let endpoint = transport::bind(key, args.listen).await?;
    let me = PeerAddr {
        id: endpoint.id(),
        addr: endpoint
            .bound_sockets()
            .first()
            .copied()
            .unwrap_or(args.listen),
    };
    let addr_file = args.data_dir.join("peer-addr");
    std::fs::write(&addr_file, format!("{me}\n"))
        .with_context(|| format!("writing {}", addr_file.display()))?;
    info!(peer = %me, file = %addr_file.display(), "listening for edges");

    let accept = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => serve_edge(conn).await,
                        Err(e) => warn!(error = %e, "incoming connection failed"),
                    }
                });
            }
        })
    };
    outpost_sync::signal::shutdown().await;
    info!("shutting down");
    accept.abort();
    endpoint.close().await;
    Ok(())
}

/// Answers an edge's link checks until it goes away. The sync protocol
/// replaces this exchange; the connection handling stays.
async fn serve_edge(conn: iroh::endpoint::Connection) {
    let edge = conn.remote_id();
    info!(%edge, "edge connected");
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                info!(%edge, reason = %e, "edge disconnected");
                return;
            }
        };
        let hello =
            match tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1024)).await {
                Ok(Ok(bytes)) => bytes,
                Ok(Err(e)) => {
                    warn!(%edge, error = %e, "bad link check");
                    continue;
                }
                Err(_) => {
                    warn!(%edge, "link check timed out");
                    continue;
                }
            };
        tracing::debug!(%edge, hello = %String::from_utf8_lossy(&hello), "link check");
        if send.write_all(b"ok").await.is_err() || send.finish().is_err() {
            continue;
        }
    }
}
