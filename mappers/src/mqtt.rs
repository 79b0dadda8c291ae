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
//! - rumqttc neither backs off nor resubscribes after a clean-session
//!   reconnect. Here the client's event loop ends at the first connection
//!   error; the device task reconnects with its jittered backoff, and the
//!   telemetry topic is subscribed again at every ConnAck.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, warn};

use crate::config::{ConfigData, ConfigError};
use crate::driver::{ConnectError, Driver, Health, PropertyError, ReadError, Reading, WriteError};
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
    /// Connections made (ConnAcks seen).
    pub connects: u64,
    /// Telemetry messages that were not JSON objects.
    pub malformed: u64,
    /// Telemetry messages taken.
    pub messages: u64,
}

#[derive(Default)]
struct Shared {
    latest: HashMap<usize, Result<Value, PropertyError>>,
    stats: MqttStats,
}

struct Connection {
    client: AsyncClient,
    up: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT device.
pub struct MqttDriver {
    config: MqttConfig,
    properties: Arc<Vec<MqttProperty>>,
    specs: Vec<PropertySpec>,
    shared: Arc<Mutex<Shared>>,
    conn: Option<Connection>,
    health: Health,
    changes_tx: mpsc::Sender<Reading>,
    changes_rx: Option<mpsc::Receiver<Reading>>,
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

impl MqttDriver {
    /// A driver for the given properties (not yet connected).
    pub fn new(config: MqttConfig, properties: Vec<MqttProperty>) -> Self {
        let specs = properties.iter().map(|p| p.spec.clone()).collect();
        let (changes_tx, changes_rx) = mpsc::channel(1024);
        Self {
            config,
            properties: Arc::new(properties),
            specs,
            shared: Arc::default(),
            conn: None,
            health: Health::default(),
            changes_tx,
            changes_rx: Some(changes_rx),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> MqttStats {
        self.shared.lock().map(|s| s.stats).unwrap_or_default()
    }

    /// Closes the connection.
    pub async fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = timeout(self.config.timeout, conn.client.disconnect()).await;
        }
    }
}

fn take_message(
    payload: &[u8],
    properties: &[MqttProperty],
    shared: &Mutex<Shared>,
    changes: &mpsc::Sender<Reading>,
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
        for (i, v) in &updates {
            s.latest.insert(*i, v.clone());
        }
    }
    for (i, value) in updates {
        let _ = changes.try_send(Reading {
            property: properties[i].spec.name.clone(),
            value,
        });
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
            .is_some_and(|c| *c.up.borrow() && !c.task.is_finished())
    }

    async fn connect(&mut self) -> Result<(), ConnectError> {
        self.conn = None;
        let mut options =
            MqttOptions::new(&self.config.client_id, &self.config.host, self.config.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        if let Some((user, password)) = &self.config.credentials {
            options.set_credentials(user, password);
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        let mut network = rumqttc::NetworkOptions::new();
        // Small messages answered one by one: Nagle only adds latency.
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(self.config.timeout.as_secs().max(1));
        events.set_network_options(network);
        let (up_tx, mut up) = watch::channel(false);
        let (why_tx, why) = tokio::sync::oneshot::channel::<String>();
        let properties = self.properties.clone();
        let shared = self.shared.clone();
        let changes = self.changes_tx.clone();
        let topic = self.config.telemetry_topic.clone();
        let qos = self.config.qos;
        let subscriber = client.clone();
        let task = tokio::spawn(async move {
            let mut why_tx = Some(why_tx);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // A clean session forgets subscriptions: subscribe at
                        // every connection.
                        if let Err(e) = subscriber.try_subscribe(&topic, qos) {
                            debug!(topic = %topic, error = %e, "subscribe failed");
                            break;
                        }
                        if let Ok(mut s) = shared.lock() {
                            s.stats.connects += 1;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = up_tx.send(true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == topic {
                            take_message(&p.payload, &properties, &shared, &changes, &topic);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(topic = %topic, error = %e, "MQTT connection ended");
                        if let Some(tx) = why_tx.take() {
                            let _ = tx.send(e.to_string());
                        }
                        break;
                    }
                }
            }
            let _ = up_tx.send(false);
        });
        let limit = self.config.timeout;
        let came_up = timeout(limit, up.wait_for(|up| *up))
            .await
            .map(|r| r.is_ok());
        let result = match came_up {
            Err(_) => Err(ConnectError::Timeout(limit)),
            Ok(true) => Ok(()),
            Ok(false) => Err(ConnectError::Transport(
                why.await.unwrap_or_else(|_| "connection ended".into()),
            )),
        };
        match result {
            Ok(()) => {
                self.conn = Some(Connection { client, up, task });
                self.health.success();
                Ok(())
            }
            Err(e) => {
                task.abort();
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
        let latest = self
            .shared
            .lock()
            .map(|s| s.latest.clone())
            .unwrap_or_default();
        Ok(self
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| Reading {
                property: p.spec.name.clone(),
                value: latest
                    .get(&i)
                    .cloned()
                    .unwrap_or(Err(PropertyError::NoValue)),
            })
            .collect())
    }

    async fn write(&mut self, property: &str, text: &str) -> Result<(), WriteError> {
        let p = self
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
            conn.client.publish(topic, self.config.qos, false, payload),
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
        self.conn.as_ref().map(|c| c.up.clone())
    }

    fn take_changes(&mut self) -> Option<mpsc::Receiver<Reading>> {
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
        let (tx, mut rx) = mpsc::channel(4);
        for bad in [&b"{not json"[..], b"[1,2]", b"\xff\xfe", b""] {
            take_message(bad, &props, &shared, &tx, "t");
        }
        take_message(br#"{"t": 5}"#, &props, &shared, &tx, "t");
        let s = shared.lock().unwrap();
        assert_eq!((s.stats.malformed, s.stats.messages), (4, 1));
        assert_eq!(rx.try_recv().unwrap().value, Ok(Value::Int(5)));
    }
}
