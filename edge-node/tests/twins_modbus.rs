//! Device twins against a real Modbus device (pymodbus,
//! scripts/sims/modbus_device.py, one private process per test), with the
//! device's documents written in a cloud replica and synced to the edge over
//! the in-memory transport (the engine's own session code):
//!
//! - a Device and its model from the cloud are read by the edge, reported
//!   values reach the cloud every report cycle, and the cloud's desired
//!   value is written to the device;
//! - offline, a local desired write is accepted and applied to the device;
//!   after reconnect the cloud and the edge resolve the same winner by the
//!   conflict rule, the loser stays visible, and the reported values
//!   recorded offline reach the cloud;
//! - a device that disappears is reported offline and comes back online; a
//!   Device that cannot be served (unknown protocol) is reported offline
//!   with the reason while the other devices go on; a deleted Device's
//!   driver stops and its reported document is deleted;
//! - local writes to a read-only property, an unknown property or an
//!   unknown device are refused with a clear error.

#![allow(clippy::unwrap_used)]

#[path = "support/http.rs"]
mod http;
#[path = "support/twins.rs"]
mod support;

use std::time::Duration;

use http::http_get;
use outpost_edge_node::api::{self, ApiState};
use outpost_edge_node::metrics::EdgeMetrics;
use outpost_edge_node::twins::{LocalWriteError, TwinConfig, TwinManager, set_local_desired};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::desired;
use outpost_sync::document::DocKind;
use support::{Fleet, value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_from_the_cloud_is_read_and_its_desired_value_applied() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("twin-read");
    let _link = fleet.connect();
    let metrics = EdgeMetrics::default();
    let mut config = TwinConfig::new(fleet.node.clone());
    config.mapper_metrics = Some(metrics.mappers.clone());
    let twins = TwinManager::spawn(fleet.edge.clone(), config);
    fleet.put_device("thermo", "modbus", sim.addr().port());
    let desired = fleet.id(DocKind::DeviceDesired, &["default", "thermo"]);
    fleet.cloud.set_desired(&desired, "fan", "4").unwrap();

    fleet
        .wait_reported(&fleet.cloud, "thermo", "values reach the cloud", |d| {
            d.state == "online"
                && value(d, "measured").as_deref() == Some("204")
                && value(d, "setpoint").as_deref() == Some("21.5")
                && value(d, "fan").as_deref() == Some("4")
                && d.twins["fan"].observed_desired.as_deref() == Some("4")
        })
        .await;
    let r = fleet.reported(&fleet.cloud, "thermo").unwrap();
    assert_eq!(r.twins["measured"].kind.as_deref(), Some("INT"));
    assert!(r.last_online_ms.is_some());

    // The local view has the same, with the resolved desired value.
    let twin = twins.view().device("default/thermo").unwrap();
    assert_eq!(twin.state, "online");
    assert_eq!(twin.properties["fan"].desired.as_deref(), Some("4"));
    assert_eq!(twin.properties["fan"].applied.as_deref(), Some("4"));
    assert!(!twin.properties["measured"].writable);

    // The local API lists the device; the metrics count its reads.
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry, &fleet.edge);
    let state = ApiState {
        engine: fleet.edge.clone(),
        twins: twins.view(),
        node: fleet.node.clone(),
        site: None,
        peers: vec![fleet.cloud.me()],
        metrics,
        registry: std::sync::Arc::new(registry),
    };
    let listener = api::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(listener, state));
    let devices = http_get(addr, "/api/v1/devices").await;
    let devices: serde_json::Value = serde_json::from_str(&devices).unwrap();
    assert_eq!(devices["items"][0]["name"], "thermo", "{devices}");
    assert_eq!(devices["items"][0]["properties"]["fan"]["applied"], "4");
    let text = http_get(addr, "/metrics").await;
    for want in [
        "outpost_edge_devices{state=\"online\"} 1",
        "outpost_mapper_operation_duration_seconds_count{protocol=\"modbus\",op=\"read\"}",
        "outpost_mapper_operation_duration_seconds_count{protocol=\"modbus\",op=\"write\"}",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    let status = http_get(addr, "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["peers"][0]["connected"], true, "{status}");
    assert_eq!(status["devices"][0]["state"], "online", "{status}");

    // Reported values keep flowing: the setpoint changes on the device.
    fleet.cloud.set_desired(&desired, "setpoint", "23").unwrap();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "the new setpoint is read back",
            |d| value(d, "setpoint").as_deref() == Some("23"),
        )
        .await;
    twins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_local_writes_apply_at_once_and_merge_by_the_conflict_rule_after_reconnect() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("twin-offline");
    let link = fleet.connect();
    let twins = fleet.twins();
    let view = twins.view();
    fleet.put_device("thermo", "modbus", sim.addr().port());
    fleet
        .wait_reported(&fleet.cloud, "thermo", "online", |d| {
            d.state == "online" && value(d, "fan").as_deref() == Some("3")
        })
        .await;

    // The link goes down. The cloud changes the fan, then the edge does.
    link.cut();
    let desired = fleet.id(DocKind::DeviceDesired, &["default", "thermo"]);
    fleet.cloud.set_desired(&desired, "fan", "2").unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    set_local_desired(
        &fleet.edge,
        &view,
        &fleet.node,
        "default/thermo",
        "fan",
        "5",
    )
    .unwrap();
    // Applied to the device offline.
    fleet
        .wait_reported(&fleet.edge, "thermo", "local write applied offline", |d| {
            value(d, "fan").as_deref() == Some("5")
                && d.twins["fan"].observed_desired.as_deref() == Some("5")
        })
        .await;
    assert_ne!(
        fleet
            .reported(&fleet.cloud, "thermo")
            .and_then(|d| value(&d, "fan")),
        Some("5".into()),
        "the cloud cannot know yet"
    );

    // Refusals are clear and leave the document alone.
    let e = set_local_desired(
        &fleet.edge,
        &view,
        &fleet.node,
        "default/thermo",
        "measured",
        "1",
    )
    .unwrap_err();
    assert!(matches!(e, LocalWriteError::ReadOnly { .. }), "{e}");
    let e = set_local_desired(
        &fleet.edge,
        &view,
        &fleet.node,
        "default/thermo",
        "nope",
        "1",
    )
    .unwrap_err();
    assert!(matches!(e, LocalWriteError::UnknownProperty { .. }), "{e}");
    let e =
        set_local_desired(&fleet.edge, &view, &fleet.node, "default/none", "fan", "1").unwrap_err();
    assert_eq!(e.to_string(), "no device default/none on this node");

    // Heal: the later (edge) write wins on both sides, the cloud's stays
    // visible as the loser, and the device keeps the winner.
    let _link = fleet.connect();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "offline values reach the cloud",
            |d| value(d, "fan").as_deref() == Some("5"),
        )
        .await;
    for _ in 0..100 {
        let a = fleet.cloud.read_json(&desired).unwrap().unwrap();
        let b = fleet.edge.read_json(&desired).unwrap().unwrap();
        if desired::resolve(&a) == desired::resolve(&b) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resolved = desired::resolve(&fleet.cloud.read_json(&desired).unwrap().unwrap());
    let fan = &resolved["fan"];
    assert_eq!(fan.winner.value, "5", "{fan:#?}");
    assert_eq!(fan.winner.writer, fleet.edge.me().to_string());
    assert_eq!(fan.losers.len(), 1, "{fan:?}");
    assert_eq!(fan.losers[0].value, "2");
    assert_eq!(fan.losers[0].writer, fleet.cloud.me().to_string());
    // The device was never set back to the loser.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = fleet.reported(&fleet.edge, "thermo").unwrap();
    assert_eq!(value(&r, "fan").as_deref(), Some("5"));
    twins.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_go_offline_and_back_bad_devices_are_reported_and_deleted_devices_stop() {
    let mut sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("twin-faults");
    let _link = fleet.connect();
    let twins = fleet.twins();
    fleet.put_device("thermo", "modbus", sim.addr().port());
    fleet.put_device("broken", "zigbee", sim.addr().port());
    fleet
        .wait_reported(&fleet.cloud, "thermo", "online", |d| d.state == "online")
        .await;
    fleet
        .wait_reported(
            &fleet.cloud,
            "broken",
            "the broken device is reported",
            |d| {
                d.state == "offline"
                    && d.unservable
                    && d.error.as_deref().unwrap_or("").contains("zigbee")
            },
        )
        .await;
    let broken = twins.view().device("default/broken").unwrap();
    assert_eq!(broken.state, "offline");
    assert!(
        broken.error.as_deref().unwrap_or("").contains("zigbee"),
        "{broken:?}"
    );

    // The device disappears, then comes back.
    sim.kill();
    fleet
        .wait_reported(&fleet.cloud, "thermo", "offline", |d| d.state == "offline")
        .await;
    // A desired value set meanwhile is applied when it returns.
    let desired = fleet.id(DocKind::DeviceDesired, &["default", "thermo"]);
    fleet.cloud.set_desired(&desired, "fan", "1").unwrap();
    sim.restart().await.unwrap();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "online again with the new value",
            |d| d.state == "online" && value(d, "fan").as_deref() == Some("1"),
        )
        .await;

    // Deleting the Device stops it and removes its reported document.
    fleet.cloud.delete(&desired).unwrap();
    for _ in 0..100 {
        if twins.view().device("default/thermo").is_none()
            && fleet.reported(&fleet.cloud, "thermo").is_none()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(twins.view().device("default/thermo").is_none());
    assert!(fleet.reported(&fleet.cloud, "thermo").is_none());
    twins.shutdown().await;
}
