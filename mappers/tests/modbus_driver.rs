//! The Modbus driver against pymodbus (scripts/sims/modbus_device.py): reads,
//! writes, scale, byte and word swap, exceptions, refused writes, a device
//! that disappears and comes back, RTU framing, and a slow link whose late
//! reply must not poison the next request.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use outpost_mappers::device::{self, Report, RunConfig};
use outpost_mappers::driver::{DeviceState, Driver, PropertyError, ReadError, Reading, WriteError};
use outpost_mappers::modbus::visitor::ModbusVisitor;
use outpost_mappers::modbus::{Framing, ModbusConfig, ModbusDriver, ModbusProperty};
use outpost_mappers::property::{PropertySpec, Value, ValueError};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::test_utils::env_value;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_modbus::prelude::*;

fn prop(name: &str, ty: &str, min: &str, max: &str, visitor: serde_json::Value) -> ModbusProperty {
    let spec = PropertySpec::from_model(name, ty, "ReadWrite", min, max).unwrap();
    let visitor = ModbusVisitor::from_config(&spec, &visitor).unwrap();
    ModbusProperty { spec, visitor }
}

fn thermostat() -> Vec<ModbusProperty> {
    vec![
        prop(
            "setpoint",
            "INT",
            "5",
            "30",
            json!({"register": "HoldingRegister", "offset": 0, "limit": 1, "scale": 0.1}),
        ),
        prop(
            "fan",
            "INT",
            "0",
            "5",
            json!({"register": "HoldingRegister", "offset": 1}),
        ),
        prop(
            "power",
            "FLOAT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 2, "limit": 2}),
        ),
        prop(
            "energy",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 4, "limit": 2}),
        ),
        prop(
            "name",
            "STRING",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 6, "limit": 8}),
        ),
        prop(
            "measured",
            "INT",
            "",
            "",
            json!({"register": "InputRegister", "offset": 0}),
        ),
        prop(
            "heater",
            "BOOLEAN",
            "",
            "",
            json!({"register": "CoilRegister", "offset": 0}),
        ),
        prop(
            "door",
            "BOOLEAN",
            "",
            "",
            json!({"register": "DiscreteInputRegister", "offset": 0}),
        ),
    ]
}

fn value(readings: &[Reading], name: &str) -> Result<Value, PropertyError> {
    readings
        .iter()
        .find(|r| r.property == name)
        .unwrap()
        .value
        .clone()
}

fn config(addr: SocketAddr) -> ModbusConfig {
    ModbusConfig {
        timeout: Duration::from_millis(500),
        ..ModbusConfig::tcp(addr)
    }
}

#[tokio::test]
async fn reads_the_thermostat_in_one_request_per_table() {
    let addr = env_value("OUTPOST_MODBUS_ADDR").unwrap().parse().unwrap();
    let mut driver = ModbusDriver::new(config(addr), thermostat());
    assert_eq!(
        driver.plan().len(),
        4,
        "holding 0-13 merge; input, coil, discrete apart"
    );
    driver.connect().await.unwrap();
    let readings = driver.read().await.unwrap();
    assert_eq!(value(&readings, "setpoint").unwrap().to_string(), "21.5");
    assert_eq!(value(&readings, "fan"), Ok(Value::Int(3)));
    assert_eq!(value(&readings, "power"), Ok(Value::Float(1500.5)));
    assert_eq!(value(&readings, "energy"), Ok(Value::Int(0x0001_0002)));
    assert_eq!(
        value(&readings, "name"),
        Ok(Value::String("thermo-1".into()))
    );
    assert_eq!(value(&readings, "measured"), Ok(Value::Int(204)));
    assert_eq!(value(&readings, "heater"), Ok(Value::Boolean(true)));
    assert_eq!(value(&readings, "door"), Ok(Value::Boolean(true)));
    assert_eq!(driver.stats().requests, 4);
    assert_eq!(driver.health().state(), DeviceState::Online);
}

#[tokio::test]
async fn writes_with_scale_and_swaps_land_in_the_right_registers() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let props = vec![
        prop(
            "setpoint",
            "INT",
            "5",
            "30",
            json!({"register": "HoldingRegister", "offset": 0, "scale": 0.1}),
        ),
        prop(
            "bytes",
            "FLOAT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 20, "limit": 2, "isSwap": true}),
        ),
        prop(
            "words",
            "FLOAT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 22, "limit": 2, "isRegisterSwap": true}),
        ),
        prop(
            "both",
            "DOUBLE",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 24, "limit": 4, "isSwap": true, "isRegisterSwap": true}),
        ),
        prop(
            "label",
            "STRING",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 30, "limit": 4}),
        ),
        prop(
            "heater",
            "BOOLEAN",
            "",
            "",
            json!({"register": "CoilRegister", "offset": 0}),
        ),
        prop(
            "wide",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 40, "limit": 4, "isRegisterSwap": true}),
        ),
    ];
    let mut driver = ModbusDriver::new(config(sim.addr()), props);
    driver.connect().await.unwrap();
    driver.write("setpoint", "22.5").await.unwrap();
    driver.write("bytes", "1500.5").await.unwrap();
    driver.write("words", "1500.5").await.unwrap();
    driver.write("both", "-2.25").await.unwrap();
    driver.write("label", "abc").await.unwrap();
    driver.write("heater", "false").await.unwrap();
    driver.write("wide", "-5").await.unwrap();

    // The raw registers, read by a plain client, show each layout.
    let mut raw = tcp::connect_slave(sim.addr(), Slave(1)).await.unwrap();
    assert_eq!(
        raw.read_holding_registers(0, 1).await.unwrap().unwrap(),
        vec![225]
    );
    assert_eq!(
        raw.read_holding_registers(20, 4).await.unwrap().unwrap(),
        vec![0xBB44, 0x0090, 0x9000, 0x44BB]
    );
    let d = (-2.25f64).to_be_bytes();
    let expect_both: Vec<u16> = d
        .chunks(2)
        .rev()
        .map(|c| u16::from_be_bytes([c[1], c[0]]))
        .collect();
    assert_eq!(
        raw.read_holding_registers(24, 4).await.unwrap().unwrap(),
        expect_both
    );
    assert_eq!(
        raw.read_holding_registers(30, 4).await.unwrap().unwrap(),
        vec![0x6162, 0x6300, 0, 0]
    );
    assert_eq!(raw.read_coils(0, 1).await.unwrap().unwrap(), vec![false]);
    assert_eq!(
        raw.read_holding_registers(40, 4).await.unwrap().unwrap(),
        vec![0xFFFB, 0xFFFF, 0xFFFF, 0xFFFF]
    );

    // And the driver reads back what it wrote.
    let readings = driver.read().await.unwrap();
    assert_eq!(value(&readings, "setpoint").unwrap().to_string(), "22.5");
    assert_eq!(value(&readings, "bytes"), Ok(Value::Float(1500.5)));
    assert_eq!(value(&readings, "words"), Ok(Value::Float(1500.5)));
    assert_eq!(value(&readings, "both"), Ok(Value::Double(-2.25)));
    assert_eq!(value(&readings, "label"), Ok(Value::String("abc".into())));
    assert_eq!(value(&readings, "heater"), Ok(Value::Boolean(false)));
    assert_eq!(value(&readings, "wide"), Ok(Value::Int(-5)));

    // Byte- and word-swapped reads of registers written by someone else.
    raw.write_multiple_registers(50, &[0x9000, 0x44BB])
        .await
        .unwrap()
        .unwrap();
    let mut reader = ModbusDriver::new(
        config(sim.addr()),
        vec![prop(
            "p",
            "FLOAT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 50, "limit": 2, "isRegisterSwap": "true"}),
        )],
    );
    reader.connect().await.unwrap();
    assert_eq!(
        value(&reader.read().await.unwrap(), "p"),
        Ok(Value::Float(1500.5))
    );
}

#[tokio::test]
async fn bad_writes_are_refused_before_sending() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let mut props = thermostat();
    props.push(prop(
        "short",
        "STRING",
        "",
        "",
        json!({"register": "HoldingRegister", "offset": 60, "limit": 1}),
    ));
    let mut driver = ModbusDriver::new(config(sim.addr()), props);
    driver.connect().await.unwrap();
    let before = driver.stats().requests;
    let refused = |r: Result<(), WriteError>| matches!(r, Err(WriteError::Refused(_)));
    assert!(matches!(
        driver.write("setpoint", "31").await,
        Err(WriteError::Refused(ValueError::OutOfRange { .. }))
    ));
    assert!(matches!(
        driver.write("fan", "-1").await,
        Err(WriteError::Refused(ValueError::OutOfRange { .. }))
    ));
    assert!(matches!(
        driver.write("fan", "fast").await,
        Err(WriteError::Refused(ValueError::WrongType { .. }))
    ));
    assert!(
        refused(driver.write("fan", "2.5").await),
        "INT without scale takes integers"
    );
    assert!(
        refused(driver.write("setpoint", "21.55").await),
        "not a multiple of the scale"
    );
    assert!(refused(driver.write("heater", "maybe").await));
    assert!(
        refused(driver.write("measured", "1").await),
        "input registers are read-only"
    );
    assert!(
        refused(driver.write("short", "abc").await),
        "3 bytes do not fit one register"
    );
    assert!(matches!(
        driver.write("nope", "1").await,
        Err(WriteError::UnknownProperty(_))
    ));
    assert_eq!(driver.stats().requests, before, "nothing was sent");
    let mut raw = tcp::connect_slave(sim.addr(), Slave(1)).await.unwrap();
    assert_eq!(
        raw.read_holding_registers(0, 2).await.unwrap().unwrap(),
        vec![215, 3],
        "registers untouched"
    );
}

#[tokio::test]
async fn an_exception_spoils_only_its_own_property() {
    let addr = env_value("OUTPOST_MODBUS_ADDR").unwrap().parse().unwrap();
    let props = vec![
        prop(
            "last",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 198, "limit": 2}),
        ),
        prop(
            "past",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 200}),
        ),
        prop(
            "far",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 250}),
        ),
        prop(
            "fan",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 1}),
        ),
    ];
    let mut driver = ModbusDriver::new(config(addr), props);
    assert_eq!(driver.plan().len(), 3, "198-200 merge into one request");
    driver.connect().await.unwrap();
    let readings = driver.read().await.unwrap();
    assert_eq!(value(&readings, "last"), Ok(Value::Int(0)));
    assert_eq!(value(&readings, "fan"), Ok(Value::Int(3)));
    for bad in ["past", "far"] {
        match value(&readings, bad) {
            Err(PropertyError::Rejected(e)) => assert!(e.contains("IllegalDataAddress"), "{e}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(
        driver.is_connected(),
        "an exception is an answer: the connection stays"
    );
    assert_eq!(driver.health().state(), DeviceState::Online);
    let mut far = ModbusDriver::new(
        config(addr),
        vec![prop(
            "far",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 250}),
        )],
    );
    far.connect().await.unwrap();
    assert!(matches!(
        far.write("far", "1").await,
        Err(WriteError::Rejected(_))
    ));
}

#[tokio::test]
async fn rtu_framing_reads_and_writes() {
    let sim = SimProcess::start("modbus_device.py", &["--framer", "rtu"])
        .await
        .unwrap();
    let cfg = ModbusConfig {
        framing: Framing::RtuOverTcp,
        ..config(sim.addr())
    };
    let mut driver = ModbusDriver::new(cfg, thermostat());
    driver.connect().await.unwrap();
    let readings = driver.read().await.unwrap();
    assert_eq!(value(&readings, "power"), Ok(Value::Float(1500.5)));
    assert_eq!(
        value(&readings, "name"),
        Ok(Value::String("thermo-1".into()))
    );
    driver.write("fan", "5").await.unwrap();
    assert_eq!(
        value(&driver.read().await.unwrap(), "fan"),
        Ok(Value::Int(5))
    );

    let from_config = ModbusConfig::from_config(
        &json!({"ip": "127.0.0.1", "port": sim.port, "slaveID": 1, "framing": "rtu"}),
    )
    .unwrap();
    assert_eq!(from_config.framing, Framing::RtuOverTcp);
}

#[tokio::test]
async fn a_device_that_disappears_goes_offline_and_comes_back_online() {
    let mut sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let driver = ModbusDriver::new(config(sim.addr()), thermostat());
    let (tx, mut rx) = mpsc::channel(64);
    let run = RunConfig {
        collect_cycle: Duration::from_millis(50),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        seed: 1,
        observer: None,
    };
    let handle = device::spawn("default/thermo", driver, run, tx);
    let state = async |rx: &mut mpsc::Receiver<Report>, want: DeviceState| {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(Report::State { state, .. }) = rx.recv().await
                    && state == want
                {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?} within 20 s"));
    };
    state(&mut rx, DeviceState::Online).await;
    sim.kill();
    state(&mut rx, DeviceState::Offline).await;
    let refused = handle.write("fan", "9").await.unwrap();
    assert!(
        matches!(refused, Err(WriteError::Refused(_))),
        "checked even while offline: {refused:?}"
    );
    assert_eq!(
        handle.write("fan", "4").await.unwrap(),
        Err(WriteError::NotConnected)
    );
    sim.restart().await.unwrap();
    state(&mut rx, DeviceState::Online).await;
    // Values flow again and writes go through.
    handle.write("fan", "4").await.unwrap().unwrap();
    let fan = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Report::Values { readings, .. }) = rx.recv().await
                && let Ok(v) = value(&readings, "fan")
                && v == Value::Int(4)
            {
                return v;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(fan, Value::Int(4));
}

/// A TCP relay to the simulator that holds back the answer to the first
/// request it carries on each connection for `delay`.
async fn slow_relay(target: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let hold = std::mem::replace(&mut first, false);
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let mut buf = [0u8; 512];
                loop {
                    let Ok(n) = client.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 || server.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    let mut answer = [0u8; 512];
                    let Ok(m) = server.read(&mut answer).await else {
                        return;
                    };
                    if hold {
                        tokio::time::sleep(delay).await;
                    }
                    if m == 0 || client.write_all(&answer[..m]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_late_reply_does_not_poison_the_next_request() {
    let target = env_value("OUTPOST_MODBUS_ADDR").unwrap().parse().unwrap();
    let relay = slow_relay(target, Duration::from_millis(400)).await;
    let props = vec![
        prop(
            "setpoint",
            "INT",
            "",
            "",
            json!({"register": "HoldingRegister", "offset": 0}),
        ),
        prop(
            "measured",
            "INT",
            "",
            "",
            json!({"register": "InputRegister", "offset": 0}),
        ),
    ];
    let cfg = ModbusConfig {
        timeout: Duration::from_millis(150),
        ..ModbusConfig::tcp(relay)
    };
    let mut driver = ModbusDriver::new(cfg, props);
    driver.connect().await.unwrap();
    assert_eq!(
        driver.read().await,
        Err(ReadError::Timeout(Duration::from_millis(150)))
    );
    assert!(!driver.is_connected(), "a timed-out connection is dropped");
    // Wait until the late answer has arrived on the old connection.
    tokio::time::sleep(Duration::from_millis(400)).await;
    driver.connect().await.unwrap();
    for _ in 0..3 {
        let readings = driver.read().await.unwrap();
        assert_eq!(value(&readings, "setpoint"), Ok(Value::Int(215)));
        assert_eq!(value(&readings, "measured"), Ok(Value::Int(204)));
    }
    assert_eq!(driver.stats().connects, 2);
}

#[tokio::test]
async fn a_dead_device_does_not_stall_a_live_one() {
    // A peer that accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = black_hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = black_hole.accept().await {
            held.push(s);
        }
    });
    let live_addr = env_value("OUTPOST_MODBUS_ADDR").unwrap().parse().unwrap();
    let (tx, mut rx) = mpsc::channel(256);
    let run = RunConfig {
        collect_cycle: Duration::from_millis(50),
        ..RunConfig::default()
    };
    let slow = ModbusConfig {
        timeout: Duration::from_secs(2),
        ..ModbusConfig::tcp(hole_addr)
    };
    let _dead = device::spawn(
        "default/dead",
        ModbusDriver::new(slow, thermostat()),
        run.clone(),
        tx.clone(),
    );
    let _live = device::spawn(
        "default/live",
        ModbusDriver::new(config(live_addr), thermostat()),
        run,
        tx,
    );
    let start = tokio::time::Instant::now();
    let mut live_reports = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if let Ok(Some(Report::Values { device, .. })) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
            && device == "default/live"
        {
            live_reports += 1;
        }
    }
    assert!(
        live_reports >= 10,
        "the live device reported {live_reports} times in 1 s while the other hung"
    );
}
