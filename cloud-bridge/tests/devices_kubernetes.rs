//! KubeEdge devices through the bridge, against the real API server of
//! `scripts/env up`, with a real sync engine as the edge joined to the
//! bridge's engine by the in-memory transport.
//!
//! - the KubeEdge example YAML, applied unchanged, reaches the edge as
//!   device-desired and device-model documents, with the bridge running as
//!   the ServiceAccount of `deploy/cloud-rbac.yaml` (least privilege);
//!   deleting the Device removes them;
//! - many devices reporting quickly reach DeviceStatus and Device.status
//!   with their latest values, within the configured API write rate;
//! - a desired value changed at the edge while disconnected, concurrently
//!   with a change in the API, wins by the HLC rule: it lands in the Device,
//!   and the losing write shows as an Event and in the twin's conflicts;
//! - malformed Devices get a clear warning and the bridge goes on.

#![allow(clippy::unwrap_used)] // tests unwrap: a failure is the test failing

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use outpost_cloud_bridge::admission::{self, SYSTEM_NAMESPACE};
use outpost_cloud_bridge::crd::{self, Device, DeviceModel, DeviceStatus, TwinStatus};
use outpost_cloud_bridge::{Bridge, BridgeConfig};
use outpost_sync::PeerId;
use outpost_sync::access::{Role as PeerRole, Roster};
use outpost_sync::desired;
use outpost_sync::document::DocId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::schema::{DeviceDesiredDoc, DeviceModelDoc, DeviceReportedDoc, ReportedValue};
use outpost_sync::test_utils::{env_value, unique_name};
use outpost_sync::transport::memory::{DEFAULT_LINK_BUFFER, connect};
use serde_json::json;
use support::{new_key, now_ms, until};
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);
const SERVICE_ACCOUNT: &str = "system:serviceaccount:outpost-system:outpost-cloud";

/// The example of `reference/kubeedge-compat.md`, as a KubeEdge user has it.
const KUBEEDGE_EXAMPLE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: thermo-model, namespace: default}
spec:
  protocol: modbus
  properties:
  - {name: temp, type: INT, accessMode: ReadWrite, minimum: "1", maximum: "100", unit: Celsius}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1, namespace: default}
spec:
  deviceModelRef: {name: thermo-model}
  nodeName: edge-1
  protocol: {protocolName: modbus, configData: {ip: 127.0.0.1, port: 1502}}
  properties:
  - name: temp
    collectCycle: 10000000000
    reportCycle: 10000000000
    reportToCloud: true
    desired: {value: "30"}
    visitors:
      protocolName: modbus
      configData: {register: HoldingRegister, offset: 2, limit: 1, scale: 1, isSwap: true, isRegisterSwap: true}
"#;

async fn config() -> Config {
    let path = env_value("KUBECONFIG").expect("test environment");
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig")
}

async fn client() -> Client {
    Client::try_from(config().await).expect("client")
}

/// A client that acts as the bridge's ServiceAccount, with only the rights
/// `deploy/cloud-rbac.yaml` grants it.
async fn service_account_client(admin: &Client) -> Client {
    apply_rbac(admin).await;
    let mut config = config().await;
    config.auth_info.impersonate = Some(SERVICE_ACCOUNT.into());
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:serviceaccounts:outpost-system".into(),
        "system:authenticated".into(),
    ]);
    Client::try_from(config).expect("impersonating client")
}

/// Applies `deploy/cloud-rbac.yaml` as it is.
async fn apply_rbac(admin: &Client) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud-rbac.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let params = PatchParams::apply("outpost-tests").force();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap().to_owned();
        let name = value["metadata"]["name"].as_str().unwrap().to_owned();
        let ns = value["metadata"]["namespace"].as_str().map(str::to_owned);
        let ar = match kind.as_str() {
            "Namespace" => ApiResource::erase::<Namespace>(&()),
            "ServiceAccount" => {
                ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&())
            }
            "ClusterRole" => ApiResource::erase::<ClusterRole>(&()),
            "ClusterRoleBinding" => ApiResource::erase::<ClusterRoleBinding>(&()),
            "Role" => ApiResource::erase::<Role>(&()),
            "RoleBinding" => ApiResource::erase::<RoleBinding>(&()),
            other => panic!("unexpected kind {other} in deploy/cloud-rbac.yaml"),
        };
        let api: Api<DynamicObject> = match &ns {
            Some(ns) => Api::namespaced_with(admin.clone(), ns, &ar),
            None => Api::all_with(admin.clone(), &ar),
        };
        api.patch(&name, &params, &Patch::Apply(&value))
            .await
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
}

fn engine(me: PeerId, roster: Roster) -> Engine {
    let dir = std::env::temp_dir().join(unique_name("outpost-devices-test"));
    let replica = Replica::open(&dir, me, ReplicaOptions::default()).unwrap();
    Engine::new(replica, roster, SyncMetrics::default())
}

/// An edge engine that trusts `cloud` and is `node`.
fn edge(key: PeerId, node: &str, cloud: PeerId) -> Engine {
    let mut roster = Roster::new();
    roster.insert(cloud, PeerRole::Cloud);
    roster.insert(
        key,
        PeerRole::Edge {
            node: node.into(),
            site: None,
        },
    );
    engine(key, roster)
}

/// A bridge on its own engine, running in the background, an admitted
/// node, its edge engine linked to the bridge, and a namespace.
struct Setup {
    client: Client,
    bridge: Bridge,
    engine: Engine,
    task: tokio::task::JoinHandle<()>,
    node: String,
    ns: String,
    token_id: String,
    edge: Engine,
    link: Option<outpost_sync::transport::memory::MemoryLink>,
}

impl Setup {
    async fn start(prefix: &str, bridge_client: Option<Client>, config: BridgeConfig) -> Self {
        let client = client().await;
        let bridge_client = bridge_client.unwrap_or_else(|| client.clone());
        // The CRDs first, so that objects can be created at once (the
        // bridge installs them too; whoever comes first does it).
        crd::install(&client, "outpost-cloud", Duration::from_secs(60))
            .await
            .unwrap();
        let engine = engine(new_key(), Roster::new());
        let node = unique_name(prefix);
        // This bridge serves this test's node only. Unscoped, every test's
        // bridge would also project the other tests' nodes in the shared API
        // server (a thousand Devices of one of them). Scoped, a test's
        // Devices are often created while its bridge still lists the
        // others' (the case the device loop redoes at the listing's end).
        // `unique_name`s have one length, so the prefix is the node.
        let config = BridgeConfig {
            node_prefix: config.node_prefix.or_else(|| Some(node.clone())),
            ..config
        };
        let bridge = Bridge::new(bridge_client, engine.clone(), config);
        let run = bridge.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = run.run().await {
                panic!("bridge stopped: {e}");
            }
        });
        let ns = unique_name(prefix);
        let issued = admission::create_token(&client, &node, None, HOUR)
            .await
            .unwrap();
        let edge_key = new_key();
        admission::admit(&client, &issued.token.to_string(), edge_key)
            .await
            .unwrap();
        let mut edges = bridge.edges();
        tokio::time::timeout(
            Duration::from_secs(10),
            edges.wait_for(|e| e.contains_key(&node)),
        )
        .await
        .expect("the bridge learns the admission in time")
        .unwrap();
        let edge = edge(edge_key, &node, engine.me());
        let link = Some(connect(&edge, &engine, DEFAULT_LINK_BUFFER));
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
        Self {
            client,
            bridge,
            engine,
            task,
            node,
            ns,
            token_id: issued.token.id().to_owned(),
            edge,
            link,
        }
    }

    fn devices(&self) -> Api<Device> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn statuses(&self) -> Api<DeviceStatus> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn dynamic(&self, kind: &str) -> Api<DynamicObject> {
        let ar = match kind {
            "Device" => ApiResource::erase::<Device>(&()),
            "DeviceModel" => ApiResource::erase::<DeviceModel>(&()),
            other => panic!("no such kind {other}"),
        };
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    /// Creates objects from YAML as a user would, without going through
    /// the Rust types.
    async fn create_yaml(&self, yaml: &str) -> Result<(), kube::Error> {
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let mut value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            value["metadata"]["namespace"] = json!(self.ns);
            let kind = value["kind"].as_str().unwrap().to_owned();
            let obj: DynamicObject = serde_json::from_value(value).unwrap();
            self.dynamic(&kind)
                .create(&PostParams::default(), &obj)
                .await?;
        }
        Ok(())
    }

    fn desired_doc(&self, device: &str) -> DocId {
        format!("device-desired/{}/{}/{device}", self.node, self.ns)
            .parse()
            .unwrap()
    }

    fn reported_doc(&self, device: &str) -> DocId {
        format!("device-reported/{}/{}/{device}", self.node, self.ns)
            .parse()
            .unwrap()
    }

    fn model_doc(&self, model: &str) -> DocId {
        format!("device-model/{}/{}/{model}", self.node, self.ns)
            .parse()
            .unwrap()
    }

    async fn events(&self, reason: &str, regarding: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
            })
            .collect()
    }

    async fn cleanup(self) {
        self.task.abort();
        drop(self.link);
        let dp = DeleteParams::default();
        let _ = Api::<Secret>::namespaced(self.client.clone(), SYSTEM_NAMESPACE)
            .delete(&admission::token_secret_name(&self.token_id), &dp)
            .await;
        let _ = Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone())
            .delete(&self.node, &dp)
            .await;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &dp)
            .await;
    }
}

fn fast() -> BridgeConfig {
    BridgeConfig {
        retry_after: Duration::from_millis(200),
        ..BridgeConfig::default()
    }
}

fn device_yaml(name: &str, node: &str, model: &str, desired: &str) -> String {
    format!(
        r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {{name: {name}}}
spec:
  deviceModelRef: {{name: {model}}}
  nodeName: {node}
  protocol: {{protocolName: modbus, configData: {{ip: 127.0.0.1, port: 1502}}}}
  properties:
  - name: temp
    reportToCloud: true
    desired: {{value: "{desired}"}}
    visitors: {{protocolName: modbus, configData: {{register: HoldingRegister, offset: 2}}}}
"#
    )
}

fn twin_value(status: Option<&TwinStatus>, property: &str) -> Option<String> {
    status?
        .twins
        .iter()
        .find(|t| t.property_name == property)?
        .reported
        .as_ref()
        .map(|r| r.value.clone())
}

#[tokio::test]
async fn the_kubeedge_example_reaches_the_edge_and_leaves_with_its_device() {
    let admin = client().await;
    let sa = service_account_client(&admin).await;
    let s = Setup::start("devices", Some(sa), fast()).await;
    let yaml = KUBEEDGE_EXAMPLE.replace("nodeName: edge-1", &format!("nodeName: {}", s.node));
    let started = Instant::now();
    s.create_yaml(&yaml).await.unwrap();

    let desired_doc = s.desired_doc("thermo-1");
    let doc: DeviceDesiredDoc = until(
        "the device at the edge",
        Duration::from_secs(20),
        async || {
            s.edge
                .with_replica(|r| r.get::<DeviceDesiredDoc>(&desired_doc))
                .unwrap()
        },
    )
    .await;
    eprintln!(
        "example applied to device at the edge: {:?}",
        started.elapsed()
    );
    assert_eq!(doc.model, "thermo-model");
    assert_eq!(doc.protocol.protocol_name, "modbus");
    assert_eq!(
        doc.protocol.config_data,
        json!({"ip": "127.0.0.1", "port": 1502})
    );
    let temp = &doc.properties[0];
    assert_eq!(temp.name, "temp");
    assert_eq!(
        (temp.collect_cycle, temp.report_cycle),
        (Some(10_000_000_000), Some(10_000_000_000))
    );
    assert_eq!(temp.report_to_cloud, Some(true));
    assert_eq!(
        temp.visitors.config_data,
        json!({"register": "HoldingRegister", "offset": 2, "limit": 1, "scale": 1, "isSwap": true, "isRegisterSwap": true})
    );
    let resolved = until(
        "the desired value at the edge",
        Duration::from_secs(10),
        async || {
            let json = s.edge.read_json(&desired_doc).unwrap()?;
            desired::resolve(&json).remove("temp")
        },
    )
    .await;
    assert_eq!(resolved.winner.value, "30");
    assert_eq!(resolved.winner.writer, s.engine.me().to_string());
    let model_doc = s.model_doc("thermo-model");
    let model: DeviceModelDoc = until(
        "the model at the edge",
        Duration::from_secs(10),
        async || {
            s.edge
                .with_replica(|r| r.get::<DeviceModelDoc>(&model_doc))
                .unwrap()
        },
    )
    .await;
    assert_eq!(model.protocol, "modbus");
    assert_eq!(model.properties[0].kind, "INT");
    assert_eq!(model.properties[0].maximum.as_deref(), Some("100"));

    // A report comes back to both statuses, under the ServiceAccount.
    s.edge
        .put(
            &s.reported_doc("thermo-1"),
            &DeviceReportedDoc {
                state: "online".into(),
                last_online_ms: Some(now_ms()),
                error: None,
                unservable: false,
                twins: [(
                    "temp".to_owned(),
                    ReportedValue {
                        value: "29".into(),
                        timestamp_ms: now_ms(),
                        kind: Some("INT".into()),
                        observed_desired: Some("30".into()),
                    },
                )]
                .into(),
            },
        )
        .unwrap();
    let status = until("the DeviceStatus", Duration::from_secs(20), async || {
        let ds = s.statuses().get_opt("thermo-1").await.unwrap()?;
        (twin_value(ds.status.as_ref(), "temp").as_deref() == Some("29")).then_some(ds)
    })
    .await;
    let owner = &status.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Device", "thermo-1")
    );
    let twin_status = status.status.unwrap();
    assert_eq!(twin_status.state.as_deref(), Some("online"));
    assert_eq!(twin_status.twin_summary.as_deref(), Some("temp=29"));
    let twin = &twin_status.twins[0];
    assert_eq!(twin.reported.as_ref().unwrap().metadata["type"], "INT");
    assert_eq!(twin.observed_desired.as_ref().unwrap().value, "30");
    until("Device.status", Duration::from_secs(10), async || {
        let d = s.devices().get("thermo-1").await.unwrap();
        (twin_value(d.status.as_ref(), "temp").as_deref() == Some("29")).then_some(())
    })
    .await;

    // Deleted: the edge loses its documents, and the model's (no other
    // device of the node uses it).
    s.devices()
        .delete("thermo-1", &DeleteParams::default())
        .await
        .unwrap();
    let started = Instant::now();
    until("the documents to go", Duration::from_secs(20), async || {
        let desired = s.edge.read_json(&desired_doc).unwrap();
        let model = s.edge.read_json(&model_doc).unwrap();
        (desired.is_none() && model.is_none()).then_some(())
    })
    .await;
    eprintln!(
        "Device deleted to documents gone at the edge: {:?}",
        started.elapsed()
    );
    s.cleanup().await;
}

#[tokio::test]
async fn many_devices_reporting_fast_reach_the_api_coalesced_within_the_rate() {
    const DEVICES: usize = 40;
    const ROUNDS: usize = 20;
    const RATE: f64 = 20.0;
    let s = Setup::start(
        "devrate",
        None,
        BridgeConfig {
            device_status_writes_per_s: RATE,
            ..fast()
        },
    )
    .await;
    let mut yaml = String::from(
        "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata: {name: thermo-model}\nspec:\n  protocol: modbus\n  properties:\n  - {name: temp, type: INT}\n",
    );
    for i in 0..DEVICES {
        yaml.push_str("---");
        yaml.push_str(&device_yaml(
            &format!("d{i}"),
            &s.node,
            "thermo-model",
            "30",
        ));
    }
    s.create_yaml(&yaml).await.unwrap();
    for i in 0..DEVICES {
        let doc = s.desired_doc(&format!("d{i}"));
        until(
            "every device at the edge",
            Duration::from_secs(30),
            async || s.edge.read_json(&doc).unwrap(),
        )
        .await;
    }

    // The edge reports every device every 50 ms, ROUNDS times.
    let before = s.bridge.device_status_writes();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let items: Vec<(DocId, serde_json::Value)> = (0..DEVICES)
            .map(|i| {
                let doc = DeviceReportedDoc {
                    state: "online".into(),
                    last_online_ms: Some(now_ms()),
                    error: None,
                    unservable: false,
                    twins: [(
                        "temp".to_owned(),
                        ReportedValue {
                            value: format!("{round}"),
                            timestamp_ms: now_ms(),
                            kind: Some("INT".into()),
                            observed_desired: None,
                        },
                    )]
                    .into(),
                };
                (
                    s.reported_doc(&format!("d{i}")),
                    serde_json::to_value(doc).unwrap(),
                )
            })
            .collect();
        s.edge.write_many(&items).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reports = DEVICES * ROUNDS;
    let last = format!("{}", ROUNDS - 1);
    // Every DeviceStatus and Device.status ends with the last round.
    until(
        "the last values in the API",
        Duration::from_secs(60),
        async || {
            let statuses = s.statuses().list(&ListParams::default()).await.unwrap();
            let devices = s.devices().list(&ListParams::default()).await.unwrap();
            let done = statuses
                .items
                .iter()
                .filter(|d| twin_value(d.status.as_ref(), "temp").as_deref() == Some(last.as_str()))
                .count();
            let done_devices = devices
                .items
                .iter()
                .filter(|d| twin_value(d.status.as_ref(), "temp").as_deref() == Some(last.as_str()))
                .count();
            (done == DEVICES && done_devices == DEVICES).then_some(())
        },
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let writes = s.bridge.device_status_writes() - before;
    eprintln!(
        "{reports} reports of {DEVICES} devices in {:.1} s -> {writes} API writes in {elapsed:.1} s ({:.1}/s, limit {RATE}/s)",
        ROUNDS as f64 * 0.05,
        writes as f64 / elapsed
    );
    // The token bucket: at most one second's burst plus the rate.
    assert!(
        writes as f64 <= RATE * elapsed + RATE + 1.0,
        "{writes} writes in {elapsed:.1} s exceed {RATE}/s"
    );
    assert!(
        (writes as usize) < reports,
        "reports coalesce: {writes} writes for {reports} reports"
    );
    // Nothing more to write once the API has the latest values.
    let settled = s.bridge.device_status_writes();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.bridge.device_status_writes(),
        settled,
        "no writes without news"
    );
    s.cleanup().await;
}

#[tokio::test]
async fn a_desired_value_changed_offline_at_the_edge_wins_by_hlc_and_the_loser_shows() {
    let mut s = Setup::start("devconf", None, fast()).await;
    let yaml = KUBEEDGE_EXAMPLE.replace("nodeName: edge-1", &format!("nodeName: {}", s.node));
    s.create_yaml(&yaml).await.unwrap();
    let doc = s.desired_doc("thermo-1");
    until(
        "the cloud's value at the edge",
        Duration::from_secs(20),
        async || {
            let json = s.edge.read_json(&doc).unwrap()?;
            (desired::resolve(&json).get("temp")?.winner.value == "30").then_some(())
        },
    )
    .await;

    // The edge goes offline; the API changes the value, then the edge does.
    s.link.take().unwrap().cut();
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/properties/0/desired/value", "value": "22"}
    ]))
    .unwrap();
    s.devices()
        .patch(
            "thermo-1",
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .unwrap();
    let cloud = s.engine.me().to_string();
    until(
        "the cloud's new value",
        Duration::from_secs(10),
        async || {
            let json = s.engine.read_json(&doc).unwrap()?;
            (desired::resolve(&json).get("temp")?.winner.value == "22").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    s.edge.set_desired(&doc, "temp", "25").unwrap();

    // Back online: the later write (the edge's) wins everywhere.
    let started = Instant::now();
    s.link = Some(connect(&s.edge, &s.engine, DEFAULT_LINK_BUFFER));
    until(
        "the edge's value in the Device",
        Duration::from_secs(20),
        async || {
            let d = s.devices().get("thermo-1").await.unwrap();
            let value = d.spec.properties[0].desired.as_ref()?.value.clone();
            (value == "25").then_some(())
        },
    )
    .await;
    eprintln!(
        "reconnect to merged value in the Device: {:?}",
        started.elapsed()
    );
    let device = s.devices().get("thermo-1").await.unwrap();
    let property = &device.spec.properties[0];
    assert_eq!(
        property.collect_cycle,
        Some(10_000_000_000),
        "other fields kept"
    );
    assert_eq!(
        property
            .visitors
            .as_ref()
            .unwrap()
            .config_data
            .as_ref()
            .unwrap()["offset"],
        2
    );

    // The loser: an Event, and the twin's conflicts in both statuses.
    let events = until("the conflict event", Duration::from_secs(10), async || {
        let events = s.events("DesiredConflict", "thermo-1").await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    let note = events[0].note.clone().unwrap();
    assert!(note.contains("\"22\" written by cloud"), "{note}");
    assert!(
        note.contains(&format!("lost to \"25\" written by edge:{}", s.node)),
        "{note}"
    );
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    let conflicts = |status: Option<&TwinStatus>| {
        status
            .and_then(|s| s.twins.iter().find(|t| t.property_name == "temp"))
            .map(|t| t.conflicts.clone())
            .unwrap_or_default()
    };
    let shown = until(
        "the conflict in DeviceStatus",
        Duration::from_secs(20),
        async || {
            let ds = s.statuses().get_opt("thermo-1").await.unwrap()?;
            let c = conflicts(ds.status.as_ref());
            (!c.is_empty()).then_some(c)
        },
    )
    .await;
    assert_eq!(
        (shown[0].value.as_str(), shown[0].winner.as_str()),
        ("22", "25")
    );
    assert_eq!(shown[0].writer, "cloud");
    until(
        "the conflict in Device.status",
        Duration::from_secs(10),
        async || {
            let d = s.devices().get("thermo-1").await.unwrap();
            (!conflicts(d.status.as_ref()).is_empty()).then_some(())
        },
    )
    .await;

    // The written-back value does not bounce as a new cloud write.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let json = s.engine.read_json(&doc).unwrap().unwrap();
    let cloud_writes: Vec<_> = desired::writes(&json)["temp"]
        .iter()
        .filter(|w| w.writer == cloud)
        .map(|w| w.value.clone())
        .collect();
    assert_eq!(cloud_writes, ["22"]);
    let resolved = desired::resolve(&json);
    assert_eq!(resolved["temp"].winner.value, "25");

    // A later change in the API is a new cloud write, and wins.
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "replace", "path": "/spec/properties/0/desired/value", "value": "27"}
    ]))
    .unwrap();
    s.devices()
        .patch(
            "thermo-1",
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .unwrap();
    until(
        "the API's new value at the edge",
        Duration::from_secs(10),
        async || {
            let json = s.edge.read_json(&doc).unwrap()?;
            (desired::resolve(&json).get("temp")?.winner.value == "27").then_some(())
        },
    )
    .await;
    s.cleanup().await;
}

#[tokio::test]
async fn malformed_devices_get_a_warning_and_the_bridge_goes_on() {
    let s = Setup::start("devbad", None, fast()).await;
    // A desired value that is not a string: the API refuses it, saying why.
    let bad = device_yaml("numeric", &s.node, "thermo-model", "30").replace("\"30\"", "30");
    let err = s.create_yaml(&bad).await.unwrap_err();
    assert!(err.to_string().contains("must be of type string"), "{err}");

    // A model that does not exist: a Warning Event; the device still goes
    // to the edge, and its model follows once created.
    s.create_yaml(&device_yaml("orphan", &s.node, "no-such-model", "30"))
        .await
        .unwrap();
    let events = until(
        "the missing-model warning",
        Duration::from_secs(20),
        async || {
            let events = s.events("DeviceModelNotFound", "orphan").await;
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    let note = events[0].note.clone().unwrap();
    assert!(
        note.contains("no-such-model") && note.contains("does not exist"),
        "{note}"
    );

    // No model reference at all: refused with the reason.
    let unmodelled =
        device_yaml("unmodelled", &s.node, "x", "30").replace("  deviceModelRef: {name: x}\n", "");
    s.create_yaml(&unmodelled).await.unwrap();
    let events = until(
        "the invalid-device warning",
        Duration::from_secs(20),
        async || {
            let events = s.events("InvalidDevice", "unmodelled").await;
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    assert!(
        events[0]
            .note
            .as_deref()
            .unwrap()
            .contains("deviceModelRef")
    );
    assert!(
        s.edge
            .read_json(&s.desired_doc("unmodelled"))
            .unwrap()
            .is_none()
    );

    // The bridge goes on: the orphan's model arrives, a good device flows.
    s.create_yaml(
        "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata: {name: no-such-model}\nspec:\n  protocol: modbus\n  properties:\n  - {name: temp, type: INT}\n",
    )
    .await
    .unwrap();
    let model_doc = s.model_doc("no-such-model");
    until(
        "the late model at the edge",
        Duration::from_secs(20),
        async || s.edge.read_json(&model_doc).unwrap(),
    )
    .await;
    s.create_yaml(&device_yaml("good", &s.node, "no-such-model", "31"))
        .await
        .unwrap();
    let good = s.desired_doc("good");
    until(
        "a good device at the edge",
        Duration::from_secs(20),
        async || s.edge.read_json(&good).unwrap(),
    )
    .await;

    // The edge cannot serve a device (its protocol is unknown there): a
    // condition in its status and a Warning Event say why.
    s.create_yaml(&device_yaml("zig", &s.node, "no-such-model", "1").replace("modbus", "zigbee"))
        .await
        .unwrap();
    until(
        "the zigbee device at the edge",
        Duration::from_secs(20),
        async || s.edge.read_json(&s.desired_doc("zig")).unwrap(),
    )
    .await;
    s.edge
        .put(
            &s.reported_doc("zig"),
            &DeviceReportedDoc {
                state: "offline".into(),
                error: Some("device default/zig: unknown protocol \"zigbee\"".into()),
                unservable: true,
                ..Default::default()
            },
        )
        .unwrap();
    let events = until(
        "a ConfigurationInvalid Event",
        Duration::from_secs(20),
        async || {
            let events = s.events("ConfigurationInvalid", "zig").await;
            (!events.is_empty()).then_some(events)
        },
    )
    .await;
    assert!(
        events[0].note.clone().unwrap().contains("zigbee"),
        "{:?}",
        events[0]
    );
    let statuses: Api<DeviceStatus> = Api::namespaced(s.client.clone(), &s.ns);
    // The Event goes out just before the status is written.
    let status = until(
        "the zigbee device's status",
        Duration::from_secs(20),
        async || {
            let status = statuses.get_opt("zig").await.ok()??.status?;
            (!status.conditions.is_empty()).then_some(status)
        },
    )
    .await;
    let ready = &status.conditions[0];
    assert_eq!(
        (
            ready.kind.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "False", "ConfigurationInvalid"),
        "{status:?}"
    );
    assert!(!s.task.is_finished(), "the bridge still runs");
    s.cleanup().await;
}

// Several threads: the edge's and the bridge's replicas work hard here, and
// on one thread their work would delay the writer's API calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_reporting_every_second_stay_within_the_rate() {
    use futures::StreamExt as _;
    const DEVICES: usize = 1000;
    const SECONDS: usize = 10;
    const RATE: f64 = 20.0;
    let s = Setup::start(
        "devmany",
        None,
        BridgeConfig {
            device_status_writes_per_s: RATE,
            ..fast()
        },
    )
    .await;
    s.create_yaml(
        "apiVersion: devices.kubeedge.io/v1beta1\nkind: DeviceModel\nmetadata: {name: thermo-model}\nspec:\n  protocol: modbus\n  properties:\n  - {name: temp, type: INT}\n",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let created: Vec<Result<(), kube::Error>> = futures::stream::iter(0..DEVICES)
        .map(|i| {
            let yaml = device_yaml(&format!("d{i}"), &s.node, "thermo-model", "30");
            let s = &s;
            async move { s.create_yaml(&yaml).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(created.iter().all(Result::is_ok));
    let prefix = format!("device-desired/{}/", s.node);
    until(
        "every device at the edge",
        Duration::from_secs(120),
        async || {
            let n = s.edge.with_replica(|r| r.scan_prefix(&prefix).count());
            (n == DEVICES).then_some(())
        },
    )
    .await;
    eprintln!(
        "{DEVICES} Devices created and at the edge in {:?}",
        started.elapsed()
    );

    let before = s.bridge.device_status_writes();
    let started = Instant::now();
    for second in 0..SECONDS {
        let items: Vec<(DocId, serde_json::Value)> = (0..DEVICES)
            .map(|i| {
                let doc = DeviceReportedDoc {
                    state: "online".into(),
                    last_online_ms: Some(now_ms()),
                    error: None,
                    unservable: false,
                    twins: [(
                        "temp".to_owned(),
                        ReportedValue {
                            value: format!("{second}"),
                            timestamp_ms: now_ms(),
                            kind: Some("INT".into()),
                            observed_desired: None,
                        },
                    )]
                    .into(),
                };
                (
                    s.reported_doc(&format!("d{i}")),
                    serde_json::to_value(doc).unwrap(),
                )
            })
            .collect();
        s.edge.write_many(&items).unwrap();
        tokio::time::sleep_until(started + Duration::from_secs(second as u64 + 1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let writes = s.bridge.device_status_writes() - before;
    let statuses = s.statuses().list(&ListParams::default()).await.unwrap();
    eprintln!(
        "{DEVICES} devices x {SECONDS} reports (one a second) -> {writes} API writes in {elapsed:.1} s ({:.1}/s, limit {RATE}/s); {} DeviceStatus objects so far",
        writes as f64 / elapsed,
        statuses.items.len()
    );
    // Clean up first: a thousand Devices left behind would load every later test.
    s.cleanup().await;
    assert!(
        writes as f64 <= RATE * elapsed + RATE + 1.0,
        "{writes} writes in {elapsed:.1} s exceed {RATE}/s"
    );
    assert!(
        writes as f64 >= RATE * elapsed * 0.5,
        "the writer keeps going: {writes} writes in {elapsed:.1} s"
    );
}
