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

use std::path::PathBuf;
use std::time::Duration;

use outpost_edge_node::twins::{LocalWriteError, TwinConfig, TwinManager, set_local_desired};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::desired;
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{
    DeviceDesiredDoc, DeviceModelDoc, DeviceProperty, DeviceReportedDoc, ModelProperty,
    ProtocolConfig,
};
use outpost_sync::test_utils::unique_name;
use outpost_sync::transport::memory::{self, DEFAULT_LINK_BUFFER, MemoryLink};
use serde_json::json;

struct Fleet {
    node: String,
    dir: PathBuf,
    cloud: Engine,
    edge: Engine,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn open(dir: PathBuf) -> Engine {
    let key = outpost_sync::identity::load_or_create(&dir).unwrap();
    let replica = Replica::open(
        dir.join("replica"),
        PeerId::from(key.public()),
        ReplicaOptions::default(),
    )
    .unwrap();
    Engine::new(replica, Roster::new(), SyncMetrics::default())
}

impl Fleet {
    fn new(prefix: &str) -> Self {
        let node = unique_name(prefix);
        let dir = std::env::temp_dir().join("outpost-twin-tests").join(&node);
        let cloud = open(dir.join("cloud"));
        let edge = open(dir.join("edge"));
        let mut roster = Roster::new();
        roster.insert(cloud.me(), Role::Cloud);
        edge.set_roster(roster);
        let mut roster = Roster::new();
        roster.insert(
            edge.me(),
            Role::Edge {
                node: node.clone(),
                site: None,
            },
        );
        cloud.set_roster(roster);
        Self {
            node,
            dir,
            cloud,
            edge,
        }
    }

    fn connect(&self) -> MemoryLink {
        memory::connect(&self.edge, &self.cloud, DEFAULT_LINK_BUFFER)
    }

    fn id(&self, kind: DocKind, object: &[&str]) -> DocId {
        DocId::new(kind, Owner::Node(&self.node), object).unwrap()
    }

    fn twins(&self) -> TwinManager {
        let mut config = TwinConfig::new(self.node.clone());
        config.retry_base = Duration::from_millis(100);
        TwinManager::spawn(self.edge.clone(), config)
    }

    /// Writes the thermostat's model and a Device of it in the cloud.
    fn put_device(&self, name: &str, protocol: &str, port: u16) {
        let model = DeviceModelDoc {
            namespace: "default".into(),
            name: "thermo-model".into(),
            protocol: "modbus".into(),
            properties: vec![
                model_prop("setpoint", "INT", "ReadWrite", Some("5"), Some("30")),
                model_prop("fan", "INT", "ReadWrite", Some("0"), Some("5")),
                model_prop("measured", "INT", "ReadOnly", None, None),
            ],
        };
        self.cloud
            .put(
                &self.id(DocKind::DeviceModel, &["default", "thermo-model"]),
                &model,
            )
            .unwrap();
        let prop = |name: &str, visitor: serde_json::Value| DeviceProperty {
            name: name.into(),
            visitors: ProtocolConfig {
                protocol_name: "modbus".into(),
                config_data: visitor,
            },
            collect_cycle: Some(100_000_000),
            report_cycle: Some(200_000_000),
            report_to_cloud: Some(true),
            push_method: None,
        };
        let device = DeviceDesiredDoc {
            namespace: "default".into(),
            name: name.into(),
            model: "thermo-model".into(),
            protocol: ProtocolConfig {
                protocol_name: protocol.into(),
                config_data: json!({"ip": "127.0.0.1", "port": port, "slaveID": 1}),
            },
            properties: vec![
                prop(
                    "setpoint",
                    json!({"register": "HoldingRegister", "offset": 0, "limit": 1, "scale": 0.1}),
                ),
                prop("fan", json!({"register": "HoldingRegister", "offset": 1})),
                prop(
                    "measured",
                    json!({"register": "InputRegister", "offset": 0}),
                ),
            ],
            ..Default::default()
        };
        self.cloud
            .put(
                &self.id(DocKind::DeviceDesired, &["default", name]),
                &device,
            )
            .unwrap();
    }

    fn reported(&self, engine: &Engine, name: &str) -> Option<DeviceReportedDoc> {
        let id = self.id(DocKind::DeviceReported, &["default", name]);
        engine
            .with_replica(|r| r.get::<DeviceReportedDoc>(&id))
            .unwrap()
    }

    async fn wait_reported(
        &self,
        engine: &Engine,
        name: &str,
        what: &str,
        ok: impl Fn(&DeviceReportedDoc) -> bool,
    ) {
        for _ in 0..150 {
            if self.reported(engine, name).as_ref().is_some_and(&ok) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: {:#?}", self.reported(engine, name));
    }
}

fn model_prop(
    name: &str,
    kind: &str,
    access: &str,
    min: Option<&str>,
    max: Option<&str>,
) -> ModelProperty {
    ModelProperty {
        name: name.into(),
        description: None,
        kind: kind.into(),
        access_mode: Some(access.into()),
        minimum: min.map(Into::into),
        maximum: max.map(Into::into),
        unit: None,
    }
}

fn value(doc: &DeviceReportedDoc, prop: &str) -> Option<String> {
    doc.twins.get(prop).map(|v| v.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_from_the_cloud_is_read_and_its_desired_value_applied() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("twin-read");
    let _link = fleet.connect();
    let twins = fleet.twins();
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
    let broken = twins.view().device("default/broken").unwrap();
    assert_eq!(broken.state, "offline");
    assert!(
        broken.error.as_deref().unwrap_or("").contains("zigbee"),
        "{broken:?}"
    );
    fleet
        .wait_reported(
            &fleet.cloud,
            "broken",
            "the broken device is reported",
            |d| d.state == "offline",
        )
        .await;

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
