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
