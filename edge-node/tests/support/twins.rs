//! Helpers of the twin tests: a cloud and an edge engine joined by the
//! in-memory transport, a thermostat model and Device written in the cloud
//! (against a pymodbus simulator), and waiting on reported documents.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use outpost_edge_node::twins::{TwinConfig, TwinManager};
use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
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

pub struct Fleet {
    pub node: String,
    pub dir: PathBuf,
    pub cloud: Engine,
    pub edge: Engine,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn open(dir: PathBuf) -> Engine {
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
    pub fn new(prefix: &str) -> Self {
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

    pub fn connect(&self) -> MemoryLink {
        memory::connect(&self.edge, &self.cloud, DEFAULT_LINK_BUFFER)
    }

    pub fn id(&self, kind: DocKind, object: &[&str]) -> DocId {
        DocId::new(kind, Owner::Node(&self.node), object).unwrap()
    }

    pub fn twins(&self) -> TwinManager {
        let mut config = TwinConfig::new(self.node.clone());
        config.retry_base = Duration::from_millis(100);
        TwinManager::spawn(self.edge.clone(), config)
    }

    /// Writes the thermostat's model and a Device of it in the cloud.
    pub fn put_device(&self, name: &str, protocol: &str, port: u16) {
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

    pub fn reported(&self, engine: &Engine, name: &str) -> Option<DeviceReportedDoc> {
        let id = self.id(DocKind::DeviceReported, &["default", name]);
        engine
            .with_replica(|r| r.get::<DeviceReportedDoc>(&id))
            .unwrap()
    }

    pub async fn wait_reported(
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

pub fn model_prop(
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

pub fn value(doc: &DeviceReportedDoc, prop: &str) -> Option<String> {
    doc.twins.get(prop).map(|v| v.value.clone())
}
