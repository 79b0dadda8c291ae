//! The MQTT driver through mosquitto: telemetry in (with scale), commands out,
//! refused commands, malformed telemetry, and a broker that goes away and
//! comes back (the driver resubscribes). The device is an MQTT client in the
//! test that publishes telemetry and listens for commands, as a real one would.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use outpost_mappers::device::{self, Report, RunConfig};
use outpost_mappers::driver::{Changes, DeviceState, Driver, PropertyError, WriteError};
use outpost_mappers::mqtt::{MqttConfig, MqttDriver, MqttProperty};
use outpost_mappers::property::{PropertySpec, Value, ValueError};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::test_utils::{env_value, unique_name};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::sync::mpsc;

fn prop(name: &str, ty: &str, min: &str, max: &str, visitor: serde_json::Value) -> MqttProperty {
    let spec = PropertySpec::from_model(name, ty, "ReadWrite", min, max).unwrap();
    MqttProperty::from_config(spec, &visitor).unwrap()
}

fn props() -> Vec<MqttProperty> {
    vec![
        prop(
            "temp",
            "INT",
            "",
            "",
            json!({"jsonKey": "temp", "scale": 0.1}),
        ),
        prop(
            "humidity",
            "DOUBLE",
            "0",
            "100",
            json!({"jsonKey": "env.humidity"}),
        ),
        prop("fan", "INT", "0", "5", json!({"jsonKey": "fan"})),
        prop("on", "BOOLEAN", "", "", json!({})),
    ]
}

/// The device: publishes telemetry, collects the commands it receives.
struct FakeDevice {
    client: AsyncClient,
    commands: mpsc::Receiver<serde_json::Value>,
}

async fn device_client(host: &str, port: u16, command_topic: &str) -> FakeDevice {
    let mut options = MqttOptions::new(unique_name("device"), host, port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe(command_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, commands) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx
                        .send(serde_json::from_slice(&p.payload).unwrap_or(json!(null)))
                        .await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    FakeDevice { client, commands }
}

fn split(addr: &str) -> (String, u16) {
    let (h, p) = addr.rsplit_once(':').unwrap();
    (h.to_owned(), p.parse().unwrap())
}

fn config(host: &str, port: u16, base: &str) -> MqttConfig {
    MqttConfig::from_config(&json!({
        "broker": format!("{host}:{port}"),
        "telemetryTopic": format!("{base}/telemetry"),
        "commandTopic": format!("{base}/command"),
        "clientId": unique_name("mapper"),
        "timeoutMs": 3000,
    }))
    .unwrap()
}

async fn next_change(rx: &mut Changes, property: &str) -> Result<Value, PropertyError> {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = rx.recv_async().await.unwrap();
            if r.property == property {
                return r.value;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no change of {property}"))
}

#[tokio::test]
async fn telemetry_in_commands_out() {
    let (host, port) = split(&env_value("OUTPOST_MQTT_ADDR").unwrap());
    let base = unique_name("outpost-test/thermo");
    let mut device = device_client(&host, port, &format!("{base}/command")).await;
    let mut driver = MqttDriver::new(config(&host, port, &base), props());
    let mut changes = driver.take_changes().unwrap();
    driver.connect().await.unwrap();
    assert_eq!(driver.health().state(), DeviceState::Online);
    assert_eq!(
        driver.read().await.unwrap()[0].value,
        Err(PropertyError::NoValue)
    );

    let telemetry = format!("{base}/telemetry");
    device
        .client
        .publish(
            &telemetry,
            QoS::AtLeastOnce,
            false,
            r#"{"temp": 215, "env": {"humidity": 40.5}, "fan": 3, "on": true}"#,
        )
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut changes, "temp").await.unwrap().to_string(),
        "21.5"
    );
    let readings = driver.read().await.unwrap();
    let get = |n: &str| {
        readings
            .iter()
            .find(|r| r.property == n)
            .unwrap()
            .value
            .clone()
    };
    assert_eq!(get("humidity"), Ok(Value::Double(40.5)));
    assert_eq!(get("fan"), Ok(Value::Int(3)));
    assert_eq!(get("on"), Ok(Value::Boolean(true)));

    // Malformed telemetry: counted, logged, last good values kept.
    for bad in ["{oops", "[1, 2]", "\"text\""] {
        device
            .client
            .publish(&telemetry, QoS::AtLeastOnce, false, bad)
            .await
            .unwrap();
    }
    // A value of the wrong type spoils only its property.
    device
        .client
        .publish(&telemetry, QoS::AtLeastOnce, false, r#"{"fan": "fast"}"#)
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut changes, "fan").await,
        Ok(Value::Int(3)),
        "from the first message"
    );
    assert!(matches!(
        next_change(&mut changes, "fan").await,
        Err(PropertyError::Decode(_))
    ));
    assert_eq!(driver.stats().malformed, 3);
    let readings = driver.read().await.unwrap();
    assert_eq!(
        readings
            .iter()
            .find(|r| r.property == "humidity")
            .unwrap()
            .value,
        Ok(Value::Double(40.5))
    );

    // Commands.
    driver.write("temp", "22.5").await.unwrap();
    driver.write("on", "false").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), device.commands.recv())
        .await
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), device.commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, json!({"temp": 225.0}));
    assert_eq!(second, json!({"on": false}));

    // Refused before publishing.
    assert!(matches!(
        driver.write("fan", "6").await,
        Err(WriteError::Refused(ValueError::OutOfRange { .. }))
    ));
    assert!(matches!(
        driver.write("humidity", "wet").await,
        Err(WriteError::Refused(ValueError::WrongType { .. }))
    ));
    assert!(matches!(
        driver.write("fan", "2.5").await,
        Err(WriteError::Refused(_))
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), device.commands.recv())
            .await
            .is_err(),
        "no refused command reached the device"
    );
    driver.disconnect().await;
}

#[tokio::test]
async fn resubscribes_after_the_broker_comes_back() {
    let mut broker = SimProcess::mosquitto().await.unwrap();
    let base = unique_name("outpost-test/restart");
    let driver = MqttDriver::new(config("127.0.0.1", broker.port, &base), props());
    let (tx, mut rx) = mpsc::channel(256);
    let run = RunConfig {
        collect_cycle: Duration::from_millis(100),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        seed: 5,
        observer: None,
    };
    let _handle = device::spawn("default/mqtt", driver, run, tx);
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
        .unwrap_or_else(|_| panic!("no {want:?}"));
    };
    state(&mut rx, DeviceState::Online).await;
    broker.kill();
    state(&mut rx, DeviceState::Offline).await;
    broker.restart().await.unwrap();
    state(&mut rx, DeviceState::Online).await;

    // The broker lost every subscription; telemetry arrives only if the
    // driver subscribed again.
    let device = device_client("127.0.0.1", broker.port, &format!("{base}/command")).await;
    let telemetry = format!("{base}/telemetry");
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            device
                .client
                .publish(&telemetry, QoS::AtLeastOnce, false, r#"{"fan": 4}"#)
                .await
                .unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
            while let Ok(Some(report)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                if let Report::Values { readings, .. } = report
                    && readings
                        .iter()
                        .any(|r| r.property == "fan" && r.value == Ok(Value::Int(4)))
                {
                    return;
                }
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "telemetry flows after the broker restart");
}

/// The latest state of every device, once all `count` of them are `want`.
async fn all_in_state(
    rx: &mut mpsc::Receiver<Report>,
    states: &mut std::collections::HashMap<String, DeviceState>,
    count: usize,
    want: DeviceState,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while states.values().filter(|s| **s == want).count() < count {
            if let Some(Report::State { device, state, .. }) = rx.recv().await {
                states.insert(device, state);
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        let n = states.values().filter(|s| **s == want).count();
        panic!("{n}/{count} devices {want:?}")
    });
}

/// The broker's count of connected clients, as it next publishes it (a
/// fresh value, not the retained one, so at most `sys_interval` old).
async fn broker_clients(probe: &AsyncClient, sys: &mut mpsc::Receiver<(bool, String)>) -> u64 {
    probe
        .subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (retained, value) = sys.recv().await.unwrap();
            if !retained {
                return value.trim().parse().unwrap();
            }
        }
    })
    .await
    .expect("mosquitto publishes $SYS/broker/clients/connected")
}

#[tokio::test]
async fn fifty_devices_share_one_connection_and_only_their_topics() {
    const DEVICES: usize = 50;
    let mut broker = SimProcess::mosquitto().await.unwrap();
    let port = broker.port;
    let base = unique_name("outpost-test/shared");
    let (tx, mut rx) = mpsc::channel(4096);
    let mut handles = Vec::new();
    for i in 0..DEVICES {
        let driver = MqttDriver::new(config("127.0.0.1", port, &format!("{base}/d{i}")), props());
        let run = RunConfig {
            collect_cycle: Duration::from_millis(200),
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(400),
            seed: i as u64,
            observer: None,
        };
        handles.push(device::spawn(
            format!("default/d{i}"),
            driver,
            run,
            tx.clone(),
        ));
    }
    let mut states = std::collections::HashMap::new();
    all_in_state(&mut rx, &mut states, DEVICES, DeviceState::Online).await;
    assert_eq!(outpost_mappers::mqtt::connections("127.0.0.1", port), 1);

    // The broker's view: this probe and one connection for all 50 devices.
    let mut options = MqttOptions::new(unique_name("probe"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (probe, mut events) = AsyncClient::new(options, 16);
    let (sys_tx, mut sys) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let value = String::from_utf8_lossy(&p.payload).into_owned();
                    let _ = sys_tx.send((p.retain, value)).await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    assert_eq!(broker_clients(&probe, &mut sys).await, 2);

    // A message on one device's topic reaches that device and no other.
    let seen_by = async |rx: &mut mpsc::Receiver<Report>, topic: String, fan: i64| {
        probe
            .publish(
                &topic,
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"fan": {fan}}}"#),
            )
            .await
            .unwrap();
        let mut takers = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(report)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let Report::Values { device, readings } = report
                && readings
                    .iter()
                    .any(|r| r.property == "fan" && r.value == Ok(Value::Int(fan)))
            {
                takers.insert(device);
            }
        }
        takers.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(
        seen_by(&mut rx, format!("{base}/d7/telemetry"), 2).await,
        ["default/d7"]
    );
    assert_eq!(
        seen_by(&mut rx, format!("{base}/d42/telemetry"), 3).await,
        ["default/d42"]
    );

    // The shared connection drops: every device goes offline by its own
    // count, and comes back on one new connection.
    broker.kill();
    all_in_state(&mut rx, &mut states, DEVICES, DeviceState::Offline).await;
    broker.restart().await.unwrap();
    all_in_state(&mut rx, &mut states, DEVICES, DeviceState::Online).await;
    assert_eq!(outpost_mappers::mqtt::connections("127.0.0.1", port), 1);
    drop(handles);
}
