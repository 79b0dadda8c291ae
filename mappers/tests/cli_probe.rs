//! `outpost-mapper probe` against the real devices: pymodbus, asyncua and a
//! device publishing through mosquitto.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use outpost_mappers::test_utils::SimProcess;
use outpost_sync::test_utils::{env_value, unique_name};

fn probe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-mapper"))
        .arg("probe")
        .args(args)
        .output()
        .expect("run outpost-mapper")
}

fn stdout(out: &Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn probes_modbus_registers() {
    let addr = env_value("OUTPOST_MODBUS_ADDR").unwrap();
    let out = probe(&["modbus", "--addr", &addr, "--offset", "0", "--scale", "0.1"]);
    assert_eq!(stdout(&out), "21.5 (double)");
    let out = probe(&[
        "modbus", "--addr", &addr, "--offset", "2", "--type", "FLOAT",
    ]);
    assert_eq!(stdout(&out), "1500.5 (float)");
    let out = probe(&[
        "modbus", "--addr", &addr, "--offset", "6", "--limit", "8", "--type", "STRING",
    ]);
    assert_eq!(stdout(&out), "thermo-1 (string)");
    let rtu = env_value("OUTPOST_MODBUS_RTU_ADDR").unwrap();
    let out = probe(&[
        "modbus",
        "--addr",
        &rtu,
        "--framing",
        "rtu",
        "--register",
        "InputRegister",
    ]);
    assert_eq!(stdout(&out), "204 (int)");
    // An exception is reported, not a crash.
    let out = probe(&["modbus", "--addr", &addr, "--offset", "250"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("IllegalDataAddress"),
        "{out:?}"
    );
}

#[tokio::test]
async fn probes_a_modbus_write_and_refuses_a_bad_one() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let addr = sim.addr().to_string();
    let common = [
        "modbus",
        "--addr",
        &addr,
        "--offset",
        "1",
        "--minimum",
        "0",
        "--maximum",
        "5",
    ];
    let out = probe(&[&common[..], &["--write", "4"]].concat());
    assert_eq!(stdout(&out), "4 (int)");
    let out = probe(&[&common[..], &["--write", "9"]].concat());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outside"),
        "{out:?}"
    );
    assert_eq!(
        stdout(&probe(&common)),
        "4 (int)",
        "the refused write was not sent"
    );
}

#[test]
fn probes_opcua_nodes() {
    let url = env_value("OUTPOST_OPCUA_URL").unwrap();
    let pki = std::env::temp_dir().join(unique_name("outpost-probe-pki"));
    let pki = pki.to_string_lossy();
    let out = probe(&[
        "opcua",
        "--url",
        &url,
        "--node",
        "ns=2;s=double",
        "--type",
        "DOUBLE",
        "--pki-dir",
        &pki,
    ]);
    assert_eq!(stdout(&out), "21.5 (double)");
    let out = probe(&[
        "opcua",
        "--url",
        &url,
        "--node",
        "ns=2;s=bytes",
        "--type",
        "BYTES",
        "--pki-dir",
        &pki,
    ]);
    assert_eq!(stdout(&out), "AQI= (bytes)");
}

#[tokio::test]
async fn probes_mqtt_telemetry() {
    let addr = env_value("OUTPOST_MQTT_ADDR").unwrap();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let topic = unique_name("outpost-test/probe");
    // The device's last telemetry, retained by the broker.
    let mut options = rumqttc::MqttOptions::new(unique_name("device"), host, port.parse().unwrap());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 8);
    client
        .publish(
            &topic,
            rumqttc::QoS::AtLeastOnce,
            true,
            r#"{"env": {"temp": 215}}"#,
        )
        .await
        .unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    let probe_topic = topic.clone();
    let out = tokio::task::spawn_blocking(move || {
        probe(&[
            "mqtt",
            "--broker",
            &addr,
            "--telemetry-topic",
            &probe_topic,
            "--key",
            "env.temp",
            "--scale",
            "0.1",
        ])
    })
    .await
    .unwrap();
    // Clear the retained message from the shared broker.
    client
        .publish(&topic, rumqttc::QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = events.poll().await.unwrap() {
            break;
        }
    }
    assert_eq!(stdout(&out), "21.5 (double)");
}
