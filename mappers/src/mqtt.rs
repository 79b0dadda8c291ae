//! The MQTT driver, with rumqttc: devices that publish JSON telemetry and
//! take commands on a topic.
//!
//! Protocol configData: `{broker: "host:port", telemetryTopic, commandTopic,
//! clientId, qos (0 or 1), timeoutMs, userName, password}`. Visitor
//! configData: `{jsonKey: "temp"}` (a dotted path such as `env.temp` reaches
//! into nested objects), with an optional numeric `scale`.
//!
//! - Telemetry: every message on `telemetryTopic` is a JSON object; each
//!   property takes the value at its key, converted to its type (and scaled).
//!   A read returns the latest values; changes also come out of
//!   [`Driver::take_changes`]. A payload that is not a JSON object is counted
//!   and logged, and leaves the last good values alone; a key whose value is of
//!   the wrong type makes that property's reading a decode error.
//! - Commands: a write publishes `{"<property>": <value>}` to `commandTopic`,
//!   after the model's checks.
//! - Connections are shared: every MQTT device of the process with the same
//!   broker, credentials and client settings (the connect timeout) uses one
//!   MQTT connection, which takes the `clientId` of the device that opened
//!   it. Incoming messages are dispatched to devices by exact topic; several
//!   devices may take the same topic. A device is connected once the broker
//!   acknowledged its subscription, and leaves the connection when its driver
//!   disconnects or is dropped; the connection closes with its last device.
//! - rumqttc neither backs off nor resubscribes after a clean-session
//!   reconnect. Here a connection's event loop ends at the first connection
//!   error and every device on it goes down at once; each device task
//!   reconnects with its own jittered backoff (so each device goes offline
//!   by its own count of failures), the first one opens a new connection and
//!   every device subscribes its topic again on it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode};
use serde_json::Value as Json;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::config::{ConfigData, ConfigError};
use crate::driver::{
    ChangeSender, Changes, ConnectError, Driver, Health, PropertyError, ReadError, Reading,
    WriteError, change_channel,
};
use crate::property::{DataType, PropertySpec, Value, ValueError};

/// Where the broker is and which topics the device uses.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id (unique per broker).
    pub client_id: String,
    /// The topic the device publishes telemetry on.
    pub telemetry_topic: String,
    /// The topic the device takes commands on.
    pub command_topic: Option<String>,
    /// QoS of the subscription and of commands.
    pub qos: QoS,
    /// Bound on connecting and on handing a command to the client.
    pub timeout: Duration,
    /// User name and password.
    pub credentials: Option<(String, String)>,
}

impl MqttConfig {
    /// Reads a Device's protocol configData (see the module docs).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ConfigError> {
        let c = ConfigData::new(config)?;
        let broker = c.required_string("broker")?;
        let stripped = broker
            .strip_prefix("mqtt://")
            .or_else(|| broker.strip_prefix("tcp://"))
            .unwrap_or(broker);
        let (host, port) = match stripped.rsplit_once(':') {
            Some((h, p)) => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| ConfigError::Invalid {
                    key: "broker",
                    expected: "host:port",
                    found: broker.to_owned(),
                })?,
            ),
            None => (stripped, 1883),
        };
        let qos = match c.bounded("qos", 2)?.unwrap_or(1) {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        let credentials = match c.string("userName")? {
            Some(u) => Some((u.to_owned(), c.string("password")?.unwrap_or("").to_owned())),
            None => None,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            client_id: c.string("clientId")?.map_or_else(
                || format!("outpost-mapper-{}", fastrand::u64(..)),
                str::to_owned,
            ),
            telemetry_topic: c.required_string("telemetryTopic")?.to_owned(),
            command_topic: c.string("commandTopic")?.map(str::to_owned),
            qos,
            timeout: Duration::from_millis(c.bounded("timeoutMs", 600_000)?.unwrap_or(2000).max(1)),
            credentials,
        })
    }
}

/// A visitor that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("property {property}: {reason}")]
pub struct VisitorError {
    /// The property.
    pub property: String,
    /// Why.
    pub reason: String,
}

/// One property of an MQTT device: where it is in the telemetry JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttProperty {
    /// The model's view.
    pub spec: PropertySpec,
    /// The path of keys to the value.
    pub path: Vec<String>,
    /// Numeric scale applied to values read (and divided out of commands).
    pub scale: f64,
}

impl MqttProperty {
    /// Reads a visitor's configData: `{jsonKey, scale}`.
    pub fn from_config(
        spec: PropertySpec,
        config: &serde_json::Value,
    ) -> Result<Self, VisitorError> {
        let err = |reason: String| VisitorError {
            property: spec.name.clone(),
            reason,
        };
        let c = ConfigData::new(config).map_err(|e| err(e.to_string()))?;
        let key = c
            .string("jsonKey")
            .map_err(|e| err(e.to_string()))?
            .unwrap_or(&spec.name);
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(err(format!("jsonKey {key:?} is not a dotted path of keys")));
        }
        let scale = c
            .f64("scale")
            .map_err(|e| err(e.to_string()))?
            .unwrap_or(1.0);
        if scale == 0.0 {
            return Err(err("scale must not be 0".into()));
        }
        let path = key.split('.').map(str::to_owned).collect();
        Ok(Self { spec, path, scale })
    }

    /// Extracts and converts this property from a telemetry object; `None`
    /// when the message does not carry it.
    pub fn extract(&self, message: &Json) -> Option<Result<Value, PropertyError>> {
        let mut at = message;
        for key in &self.path {
            at = at.get(key)?;
        }
        Some(json_to_value(self.spec.data_type, self.scale, at))
    }
}

fn json_to_value(data_type: DataType, scale: f64, json: &Json) -> Result<Value, PropertyError> {
    let wrong = || {
        let mut text = json.to_string();
        text.truncate(64);
        PropertyError::Decode(format!("{text} is not a {data_type} value"))
    };
    let number = || -> Result<f64, PropertyError> {
        match json {
            Json::Number(n) => n.as_f64().ok_or_else(wrong),
            Json::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(wrong),
            _ => Err(wrong()),
        }
    };
    match data_type {
        DataType::Int => {
            if scale == 1.0 {
                match json {
                    Json::Number(n) => n.as_i64().map(Value::Int).ok_or_else(wrong),
                    Json::String(s) => s.trim().parse::<i64>().map(Value::Int).map_err(|_| wrong()),
                    _ => Err(wrong()),
                }
            } else {
                Ok(Value::Double(number()? * scale))
            }
        }
        DataType::Float => {
            #[allow(clippy::cast_possible_truncation)]
            let v = (number()? * scale) as f32;
            Ok(Value::Float(v))
        }
        DataType::Double => Ok(Value::Double(number()? * scale)),
        DataType::String => match json {
            Json::String(s) => Ok(Value::String(s.clone())),
            _ => Err(wrong()),
        },
        DataType::Boolean => match json {
            Json::Bool(b) => Ok(Value::Boolean(*b)),
            _ => Err(wrong()),
        },
        DataType::Bytes => match json {
            Json::String(s) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map(Value::Bytes)
                    .map_err(|_| wrong())
            }
            _ => Err(wrong()),
        },
    }
}

fn value_to_json(value: &Value, scale: f64) -> Json {
    match value {
        Value::Int(i) if scale == 1.0 => Json::from(*i),
        Value::String(s) => Json::from(s.clone()),
        Value::Boolean(b) => Json::from(*b),
        Value::Bytes(_) => Json::from(value.to_string()),
        other => other.as_f64().map_or(Json::Null, |n| Json::from(n / scale)),
    }
}

/// Counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Times this device joined a connection (subscribed and acknowledged).
    pub connects: u64,
    /// Telemetry messages that were not JSON objects.
    pub malformed: u64,
    /// Telemetry messages taken.
    pub messages: u64,
}

#[derive(Default)]
struct Shared {
    /// The latest value of each property, by its place in the device's
    /// properties; empty until the first message. A vector, not a map: a
    /// map's first table is 180 bytes for a device of one property.
    latest: Vec<Option<Result<Value, PropertyError>>>,
    stats: MqttStats,
}

/// Where a device's telemetry goes: what the shared connection's task needs
/// to take a message for it.
struct Sink {
    properties: Vec<MqttProperty>,
    shared: Mutex<Shared>,
    changes: ChangeSender,
}

// ------------------------------------------------------------ shared connections

/// What makes two devices' connections interchangeable: the same broker,
/// the same credentials and the same client settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct HubKey {
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    timeout: Duration,
}

impl HubKey {
    fn of(config: &MqttConfig) -> Self {
        Self {
            host: config.host.clone(),
            port: config.port,
            credentials: config.credentials.clone(),
            timeout: config.timeout,
        }
    }
}

/// The state of a shared connection. It is never revived: once down, the
/// next device to connect opens a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HubStatus {
    Connecting,
    Up,
    Down(String),
}

/// One device's subscription on a shared connection.
struct Route {
    id: u64,
    sink: Arc<Sink>,
    /// Told whether the broker took the subscription, at its first
    /// acknowledgement. A oneshot, not a watch per device: once the
    /// subscription stands, the device's link is the connection's
    /// ([`Hub::up`]), and 1,000 devices' watches would take 370 KB.
    ack: Option<oneshot::Sender<bool>>,
}

#[derive(Default)]
struct Routes {
    next_id: u64,
    /// Devices by telemetry topic (several devices may share a topic).
    by_topic: HashMap<String, Vec<Route>>,
    /// Topics of subscribe requests handed to the client and not yet seen
    /// leaving, oldest first.
    sent: VecDeque<String>,
    /// Topics of subscribes on the wire, by packet id. rumqttc cycles packet
    /// ids within its inflight window, so one id may carry several.
    on_wire: HashMap<u16, VecDeque<String>>,
}

/// One MQTT connection shared by every device of the process with the same
/// [`HubKey`]; incoming messages are dispatched to devices by topic.
struct Hub {
    key: HubKey,
    client: AsyncClient,
    status: watch::Receiver<HubStatus>,
    /// Whether the connection is up: every device's link on it.
    up: watch::Receiver<bool>,
    routes: Arc<Mutex<Routes>>,
    task: JoinHandle<()>,
}

/// Live shared connections, by key. Entries are weak: the connection closes
/// when its last device lets go of it.
static HUBS: OnceLock<Mutex<HashMap<HubKey, Weak<Hub>>>> = OnceLock::new();

fn hubs() -> std::sync::MutexGuard<'static, HashMap<HubKey, Weak<Hub>>> {
    HUBS.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shared connections of this process that are open or opening to `host:port`.
pub fn connections(host: &str, port: u16) -> usize {
    hubs()
        .iter()
        .filter(|(k, _)| k.host == host && k.port == port)
        .filter_map(|(_, w)| w.upgrade())
        .filter(|h| !h.is_down())
        .count()
}

/// rumqttc's request channel: subscribes of many devices starting at once
/// wait for room (see [`Hub::subscribe`]); it allocates only as it fills.
const REQUEST_CAPACITY: usize = 64;
/// Unacknowledged QoS 1/2 publishes (commands) at once; rumqttc keeps a slot
/// for each.
const INFLIGHT: u16 = 16;
/// Largest packet either way.
const MAX_PACKET: usize = 256 * 1024;

impl Hub {
    /// The live connection for `config`'s key, or a new one.
    fn for_config(config: &MqttConfig) -> Arc<Self> {
        let key = HubKey::of(config);
        let mut hubs = hubs();
        if let Some(hub) = hubs.get(&key).and_then(Weak::upgrade)
            && !hub.is_down()
        {
            return hub;
        }
        hubs.retain(|_, w| w.strong_count() > 0);
        let hub = Arc::new(Self::start(config, key.clone()));
        hubs.insert(key, Arc::downgrade(&hub));
        hub
    }

    fn start(config: &MqttConfig, key: HubKey) -> Self {
        // The connection takes the client id of the device that opens it.
        let mut options = MqttOptions::new(&config.client_id, &key.host, key.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_inflight(INFLIGHT)
            .set_request_channel_capacity(REQUEST_CAPACITY);
        if let Some((user, password)) = &key.credentials {
            options.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(options, REQUEST_CAPACITY);
        let mut network = rumqttc::NetworkOptions::new();
        // Small messages answered one by one: Nagle only adds latency.
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(key.timeout.as_secs().max(1));
        events.set_network_options(network);
        let (status_tx, status) = watch::channel(HubStatus::Connecting);
        let (up_tx, up) = watch::channel(false);
        let routes = Arc::new(Mutex::new(Routes::default()));
        let task = tokio::spawn(drive(
            events,
            HubGuard {
                routes: routes.clone(),
                status: status_tx,
                up: up_tx,
            },
            format!("{}:{}", key.host, key.port),
        ));
        Self {
            key,
            client,
            status,
            up,
            routes,
            task,
        }
    }

    fn is_down(&self) -> bool {
        matches!(*self.status.borrow(), HubStatus::Down(_)) || self.task.is_finished()
    }

    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add_route(&self, topic: &str, sink: Arc<Sink>) -> (u64, oneshot::Receiver<bool>) {
        let (ack, rx) = oneshot::channel();
        let mut routes = self.routes();
        routes.next_id += 1;
        let id = routes.next_id;
        routes
            .by_topic
            .entry(topic.to_owned())
            .or_default()
            .push(Route {
                id,
                sink,
                ack: Some(ack),
            });
        (id, rx)
    }

    fn remove_route(&self, topic: &str, id: u64) {
        let mut routes = self.routes();
        let Some(list) = routes.by_topic.get_mut(topic) else {
            return;
        };
        list.retain(|r| r.id != id);
        if list.is_empty() {
            routes.by_topic.remove(topic);
            // Best effort: a message for a topic nobody takes is dropped.
            if !self.is_down() {
                let _ = self.client.try_unsubscribe(topic);
            }
        }
    }

    /// Hands a subscribe to the client and records it, under one lock, so
    /// that the connection's task finds the topic when the request leaves.
    /// Waits (polling) while the request channel is full.
    async fn subscribe(&self, topic: &str, qos: QoS) -> Result<(), ConnectError> {
        loop {
            {
                let mut routes = self.routes();
                if self.client.try_subscribe(topic, qos).is_ok() {
                    routes.sent.push_back(topic.to_owned());
                    return Ok(());
                }
            }
            if self.is_down() {
                return Err(ConnectError::Transport("connection ended".into()));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        // The last device let go: say goodbye, or just close.
        if self.is_down() || self.client.try_disconnect().is_err() {
            self.task.abort();
        }
        debug!(broker = %format_args!("{}:{}", self.key.host, self.key.port), "MQTT connection closed");
    }
}

/// Owned by the connection's task: when the task ends, however it ends
/// (an error, an abort, its runtime shutting down), the connection is down
/// and so is every device on it.
struct HubGuard {
    routes: Arc<Mutex<Routes>>,
    status: watch::Sender<HubStatus>,
    up: watch::Sender<bool>,
}

impl HubGuard {
    fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for HubGuard {
    fn drop(&mut self) {
        self.status.send_if_modified(|s| {
            if matches!(s, HubStatus::Down(_)) {
                false
            } else {
                *s = HubStatus::Down("connection closed".into());
                true
            }
        });
        self.up.send_replace(false);
        // Devices still waiting for their subscription hear that the
        // connection ended.
        for route in self.routes().by_topic.values_mut().flatten() {
            route.ack = None;
        }
    }
}

/// The shared connection's event loop: ends at the first connection error
/// (rumqttc neither backs off nor resubscribes; devices reconnect with their
/// own backoff and the first of them opens a new connection).
async fn drive(mut events: rumqttc::EventLoop, guard: HubGuard, broker: String) {
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                debug!(%broker, "MQTT connection up");
                guard.status.send_replace(HubStatus::Up);
                guard.up.send_replace(true);
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                let mut routes = guard.routes();
                if let Some(topic) = routes.sent.pop_front() {
                    routes.on_wire.entry(pkid).or_default().push_back(topic);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| !matches!(c, SubscribeReasonCode::Failure));
                let mut routes = guard.routes();
                let topic = routes
                    .on_wire
                    .get_mut(&ack.pkid)
                    .and_then(VecDeque::pop_front);
                if routes
                    .on_wire
                    .get(&ack.pkid)
                    .is_some_and(VecDeque::is_empty)
                {
                    routes.on_wire.remove(&ack.pkid);
                }
                let Some(topic) = topic else { continue };
                if !ok {
                    warn!(%broker, %topic, "the broker refused the subscription");
                }
                for route in routes.by_topic.get_mut(&topic).into_iter().flatten() {
                    if let Some(ack) = route.ack.take() {
                        let _ = ack.send(ok);
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Take the sinks out of the lock: parsing happens outside it.
                let sinks: Vec<Arc<Sink>> = guard
                    .routes()
                    .by_topic
                    .get(p.topic.as_str())
                    .into_iter()
                    .flatten()
                    .map(|r| r.sink.clone())
                    .collect();
                for sink in sinks {
                    take_message(
                        &p.payload,
                        &sink.properties,
                        &sink.shared,
                        &sink.changes,
                        &p.topic,
                    );
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                guard
                    .status
                    .send_replace(HubStatus::Down("disconnected".into()));
                break;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(%broker, error = %e, "MQTT connection ended");
                guard.status.send_replace(HubStatus::Down(e.to_string()));
                break;
            }
        }
    }
}

/// A device's place on a shared connection; dropping it leaves.
struct Connection {
    hub: Arc<Hub>,
    topic: String,
    route: u64,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.hub.remove_route(&self.topic, self.route);
    }
}

/// An MQTT device.
pub struct MqttDriver {
    config: MqttConfig,
    sink: Arc<Sink>,
    specs: Vec<PropertySpec>,
    conn: Option<Connection>,
    health: Health,
    changes_rx: Option<Changes>,
}

impl std::fmt::Debug for MqttDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttDriver")
            .field(
                "broker",
                &format_args!("{}:{}", self.config.host, self.config.port),
            )
            .field("telemetry_topic", &self.config.telemetry_topic)
            .field("connected", &self.is_connected())
            .finish()
    }
}

/// Telemetry changes a device may have waiting before newer ones are dropped
/// (reads still return the latest values).
const CHANGES_CAPACITY: usize = 32;

impl MqttDriver {
    /// A driver for the given properties (not yet connected).
    pub fn new(config: MqttConfig, properties: Vec<MqttProperty>) -> Self {
        let specs = properties.iter().map(|p| p.spec.clone()).collect();
        let (changes, changes_rx) = change_channel(CHANGES_CAPACITY);
        Self {
            config,
            sink: Arc::new(Sink {
                properties,
                shared: Mutex::default(),
                changes,
            }),
            specs,
            conn: None,
            health: Health::default(),
            changes_rx: Some(changes_rx),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> MqttStats {
        self.sink.shared.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Leaves the connection; it closes when no device uses it any more.
    pub async fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Joins the shared connection for this device's broker (opening it if
    /// needed), subscribes the telemetry topic and waits for the broker's
    /// acknowledgement.
    async fn join(&self) -> Result<Connection, ConnectError> {
        let ended = |why: &str| ConnectError::Transport(why.to_owned());
        let hub = Hub::for_config(&self.config);
        let mut status = hub.status.clone();
        let came_up = status
            .wait_for(|s| *s != HubStatus::Connecting)
            .await
            .map(|s| s.clone());
        match came_up {
            Ok(HubStatus::Down(why)) => return Err(ended(&why)),
            Err(_) => return Err(ended("connection ended")),
            Ok(_) => {}
        }
        let topic = self.config.telemetry_topic.clone();
        let (route, ack) = hub.add_route(&topic, self.sink.clone());
        let conn = Connection {
            hub: hub.clone(),
            topic: topic.clone(),
            route,
        };
        hub.subscribe(&topic, self.config.qos).await?;
        tokio::select! {
            acked = ack => match acked {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ended(&format!("the broker refused the subscription to {topic}")));
                }
                Err(_) => return Err(ended("connection ended")),
            },
            down = status.wait_for(|s| matches!(s, HubStatus::Down(_))) => {
                let why = match down.as_deref() {
                    Ok(HubStatus::Down(why)) => why.clone(),
                    _ => "connection ended".to_owned(),
                };
                return Err(ended(&why));
            }
        }
        Ok(conn)
    }
}

fn take_message(
    payload: &[u8],
    properties: &[MqttProperty],
    shared: &Mutex<Shared>,
    changes: &ChangeSender,
    topic: &str,
) {
    let parsed: Result<Json, String> = serde_json::from_slice(payload).map_err(|e| e.to_string());
    let message = match parsed {
        Ok(m @ Json::Object(_)) => m,
        Ok(other) => {
            let kind = match other {
                Json::Array(_) => "an array",
                Json::String(_) => "a string",
                Json::Number(_) => "a number",
                Json::Bool(_) => "a boolean",
                _ => "null",
            };
            malformed(
                shared,
                topic,
                &format!("telemetry is {kind}, not a JSON object"),
            );
            return;
        }
        Err(e) => {
            malformed(shared, topic, &format!("telemetry is not JSON: {e}"));
            return;
        }
    };
    let mut updates = Vec::new();
    for (i, p) in properties.iter().enumerate() {
        if let Some(v) = p.extract(&message) {
            updates.push((i, v));
        }
    }
    if let Ok(mut s) = shared.lock() {
        s.stats.messages += 1;
        s.latest.resize_with(properties.len(), || None);
        for (i, v) in &updates {
            if let Some(slot) = s.latest.get_mut(*i) {
                *slot = Some(v.clone());
            }
        }
    }
    for (i, value) in updates {
        let _ = changes.try_send(Box::new(Reading {
            property: properties[i].spec.name.clone(),
            value,
        }));
    }
}

fn malformed(shared: &Mutex<Shared>, topic: &str, why: &str) {
    let count = shared
        .lock()
        .map(|mut s| {
            s.stats.malformed += 1;
            s.stats.malformed
        })
        .unwrap_or(0);
    if count.is_power_of_two() {
        warn!(
            topic,
            malformed = count,
            error = why,
            "dropping malformed telemetry"
        );
    }
}

impl Driver for MqttDriver {
    fn properties(&self) -> &[PropertySpec] {
        &self.specs
    }

    fn is_connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| *c.hub.up.borrow() && !c.hub.is_down())
    }

    async fn connect(&mut self) -> Result<(), ConnectError> {
        self.conn = None;
        let limit = self.config.timeout;
        let joined = timeout(limit, self.join())
            .await
            .unwrap_or(Err(ConnectError::Timeout(limit)));
        match joined {
            Ok(conn) => {
                self.conn = Some(conn);
                if let Ok(mut s) = self.sink.shared.lock() {
                    s.stats.connects += 1;
                }
                self.health.success();
                Ok(())
            }
            Err(e) => {
                self.health.failure(&e);
                Err(e)
            }
        }
    }

    async fn read(&mut self) -> Result<Vec<Reading>, ReadError> {
        if !self.is_connected() {
            self.conn = None;
            self.health.failure(ReadError::NotConnected);
            return Err(ReadError::NotConnected);
        }
        self.health.success();
        let shared = self.sink.shared.lock();
        let latest = shared.as_ref().map(|s| &s.latest).ok();
        Ok(self
            .sink
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| Reading {
                property: p.spec.name.clone(),
                value: latest
                    .and_then(|l| l.get(i))
                    .and_then(Option::clone)
                    .unwrap_or(Err(PropertyError::NoValue)),
            })
            .collect())
    }

    async fn write(&mut self, property: &str, text: &str) -> Result<(), WriteError> {
        let p = self
            .sink
            .properties
            .iter()
            .find(|p| p.spec.name == property)
            .ok_or_else(|| WriteError::UnknownProperty(property.to_owned()))?;
        let value = p.spec.check_write(text)?;
        if p.spec.data_type == DataType::Int && p.scale == 1.0 && !matches!(value, Value::Int(_)) {
            return Err(WriteError::Refused(ValueError::DoesNotFit {
                property: property.to_owned(),
                reason: format!("{value} is not an integer"),
            }));
        }
        let Some(topic) = self.config.command_topic.clone() else {
            return Err(WriteError::Refused(ValueError::DoesNotFit {
                property: property.to_owned(),
                reason: "the device has no commandTopic".into(),
            }));
        };
        let mut body = serde_json::Map::new();
        body.insert(p.path.join("."), value_to_json(&value, p.scale));
        let payload = Json::Object(body).to_string();
        if !self.is_connected() {
            return Err(WriteError::NotConnected);
        }
        let Some(conn) = self.conn.as_ref() else {
            return Err(WriteError::NotConnected);
        };
        let limit = self.config.timeout;
        match timeout(
            limit,
            conn.hub
                .client
                .publish(topic, self.config.qos, false, payload),
        )
        .await
        {
            Err(_) => {
                self.conn = None;
                self.health.failure(WriteError::Timeout(limit));
                Err(WriteError::Timeout(limit))
            }
            Ok(Err(e)) => {
                self.conn = None;
                self.health.failure(&e);
                Err(WriteError::Transport(e.to_string()))
            }
            Ok(Ok(())) => Ok(()),
        }
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn link(&self) -> Option<watch::Receiver<bool>> {
        self.conn.as_ref().map(|c| c.hub.up.clone())
    }

    fn take_changes(&mut self) -> Option<Changes> {
        self.changes_rx.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn telemetry_decodes_by_type_path_and_scale() {
        let p = |ty, cfg| MqttProperty::from_config(PropertySpec::new("x", ty), &cfg).unwrap();
        let msg = json!({"temp": 215, "env": {"hum": "40.5"}, "on": true, "name": "t1", "raw": "AQI=", "bad": [1]});
        assert_eq!(
            p(DataType::Int, json!({"jsonKey": "temp"})).extract(&msg),
            Some(Ok(Value::Int(215)))
        );
        assert_eq!(
            p(DataType::Int, json!({"jsonKey": "temp", "scale": 0.1}))
                .extract(&msg)
                .unwrap()
                .unwrap()
                .to_string(),
            "21.5"
        );
        assert_eq!(
            p(DataType::Double, json!({"jsonKey": "env.hum"})).extract(&msg),
            Some(Ok(Value::Double(40.5)))
        );
        assert_eq!(
            p(DataType::Boolean, json!({"jsonKey": "on"})).extract(&msg),
            Some(Ok(Value::Boolean(true)))
        );
        assert_eq!(
            p(DataType::String, json!({"jsonKey": "name"})).extract(&msg),
            Some(Ok(Value::String("t1".into())))
        );
        assert_eq!(
            p(DataType::Bytes, json!({"jsonKey": "raw"})).extract(&msg),
            Some(Ok(Value::Bytes(vec![1, 2])))
        );
        assert!(matches!(
            p(DataType::Int, json!({"jsonKey": "bad"})).extract(&msg),
            Some(Err(PropertyError::Decode(_)))
        ));
        assert!(matches!(
            p(DataType::Boolean, json!({"jsonKey": "temp"})).extract(&msg),
            Some(Err(_))
        ));
        assert_eq!(
            p(DataType::Int, json!({"jsonKey": "absent"})).extract(&msg),
            None
        );
        assert!(
            MqttProperty::from_config(
                PropertySpec::new("x", DataType::Int),
                &json!({"jsonKey": "a..b"})
            )
            .is_err()
        );
    }

    #[test]
    fn broker_config() {
        let c = MqttConfig::from_config(
            &json!({"broker": "mqtt://127.0.0.1:11883", "telemetryTopic": "t", "qos": 0}),
        )
        .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.qos),
            ("127.0.0.1", 11883, QoS::AtMostOnce)
        );
        assert!(
            MqttConfig::from_config(&json!({"broker": "h:notaport", "telemetryTopic": "t"}))
                .is_err()
        );
        assert!(MqttConfig::from_config(&json!({"broker": "h:1"})).is_err());
    }

    #[test]
    fn malformed_payloads_are_counted_not_fatal() {
        let props = vec![
            MqttProperty::from_config(PropertySpec::new("t", DataType::Int), &json!({})).unwrap(),
        ];
        let shared = Mutex::new(Shared::default());
        let (tx, rx) = change_channel(4);
        for bad in [&b"{not json"[..], b"[1,2]", b"\xff\xfe", b""] {
            take_message(bad, &props, &shared, &tx, "t");
        }
        take_message(br#"{"t": 5}"#, &props, &shared, &tx, "t");
        let s = shared.lock().unwrap();
        assert_eq!((s.stats.malformed, s.stats.messages), (4, 1));
        assert_eq!(rx.try_recv().unwrap().value, Ok(Value::Int(5)));
    }
}
