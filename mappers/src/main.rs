//! `outpost-mapper`: an Outpost device mapper.

use clap::{CommandFactory, Parser};

/// `outpost-mapper`: an Outpost device mapper.
///
///  talks Modbus, OPC UA and MQTT to hardware:It reads and writes device properties as KubeEdge's Device and DeviceModel describe them, standalone over KubeEdge's DMI gRPC interface or hosted inside outpost-edge.
#[derive(Debug, Parser)]
#[command(name = "outpost-mapper", version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    // No commands yet: say what this is.
    Cli::command().print_help()?;
    Ok(())
}
