//! Mapper benchmarks against the real simulators, each figure beside a
//! baseline measured in the same run:
//!
//! 1. Modbus property reads per second through the driver, against a bare
//!    tokio-modbus loop sending the same requests to the same pymodbus server.
//! 2. Modbus requests per collect cycle for 50 properties in contiguous
//!    registers, against one request per property.
//! 3. OPC UA values per second for 100 nodes: the driver's batched read,
//!    against one Read request per node on the same async-opcua session type.
//!
//! Run: `cargo bench -p outpost-mappers --bench mappers` (it starts its own
//! pymodbus and asyncua processes on free loopback ports).

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use opcua::client::{ClientBuilder, IdentityToken};
use opcua::types::{
    AttributeId, EndpointDescription, MessageSecurityMode, NodeId, ReadValueId, TimestampsToReturn,
    UserTokenPolicy,
};
use outpost_mappers::driver::Driver;
use outpost_mappers::modbus::visitor::{ModbusVisitor, Register};
use outpost_mappers::modbus::{ModbusConfig, ModbusDriver, ModbusProperty};
use outpost_mappers::opcua::{OpcUaConfig, OpcUaDriver, OpcUaProperty};
use outpost_mappers::property::{DataType, PropertySpec};
use outpost_mappers::test_utils::SimProcess;
use tokio::time::Instant;
use tokio_modbus::prelude::*;

const ROUNDS: usize = 5;
const READS_PER_ROUND: usize = 1000;
const PROPS_PER_READ: u16 = 10;

fn int_props(count: u16) -> Vec<ModbusProperty> {
    (0..count)
        .map(|i| ModbusProperty {
            spec: PropertySpec::new(format!("p{i}"), DataType::Int),
            visitor: ModbusVisitor::new(Register::Holding, 14 + i, 1),
        })
        .collect()
}

async fn modbus_reads(sim: &SimProcess) -> (f64, f64) {
    let mut bare = tcp::connect_slave(sim.addr(), Slave(1)).await.unwrap();
    let mut driver = ModbusDriver::new(ModbusConfig::tcp(sim.addr()), int_props(PROPS_PER_READ));
    driver.connect().await.unwrap();
    assert_eq!(driver.plan().len(), 1);
    // Warm up both paths.
    for _ in 0..100 {
        bare.read_holding_registers(14, PROPS_PER_READ)
            .await
            .unwrap()
            .unwrap();
        driver.read().await.unwrap();
    }
    let (mut bare_s, mut mapper_s) = (0.0, 0.0);
    // Interleave rounds so that drift in the simulator hits both alike.
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for _ in 0..READS_PER_ROUND {
            let regs = bare
                .read_holding_registers(14, PROPS_PER_READ)
                .await
                .unwrap()
                .unwrap();
            std::hint::black_box(regs);
        }
        bare_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..READS_PER_ROUND {
            let readings = driver.read().await.unwrap();
            std::hint::black_box(readings);
        }
        mapper_s += t.elapsed().as_secs_f64();
    }
    let n = (ROUNDS * READS_PER_ROUND) as f64 * f64::from(PROPS_PER_READ);
    (n / bare_s, n / mapper_s)
}

async fn requests_per_cycle(sim: &SimProcess) -> f64 {
    let mut driver = ModbusDriver::new(ModbusConfig::tcp(sim.addr()), int_props(50));
    driver.connect().await.unwrap();
    let before = driver.stats().requests;
    let cycles = 100;
    for _ in 0..cycles {
        let readings = driver.read().await.unwrap();
        assert!(readings.iter().all(|r| r.value.is_ok()));
    }
    (driver.stats().requests - before) as f64 / f64::from(cycles)
}

async fn opcua_values(sim: &SimProcess) -> (f64, f64) {
    let url = format!("opc.tcp://127.0.0.1:{}/outpost/", sim.port);
    let pki = std::env::temp_dir().join(outpost_sync::test_utils::unique_name("outpost-bench-pki"));
    let props: Vec<OpcUaProperty> = (0..100)
        .map(|i| OpcUaProperty {
            spec: PropertySpec::new(format!("v{i}"), DataType::Double),
            node: NodeId::new(2, format!("v{i}")),
        })
        .collect();
    let mut driver = OpcUaDriver::new(
        OpcUaConfig {
            pki_dir: pki.clone(),
            ..OpcUaConfig::new(&url)
        },
        props,
    );
    driver.connect().await.unwrap();

    let mut client = ClientBuilder::new()
        .application_name("outpost-bench")
        .application_uri("urn:outpost:bench")
        .pki_dir(&pki)
        .trust_server_certs(true)
        .session_retry_limit(0)
        .client()
        .unwrap();
    let endpoint: EndpointDescription = (
        url.as_str(),
        "None",
        MessageSecurityMode::None,
        UserTokenPolicy::anonymous(),
    )
        .into();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(endpoint, IdentityToken::Anonymous)
        .await
        .unwrap();
    let handle = event_loop.spawn();
    tokio::time::timeout(Duration::from_secs(10), session.wait_for_connection())
        .await
        .unwrap();
    let ids: Vec<ReadValueId> = (0..100)
        .map(|i| ReadValueId {
            node_id: NodeId::new(2, format!("v{i}")),
            attribute_id: AttributeId::Value as u32,
            ..Default::default()
        })
        .collect();

    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        let readings = driver.read().await.unwrap();
        assert!(readings.iter().all(|r| r.value.is_ok()));
    }
    let batched = f64::from(rounds * 100) / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..rounds {
        for id in &ids {
            let v = session
                .read(std::slice::from_ref(id), TimestampsToReturn::Neither, 0.0)
                .await
                .unwrap();
            std::hint::black_box(v);
        }
    }
    let per_node = f64::from(rounds * 100) / t.elapsed().as_secs_f64();
    let _ = session.disconnect().await;
    handle.abort();
    driver.disconnect().await;
    let _ = std::fs::remove_dir_all(pki);
    (batched, per_node)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then
    // only check that the benchmark starts.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let modbus = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let opcua = SimProcess::start("opcua_device.py", &["--extra-nodes", "100"])
        .await
        .unwrap();

    let (bare, mapper) = modbus_reads(&modbus).await;
    let cycle = requests_per_cycle(&modbus).await;
    let (batched, per_node) = opcua_values(&opcua).await;

    println!("| figure | Outpost mapper | baseline (same run) | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| Modbus property reads/s ({PROPS_PER_READ} contiguous INT registers per read) | {mapper:.0} | {bare:.0} (bare tokio-modbus loop) | {:.2} |",
        mapper / bare
    );
    println!(
        "| Modbus requests per collect cycle, 50 contiguous properties | {cycle:.2} | 50 (one request per property) | {:.2} |",
        cycle / 50.0
    );
    println!(
        "| OPC UA values/s, 100 nodes | {batched:.0} (batched read) | {per_node:.0} (one read per node) | {:.1} |",
        batched / per_node
    );
    // One line per figure for scripts/bench's summary table.
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "BENCH|mappers: Modbus property reads/s|{mapper:.0}|{bare:.0} (bare tokio-modbus loop)|ratio >= 0.9 ({:.2})|{}",
        mapper / bare,
        met(mapper / bare >= 0.9)
    );
    println!(
        "BENCH|mappers: Modbus requests per collect cycle, 50 contiguous properties|{cycle:.2}|50 (one per property)|1|{}",
        met(cycle <= 1.0)
    );
    println!(
        "BENCH|mappers: OPC UA values/s, 100 nodes|{batched:.0} (batched)|{per_node:.0} (one read per node)|-|-"
    );
}
