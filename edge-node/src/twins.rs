//! Device twins: the node's devices, read and written through in-process
//! mapper drivers, from the replica alone.
//!
//! For every `device-desired/<node>/<ns>/<name>` document of this node (and
//! the `device-model/<node>/<ns>/<model>` document it names) the manager
//! builds the protocol's driver ([`outpost_mappers::spec::build`]) and runs
//! it in its own task ([`outpost_mappers::device::spawn`]). Then:
//!
//! - **Reported values**: every reading is kept in memory and the device's
//!   `device-reported` document is written once per report cycle (the
//!   smallest `reportCycle` of its properties, else its collect cycle), with
//!   the value, the read time, the type and the desired value the device
//!   last accepted. Properties with `reportToCloud: false` are read and kept
//!   for local apps but not written. A change of online/offline state is
//!   written at once.
//! - **Desired values**: the document's desired values are resolved by the
//!   conflict rule ([`outpost_sync::desired::resolve`]); a winner the device
//!   has not accepted yet is written to it. A write that fails is retried
//!   with back-off (immediately when the device comes back online); a write
//!   the driver refuses before sending (read-only property, out of range) is
//!   not retried until the desired value changes.
//! - **Configuration changes** (protocol, visitors, cycles, model) restart
//!   the device's driver; a deleted document stops it and deletes the
//!   device's reported document.
//!
//! A device whose configuration cannot be used (unknown protocol, a
//! property missing from the model, a bad visitor) is reported `offline`
//! with the reason, and the other devices go on. The manager's state is
//! published as a [`TwinView`] for the MQTT event bus and the local API.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use outpost_mappers::device::{self, DeviceHandle, DeviceSender, Report};
use outpost_mappers::dmi::v1beta1;
use outpost_mappers::driver::{DeviceState, Reading, WriteError};
use outpost_mappers::property::{PropertySpec, Value};
use outpost_mappers::spec::{self, DeviceSpec, ModelSpec, PropertyBinding};
use outpost_sync::document::{DocId, DocKind, Owner};
use outpost_sync::engine::Engine;
use outpost_sync::replica::{Scope, SubscriptionError};
use outpost_sync::schema::{DeviceDesiredDoc, DeviceModelDoc, DeviceReportedDoc, ReportedValue};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::clock::now_ms;

/// How the twin manager runs.
#[derive(Debug, Clone)]
pub struct TwinConfig {
    /// This node's name.
    pub node: String,
    /// First retry delay of a failed desired-value write.
    pub retry_base: Duration,
    /// Longest retry delay of a failed desired-value write.
    pub retry_max: Duration,
    /// How often the documents are re-read even without a change.
    pub resync_interval: Duration,
    /// Where the drivers' operations are counted, if anywhere.
    pub mapper_metrics: Option<crate::metrics::MapperMetrics>,
}

impl TwinConfig {
    /// Defaults for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            resync_interval: Duration::from_secs(30),
            mapper_metrics: None,
        }
    }
}

/// One property of a device as the node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PropertyTwin {
    /// The last value read, with its time and type.
    pub reported: Option<ReportedValue>,
    /// The desired value that wins by the conflict rule, if any.
    pub desired: Option<String>,
    /// The desired value the device last accepted.
    pub applied: Option<String>,
    /// Why the last read or desired write of this property failed.
    pub error: Option<String>,
    /// The model's type (`INT`, `FLOAT`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether the model allows writes.
    pub writable: bool,
}

/// A device as the node sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTwin {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The model's name.
    pub model: String,
    /// The protocol.
    pub protocol: String,
    /// `online`, `offline` or `unknown`.
    pub state: String,
    /// When the device last answered (ms since the epoch).
    pub last_online_ms: Option<u64>,
    /// Why the device is not served or last went offline.
    pub error: Option<String>,
    /// Its properties by name.
    pub properties: PropertyMap,
}

/// A device's properties by name, in name order, in one vector.
///
/// A `BTreeMap` allocates room for eleven entries in its first node however
/// few it holds: 2.5 KB for a device with one property, 2.5 MB for a
/// thousand such devices. Devices have a few properties to a few dozen, so a
/// sorted vector searched by halves is as quick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PropertyMap(Vec<(String, PropertyTwin)>);

impl PropertyMap {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    /// The property called `name`.
    pub fn get(&self, name: &str) -> Option<&PropertyTwin> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    /// The property called `name`, to change.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut PropertyTwin> {
        self.find(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Whether there is a property called `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }

    /// Adds or replaces a property; returns the one replaced.
    pub fn insert(&mut self, name: String, property: PropertyTwin) -> Option<PropertyTwin> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, property)),
            Err(i) => {
                self.0.insert(i, (name, property));
                None
            }
        }
    }

    /// Keeps the properties `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&String, &mut PropertyTwin) -> bool) {
        self.0.retain_mut(|(n, p)| keep(n, p));
    }

    /// Frees the room no property uses.
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    /// The properties, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &PropertyTwin)> {
        self.0.iter().map(|(n, p)| (n, p))
    }

    /// The properties, in name order, to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut PropertyTwin)> {
        self.0.iter_mut().map(|(n, p)| (&*n, p))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(n, _)| n)
    }

    /// How many properties there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Index<&str> for PropertyMap {
    type Output = PropertyTwin;

    /// The property called `name`; panics when there is none, as a map's
    /// index does (for tests and callers that checked).
    fn index(&self, name: &str) -> &PropertyTwin {
        match self.get(name) {
            Some(p) => p,
            None => panic!("no property {name:?}"),
        }
    }
}

impl<'a> IntoIterator for &'a PropertyMap {
    type Item = (&'a String, &'a PropertyTwin);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, PropertyTwin)>,
        fn(&'a (String, PropertyTwin)) -> (&'a String, &'a PropertyTwin),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(n, p)| (n, p))
    }
}

impl FromIterator<(String, PropertyTwin)> for PropertyMap {
    fn from_iter<I: IntoIterator<Item = (String, PropertyTwin)>>(iter: I) -> Self {
        let mut map = PropertyMap::default();
        for (name, property) in iter {
            map.insert(name, property);
        }
        map.shrink_to_fit();
        map
    }
}

impl Serialize for PropertyMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl DeviceTwin {
    /// `namespace/name`, KubeEdge's device id.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The node's devices by id (`namespace/name`).
pub type Twins = BTreeMap<String, DeviceTwin>;

/// A read-only view of the twins, updated as they change, and a stream of
/// the ids of devices that changed.
#[derive(Debug, Clone)]
pub struct TwinView {
    twins: watch::Receiver<Twins>,
    changes: broadcast::Sender<String>,
    reports: mpsc::Sender<Report>,
    control: mpsc::Sender<Control>,
}

impl TwinView {
    /// The twins now.
    pub fn snapshot(&self) -> Twins {
        self.twins.borrow().clone()
    }

    /// Reads the twins in place, without a copy (a thousand devices' twins
    /// are about a megabyte). The manager waits to publish a change while
    /// `read` runs: keep it short, and do not await in it.
    pub fn read<R>(&self, read: impl FnOnce(&Twins) -> R) -> R {
        read(&self.twins.borrow())
    }

    /// One device's twin.
    pub fn device(&self, id: &str) -> Option<DeviceTwin> {
        self.twins.borrow().get(id).cloned()
    }

    /// The ids of devices whose twin changes from now on (a reading, a
    /// state, a desired value, the device itself).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// A watch of the whole map (wakes on every change).
    pub fn watch(&self) -> watch::Receiver<Twins> {
        self.twins.clone()
    }

    /// Hands the devices of `protocol` to the external mapper at `socket`
    /// (from now on, until the agent restarts) and returns them, with their
    /// models, as DMI messages.
    pub(crate) async fn register_mapper(
        &self,
        protocol: &str,
        socket: PathBuf,
    ) -> Option<(Vec<v1beta1::DeviceModel>, Vec<v1beta1::Device>)> {
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::Register {
                protocol: protocol.to_ascii_lowercase(),
                socket,
                reply,
            })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// A report from an external mapper, taken as a driver's.
    pub(crate) async fn report(&self, report: Report) {
        let _ = self.reports.send(report).await;
    }

    /// A value of a property reported by a local app (KubeEdge's twin
    /// `actual`), taken as if the driver had read it.
    pub async fn report_actual(
        &self,
        device: &str,
        property: &str,
        value: &str,
    ) -> Result<(), LocalWriteError> {
        let twin = self
            .device(device)
            .ok_or_else(|| LocalWriteError::UnknownDevice(device.to_owned()))?;
        if !twin.properties.contains_key(property) {
            return Err(LocalWriteError::UnknownProperty {
                device: device.to_owned(),
                property: property.to_owned(),
            });
        }
        let report = Report::Values {
            device: device.to_owned(),
            readings: vec![Reading {
                property: property.to_owned(),
                value: Ok(Value::String(value.to_owned())),
            }],
        };
        self.reports
            .send(report)
            .await
            .map_err(|_| LocalWriteError::Store("the twin manager has stopped".into()))
    }
}

/// The running twin manager. Dropping it stops the devices.
pub struct TwinManager {
    tasks: JoinSet<()>,
    view: TwinView,
}

impl std::fmt::Debug for TwinManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinManager").finish_non_exhaustive()
    }
}

impl TwinManager {
    /// Starts serving the devices of `config.node` found in `engine`'s
    /// replica.
    pub fn spawn(engine: Engine, config: TwinConfig) -> Self {
        let (twins_tx, twins_rx) = watch::channel(Twins::new());
        let (changes, _) = broadcast::channel(1024);
        let (reports_tx, reports_rx) = mpsc::channel(1024);
        let (control_tx, control_rx) = mpsc::channel(16);
        let view = TwinView {
            twins: twins_rx,
            changes: changes.clone(),
            reports: reports_tx.clone(),
            control: control_tx,
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(run(
            engine,
            config,
            twins_tx,
            changes,
            (reports_tx, reports_rx),
            control_rx,
        ));
        Self { tasks, view }
    }

    /// The twins, for the event bus and the local API.
    pub fn view(&self) -> TwinView {
        self.view.clone()
    }

    /// Stops every device and waits for the manager's task.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// The ids of a device's documents the manager writes.
#[derive(Debug, Clone)]
struct DocIds {
    reported: DocId,
}

/// A desired write in flight or waiting for a retry.
#[derive(Debug, Clone)]
struct Pending {
    value: String,
    attempts: u32,
    /// When to try again; `None` while in flight.
    retry_at: Option<Instant>,
    /// Refused before sending: wait for another value.
    refused: bool,
}

/// A device the manager serves. Its twin is kept once, in the published
/// map ([`Manager::twins`]), and changed there in place.
struct Running {
    ids: DocIds,
    /// A hash of what the driver was built from: a change restarts it.
    /// `None` forces a restart.
    fingerprint: Option<blake3::Hash>,
    handle: Option<DeviceHandle>,
    /// Its protocol, as the device document names it.
    protocol: String,
    /// The external mapper serving it, instead of a driver.
    external: Option<Box<External>>,
    report_every: Duration,
    next_report: Instant,
    /// Properties written to the reported document.
    to_cloud: Vec<String>,
    dirty: bool,
    pending: HashMap<String, Pending>,
}

/// An external mapper serving a device, and the documents the device was
/// started from, for the mapper's messages. Only such devices keep their
/// documents (with a thousand devices served in-process, a megabyte).
struct External {
    socket: PathBuf,
    desired: DeviceDesiredDoc,
    model: Option<DeviceModelDoc>,
}

/// The end of a desired-value write.
pub(crate) struct WriteDone {
    pub(crate) device: String,
    pub(crate) property: String,
    pub(crate) value: String,
    pub(crate) result: Result<(), WriteError>,
}

/// Requests to the manager from the DMI server.
#[derive(Debug)]
pub(crate) enum Control {
    /// An external mapper registered for a protocol: its devices move to it;
    /// the reply carries them (and their models) as DMI messages.
    Register {
        protocol: String,
        socket: PathBuf,
        reply: oneshot::Sender<(Vec<v1beta1::DeviceModel>, Vec<v1beta1::Device>)>,
    },
}

struct Manager {
    engine: Engine,
    config: TwinConfig,
    /// External mappers by protocol (lower case): their sockets.
    externals: HashMap<String, PathBuf>,
    /// While an external mapper registers: its protocol. Devices of it
    /// (re)started then are not announced one by one: the registration's
    /// reply carries them all.
    registering: Option<String>,
    devices: BTreeMap<String, Running>,
    reports_tx: mpsc::Sender<Report>,
    done_tx: mpsc::Sender<WriteDone>,
    twins: watch::Sender<Twins>,
    changes: broadcast::Sender<String>,
}

async fn run(
    engine: Engine,
    config: TwinConfig,
    twins: watch::Sender<Twins>,
    changes: broadcast::Sender<String>,
    (reports_tx, mut reports_rx): (mpsc::Sender<Report>, mpsc::Receiver<Report>),
    mut control_rx: mpsc::Receiver<Control>,
) {
    // Desired values and models change seldom, and a lag re-reads every
    // twin: a queue of 256 is plenty.
    let mut sub = engine.with_replica(|r| {
        r.subscribe_scope_queued(
            Scope::all()
                .kinds([DocKind::DeviceDesired, DocKind::DeviceModel])
                .node(config.node.clone()),
            256,
        )
    });
    let (done_tx, mut done_rx) = mpsc::channel(256);
    let mut resync = tokio::time::interval(config.resync_interval);
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut m = Manager {
        engine,
        config,
        externals: HashMap::new(),
        registering: None,
        devices: BTreeMap::new(),
        reports_tx,
        done_tx,
        twins,
        changes,
    };
    loop {
        tokio::select! {
            _ = resync.tick() => m.sync_all(),
            doc = sub.recv() => match doc {
                Ok(doc) => {
                    // Drain what else changed, then sync once.
                    let mut docs = vec![doc];
                    while let Ok(Some(more)) = sub.try_recv() {
                        docs.push(more);
                    }
                    if docs.iter().any(|d| d.kind() == DocKind::DeviceModel) {
                        m.sync_all();
                    } else {
                        for d in docs {
                            m.sync_device(&d);
                        }
                    }
                }
                Err(SubscriptionError::Lagged(_)) => m.sync_all(),
                Err(SubscriptionError::Closed) => {
                    info!("the replica closed: stopping devices");
                    return;
                }
            },
            Some(report) = reports_rx.recv() => m.on_report(report),
            Some(control) = control_rx.recv() => m.on_control(control),
            Some(done) = done_rx.recv() => m.on_write_done(done),
            _ = tick.tick() => m.on_tick(),
        }
    }
}

fn device_doc_ids(engine: &Engine, node: &str) -> Vec<DocId> {
    let prefix = format!("{}/{node}/", DocKind::DeviceDesired.as_str());
    engine.with_replica(|r| {
        r.scan_prefix(&prefix)
            .filter_map(Result::ok)
            .map(|(id, _)| id)
            .collect()
    })
}

/// `(namespace, name)` of a device-desired document id of `node`.
fn parse_id(doc: &DocId, node: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = doc.as_str().split('/').collect();
    match parts.as_slice() {
        [_, n, ns, name] if *n == node => Some(((*ns).to_owned(), (*name).to_owned())),
        _ => None,
    }
}

/// A device's report cycle: the smallest `reportCycle` of the properties
/// that report, else its collect cycle.
fn report_cycle(doc: &DeviceDesiredDoc, collect: Duration) -> Duration {
    doc.properties
        .iter()
        .filter(|p| p.report_to_cloud != Some(false))
        .filter_map(|p| p.report_cycle.and_then(spec::collect_cycle))
        .min()
        .unwrap_or(collect)
        .max(Duration::from_millis(50))
}

/// The driver's inputs: the Device and its model, in the mappers' terms.
fn specs(doc: &DeviceDesiredDoc, model: &DeviceModelDoc) -> (DeviceSpec, ModelSpec) {
    let device = DeviceSpec {
        name: doc.name.clone(),
        namespace: doc.namespace.clone(),
        model: doc.model.clone(),
        protocol: doc.protocol.protocol_name.clone(),
        protocol_config: doc.protocol.config_data.clone(),
        properties: doc
            .properties
            .iter()
            .map(|p| PropertyBinding {
                name: p.name.clone(),
                visitor: p.visitors.config_data.clone(),
                collect_cycle: p.collect_cycle.unwrap_or(0),
                desired: None,
            })
            .collect(),
    };
    let model_spec = ModelSpec {
        name: model.name.clone(),
        namespace: model.namespace.clone(),
        properties: Vec::new(),
    };
    (device, model_spec)
}

/// The model's properties in the mappers' terms; a bad one is an error
/// naming it.
fn model_properties(model: &DeviceModelDoc) -> Result<Vec<PropertySpec>, String> {
    model
        .properties
        .iter()
        .map(|p| {
            PropertySpec::from_model(
                &p.name,
                &p.kind,
                p.access_mode.as_deref().unwrap_or(""),
                p.minimum.as_deref().unwrap_or(""),
                p.maximum.as_deref().unwrap_or(""),
            )
            .map_err(|e| format!("model {}: {e}", model.name))
        })
        .collect()
}

impl Manager {
    fn sync_all(&mut self) {
        let ids = device_doc_ids(&self.engine, &self.config.node);
        let present: HashSet<String> = ids
            .iter()
            .filter_map(|d| parse_id(d, &self.config.node))
            .map(|(ns, name)| format!("{ns}/{name}"))
            .collect();
        let gone: Vec<String> = self
            .devices
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        for doc in ids {
            self.sync_device(&doc);
        }
    }

    fn sync_device(&mut self, doc: &DocId) {
        if doc.kind() != DocKind::DeviceDesired {
            return;
        }
        let Some((ns, name)) = parse_id(doc, &self.config.node) else {
            return;
        };
        let id = format!("{ns}/{name}");
        let desired = match self.engine.with_replica(|r| r.get::<DeviceDesiredDoc>(doc)) {
            Ok(Some(d)) => d,
            Ok(None) => {
                self.remove(&id);
                return;
            }
            Err(e) => {
                warn!(%doc, error = %e, "device document cannot be read; the device is left as it is");
                return;
            }
        };
        let Ok(reported) = DocId::new(
            DocKind::DeviceReported,
            Owner::Node(&self.config.node),
            &[ns.as_str(), name.as_str()],
        ) else {
            return;
        };
        let ids = DocIds { reported };
        let model = self.read_model(&ns, &desired.model);
        let mut config = desired.clone();
        config.slots.clear();
        // Hashed: the JSON of a device and its model is a kilobyte, and one
        // is kept per device.
        let fingerprint = blake3::hash(
            serde_json::to_string(&(&config, &model))
                .unwrap_or_default()
                .as_bytes(),
        );
        let restart = self
            .devices
            .get(&id)
            .is_none_or(|d| d.fingerprint != Some(fingerprint));
        if restart {
            self.start(&id, ids, fingerprint, &desired, model);
        }
        self.update_desired(&id, &desired);
    }

    fn read_model(&self, ns: &str, model: &str) -> Result<DeviceModelDoc, String> {
        if model.is_empty() {
            return Err("the device names no model".into());
        }
        let id = DocId::new(
            DocKind::DeviceModel,
            Owner::Node(&self.config.node),
            &[ns, model],
        )
        .map_err(|e| format!("model {model}: {e}"))?;
        match self.engine.with_replica(|r| r.get::<DeviceModelDoc>(&id)) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(format!("model {ns}/{model} is not on this node (yet)")),
            Err(e) => Err(format!("model {ns}/{model} cannot be read: {e}")),
        }
    }

    /// (Re)starts a device's driver from its documents.
    fn start(
        &mut self,
        id: &str,
        ids: DocIds,
        fingerprint: blake3::Hash,
        desired: &DeviceDesiredDoc,
        model: Result<DeviceModelDoc, String>,
    ) {
        let previous = self.devices.remove(id);
        if let Some(prev) = &previous {
            if let Some(h) = &prev.handle {
                h.stop();
            }
            info!(device = %id, "device configuration changed: restarting its driver");
        }
        let mut twin = DeviceTwin {
            namespace: desired.namespace.clone(),
            name: desired.name.clone(),
            model: desired.model.clone(),
            protocol: desired.protocol.protocol_name.clone(),
            state: DeviceState::Unknown.as_str().into(),
            ..Default::default()
        };
        // Keep what is known across a restart of the driver (and from the
        // reported document, across a restart of the agent).
        let known: Option<DeviceReportedDoc> = self
            .engine
            .with_replica(|r| r.get::<DeviceReportedDoc>(&ids.reported))
            .ok()
            .flatten();
        let mut collect = Duration::from_secs(1);
        let model_doc = model.as_ref().ok().cloned();
        let built = model.and_then(|model| {
            let props = model_properties(&model)?;
            let (device, mut model_spec) = specs(desired, &model);
            model_spec.properties = props;
            for (p, declared) in model_spec.properties.iter().zip(&model.properties) {
                twin.properties.insert(
                    p.name.clone(),
                    PropertyTwin {
                        // The type as the model spells it (`INT`).
                        kind: declared.kind.clone(),
                        writable: p.access != outpost_mappers::property::AccessMode::ReadOnly,
                        ..Default::default()
                    },
                );
            }
            // Model properties the device does not bind are not read.
            twin.properties
                .retain(|name, _| desired.properties.iter().any(|p| &p.name == name));
            twin.properties.shrink_to_fit();
            spec::build(&device, &model_spec).map_err(|e| e.to_string())
        });
        if let Some(known) = known {
            twin.last_online_ms = known.last_online_ms;
            for (name, value) in known.twins {
                if let Some(p) = twin.properties.get_mut(&name) {
                    p.applied.clone_from(&value.observed_desired);
                    p.reported = Some(value);
                }
            }
        }
        if previous.is_some() {
            let twins = self.twins.borrow();
            if let Some(prev) = twins.get(id) {
                for (name, p) in &prev.properties {
                    if let Some(now) = twin.properties.get_mut(name) {
                        now.reported.clone_from(&p.reported);
                        now.applied.clone_from(&p.applied);
                    }
                }
                twin.last_online_ms = prev.last_online_ms.or(twin.last_online_ms);
            }
        }
        let mut external = self
            .externals
            .get(&twin.protocol.to_ascii_lowercase())
            .cloned();
        let handle = match built {
            Ok(_) if external.is_some() => {
                // Checked here, served there.
                info!(device = %id, protocol = %twin.protocol, "device served by an external mapper");
                None
            }
            Ok((driver, mut run)) => {
                collect = run.collect_cycle;
                run.observer = self
                    .config
                    .mapper_metrics
                    .as_ref()
                    .map(|m| m.observer(&twin.protocol));
                info!(device = %id, protocol = %twin.protocol, "serving device");
                Some(device::spawn(id, driver, run, self.reports_tx.clone()))
            }
            Err(reason) => {
                external = None;
                warn!(device = %id, %reason, "device cannot be served");
                twin.state = DeviceState::Offline.as_str().into();
                twin.error = Some(reason);
                None
            }
        };
        let to_cloud = desired
            .properties
            .iter()
            .filter(|p| p.report_to_cloud != Some(false))
            .map(|p| p.name.clone())
            .collect();
        let report_every = report_cycle(desired, collect);
        if let (Some(socket), Some(model), true) = (
            &external,
            &model_doc,
            announces(self.registering.as_deref(), &twin.protocol),
        ) {
            let messages = (
                crate::dmi::model_proto(model),
                crate::dmi::device_proto(desired, &BTreeMap::new()),
            );
            crate::dmi::send_register(socket.clone(), messages);
        }
        self.devices.insert(
            id.to_owned(),
            Running {
                ids,
                fingerprint: Some(fingerprint),
                handle,
                protocol: desired.protocol.protocol_name.clone(),
                external: external.map(|socket| {
                    Box::new(External {
                        socket,
                        desired: desired.clone(),
                        model: model_doc,
                    })
                }),
                report_every,
                next_report: Instant::now(),
                to_cloud,
                dirty: true,
                pending: HashMap::new(),
            },
        );
        let changed = self.twins.send_if_modified(|t| {
            if t.get(id) == Some(&twin) {
                false
            } else {
                t.insert(id.to_owned(), twin);
                true
            }
        });
        if changed {
            let _ = self.changes.send(id.to_owned());
        }
    }

    fn remove(&mut self, id: &str) {
        let Some(dev) = self.devices.remove(id) else {
            return;
        };
        if let Some(h) = &dev.handle {
            h.stop();
        }
        if let Some(ext) = &dev.external {
            crate::dmi::send_remove(
                ext.socket.clone(),
                ext.desired.namespace.clone(),
                ext.desired.name.clone(),
            );
        }
        info!(device = %id, "device removed from this node: driver stopped");
        if let Err(e) = self.engine.delete(&dev.ids.reported) {
            warn!(doc = %dev.ids.reported, error = %e, "cannot delete the reported document");
        }
        self.twins.send_modify(|t| {
            t.remove(id);
        });
        let _ = self.changes.send(id.to_owned());
    }

    /// Resolves the desired values and starts writes the device has not
    /// accepted yet.
    fn update_desired(&mut self, id: &str, doc: &DeviceDesiredDoc) {
        let Ok(json) = serde_json::to_value(doc) else {
            return;
        };
        let resolved = outpost_sync::desired::resolve(&json);
        let Some(dev) = self.devices.get_mut(id) else {
            return;
        };
        // (property, desired, applied) of every property with a desired value.
        let mut wanted: Vec<(String, String, Option<String>)> = Vec::new();
        let changed = edit_twin(&self.twins, &self.changes, id, |twin| {
            let mut changed = false;
            for (name, p) in twin.properties.iter_mut() {
                let winner = resolved.get(name).map(|r| r.winner.value.clone());
                if p.desired != winner {
                    changed = true;
                    p.desired = winner;
                }
                if let Some(want) = &p.desired {
                    wanted.push((name.clone(), want.clone(), p.applied.clone()));
                }
            }
            changed
        });
        if changed {
            dev.dirty = true;
        }
        let now = Instant::now();
        for (name, want, applied) in &wanted {
            if applied.as_ref() == Some(want) {
                dev.pending.remove(name);
                continue;
            }
            match dev.pending.get(name) {
                Some(pending) if &pending.value == want => {}
                _ => {
                    dev.pending.insert(
                        name.clone(),
                        Pending {
                            value: want.clone(),
                            attempts: 0,
                            retry_at: Some(now),
                            refused: false,
                        },
                    );
                }
            }
        }
        self.start_due_writes(id);
    }

    fn start_due_writes(&mut self, id: &str) {
        let Some(dev) = self.devices.get_mut(id) else {
            return;
        };
        let now = Instant::now();
        if let Some(ext) = &dev.external {
            if !announces(self.registering.as_deref(), &dev.protocol) {
                return;
            }
            // One UpdateDevice carries every desired value; the mapper
            // writes those new to it.
            let due: Vec<(String, String)> = dev
                .pending
                .iter_mut()
                .filter(|(_, p)| !p.refused && p.retry_at.is_some_and(|at| at <= now))
                .map(|(name, p)| {
                    p.retry_at = None;
                    p.attempts += 1;
                    (name.clone(), p.value.clone())
                })
                .collect();
            if !due.is_empty() {
                let desired = desired_values(&self.twins, id);
                let message = crate::dmi::device_proto(&ext.desired, &desired);
                crate::dmi::send_update(
                    ext.socket.clone(),
                    id.to_owned(),
                    message,
                    due,
                    self.done_tx.clone(),
                );
            }
            return;
        }
        let Some(sender) = dev.handle.as_ref().map(DeviceHandle::sender) else {
            return;
        };
        for (name, pending) in dev.pending.iter_mut() {
            if pending.refused || pending.retry_at.is_none_or(|at| at > now) {
                continue;
            }
            pending.retry_at = None;
            pending.attempts += 1;
            spawn_write(
                sender.clone(),
                id.to_owned(),
                name.clone(),
                pending.value.clone(),
                self.done_tx.clone(),
            );
        }
    }

    fn on_write_done(&mut self, done: WriteDone) {
        let (base, max) = (self.config.retry_base, self.config.retry_max);
        let Some(dev) = self.devices.get_mut(&done.device) else {
            return;
        };
        let current = dev.pending.get(&done.property).map(|p| p.value.clone());
        match done.result {
            Ok(()) => {
                info!(device = %done.device, property = %done.property, value = %done.value, "desired value applied");
                edit_twin(&self.twins, &self.changes, &done.device, |twin| {
                    let Some(p) = twin.properties.get_mut(&done.property) else {
                        return false;
                    };
                    p.applied = Some(done.value.clone());
                    p.error = None;
                    true
                });
                dev.dirty = true;
                if current.as_ref() == Some(&done.value) {
                    dev.pending.remove(&done.property);
                }
            }
            Err(e) => {
                let refused = matches!(e, WriteError::Refused(_) | WriteError::UnknownProperty(_));
                edit_twin(&self.twins, &self.changes, &done.device, |twin| {
                    let Some(p) = twin.properties.get_mut(&done.property) else {
                        return false;
                    };
                    let error = Some(format!("desired value {:?}: {e}", done.value));
                    let changed = p.error != error;
                    p.error = error;
                    changed
                });
                if let Some(pending) = dev.pending.get_mut(&done.property)
                    && pending.value == done.value
                {
                    pending.refused = refused;
                    let delay = base
                        .saturating_mul(1u32 << pending.attempts.min(16).saturating_sub(1))
                        .min(max);
                    pending.retry_at = Some(Instant::now() + delay);
                    if pending.attempts == 1 || refused {
                        warn!(device = %done.device, property = %done.property, value = %done.value, error = %e,
                            retry = !refused, "desired value not applied");
                    } else {
                        debug!(device = %done.device, property = %done.property, error = %e, retry_in = ?delay, "desired value not applied");
                    }
                } else if current.is_some() {
                    // A newer value is waiting: start it now.
                    if let Some(p) = dev.pending.get_mut(&done.property) {
                        p.retry_at = Some(Instant::now());
                    }
                }
            }
        }
        let id = done.device.clone();
        self.start_due_writes(&id);
    }

    fn on_report(&mut self, report: Report) {
        match report {
            Report::Values { device, readings } => {
                let Some(dev) = self.devices.get_mut(&device) else {
                    return;
                };
                let now = now_ms();
                let changed = edit_twin(&self.twins, &self.changes, &device, |twin| {
                    let mut changed = false;
                    for r in readings {
                        let Some(p) = twin.properties.get_mut(&r.property) else {
                            continue;
                        };
                        changed = true;
                        match r.value {
                            Ok(v) => {
                                p.reported = Some(ReportedValue {
                                    value: v.to_string(),
                                    timestamp_ms: now,
                                    kind: Some(p.kind.clone()),
                                    observed_desired: p.applied.clone(),
                                });
                                p.error = None;
                                twin.last_online_ms = Some(now);
                            }
                            Err(e) => p.error = Some(e.to_string()),
                        }
                    }
                    changed
                });
                if changed {
                    dev.dirty = true;
                }
            }
            Report::State {
                device,
                state,
                error,
            } => {
                let Some(dev) = self.devices.get_mut(&device) else {
                    return;
                };
                info!(device = %device, state = state.as_str(), error = error.as_deref().unwrap_or(""), "device state");
                edit_twin(&self.twins, &self.changes, &device, |twin| {
                    twin.state = state.as_str().into();
                    twin.error = error;
                    if state == DeviceState::Online {
                        twin.last_online_ms = Some(now_ms());
                    }
                    true
                });
                if state == DeviceState::Online {
                    // Writes waiting for the device go now.
                    let now = Instant::now();
                    for p in dev.pending.values_mut() {
                        if p.retry_at.is_some() && !p.refused {
                            p.retry_at = Some(now);
                        }
                    }
                }
                // A state change is reported at once.
                dev.dirty = true;
                dev.next_report = Instant::now();
                self.write_reported(&device);
                self.start_due_writes(&device);
            }
        }
    }

    fn on_control(&mut self, control: Control) {
        match control {
            Control::Register {
                protocol,
                socket,
                reply,
            } => {
                info!(%protocol, socket = %socket.display(), "external mapper registered");
                self.externals.insert(protocol.clone(), socket);
                // Its devices restart as external ones (no fingerprint
                // forces it); none is announced twice: the reply carries
                // them all.
                for d in self.devices.values_mut() {
                    if d.protocol.eq_ignore_ascii_case(&protocol) {
                        d.fingerprint = None;
                    }
                }
                // Restart them without announcing each: the reply does.
                // Devices of other protocols that restart meanwhile are
                // announced as usual.
                self.registering = Some(protocol.clone());
                self.sync_all();
                self.registering = None;
                // Collected after: a device of the protocol first started
                // by this very sync is in the reply too.
                let ids: Vec<String> = self
                    .devices
                    .iter()
                    .filter(|(_, d)| d.protocol.eq_ignore_ascii_case(&protocol))
                    .map(|(id, _)| id.clone())
                    .collect();
                let mut models = BTreeMap::new();
                let mut devices = Vec::new();
                for id in ids {
                    let Some(d) = self.devices.get_mut(&id) else {
                        continue;
                    };
                    let Some(ext) = &d.external else {
                        continue; // its configuration cannot be used: not sent
                    };
                    let desired = desired_values(&self.twins, &id);
                    // The mapper writes these itself when it serves the device.
                    edit_twin(&self.twins, &self.changes, &id, |twin| {
                        let mut changed = false;
                        for (name, value) in &desired {
                            if let Some(p) = twin.properties.get_mut(name)
                                && p.applied.as_ref() != Some(value)
                            {
                                p.applied = Some(value.clone());
                                changed = true;
                            }
                        }
                        changed
                    });
                    d.pending.clear();
                    if let Some(m) = &ext.model {
                        models.insert(
                            (m.namespace.clone(), m.name.clone()),
                            crate::dmi::model_proto(m),
                        );
                    }
                    devices.push(crate::dmi::device_proto(&ext.desired, &desired));
                    d.dirty = true;
                }
                let _ = reply.send((models.into_values().collect(), devices));
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| d.dirty && d.next_report <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.write_reported(&id);
        }
        let retries: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| {
                d.pending
                    .values()
                    .any(|p| !p.refused && p.retry_at.is_some_and(|at| at <= now))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in retries {
            self.start_due_writes(&id);
        }
    }

    fn write_reported(&mut self, id: &str) {
        let Some(dev) = self.devices.get_mut(id) else {
            return;
        };
        let doc = {
            let twins = self.twins.borrow();
            let Some(twin) = twins.get(id) else {
                return;
            };
            DeviceReportedDoc {
                state: twin.state.clone(),
                error: twin.error.clone(),
                unservable: dev.handle.is_none() && dev.external.is_none(),
                last_online_ms: twin.last_online_ms,
                twins: twin
                    .properties
                    .iter()
                    .filter(|(name, _)| dev.to_cloud.contains(name))
                    .filter_map(|(name, p)| {
                        let mut v = p.reported.clone()?;
                        v.observed_desired.clone_from(&p.applied);
                        Some((name.clone(), v))
                    })
                    .collect(),
            }
        };
        dev.dirty = false;
        dev.next_report = Instant::now() + dev.report_every;
        if let Err(e) = self.engine.put(&dev.ids.reported, &doc) {
            warn!(doc = %dev.ids.reported, error = %e, "cannot write reported values");
            dev.dirty = true;
        }
    }
}

/// Changes a device's twin in place in the published map; `change` says
/// whether it changed anything, and subscribers hear only of changes.
/// Returns whether it did.
fn edit_twin(
    twins: &watch::Sender<Twins>,
    changes: &broadcast::Sender<String>,
    id: &str,
    change: impl FnOnce(&mut DeviceTwin) -> bool,
) -> bool {
    let changed = twins.send_if_modified(|t| t.get_mut(id).is_some_and(change));
    if changed {
        let _ = changes.send(id.to_owned());
    }
    changed
}

/// Whether a device of `protocol` (re)started now is announced to its
/// external mapper, while the mapper of `registering` (if any) registers.
fn announces(registering: Option<&str>, protocol: &str) -> bool {
    registering.is_none_or(|p| !p.eq_ignore_ascii_case(protocol))
}

/// A device's desired values by property.
fn desired_values(twins: &watch::Sender<Twins>, id: &str) -> BTreeMap<String, String> {
    twins.borrow().get(id).map_or_else(BTreeMap::new, |twin| {
        twin.properties
            .iter()
            .filter_map(|(n, p)| Some((n.clone(), p.desired.clone()?)))
            .collect()
    })
}

fn spawn_write(
    sender: DeviceSender,
    device: String,
    property: String,
    value: String,
    done: mpsc::Sender<WriteDone>,
) {
    tokio::spawn(async move {
        let result = match sender.write(&property, &value).await {
            Ok(r) => r,
            Err(stopped) => Err(WriteError::Transport(stopped.to_string())),
        };
        let _ = done
            .send(WriteDone {
                device,
                property,
                value,
                result,
            })
            .await;
    });
}

/// A desired value set by a local app (MQTT, local API): checked against
/// the device's model, then written as this node's desired value.
pub fn set_local_desired(
    engine: &Engine,
    view: &TwinView,
    node: &str,
    device: &str,
    property: &str,
    value: &str,
) -> Result<(), LocalWriteError> {
    let twin = view
        .device(device)
        .ok_or_else(|| LocalWriteError::UnknownDevice(device.to_owned()))?;
    let p = twin
        .properties
        .get(property)
        .ok_or_else(|| LocalWriteError::UnknownProperty {
            device: device.to_owned(),
            property: property.to_owned(),
        })?;
    if !p.writable {
        return Err(LocalWriteError::ReadOnly {
            device: device.to_owned(),
            property: property.to_owned(),
        });
    }
    let doc = DocId::new(
        DocKind::DeviceDesired,
        Owner::Node(node),
        &[twin.namespace.as_str(), twin.name.as_str()],
    )
    .map_err(|e| LocalWriteError::Store(e.to_string()))?;
    engine
        .set_desired(&doc, property, value)
        .map_err(|e| LocalWriteError::Store(e.to_string()))?;
    Ok(())
}

/// Why a local desired write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalWriteError {
    /// No such device on this node.
    #[error("no device {0} on this node")]
    UnknownDevice(String),
    /// The device has no such property.
    #[error("device {device} has no property {property}")]
    UnknownProperty {
        /// The device.
        device: String,
        /// The property.
        property: String,
    },
    /// The model says read-only.
    #[error("property {property} of device {device} is read-only")]
    ReadOnly {
        /// The device.
        device: String,
        /// The property.
        property: String,
    },
    /// The replica refused the write.
    #[error("the write could not be stored: {0}")]
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_sync::schema::{DeviceProperty, ModelProperty, ProtocolConfig};
    use serde_json::json;

    fn doc() -> DeviceDesiredDoc {
        DeviceDesiredDoc {
            namespace: "default".into(),
            name: "thermo".into(),
            model: "thermo-model".into(),
            protocol: ProtocolConfig {
                protocol_name: "modbus".into(),
                config_data: json!({"ip": "127.0.0.1", "port": 1502}),
            },
            properties: vec![
                DeviceProperty {
                    name: "temp".into(),
                    report_cycle: Some(2_000_000_000),
                    ..Default::default()
                },
                DeviceProperty {
                    name: "secret".into(),
                    report_cycle: Some(100_000_000),
                    report_to_cloud: Some(false),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn report_cycle_is_the_smallest_of_reporting_properties() {
        assert_eq!(
            report_cycle(&doc(), Duration::from_secs(1)),
            Duration::from_secs(2)
        );
        let mut d = doc();
        d.properties.clear();
        assert_eq!(
            report_cycle(&d, Duration::from_millis(700)),
            Duration::from_millis(700)
        );
    }

    #[test]
    fn properties_stay_in_name_order_and_serialize_as_a_map() {
        let p = |kind: &str| PropertyTwin {
            kind: kind.into(),
            ..Default::default()
        };
        let mut map: PropertyMap = [
            ("temp".to_string(), p("FLOAT")),
            ("fan".to_string(), p("INT")),
        ]
        .into_iter()
        .collect();
        assert_eq!(map.insert("mode".into(), p("STRING")), None);
        assert_eq!(
            map.insert("fan".into(), p("BOOLEAN")).map(|old| old.kind),
            Some("INT".into())
        );
        assert_eq!(map.keys().collect::<Vec<_>>(), ["fan", "mode", "temp"]);
        assert_eq!(map["fan"].kind, "BOOLEAN");
        assert!(map.get("nope").is_none() && !map.contains_key("nope"));
        map.get_mut("mode").expect("mode").writable = true;
        map.retain(|name, _| name != "temp");
        assert_eq!(map.len(), 2);
        let json = serde_json::to_value(&map).expect("json");
        assert_eq!(json["mode"]["writable"], true);
        assert_eq!(json.as_object().map(|o| o.len()), Some(2));
    }

    #[test]
    fn ids_of_other_nodes_are_not_ours() {
        let mine: DocId = "device-desired/edge-1/default/thermo".parse().unwrap();
        let other: DocId = "device-desired/edge-2/default/thermo".parse().unwrap();
        assert_eq!(
            parse_id(&mine, "edge-1"),
            Some(("default".into(), "thermo".into()))
        );
        assert_eq!(parse_id(&other, "edge-1"), None);
    }

    #[test]
    fn a_bad_model_is_an_error_naming_it() {
        let model = DeviceModelDoc {
            namespace: "default".into(),
            name: "m".into(),
            protocol: "modbus".into(),
            properties: vec![ModelProperty {
                name: "temp".into(),
                kind: "COMPLEX".into(),
                ..Default::default()
            }],
        };
        let e = model_properties(&model).unwrap_err();
        assert!(e.contains("model m"), "{e}");
    }
}
