//! `outpost-sim`: the Outpost network-chaos simulation harness.

use clap::{CommandFactory, Parser};

/// `outpost-sim`: the Outpost network-chaos simulation harness.
///
/// It runs fleets of Outpost replicas under partitions, loss, reordering, crashes and clock skew, from one seed, and checks that every replica converges and no acknowledged write is lost.
#[derive(Debug, Parser)]
#[command(name = "outpost-sim", version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    // No commands yet: say what this is.
    Cli::command().print_help()?;
    Ok(())
}
