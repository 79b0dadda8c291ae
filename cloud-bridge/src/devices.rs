//! Devices: KubeEdge Devices and DeviceModels into documents, twins back.
//!
//! The device loop watches Devices and DeviceModels (`devices.kubeedge.io`,
//! installed at start when missing: [`crate::crd::install`]) through
//! reflectors. For each Device whose `spec.nodeName` is a managed edge it
//! writes:
//! - the device-desired document's configuration, read-modify-write so that
//!   the writers' desired-value slots are kept;
//! - the cloud's desired values, through the engine's `set_desired`, only
//!   when the Device's value is a new one (see [`convert::decide`]): the
//!   edge's winning value, once written back to the Device, does not come
//!   back as a cloud write;
//! - the device-model document of its model for that node (one per node
//!   that has a device of the model, as ConfigMaps are written per node).
//!
//! A deleted Device, or one moved to another node, loses its documents
//! (tombstones); a model document goes when no device of that node uses the
//! model any more. Documents of Devices deleted while the bridge was down
//! are swept once the watch has listed every Device.
//!
//! Back to the API:
//! - **twins**: a replica subscription on device-reported documents marks
//!   the device dirty in a [`coalesce::Coalescer`]; one status writer takes
//!   dirty devices in turn and writes each one's *latest* twins to its
//!   `DeviceStatus` object (named like the Device, owned by it) and to the
//!   Device's own `status`, both through the status subresource by
//!   server-side apply (the bridge is their only writer), never faster than
//!   [`crate::BridgeConfig::device_status_writes_per_s`] (a
//!   [`coalesce::TokenBucket`]). A thousand devices reporting every second
//!   cost the API server that many writes a second, no more.
//! - **merged desired values**: when another writer's desired value wins,
//!   it is written to the Device's `spec.properties[i].desired.value` by a
//!   JSON patch that `test`s the property's name and its current value
//!   before it replaces it. That changes exactly one field, keeps every
//!   other field and its owner, and fails (to be decided again on the next
//!   event) if the user changed the value meanwhile. Server-side apply with
//!   force would take the field from the user's field manager, and since
//!   `properties` is an atomic list it would have to send, and take, the
//!   whole list.
//! - **conflicts**: each losing write (who, when, what) becomes a Warning
//!   Event `DesiredConflict` on the Device, and shows in the twin's
//!   `conflicts` in both statuses.
//!
//! A Device that cannot be projected (no model reference, duplicate
//! properties, names that make no document id) or that names a missing
//! model or properties its model lacks gets a Warning Event and a log line
//! once per distinct problem; the bridge goes on with the others.

pub mod coalesce;
pub mod convert;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use outpost_sync::desired::{self, Resolved};
use outpost_sync::document::{DocId, DocKind};
use outpost_sync::hlc::Hlc;
use outpost_sync::schema::{DeviceDesiredDoc, DeviceReportedDoc};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::admission;
use crate::bridge::{Bridge, BridgeError, Edges, next_doc, reflect, retry, slim};
use crate::crd::{self, Device, DeviceModel, DeviceStatus, TwinStatus};
use coalesce::{Coalescer, TokenBucket};
use convert::{DesiredAction, DeviceKey};

/// How long the CRDs get to become Established.
const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failed CRD installation waits before it is tried again.
const CRD_RETRY: Duration = Duration::from_secs(5);
/// The `reportingController` of the bridge's Events.
const REPORTING_CONTROLLER: &str = "outpost.io/outpost-cloud";

/// Runs the device loop and the status writer until a watch or the replica
/// ends.
pub(crate) async fn run(bridge: Bridge) -> Result<(), BridgeError> {
    // The rest of the bridge (nodes, pods) runs meanwhile: a cluster where
    // the CRDs cannot be installed yet only has no devices.
    loop {
        match crd::install(
            &bridge.client,
            &bridge.config.field_manager,
            CRD_ESTABLISHED_TIMEOUT,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => {
                warn!(error = %e, "device CRDs not installed; devices wait");
                tokio::time::sleep(CRD_RETRY).await;
            }
        }
    }
    let client = bridge.client.clone();
    let (devices, device_events) = reflect(
        Api::<Device>::all(client.clone()),
        watcher::Config::default(),
        slim_device,
    );
    let (models, model_events) = reflect(
        Api::<DeviceModel>::all(client),
        watcher::Config::default(),
        slim,
    );
    let queue = Arc::new(StatusQueue::default());
    let rate = bridge.config.device_status_writes_per_s;
    let writer = StatusWriter {
        bridge: bridge.clone(),
        devices: devices.clone(),
        queue: queue.clone(),
        bucket: TokenBucket::new(rate, rate, tokio::time::Instant::now()),
        written: HashMap::new(),
        owned: HashMap::new(),
        problems: HashMap::new(),
    };
    let (retry_tx, retry_rx) = mpsc::unbounded_channel();
    let device_loop = DeviceLoop {
        bridge,
        devices,
        models,
        models_ready: false,
        projected: HashMap::new(),
        model_users: HashMap::new(),
        seen: HashMap::new(),
        published: HashMap::new(),
        warned: HashMap::new(),
        decided: HashMap::new(),
        queue,
        retry_tx,
        retry_rx,
    };
    // Its own task: the device loop's work never holds up the writes.
    let mut writer = AbortOnDrop(tokio::spawn(writer.run()));
    tokio::select! {
        r = device_loop.run(device_events, model_events) => r,
        r = &mut writer.0 => match r {
            Ok(r) => r,
            Err(_) => Err(BridgeError::Ended("the device status writer")),
        },
    }
}

/// Aborts a task when dropped (the bridge stopped).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Devices whose status is to be written, and the writer's wake-up.
#[derive(Default)]
struct StatusQueue {
    dirty: Mutex<Coalescer<DeviceKey>>,
    wake: Notify,
}

impl StatusQueue {
    fn lock(&self) -> MutexGuard<'_, Coalescer<DeviceKey>> {
        self.dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn mark(&self, key: DeviceKey) {
        if self.lock().mark(key) {
            self.wake.notify_one();
        }
    }

    async fn next(&self) -> DeviceKey {
        loop {
            if let Some(key) = self.lock().pop() {
                return key;
            }
            self.wake.notified().await;
        }
    }
}

/// Who a desired-value writer is, for people: `cloud` (this bridge),
/// `edge:<node>`, or the start of an unknown key.
fn writer_name(edges: &Edges, me: &str, writer: &str) -> String {
    if writer == me {
        return "cloud".into();
    }
    edges
        .values()
        .find(|e| e.key.to_string() == writer)
        .map(|e| format!("edge:{}", e.node))
        .unwrap_or_else(|| format!("peer:{}", writer.chars().take(16).collect::<String>()))
}

fn object_ref(device: &Device) -> ObjectRef<Device> {
    ObjectRef::from(device)
}

fn store_key(key: &DeviceKey) -> ObjectRef<Device> {
    ObjectRef::new(&key.name).within(&key.namespace)
}

struct DeviceLoop {
    bridge: Bridge,
    devices: Store<Device>,
    models: Store<DeviceModel>,
    /// Whether the model watch has listed every model (before, a missing
    /// model is not yet a reason to warn).
    models_ready: bool,
    /// Devices with documents: the node and model they were written for.
    projected: HashMap<DeviceKey, (String, String)>,
    /// The devices of each node that use each model: (node, ns, model) → names.
    model_users: HashMap<(String, String, String), BTreeSet<String>>,
    /// Each device's desired values as last seen in the API, by property.
    seen: HashMap<DeviceKey, BTreeMap<String, Option<String>>>,
    /// Losing writes already published as Events: (property, writer, time).
    published: HashMap<DeviceKey, HashSet<(String, String, Hlc)>>,
    /// The last warning given about each device.
    warned: HashMap<DeviceKey, String>,
    /// The heads of each device-desired document when its values were last
    /// decided.
    decided: HashMap<DocId, Vec<[u8; 32]>>,
    queue: Arc<StatusQueue>,
    retry_tx: mpsc::UnboundedSender<DeviceKey>,
    retry_rx: mpsc::UnboundedReceiver<DeviceKey>,
}

impl DeviceLoop {
    fn managed(&self, node: &str) -> bool {
        self.bridge.holds(node)
    }

    async fn run(
        mut self,
        mut device_events: crate::bridge::Events<Device>,
        mut model_events: crate::bridge::Events<DeviceModel>,
    ) -> Result<(), BridgeError> {
        let mut edges_rx = self.bridge.held();
        let mut managed: HashSet<String> = HashSet::new();
        let mut listed = false;
        let mut desired_sub = self.bridge.subscribe([DocKind::DeviceDesired]);
        let mut reported_sub = self.bridge.subscribe([DocKind::DeviceReported]);
        loop {
            tokio::select! {
                changed = edges_rx.changed() => {
                    if changed.is_err() {
                        return Err(BridgeError::Ended("the admission loop"));
                    }
                    let now: HashSet<String> = edges_rx.borrow_and_update().keys().cloned().collect();
                    let added: HashSet<String> = now.difference(&managed).cloned().collect();
                    let gone: HashSet<String> = managed.difference(&now).cloned().collect();
                    managed = now;
                    if !gone.is_empty() {
                        // Handed to another replica: its documents stay.
                        self.forget_nodes(&gone);
                    }
                    if listed && !added.is_empty() {
                        self.sweep(&added);
                    }
                    if !added.is_empty() {
                        for device in self.devices.state() {
                            if device.spec.node_name.as_ref().is_some_and(|n| added.contains(n)) {
                                self.reconcile(&device).await;
                            }
                        }
                    }
                }
                event = device_events.next() => match event {
                    Some(Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d))) => {
                        self.reconcile(&d).await;
                    }
                    Some(Ok(watcher::Event::Delete(d))) => {
                        if let Some(key) = DeviceKey::of(&d) {
                            self.unproject(&key);
                            self.warned.remove(&key);
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        listed = true;
                        self.sweep(&managed);
                        // The store takes a listing's Devices only now (the
                        // loop saw them as they were listed): what looked
                        // them up in the store meanwhile found nothing and
                        // was skipped. Status writes (unchanged statuses
                        // are not written), model checks (warnings are not
                        // repeated) and the edges' desired values (only the
                        // documents that moved) are done again.
                        for key in self.projected.keys() {
                            self.queue.mark(key.clone());
                        }
                        if self.models_ready {
                            self.check_models().await;
                        }
                        self.desired_rescan().await;
                    }
                    Some(Ok(watcher::Event::Init)) => {}
                    Some(Err(e)) => warn!(error = %e, "device watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the device watch")),
                },
                event = model_events.next() => match event {
                    Some(Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m))) => {
                        self.model_changed(&m).await;
                    }
                    Some(Ok(watcher::Event::Delete(m))) => self.model_deleted(&m).await,
                    Some(Ok(watcher::Event::InitDone)) => {
                        self.models_ready = true;
                        // The store is complete now: models of devices
                        // projected during the listing are written.
                        let users: Vec<(String, String, String)> =
                            self.model_users.keys().cloned().collect();
                        for (node, ns, model) in users {
                            self.write_model(&node, &ns, &model);
                        }
                        self.check_models().await;
                    }
                    Some(Ok(watcher::Event::Init)) => {}
                    Some(Err(e)) => warn!(error = %e, "device model watch failed; retrying"),
                    None => return Err(BridgeError::Ended("the device model watch")),
                },
                doc = next_doc(&mut desired_sub) => match doc? {
                    Some(doc) => self.desired_changed(&doc).await,
                    None => self.desired_rescan().await,
                },
                doc = next_doc(&mut reported_sub) => match doc? {
                    Some(doc) => self.reported_changed(&doc),
                    None => {
                        for key in self.projected.keys() {
                            self.queue.mark(key.clone());
                        }
                    }
                },
                Some(key) = self.retry_rx.recv() => {
                    if let Some(device) = self.devices.get(&store_key(&key)) {
                        self.reconcile(&device).await;
                    }
                }
            }
        }
    }

    /// Writes a Device's documents (or removes them when it left its node).
    async fn reconcile(&mut self, device: &Device) {
        let Some(key) = DeviceKey::of(device) else {
            return;
        };
        let node = device.spec.node_name.clone().filter(|n| self.managed(n));
        if let Some((old, _)) = self.projected.get(&key)
            && node.as_ref() != Some(old)
        {
            self.unproject(&key);
        }
        let Some(node) = node else { return };
        let doc = match convert::desired_id(&node, &key) {
            Ok(doc) => doc,
            Err(e) => {
                let problem = convert::DeviceError::from(e).to_string();
                self.warn(device, &key, "InvalidDevice", problem).await;
                return;
            }
        };
        let engine = &self.bridge.engine;
        let slots = match engine.with_replica(|r| r.get::<DeviceDesiredDoc>(&doc)) {
            Ok(existing) => existing.map(|d| d.slots).unwrap_or_default(),
            Err(e) => {
                warn!(%doc, error = %e, "unreadable device-desired document; retrying");
                retry(&self.retry_tx, key, self.bridge.config.retry_after);
                return;
            }
        };
        let config = match convert::desired_config(device, slots) {
            Ok(config) => config,
            Err(e) => {
                self.warn(device, &key, "InvalidDevice", e.to_string())
                    .await;
                return;
            }
        };
        if let Err(e) = engine.put(&doc, &config) {
            warn!(%doc, error = %e, "cannot write device-desired document; retrying");
            retry(&self.retry_tx, key, self.bridge.config.retry_after);
            return;
        }
        self.set_model_user(&key, &node, &config.model);
        self.projected
            .insert(key.clone(), (node.clone(), config.model.clone()));
        self.write_model(&node, &key.namespace, &config.model);
        self.check_model(device).await;
        self.reconcile_desired(device, &key, &node, &doc).await;
        self.queue.mark(key);
    }

    /// Records that `key` on `node` uses `model`, dropping its previous use
    /// (and that model's document when nothing else on the node uses it).
    fn set_model_user(&mut self, key: &DeviceKey, node: &str, model: &str) {
        if let Some((old_node, old_model)) = self.projected.get(key).cloned()
            && (old_node != node || old_model != model)
        {
            self.drop_model_user(key, &old_node, &old_model);
        }
        self.model_users
            .entry((node.to_owned(), key.namespace.clone(), model.to_owned()))
            .or_default()
            .insert(key.name.clone());
    }

    fn drop_model_user(&mut self, key: &DeviceKey, node: &str, model: &str) {
        let users_key = (node.to_owned(), key.namespace.clone(), model.to_owned());
        let Some(users) = self.model_users.get_mut(&users_key) else {
            return;
        };
        users.remove(&key.name);
        if users.is_empty() {
            self.model_users.remove(&users_key);
            if let Ok(doc) = convert::model_id(node, &key.namespace, model) {
                match self.bridge.engine.delete(&doc) {
                    Ok(true) => debug!(%doc, "device model no longer used on the node; deleted"),
                    Ok(false) => {}
                    Err(e) => warn!(%doc, error = %e, "cannot delete device-model document"),
                }
            }
        }
    }

    /// Writes a model's document for a node, if the model exists.
    fn write_model(&self, node: &str, namespace: &str, model: &str) {
        let Some(found) = self.models.get(&ObjectRef::new(model).within(namespace)) else {
            return; // written when it appears
        };
        self.write_model_doc(node, &found);
    }

    /// Writes a model's document for a node from the model itself (the
    /// store holds the initial listing's models only once it is complete).
    fn write_model_doc(&self, node: &str, model: &DeviceModel) {
        let Some(key) = DeviceKey::of(model) else {
            return;
        };
        let Ok(doc) = convert::model_id(node, &key.namespace, &key.name) else {
            return;
        };
        if let Err(e) = self.bridge.engine.put(&doc, &convert::model_doc(model)) {
            warn!(%doc, error = %e, "cannot write device-model document");
        }
    }

    /// Removes a device's documents (it was deleted, or left its node).
    fn unproject(&mut self, key: &DeviceKey) {
        // The writer's turn for it drops what it remembers of the device.
        self.queue.mark(key.clone());
        self.seen.remove(key);
        self.published.remove(key);
        let Some((node, model)) = self.projected.remove(key) else {
            return;
        };
        self.drop_model_user(key, &node, &model);
        if let Ok(doc) = convert::desired_id(&node, key) {
            self.decided.remove(&doc);
            match self.bridge.engine.delete(&doc) {
                Ok(_) => info!(device = %key, %node, "device documents deleted"),
                Err(e) => warn!(%doc, error = %e, "cannot delete device-desired document"),
            }
        }
    }

    /// Stops projecting the devices of nodes this replica no longer holds,
    /// leaving their documents to the replica that does.
    fn forget_nodes(&mut self, nodes: &HashSet<String>) {
        self.projected.retain(|_, (node, _)| !nodes.contains(node));
        self.model_users
            .retain(|(node, _, _), _| !nodes.contains(node));
    }

    /// Once every Device is listed, for the nodes this replica holds:
    /// deletes the documents of devices that are gone (deleted while no
    /// replica held the node) or now elsewhere.
    fn sweep(&mut self, nodes: &HashSet<String>) {
        let engine = &self.bridge.engine;
        for doc in self.bridge.scan(DocKind::DeviceDesired) {
            let Some((node, key)) = convert::split_id(&doc) else {
                continue;
            };
            if !nodes.contains(node) {
                continue;
            }
            let live = self.devices.get(&store_key(&key));
            if live.is_none_or(|d| d.spec.node_name.as_deref() != Some(node))
                && let Ok(true) = engine.delete(&doc)
            {
                info!(%doc, "document of a device that is gone deleted");
            }
        }
        let devices = self.devices.state();
        for doc in self.bridge.scan(DocKind::DeviceModel) {
            let Some((node, model)) = convert::split_id(&doc) else {
                continue;
            };
            if !nodes.contains(node) {
                continue;
            }
            let used = devices.iter().any(|d| {
                d.spec.node_name.as_deref() == Some(node)
                    && d.metadata.namespace.as_deref() == Some(model.namespace.as_str())
                    && convert::model_name(d) == Some(model.name.as_str())
            });
            if !used && let Ok(true) = engine.delete(&doc) {
                info!(%doc, "device-model document no device uses deleted");
            }
        }
    }

    async fn model_changed(&mut self, model: &DeviceModel) {
        let Some(key) = DeviceKey::of(model) else {
            return;
        };
        let nodes: Vec<String> = self
            .model_users
            .keys()
            .filter(|(_, ns, m)| *ns == key.namespace && *m == key.name)
            .map(|(node, _, _)| node.clone())
            .collect();
        for node in nodes {
            self.write_model_doc(&node, model);
        }
        if self.models_ready {
            for device in self.users_of(&key) {
                self.check_model(&device).await;
            }
        }
    }

    async fn model_deleted(&mut self, model: &DeviceModel) {
        let Some(key) = DeviceKey::of(model) else {
            return;
        };
        let nodes: Vec<String> = self
            .model_users
            .keys()
            .filter(|(_, ns, m)| *ns == key.namespace && *m == key.name)
            .map(|(node, _, _)| node.clone())
            .collect();
        for node in nodes {
            if let Ok(doc) = convert::model_id(&node, &key.namespace, &key.name)
                && let Err(e) = self.bridge.engine.delete(&doc)
            {
                warn!(%doc, error = %e, "cannot delete device-model document");
            }
        }
        for device in self.users_of(&key) {
            self.check_model(&device).await;
        }
    }

    /// The Devices that name a model.
    fn users_of(&self, model: &DeviceKey) -> Vec<Arc<Device>> {
        self.devices
            .state()
            .into_iter()
            .filter(|d| {
                d.metadata.namespace.as_deref() == Some(model.namespace.as_str())
                    && convert::model_name(d) == Some(model.name.as_str())
            })
            .collect()
    }

    /// [`Self::check_model`] for every Device in the store.
    async fn check_models(&mut self) {
        for device in self.devices.state() {
            self.check_model(&device).await;
        }
    }

    /// Warns about a projected Device whose model is missing or lacks some
    /// of its properties.
    async fn check_model(&mut self, device: &Device) {
        let Some(key) = DeviceKey::of(device) else {
            return;
        };
        if !self.models_ready || !self.projected.contains_key(&key) {
            return;
        }
        let Some(name) = convert::model_name(device) else {
            return;
        };
        let problem = match self
            .models
            .get(&ObjectRef::new(name).within(&key.namespace))
        {
            None => Some((
                "DeviceModelNotFound",
                format!(
                    "DeviceModel {}/{name} does not exist: the edge gets the device but no model until it is created",
                    key.namespace
                ),
            )),
            Some(model) => {
                let unknown = convert::unknown_properties(device, &model);
                (!unknown.is_empty()).then(|| {
                    (
                        "UnknownDeviceProperty",
                        format!("properties {unknown:?} are not in DeviceModel {name}"),
                    )
                })
            }
        };
        match problem {
            Some((reason, message)) => self.warn(device, &key, reason, message).await,
            None => {
                self.warned.remove(&key);
            }
        }
    }

    /// Logs a problem with a Device and publishes it as a Warning Event,
    /// once per distinct problem.
    async fn warn(&mut self, device: &Device, key: &DeviceKey, reason: &str, message: String) {
        if self.warned.get(key) == Some(&message) {
            return;
        }
        warn!(device = %key, %reason, %message, "device not fully projected");
        publish_event(
            &self.bridge,
            device,
            "Warning",
            reason,
            "Project",
            message.clone(),
        )
        .await;
        self.warned.insert(key.clone(), message);
    }

    /// Decides each property's desired-value flow (see
    /// [`convert::decide`]): new cloud writes to the document, winners of
    /// other writers back to the Device; publishes new conflicts.
    async fn reconcile_desired(
        &mut self,
        device: &Device,
        key: &DeviceKey,
        node: &str,
        doc: &DocId,
    ) {
        let engine = &self.bridge.engine;
        if let Ok(Some(entry)) = engine.with_replica(|r| r.entry(doc)) {
            self.decided.insert(doc.clone(), entry.heads);
        }
        let json = match engine.read_json(doc) {
            Ok(json) => json.unwrap_or_else(|| json!({})),
            Err(e) => {
                warn!(%doc, error = %e, "unreadable device-desired document");
                return;
            }
        };
        let resolved = desired::resolve(&json);
        let me = engine.me().to_string();
        let mut own: BTreeMap<String, desired::DesiredWrite> = BTreeMap::new();
        for (property, writes) in desired::writes(&json) {
            if let Some(w) = writes
                .into_iter()
                .filter(|w| w.writer == me)
                .max_by_key(|w| w.at)
            {
                own.insert(property, w);
            }
        }
        let seen = self.seen.entry(key.clone()).or_default();
        let mut ops = Vec::new();
        let mut failed = false;
        for (i, p) in device.spec.properties.iter().enumerate() {
            let value = p.desired.as_ref().map(|d| d.value.as_str());
            let last = seen.get(&p.name).map(Option::as_deref);
            let own = own.get(&p.name).map(|w| w.value.as_str());
            match convert::decide(value, last, own, resolved.get(&p.name), &me) {
                DesiredAction::None => {}
                DesiredAction::CloudWrite(v) => {
                    let written_ms = spec_written_ms(device, &self.bridge.config.field_manager);
                    if let Err(e) = engine.set_desired_at(doc, &p.name, &v, written_ms) {
                        warn!(%doc, property = %p.name, error = %e, "cannot set desired value; retrying");
                        failed = true;
                        continue;
                    }
                    debug!(device = %key, property = %p.name, value = %v, "desired value from the API");
                }
                DesiredAction::WriteBack { current, winner } => {
                    ops.extend(convert::write_back_ops(
                        i,
                        &p.name,
                        current.as_deref(),
                        &winner,
                    ));
                }
            }
            seen.insert(p.name.clone(), value.map(str::to_owned));
        }
        if !ops.is_empty() && !self.write_back(key, ops).await {
            failed = true;
        }
        if failed {
            retry(&self.retry_tx, key.clone(), self.bridge.config.retry_after);
        }
        self.publish_conflicts(device, key, node, &resolved).await;
    }

    /// Applies a desired-value write-back to a Device; `false` on failure.
    async fn write_back(&self, key: &DeviceKey, ops: Vec<Value>) -> bool {
        let patch: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
            Ok(patch) => patch,
            Err(e) => {
                warn!(device = %key, error = %e, "cannot build the desired-value patch");
                return true; // a bug, not worth retrying
            }
        };
        let api: Api<Device> = Api::namespaced(self.bridge.client.clone(), &key.namespace);
        let params = PatchParams {
            field_manager: Some(self.bridge.config.field_manager.clone()),
            ..PatchParams::default()
        };
        match api
            .patch(&key.name, &params, &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => {
                info!(device = %key, "merged desired value written back to the Device");
                true
            }
            Err(e) if admission::is_status(&e, 404) => true,
            Err(e) => {
                // A failed test (the user changed the value) lands here too:
                // the retry decides again from the Device as it is now.
                debug!(device = %key, error = %e, "desired-value write-back refused; deciding again");
                false
            }
        }
    }

    /// Publishes each losing write not published before as an Event, and
    /// has the status show it.
    async fn publish_conflicts(
        &mut self,
        device: &Device,
        key: &DeviceKey,
        node: &str,
        resolved: &BTreeMap<String, Resolved>,
    ) {
        let me = self.bridge.engine.me().to_string();
        let edges = self.bridge.edges.borrow().clone();
        let published = self.published.entry(key.clone()).or_default();
        // Only losers still visible are remembered (bounded).
        published.retain(|(property, writer, at)| {
            resolved
                .get(property)
                .is_some_and(|r| r.losers.iter().any(|l| l.writer == *writer && l.at == *at))
        });
        let mut notes = Vec::new();
        for (property, r) in resolved {
            for loser in &r.losers {
                if !published.insert((property.clone(), loser.writer.clone(), loser.at)) {
                    continue;
                }
                let conflict = crd::DesiredConflict {
                    writer: writer_name(&edges, &me, &loser.writer),
                    time: convert::hlc_time(loser.at),
                    value: loser.value.clone(),
                    winner: r.winner.value.clone(),
                };
                let winner_by = writer_name(&edges, &me, &r.winner.writer);
                info!(device = %key, %node, %property, loser = %conflict.value, by = %conflict.writer, winner = %conflict.winner, %winner_by, "desired-value conflict");
                notes.push(convert::conflict_note(property, &conflict, &winner_by));
            }
        }
        if notes.is_empty() {
            return;
        }
        for note in notes {
            publish_event(
                &self.bridge,
                device,
                "Warning",
                "DesiredConflict",
                "Resolve",
                note,
            )
            .await;
        }
        self.queue.mark(key.clone());
    }

    /// After a lagged subscription: decides again the device-desired
    /// documents whose heads moved since last decided (an index scan, not a
    /// read of every document: reports of many devices arriving at once make
    /// the shared subscription lag routinely).
    async fn desired_rescan(&mut self) {
        let prefix = format!("{}/", DocKind::DeviceDesired.as_str());
        let moved: Vec<DocId> = self.bridge.engine.with_replica(|r| {
            r.scan_prefix(&prefix)
                .filter_map(Result::ok)
                .filter(|(doc, entry)| self.decided.get(doc) != Some(&entry.heads))
                .map(|(doc, _)| doc)
                .collect()
        });
        for doc in moved {
            self.desired_changed(&doc).await;
        }
    }

    /// A device-desired document changed (an edge's write arrived, or our
    /// own): decide its values again.
    async fn desired_changed(&mut self, doc: &DocId) {
        let Some((node, key)) = convert::split_id(doc) else {
            return;
        };
        let Some(device) = self.devices.get(&store_key(&key)) else {
            return;
        };
        if self.projected.get(&key).is_none_or(|(n, _)| n != node) {
            return;
        }
        let node = node.to_owned();
        self.reconcile_desired(&device, &key, &node, doc).await;
    }

    fn reported_changed(&self, doc: &DocId) {
        let Some((node, key)) = convert::split_id(doc) else {
            return;
        };
        if self.projected.get(&key).is_some_and(|(n, _)| n == node) {
            self.queue.mark(key);
        }
    }
}

/// Publishes an Event about a Device (events.k8s.io/v1); a failure is
/// logged, nothing more.
async fn publish_event(
    bridge: &Bridge,
    device: &Device,
    kind: &str,
    reason: &str,
    action: &str,
    note: String,
) {
    let namespace = device.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", device.name_any(), now.as_nanosecond())),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(kind.to_owned()),
        reason: Some(reason.to_owned()),
        action: Some(action.to_owned()),
        note: Some(note),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(
            format!("{}-{}", bridge.config.field_manager, bridge.engine.me())
                .chars()
                .take(128)
                .collect(),
        ),
        regarding: Some(ObjectReference {
            api_version: Some(Device::api_version(&()).into_owned()),
            kind: Some(Device::kind(&()).into_owned()),
            name: device.metadata.name.clone(),
            namespace: Some(namespace.clone()),
            uid: device.metadata.uid.clone(),
            resource_version: device.metadata.resource_version.clone(),
            ..ObjectReference::default()
        }),
        ..Event::default()
    };
    let api: Api<Event> = Api::namespaced(bridge.client.clone(), &namespace);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        warn!(device = %object_ref(device), %reason, error = %e, "cannot publish event");
    }
}

/// Writes dirty devices' twins to the API, one device at a time, within the
/// token bucket's rate.
struct StatusWriter {
    bridge: Bridge,
    devices: Store<Device>,
    queue: Arc<StatusQueue>,
    bucket: TokenBucket,
    /// The twin status last written per device, with the Device's uid (a
    /// Device created again under the same name gets its status again).
    written: HashMap<DeviceKey, (String, TwinStatus)>,
    /// The Device uid each DeviceStatus object was applied for.
    owned: HashMap<DeviceKey, String>,
    /// The last problem published as an Event per device.
    problems: HashMap<DeviceKey, String>,
}

impl StatusWriter {
    async fn run(mut self) -> Result<(), BridgeError> {
        loop {
            let key = self.queue.next().await;
            if let Err(e) = self.write(&key).await {
                warn!(device = %key, error = %e, "cannot write device status; retrying");
                let (queue, delay) = (self.queue.clone(), self.bridge.config.retry_after);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.mark(key);
                });
            }
        }
    }

    /// Waits for a token and counts the write it pays for.
    async fn token(&mut self) {
        self.bucket.acquire().await;
        self.bridge.metrics.device_status_writes.inc();
    }

    async fn write(&mut self, key: &DeviceKey) -> Result<(), kube::Error> {
        let Some(device) = self.devices.get(&store_key(key)) else {
            self.written.remove(key);
            self.owned.remove(key);
            return Ok(());
        };
        let Some(node) = device.spec.node_name.clone() else {
            return Ok(());
        };
        let Some(uid) = device.metadata.uid.clone() else {
            return Ok(());
        };
        if !self.bridge.holds(&node) {
            self.written.remove(key);
            return Ok(());
        }
        let (Ok(reported_doc), Ok(desired_doc)) = (
            convert::reported_id(&node, key),
            convert::desired_id(&node, key),
        ) else {
            return Ok(());
        };
        let (reported, desired_json) = self.bridge.engine.with_replica(|r| {
            (
                r.get::<DeviceReportedDoc>(&reported_doc),
                r.read_json(&desired_doc),
            )
        });
        let reported = reported.unwrap_or_else(|e| {
            warn!(doc = %reported_doc, error = %e, "unreadable device-reported document");
            None
        });
        let resolved = desired_json
            .ok()
            .flatten()
            .map(|json| desired::resolve(&json))
            .unwrap_or_default();
        let me = self.bridge.engine.me().to_string();
        let edges = self.bridge.edges.borrow().clone();
        let status = convert::twin_status(reported.as_ref(), &resolved, |w| {
            writer_name(&edges, &me, w)
        });
        // A device its node cannot serve, or that stopped answering, is told
        // as a Warning Event, once per distinct problem.
        let problem = status
            .conditions
            .iter()
            .find(|c| c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone().unwrap_or_default()));
        match problem {
            Some((reason, message)) if self.problems.get(key) != Some(&message) => {
                warn!(device = %key, %reason, %message, "device not served");
                let note = format!("node {node}: {message}");
                publish_event(&self.bridge, &device, "Warning", &reason, "Serve", note).await;
                self.problems.insert(key.clone(), message);
            }
            Some(_) => {}
            None => {
                self.problems.remove(key);
            }
        }
        // Nothing reported and no conflict: nothing to say (and a bridge
        // whose replica lacks the report must not blank what another wrote).
        let conflicts = resolved.values().any(|r| !r.losers.is_empty());
        if (reported.is_none() && !conflicts)
            || self
                .written
                .get(key)
                .is_some_and(|(u, written)| *u == uid && *written == status)
        {
            return Ok(());
        }
        let params = PatchParams::apply(&self.bridge.config.field_manager).force();
        let statuses: Api<DeviceStatus> =
            Api::namespaced(self.bridge.client.clone(), &key.namespace);
        if self.owned.get(key) != Some(&uid) {
            let object = json!({
                "apiVersion": DeviceStatus::api_version(&()),
                "kind": DeviceStatus::kind(&()),
                "metadata": {
                    "name": key.name,
                    "namespace": key.namespace,
                    "ownerReferences": [{
                        "apiVersion": Device::api_version(&()),
                        "kind": Device::kind(&()),
                        "name": key.name,
                        "uid": uid,
                        "controller": true,
                    }],
                },
                "spec": {"nodeName": node},
            });
            self.token().await;
            statuses
                .patch(&key.name, &params, &Patch::Apply(&object))
                .await?;
            self.owned.insert(key.clone(), uid.clone());
        }
        let body = |api_version: &str, kind: &str| {
            json!({
                "apiVersion": api_version,
                "kind": kind,
                "metadata": {"name": key.name, "namespace": key.namespace},
                "status": status,
            })
        };
        self.token().await;
        if let Err(e) = statuses
            .patch_status(
                &key.name,
                &params,
                &Patch::Apply(body(
                    &DeviceStatus::api_version(&()),
                    &DeviceStatus::kind(&()),
                )),
            )
            .await
        {
            // Gone (deleted by hand, or with an earlier Device of this
            // name): applied again on the retry.
            self.owned.remove(key);
            return Err(e);
        }
        let devices: Api<Device> = Api::namespaced(self.bridge.client.clone(), &key.namespace);
        self.token().await;
        match devices
            .patch_status(
                &key.name,
                &params,
                &Patch::Apply(body(&Device::api_version(&()), &Device::kind(&()))),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if admission::is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e),
        }
        debug!(device = %key, twins = status.twins.len(), "device status written");
        self.written.insert(key.clone(), (uid, status));
        Ok(())
    }
}

/// A Device as the device loop keeps it: [`slim`], except that of its
/// `managedFields` it keeps each spec writer's name and time (not the
/// fields), for [`spec_written_ms`].
fn slim_device(device: &mut Device) {
    let writers: Option<Vec<ManagedFieldsEntry>> =
        device.metadata.managed_fields.take().map(|entries| {
            entries
                .into_iter()
                .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
                .map(|m| ManagedFieldsEntry {
                    manager: m.manager,
                    time: m.time,
                    ..Default::default()
                })
                .collect()
        });
    slim(device);
    device.metadata.managed_fields = writers;
}

/// When a Device's spec was last written by anyone but the bridge (its
/// `managedFields`, which the API server keeps to the second): the latest
/// moment of that second, in ms. A desired value taken from the spec is
/// stamped then rather than when the bridge records it.
fn spec_written_ms(device: &Device, bridge_manager: &str) -> Option<u64> {
    device
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some(bridge_manager))
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|m| m.time.as_ref())
        .filter_map(|t| u64::try_from(t.0.as_millisecond()).ok())
        .max()
        .map(|ms| ms - ms % 1000 + 999)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(managed: Value) -> Device {
        serde_json::from_value(json!({
            "apiVersion": "devices.kubeedge.io/v1beta1",
            "kind": "Device",
            "metadata": {"name": "fan", "namespace": "default", "managedFields": managed},
            "spec": {"deviceModelRef": {"name": "fan-model"}, "nodeName": "edge-1"},
        }))
        .unwrap()
    }

    #[test]
    fn the_spec_write_time_is_the_latest_writer_but_the_bridge_and_survives_slimming() {
        let mut d = device(json!([
            {"manager": "kubectl-edit", "operation": "Update", "time": "2026-11-26T04:00:05Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:properties": {}}}},
            {"manager": "outpost-cloud", "operation": "Apply", "time": "2026-11-26T04:00:09Z",
             "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}},
            {"manager": "outpost-cloud", "operation": "Apply", "time": "2026-11-26T04:00:20Z",
             "subresource": "status", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}},
            {"manager": "kubectl-client-side-apply", "operation": "Update", "time": "2026-11-26T04:00:01Z"},
        ]));
        let at = "2026-11-26T04:00:05Z".parse::<Timestamp>().unwrap();
        let expected = u64::try_from(at.as_millisecond()).unwrap() + 999;
        assert_eq!(spec_written_ms(&d, "outpost-cloud"), Some(expected));
        slim_device(&mut d);
        let kept = d.metadata.managed_fields.as_ref().unwrap();
        assert_eq!(kept.len(), 3, "the status writer is dropped");
        assert!(kept.iter().all(|m| m.fields_v1.is_none()));
        assert_eq!(spec_written_ms(&d, "outpost-cloud"), Some(expected));
        assert_eq!(spec_written_ms(&device(json!([])), "outpost-cloud"), None);
    }
}
