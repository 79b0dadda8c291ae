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
        Command::Join(args) => join(args).await,
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
    outpost_sync::signal::shutdown().await;
    info!("shutting down; containers keep running");
    agent.shutdown().await;
    Ok(())
}

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
