//! The OPC UA driver against asyncua (scripts/sims/opcua_device.py): a read
//! of every type in one request, typed writes, refused writes, bad node ids,
//! subscriptions, a server restart, a subscription the server forgets
//! (watchdog), and Basic256Sha256 with a client certificate.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use outpost_mappers::device::{self, Report, RunConfig};
use outpost_mappers::driver::{Changes, DeviceState, Driver, PropertyError, Reading, WriteError};
use outpost_mappers::opcua::{OpcUaConfig, OpcUaDriver, OpcUaProperty, Security, SubscribeConfig};
use outpost_mappers::property::{PropertySpec, Value, ValueError};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::test_utils::{env_value, unique_name};
use serde_json::json;
use tokio::sync::mpsc;

fn prop(name: &str, ty: &str, min: &str, max: &str, node: &str) -> OpcUaProperty {
    let spec = PropertySpec::from_model(name, ty, "ReadWrite", min, max).unwrap();
    OpcUaProperty::from_config(spec, &json!({"nodeID": node})).unwrap()
}

fn all_types() -> Vec<OpcUaProperty> {
    vec![
        prop("int", "INT", "0", "100", "ns=2;s=int"),
        prop("float", "FLOAT", "", "", "ns=2;s=float"),
        prop("double", "DOUBLE", "-50", "50", "ns=2;s=double"),
        prop("string", "STRING", "", "", "ns=2;s=string"),
        prop("boolean", "BOOLEAN", "", "", "ns=2;s=boolean"),
        prop("bytes", "BYTES", "", "", "ns=2;s=bytes"),
    ]
}

fn config(url: &str) -> OpcUaConfig {
    OpcUaConfig {
        pki_dir: std::env::temp_dir().join(unique_name("outpost-opcua-pki")),
        ..OpcUaConfig::new(url)
    }
}

fn sim_url(sim: &SimProcess) -> String {
    format!("opc.tcp://127.0.0.1:{}/outpost/", sim.port)
}

fn value(readings: &[Reading], name: &str) -> Result<Value, PropertyError> {
    readings
        .iter()
        .find(|r| r.property == name)
        .unwrap()
        .value
        .clone()
}

#[tokio::test]
async fn reads_every_type_in_one_request() {
    let url = env_value("OUTPOST_OPCUA_URL").unwrap();
    let mut props = all_types();
    props.push(prop("missing", "INT", "", "", "ns=2;s=no-such-node"));
    let mut driver = OpcUaDriver::new(config(&url), props);
    driver.connect().await.unwrap();
    let readings = driver.read().await.unwrap();
    assert_eq!(driver.stats().requests, 1);
    assert_eq!(value(&readings, "int"), Ok(Value::Int(42)));
    assert_eq!(value(&readings, "float"), Ok(Value::Float(1.5)));
    assert_eq!(value(&readings, "double"), Ok(Value::Double(21.5)));
    assert_eq!(
        value(&readings, "string"),
        Ok(Value::String("thermo-1".into()))
    );
    assert_eq!(value(&readings, "boolean"), Ok(Value::Boolean(true)));
    assert_eq!(value(&readings, "bytes"), Ok(Value::Bytes(vec![1, 2])));
    match value(&readings, "missing") {
        Err(PropertyError::Rejected(e)) => assert!(e.contains("BadNodeIdUnknown"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(driver.health().state(), DeviceState::Online);
    driver.disconnect().await;
}

#[tokio::test]
async fn writes_each_type_and_refuses_bad_values() {
    let sim = SimProcess::start("opcua_device.py", &[]).await.unwrap();
    let mut props = all_types();
    props.push(prop("missing", "INT", "", "", "ns=2;s=no-such-node"));
    let mut driver = OpcUaDriver::new(config(&sim_url(&sim)), props);
    driver.connect().await.unwrap();
    for (name, text) in [
        ("int", "77"),
        ("float", "2.25"),
        ("double", "-3.5"),
        ("string", "renamed"),
        ("boolean", "false"),
        ("bytes", "AwQF"),
    ] {
        driver
            .write(name, text)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let readings = driver.read().await.unwrap();
    assert_eq!(value(&readings, "int"), Ok(Value::Int(77)));
    assert_eq!(value(&readings, "float"), Ok(Value::Float(2.25)));
    assert_eq!(value(&readings, "double"), Ok(Value::Double(-3.5)));
    assert_eq!(
        value(&readings, "string"),
        Ok(Value::String("renamed".into()))
    );
    assert_eq!(value(&readings, "boolean"), Ok(Value::Boolean(false)));
    assert_eq!(value(&readings, "bytes"), Ok(Value::Bytes(vec![3, 4, 5])));

    let before = driver.stats().requests;
    assert!(matches!(
        driver.write("int", "101").await,
        Err(WriteError::Refused(ValueError::OutOfRange { .. }))
    ));
    assert!(matches!(
        driver.write("double", "-51").await,
        Err(WriteError::Refused(ValueError::OutOfRange { .. }))
    ));
    assert!(matches!(
        driver.write("int", "lots").await,
        Err(WriteError::Refused(ValueError::WrongType { .. }))
    ));
    assert!(matches!(
        driver.write("int", "2.5").await,
        Err(WriteError::Refused(ValueError::DoesNotFit { .. }))
    ));
    assert!(matches!(
        driver.write("boolean", "2").await,
        Err(WriteError::Refused(_))
    ));
    assert_eq!(
        driver.stats().requests,
        before,
        "refused writes send nothing"
    );
    assert_eq!(
        value(&driver.read().await.unwrap(), "int"),
        Ok(Value::Int(77))
    );
    // The server's own refusal: a node that does not exist.
    assert!(matches!(
        driver.write("missing", "1").await,
        Err(WriteError::Rejected(_)) | Err(WriteError::Transport(_))
    ));
    driver.disconnect().await;
}

async fn change_of(rx: &mut mpsc::Receiver<Report>, property: &str, within: Duration) -> Value {
    tokio::time::timeout(within, async {
        loop {
            if let Some(Report::Values { readings, .. }) = rx.recv().await
                && readings.len() == 1
                && readings[0].property == property
                && let Ok(v) = &readings[0].value
            {
                return v.clone();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no change of {property} within {within:?}"))
}

fn fast_subscription(url: &str) -> OpcUaConfig {
    OpcUaConfig {
        subscribe: Some(SubscribeConfig {
            publishing_interval: Duration::from_millis(100),
            keep_alive_count: 3,
        }),
        timeout: Duration::from_millis(1000),
        ..config(url)
    }
}

#[tokio::test]
async fn subscriptions_survive_a_server_restart() {
    let mut sim = SimProcess::start("opcua_device.py", &[]).await.unwrap();
    let driver = OpcUaDriver::new(
        fast_subscription(&sim_url(&sim)),
        vec![
            prop("counter", "INT", "", "", "ns=2;s=counter"),
            prop("int", "INT", "", "", "ns=2;s=int"),
        ],
    );
    let (tx, mut rx) = mpsc::channel(256);
    let run = RunConfig {
        collect_cycle: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        seed: 3,
        observer: None,
    };
    let handle = device::spawn("default/opc", driver, run, tx);
    let first = change_of(&mut rx, "counter", Duration::from_secs(10)).await;
    let second = change_of(&mut rx, "counter", Duration::from_secs(5)).await;
    assert_ne!(first, second, "the counter ticks");
    // A write is seen through the subscription.
    handle.write("int", "5").await.unwrap().unwrap();
    assert_eq!(
        change_of(&mut rx, "int", Duration::from_secs(5)).await,
        Value::Int(5)
    );

    sim.kill();
    sim.restart().await.unwrap();
    // A fresh server starts its counter again from 0 and int at 42.
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let v = change_of(&mut rx, "int", Duration::from_secs(30)).await;
            if v == Value::Int(42) {
                return v;
            }
        }
    })
    .await
    .expect("the subscription came back after the restart");
    assert_eq!(after, Value::Int(42));
    let a = change_of(&mut rx, "counter", Duration::from_secs(5)).await;
    let b = change_of(&mut rx, "counter", Duration::from_secs(5)).await;
    assert_ne!(a, b, "changes flow again");
}

#[tokio::test]
async fn the_watchdog_recreates_a_subscription_the_server_forgot() {
    let sim = SimProcess::start("opcua_device.py", &["--fault-hooks"])
        .await
        .unwrap();
    let url = sim_url(&sim);
    let mut driver = OpcUaDriver::new(
        fast_subscription(&url),
        vec![
            prop("counter", "INT", "", "", "ns=2;s=counter"),
            prop("drop", "BOOLEAN", "", "", "ns=2;s=drop_subscriptions"),
        ],
    );
    let mut changes = driver.take_changes().unwrap();
    driver.connect().await.unwrap();
    assert_eq!(driver.stats().subscriptions_created, 1);
    let wait_counter = async |changes: &mut Changes| {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let r = changes.recv_async().await.unwrap();
                if r.property == "counter" {
                    return r.value.unwrap();
                }
            }
        })
        .await
    };
    wait_counter(&mut changes)
        .await
        .expect("changes before the fault");
    driver.write("drop", "true").await.unwrap();
    // The server forgets the subscription; nothing arrives any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while changes.try_recv().is_ok() {}
    assert!(
        wait_counter(&mut changes).await.is_err(),
        "silent after the fault"
    );
    // A collect cycle runs the watchdog, which recreates the subscription.
    assert!(driver.read().await.is_ok());
    assert_eq!(driver.stats().subscriptions_created, 2, "recreated once");
    wait_counter(&mut changes)
        .await
        .expect("changes after the watchdog");
    assert!(
        !driver.check_subscription().await.unwrap(),
        "a live subscription is left alone"
    );
    driver.disconnect().await;
}

#[tokio::test]
async fn basic256sha256_with_a_client_certificate() {
    let certs = std::env::temp_dir().join(unique_name("outpost-opcua-certs"));
    let dir = certs.to_string_lossy().into_owned();
    let sim = SimProcess::start(
        "opcua_device.py",
        &["--security", "basic256sha256", "--cert-dir", &dir],
    )
    .await
    .unwrap();
    let url = sim_url(&sim);
    // The client's own certificate, made the way an operator would.
    let (cert, key) = (certs.join("client-cert.der"), certs.join("client-key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=outpost-mapper",
        ])
        .args([
            "-addext",
            "subjectAltName=URI:urn:outpost:mapper,DNS:localhost",
        ])
        .args([
            "-addext",
            "keyUsage=digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment",
        ])
        .args(["-addext", "extendedKeyUsage=clientAuth,serverAuth"])
        .arg("-keyout")
        .arg(&key)
        .args(["-outform", "DER", "-out"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let secure = OpcUaConfig {
        security: Security::Basic256Sha256SignAndEncrypt,
        certificate: Some(cert.clone()),
        private_key: Some(key),
        // Asymmetric handshakes are slow in unoptimised builds.
        timeout: Duration::from_secs(15),
        ..config(&url)
    };
    let pki = secure.pki_dir.clone();
    let mut driver = OpcUaDriver::new(secure, all_types());
    driver.connect().await.unwrap();
    assert_eq!(
        value(&driver.read().await.unwrap(), "double"),
        Ok(Value::Double(21.5))
    );
    driver.write("string", "secret").await.unwrap();
    assert_eq!(
        value(&driver.read().await.unwrap(), "string"),
        Ok(Value::String("secret".into()))
    );
    driver.disconnect().await;
    assert!(
        !pki.join("own/cert.der").exists(),
        "the given certificate was used, none was made"
    );

    // The server offers no unsecured endpoint.
    let mut plain = OpcUaDriver::new(
        OpcUaConfig {
            timeout: Duration::from_secs(15),
            ..config(&url)
        },
        all_types(),
    );
    assert!(plain.connect().await.is_err());
    let _ = std::fs::remove_dir_all(certs);
    let _ = std::fs::remove_dir_all(pki);
}
