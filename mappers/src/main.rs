//! `outpost-mapper`: an Outpost device mapper.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use outpost_mappers::driver::Driver;
use outpost_mappers::modbus::visitor::ModbusVisitor;
use outpost_mappers::modbus::{ModbusConfig, ModbusDriver, ModbusProperty};
use outpost_mappers::mqtt::{MqttConfig, MqttDriver, MqttProperty};
use outpost_mappers::opcua::{OpcUaConfig, OpcUaDriver, OpcUaProperty, Security};
use outpost_mappers::property::{PropertySpec, Value};
use serde_json::json;

/// `outpost-mapper`: an Outpost device mapper.
///
/// It talks Modbus, OPC UA and MQTT to hardware: it reads and writes device
/// properties as KubeEdge's Device and DeviceModel describe them, standalone
/// over KubeEdge's DMI gRPC interface or hosted inside outpost-edge.
#[derive(Debug, Parser)]
#[command(name = "outpost-mapper", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read (and optionally write) one property of a device, to check it
    /// before binding it to a Device.
    Probe(Probe),
    /// Run standalone beside an edge agent: serve KubeEdge's DMI
    /// DeviceMapperService on a unix socket, register with the agent's
    /// DeviceManagerService, and report device twins and states to it.
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Unix socket this mapper serves DeviceMapperService on.
    #[arg(
        long,
        env = "OUTPOST_MAPPER_SOCKET",
        default_value = "/etc/kubeedge/outpost-mapper.sock"
    )]
    socket: std::path::PathBuf,
    /// Unix socket of the edge agent's DeviceManagerService.
    #[arg(
        long,
        env = "OUTPOST_DMI_SOCKET",
        default_value = "/etc/kubeedge/dmi.sock"
    )]
    agent_socket: std::path::PathBuf,
    /// Mapper name announced to the agent.
    #[arg(long, default_value = "outpost-mapper")]
    name: String,
    /// Protocol announced to the agent (the agent sends devices of it).
    #[arg(long, default_value = "modbus")]
    protocol: String,
}

#[derive(Debug, Args)]
struct Probe {
    #[command(subcommand)]
    protocol: ProbeProtocol,
}

#[derive(Debug, Subcommand)]
enum ProbeProtocol {
    /// A Modbus TCP device, or RTU framing over TCP.
    Modbus(ModbusProbe),
    /// An OPC UA server.
    Opcua(OpcUaProbe),
    /// A device that publishes JSON telemetry to an MQTT broker.
    Mqtt(MqttProbe),
}

/// What every probe shares: the property's model.
#[derive(Debug, Args)]
struct PropertyArgs {
    /// Property type: INT, FLOAT, DOUBLE, STRING, BOOLEAN or BYTES (base64).
    #[arg(long = "type", default_value = "INT")]
    data_type: String,
    /// Value to write before reading back (checked against the type and
    /// bounds first).
    #[arg(long)]
    write: Option<String>,
    /// Smallest value a write may set (default: none).
    #[arg(long)]
    minimum: Option<String>,
    /// Largest value a write may set (default: none).
    #[arg(long)]
    maximum: Option<String>,
    /// Timeout of each request, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

impl PropertyArgs {
    fn spec(&self) -> anyhow::Result<PropertySpec> {
        Ok(PropertySpec::from_model(
            "value",
            &self.data_type,
            "ReadWrite",
            self.minimum.as_deref().unwrap_or(""),
            self.maximum.as_deref().unwrap_or(""),
        )?)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Framing {
    Tcp,
    Rtu,
}

#[derive(Debug, Args)]
struct ModbusProbe {
    /// Device address (host:port).
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// Framing on the TCP stream.
    #[arg(long, value_enum, default_value = "tcp")]
    framing: Framing,
    /// Unit (slave) id.
    #[arg(long, default_value_t = 1)]
    slave: u8,
    /// Data table: HoldingRegister, InputRegister, CoilRegister or
    /// DiscreteInputRegister.
    #[arg(long, default_value = "HoldingRegister")]
    register: String,
    /// Address of the first register (from 0).
    #[arg(long, default_value_t = 0)]
    offset: u16,
    /// Registers the value spans (default: from the type: INT 1, FLOAT 2,
    /// DOUBLE 4).
    #[arg(long)]
    limit: Option<u16>,
    /// Scale applied to numbers.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Swap the bytes of each register (isSwap).
    #[arg(long, default_value_t = false)]
    swap_bytes: bool,
    /// Reverse the order of the registers (isRegisterSwap).
    #[arg(long, default_value_t = false)]
    swap_words: bool,
    #[command(flatten)]
    property: PropertyArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SecurityArg {
    None,
    Basic256sha256Sign,
    Basic256sha256SignAndEncrypt,
}

#[derive(Debug, Args)]
struct OpcUaProbe {
    /// Endpoint URL (opc.tcp://host:port/path).
    #[arg(long)]
    url: String,
    /// Node id of the variable (like ns=2;s=temp).
    #[arg(long)]
    node: String,
    /// Security policy and mode.
    #[arg(long, value_enum, default_value = "none")]
    security: SecurityArg,
    /// Client certificate (DER) for a secure endpoint (default: a
    /// self-signed one created in --pki-dir).
    #[arg(long)]
    certificate: Option<std::path::PathBuf>,
    /// Client private key (PEM) for --certificate.
    #[arg(long)]
    private_key: Option<std::path::PathBuf>,
    /// Folder of the client PKI (default: outpost-mapper-pki in the temp folder).
    #[arg(long)]
    pki_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    property: PropertyArgs,
}

#[derive(Debug, Args)]
struct MqttProbe {
    /// Broker address (host:port).
    #[arg(long)]
    broker: String,
    /// Topic the device publishes JSON telemetry on.
    #[arg(long)]
    telemetry_topic: String,
    /// Topic the device takes commands on (needed for --write).
    #[arg(long)]
    command_topic: Option<String>,
    /// Key of the value in the telemetry (dotted path).
    #[arg(long)]
    key: String,
    /// Scale applied to numbers.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// How long to wait for telemetry, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    wait_ms: u64,
    #[command(flatten)]
    property: PropertyArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Probe(probe) => {
            let value = match probe.protocol {
                ProbeProtocol::Modbus(args) => probe_modbus(args).await?,
                ProbeProtocol::Opcua(args) => probe_opcua(args).await?,
                ProbeProtocol::Mqtt(args) => probe_mqtt(args).await?,
            };
            println!("{value} ({})", value.data_type());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    use outpost_mappers::backoff::Backoff;
    use outpost_mappers::dmi::{self, Mapper, v1beta1};

    let (mapper, reports) = Mapper::new();
    let socket = args.socket.clone();
    let server = tokio::spawn({
        let mapper = mapper.clone();
        async move {
            dmi::serve(mapper, &socket, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
        }
    });
    let info = v1beta1::MapperInfo {
        name: args.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        api_version: "v1beta1".to_owned(),
        protocol: args.protocol.clone(),
        address: args.socket.to_string_lossy().as_bytes().to_vec(),
        state: "ok".to_owned(),
    };
    // The agent may start after the mapper: retry with backoff.
    let mut backoff = Backoff::new(
        Duration::from_millis(200),
        Duration::from_secs(30),
        u64::from(std::process::id()),
    );
    let agent = loop {
        let attempt = async {
            let channel = dmi::unix_channel(&args.agent_socket).await?;
            let mut agent =
                v1beta1::device_manager_service_client::DeviceManagerServiceClient::new(channel);
            let served = dmi::register(&mapper, &mut agent, info.clone()).await?;
            Ok::<_, dmi::DmiError>((agent, served))
        };
        match attempt.await {
            Ok((agent, served)) => {
                tracing::info!(agent = %args.agent_socket.display(), devices = served, "registered with the edge agent");
                break agent;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(agent = %args.agent_socket.display(), error = %e, retry_in = ?delay, "cannot register with the edge agent");
                tokio::time::sleep(delay).await;
            }
        }
    };
    tokio::spawn(dmi::forward_reports(agent, reports));
    server.await.context("DMI server task")??;
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

/// Connects, writes if asked, then reads the one property.
async fn probe<D: Driver>(mut driver: D, write: Option<&str>) -> anyhow::Result<Value> {
    driver.connect().await.context("connecting")?;
    if let Some(text) = write {
        driver.write("value", text).await.context("writing")?;
    }
    let readings = driver.read().await.context("reading")?;
    let reading = readings
        .into_iter()
        .next()
        .context("the device returned no reading")?;
    reading.value.context("reading the property")
}

async fn probe_modbus(args: ModbusProbe) -> anyhow::Result<Value> {
    let spec = args.property.spec()?;
    let mut visitor = json!({
        "register": args.register,
        "offset": args.offset,
        "scale": args.scale,
        "isSwap": args.swap_bytes,
        "isRegisterSwap": args.swap_words,
    });
    if let Some(limit) = args.limit {
        visitor["limit"] = json!(limit);
    }
    let visitor = ModbusVisitor::from_config(&spec, &visitor)?;
    let config = ModbusConfig {
        framing: match args.framing {
            Framing::Tcp => outpost_mappers::modbus::Framing::Tcp,
            Framing::Rtu => outpost_mappers::modbus::Framing::RtuOverTcp,
        },
        slave: args.slave,
        timeout: Duration::from_millis(args.property.timeout_ms.max(1)),
        ..ModbusConfig::tcp(args.addr)
    };
    let driver = ModbusDriver::new(config, vec![ModbusProperty { spec, visitor }]);
    probe(driver, args.property.write.as_deref()).await
}

async fn probe_opcua(args: OpcUaProbe) -> anyhow::Result<Value> {
    let spec = args.property.spec()?;
    let property = OpcUaProperty::from_config(spec, &json!({"nodeID": args.node}))?;
    let mut config = OpcUaConfig::new(args.url);
    config.security = match args.security {
        SecurityArg::None => Security::None,
        SecurityArg::Basic256sha256Sign => Security::Basic256Sha256Sign,
        SecurityArg::Basic256sha256SignAndEncrypt => Security::Basic256Sha256SignAndEncrypt,
    };
    config.certificate = args.certificate;
    config.private_key = args.private_key;
    if let Some(dir) = args.pki_dir {
        config.pki_dir = dir;
    }
    config.timeout = Duration::from_millis(args.property.timeout_ms.max(1));
    let driver = OpcUaDriver::new(config, vec![property]);
    probe(driver, args.property.write.as_deref()).await
}

async fn probe_mqtt(args: MqttProbe) -> anyhow::Result<Value> {
    let spec = args.property.spec()?;
    let property =
        MqttProperty::from_config(spec, &json!({"jsonKey": args.key, "scale": args.scale}))?;
    let mut protocol = json!({
        "broker": args.broker,
        "telemetryTopic": args.telemetry_topic,
        "timeoutMs": args.property.timeout_ms,
    });
    if let Some(topic) = args.command_topic {
        protocol["commandTopic"] = json!(topic);
    }
    let mut driver = MqttDriver::new(MqttConfig::from_config(&protocol)?, vec![property]);
    let changes = driver.take_changes().context("no telemetry channel")?;
    driver.connect().await.context("connecting")?;
    if let Some(text) = args.property.write.as_deref() {
        driver
            .write("value", text)
            .await
            .context("publishing the command")?;
    }
    let wait = Duration::from_millis(args.wait_ms);
    let Ok(Ok(reading)) = tokio::time::timeout(wait, changes.recv_async()).await else {
        bail!("no telemetry carrying {:?} within {wait:?}", args.key);
    };
    driver.disconnect().await;
    reading.value.context("reading the property")
}
