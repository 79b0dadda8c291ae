//! KubeEdge's MQTT event bus against a real mosquitto (a private broker per
//! test) and a real Modbus device (pymodbus), with an "edge app" that is a
//! plain MQTT client speaking KubeEdge's topics and payloads:
//!
//! - twin/get answers the device's twin; membership/get lists the node's
//!   devices;
//! - a twin update's expected value reaches the device, the document and
//!   result topics say so, and the cloud gets the value as the edge's
//!   desired write; the same works with the cloud unreachable and reaches
//!   the cloud after reconnect;
//! - a delta is published while the device cannot take the expected value
//!   (it is offline), and state changes are published;
//! - malformed payloads, unknown devices and properties, read-only
//!   properties and over-long values get a result with an error code, and
//!   the stored desired values stay as they were.

#![allow(clippy::unwrap_used)]

#[path = "support/twins.rs"]
mod support;

use std::time::Duration;

use outpost_edge_node::eventbus::{EventBus, EventBusConfig};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::desired;
use outpost_sync::document::DocKind;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use support::{Fleet, value};
use tokio::sync::mpsc;

/// An edge app: publishes requests, collects what the node publishes.
struct App {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Value)>,
}

impl App {
    async fn connect(broker: std::net::SocketAddr) -> Self {
        let options = MqttOptions::new(
            outpost_sync::test_utils::unique_name("app"),
            broker.ip().to_string(),
            broker.port(),
        );
        let (client, mut events) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready) = mpsc::unbounded_channel();
        let sub = client.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub.subscribe("$hw/events/#", QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let body = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        if tx.send((p.topic, body)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        ready.recv().await.unwrap();
        Self { client, rx }
    }

    async fn send(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// The next message on `topic` that satisfies `ok`.
    async fn expect(&mut self, topic: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((t, body))) if t == topic && ok(&body) => return body,
                Ok(Some(_)) => {}
                _ => panic!("no message on {topic} matching"),
            }
        }
    }

    /// Sends a request and waits for its result (matched by event id).
    async fn request(&mut self, topic: &str, payload: Value) -> Value {
        let id = payload["event_id"].as_str().unwrap_or_default().to_owned();
        self.send(topic, payload.to_string()).await;
        let result = format!("{topic}/result");
        self.expect(&result, |b| b["event_id"] == id.as_str()).await
    }
}

const DEV: &str = "$hw/events/device/default/thermo";

fn update(event: &str, twin: Value) -> Value {
    json!({"event_id": event, "timestamp": 0, "twin": twin})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_app_reads_and_sets_twins_online_and_offline() {
    let broker = SimProcess::mosquitto().await.unwrap();
    let mut sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("bus");
    let link = fleet.connect();
    let twins = fleet.twins();
    let _bus = EventBus::spawn(
        fleet.edge.clone(),
        twins.view(),
        EventBusConfig {
            host: "127.0.0.1".into(),
            port: broker.addr().port(),
            node: fleet.node.clone(),
            client_id: format!("outpost-edge-{}", fleet.node),
        },
    );
    let mut app = App::connect(broker.addr()).await;
    fleet.put_device("thermo", "modbus", sim.addr().port());
    fleet
        .wait_reported(&fleet.edge, "thermo", "online", |d| d.state == "online")
        .await;

    // twin/get and membership/get.
    let got = app
        .request(&format!("{DEV}/twin/get"), json!({"event_id": "g1"}))
        .await;
    assert_eq!(got["twin"]["fan"]["actual"]["value"], "3", "{got}");
    assert_eq!(got["twin"]["measured"]["metadata"]["type"], "INT");
    let members = app
        .request(
            &format!("$hw/events/node/{}/membership/get", fleet.node),
            json!({"event_id": "m1"}),
        )
        .await;
    assert_eq!(members["devices"][0]["id"], "default/thermo", "{members}");

    // An expected value from the app reaches the device and the cloud.
    let result = app
        .request(
            &format!("{DEV}/twin/update"),
            update("u1", json!({"fan": {"expected": {"value": "4"}}})),
        )
        .await;
    assert_eq!(result["code"], 200, "{result}");
    app.expect(&format!("{DEV}/twin/update/document"), |b| {
        b["twin"]["fan"]["current"]["actual"]["value"] == "4"
    })
    .await;
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "the app's value at the cloud",
            |d| value(d, "fan").as_deref() == Some("4"),
        )
        .await;
    let desired_id = fleet.id(DocKind::DeviceDesired, &["default", "thermo"]);
    let resolved = desired::resolve(&fleet.cloud.read_json(&desired_id).unwrap().unwrap());
    assert_eq!(resolved["fan"].winner.value, "4");
    assert_eq!(resolved["fan"].winner.writer, fleet.edge.me().to_string());

    // Bad requests get error results and change nothing.
    let before = fleet.edge.read_json(&desired_id).unwrap();
    app.send(&format!("{DEV}/twin/update"), "{not json").await;
    let r = app
        .expect(&format!("{DEV}/twin/update/result"), |b| b["code"] == 400)
        .await;
    assert!(
        r["reason"].as_str().unwrap().contains("not valid JSON"),
        "{r}"
    );
    for (event, twin, code, says) in [
        (
            "b1",
            json!({"nope": {"expected": {"value": "1"}}}),
            400,
            "no property",
        ),
        (
            "b2",
            json!({"measured": {"expected": {"value": "1"}}}),
            400,
            "read-only",
        ),
        (
            "b3",
            json!({"fan": {"expected": {"value": 7}}}),
            400,
            "must be a string",
        ),
        (
            "b4",
            json!({"fan": {"expected": {"value": "9".repeat(600)}}}),
            400,
            "longer than",
        ),
    ] {
        let r = app
            .request(&format!("{DEV}/twin/update"), update(event, twin))
            .await;
        assert_eq!(r["code"], code, "{event}: {r}");
        assert!(r["reason"].as_str().unwrap().contains(says), "{event}: {r}");
    }
    let r = app
        .request(
            "$hw/events/device/default/ghost/twin/update",
            update("b5", json!({"fan": {"expected": {"value": "1"}}})),
        )
        .await;
    assert_eq!(r["code"], 404, "{r}");
    assert_eq!(fleet.edge.read_json(&desired_id).unwrap(), before);

    // Offline: the app's value is applied at once and reaches the cloud
    // after reconnect.
    link.cut();
    let result = app
        .request(
            &format!("{DEV}/twin/update"),
            update("u2", json!({"fan": {"expected": {"value": "1"}}})),
        )
        .await;
    assert_eq!(result["code"], 200, "{result}");
    fleet
        .wait_reported(&fleet.edge, "thermo", "applied offline", |d| {
            value(d, "fan").as_deref() == Some("1")
        })
        .await;

    // The device goes away: its state is published, and an expected value
    // it cannot take yet shows as a delta.
    sim.kill();
    app.expect(&format!("{DEV}/state/update/result"), |b| {
        b["device"]["state"] == "offline"
    })
    .await;
    app.request(
        &format!("{DEV}/twin/update"),
        update("u3", json!({"fan": {"expected": {"value": "2"}}})),
    )
    .await;
    let delta = app
        .expect(&format!("{DEV}/twin/update/delta"), |b| {
            b["delta"]["fan"] == "2"
        })
        .await;
    assert_eq!(delta["twin"]["fan"]["actual"]["value"], "1", "{delta}");
    sim.restart().await.unwrap();
    app.expect(&format!("{DEV}/state/update/result"), |b| {
        b["device"]["state"] == "online"
    })
    .await;
    fleet
        .wait_reported(&fleet.edge, "thermo", "applied when back", |d| {
            value(d, "fan").as_deref() == Some("2")
        })
        .await;

    let _link = fleet.connect();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "the offline values at the cloud",
            |d| value(d, "fan").as_deref() == Some("2"),
        )
        .await;
    for _ in 0..100 {
        let r = desired::resolve(&fleet.cloud.read_json(&desired_id).unwrap().unwrap());
        if r["fan"].winner.value == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = desired::resolve(&fleet.cloud.read_json(&desired_id).unwrap().unwrap());
    assert_eq!(r["fan"].winner.value, "2");
    twins.shutdown().await;
}
