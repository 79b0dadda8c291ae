//! The OPC UA driver, with async-opcua: batched reads, typed writes, and
//! subscriptions with a watchdog.
//!
//! - A read asks for every property's node in one Read request.
//! - A write sends a variant of the node's own scalar type (learnt from the
//!   last read of that node, or read once first), since servers refuse a type
//!   mismatch.
//! - With `subscribe`, one subscription with a monitored item per property
//!   pushes changes; they come out of [`Driver::take_changes`].
//! - The watchdog: every notification, keep-alives included, stamps the
//!   subscription. When none has arrived for twice the keep-alive period plus
//!   the request timeout, the subscription is deleted (best effort) and
//!   created again. A server that lost the subscription (a restart, a
//!   crash of its subscription service) is recovered that way even when the
//!   session itself survives.
//! - async-opcua's own session retry is off: a lost connection ends the
//!   session, and the device task reconnects with its jittered backoff and
//!   subscribes afresh.
//!
//! Security: policy None, or Basic256Sha256 with Sign or SignAndEncrypt and a
//! client certificate (given, or a self-signed one created in the PKI folder).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use opcua::client::{
    ClientBuilder, IdentityToken, MonitoredItemMap, OnSubscriptionNotificationCore, Password,
    Session, SessionPollResult,
};
use opcua::types::{
    AttributeId, ByteString, DataChangeNotification, DataValue, EndpointDescription,
    ExtensionObject, MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode,
    MonitoringParameters, NodeId, NotificationMessage, ReadValueId, TimestampsToReturn, UAString,
    UserTokenPolicy, Variant, VariantScalarTypeId, WriteValue,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tracing::{debug, warn};

use crate::config::{ConfigData, ConfigError};
use crate::driver::{
    ChangeSender, Changes, ConnectError, Driver, Health, PropertyError, ReadError, Reading,
    WriteError, change_channel,
};
use crate::property::{DataType, PropertySpec, Value, ValueError};

/// The security policy of the endpoint to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// No signing, no encryption.
    None,
    /// Basic256Sha256, signed only.
    Basic256Sha256Sign,
    /// Basic256Sha256, signed and encrypted.
    Basic256Sha256SignAndEncrypt,
}

impl Security {
    fn policy(self) -> &'static str {
        match self {
            Self::None => "None",
            _ => "Basic256Sha256",
        }
    }

    fn mode(self) -> MessageSecurityMode {
        match self {
            Self::None => MessageSecurityMode::None,
            Self::Basic256Sha256Sign => MessageSecurityMode::Sign,
            Self::Basic256Sha256SignAndEncrypt => MessageSecurityMode::SignAndEncrypt,
        }
    }
}

/// Change-driven reporting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubscribeConfig {
    /// The subscription's publishing interval (and items' sampling interval).
    pub publishing_interval: Duration,
    /// Publishing intervals without a change before the server sends a
    /// keep-alive.
    pub keep_alive_count: u32,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        Self {
            publishing_interval: Duration::from_millis(500),
            keep_alive_count: 10,
        }
    }
}

impl SubscribeConfig {
    /// How long a subscription may stay silent before the watchdog recreates it.
    pub fn silence_limit(&self, request_timeout: Duration) -> Duration {
        self.publishing_interval
            .saturating_mul(self.keep_alive_count.max(1))
            .saturating_mul(2)
            + request_timeout
    }
}

/// Where and how to reach an OPC UA server.
#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaConfig {
    /// The endpoint URL (`opc.tcp://host:port/path`).
    pub url: String,
    /// Security policy and mode.
    pub security: Security,
    /// The client certificate (DER) for a secure endpoint; a self-signed one
    /// is created in `pki_dir` when absent.
    pub certificate: Option<PathBuf>,
    /// The client's private key (PEM) that goes with `certificate`.
    pub private_key: Option<PathBuf>,
    /// The folder of the client's PKI (own certificate, trusted and rejected
    /// peers).
    pub pki_dir: PathBuf,
    /// Trust the server's certificate without it being in `pki_dir/trusted`.
    pub trust_server_certs: bool,
    /// User name and password, or anonymous when absent.
    pub user: Option<(String, String)>,
    /// The bound on connecting and on each request.
    pub timeout: Duration,
    /// Subscribe to every property's node, or poll only.
    pub subscribe: Option<SubscribeConfig>,
}

impl OpcUaConfig {
    /// An anonymous connection with policy None, 2 s timeout, no subscription.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            security: Security::None,
            certificate: None,
            private_key: None,
            pki_dir: std::env::temp_dir().join("outpost-mapper-pki"),
            trust_server_certs: true,
            user: None,
            timeout: Duration::from_secs(2),
            subscribe: None,
        }
    }

    /// Reads a Device's protocol configData: `{url, securityPolicy (None |
    /// Basic256Sha256), securityMode (None | Sign | SignAndEncrypt),
    /// certificate, privateKey, pkiDir, trustServerCerts, userName, password,
    /// timeoutMs, subscribe, publishingIntervalMs}`.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, ConfigError> {
        let c = ConfigData::new(config)?;
        let mut out = Self::new(c.required_string("url")?);
        let policy = c.string("securityPolicy")?.unwrap_or("None");
        let mode = c.string("securityMode")?;
        out.security = match (
            policy.to_ascii_lowercase().as_str(),
            mode.map(str::to_ascii_lowercase).as_deref(),
        ) {
            ("none" | "", None | Some("none")) => Security::None,
            ("basic256sha256", Some("sign")) => Security::Basic256Sha256Sign,
            ("basic256sha256", None | Some("signandencrypt")) => {
                Security::Basic256Sha256SignAndEncrypt
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key: "securityPolicy",
                    expected: "None, or Basic256Sha256 with securityMode Sign or SignAndEncrypt",
                    found: format!("{policy} / {}", mode.unwrap_or("")),
                });
            }
        };
        out.certificate = c.string("certificate")?.map(PathBuf::from);
        out.private_key = c.string("privateKey")?.map(PathBuf::from);
        if let Some(dir) = c.string("pkiDir")? {
            out.pki_dir = PathBuf::from(dir);
        }
        out.trust_server_certs = c.bool("trustServerCerts")?.unwrap_or(true);
        if let Some(user) = c.string("userName")? {
            out.user = Some((
                user.to_owned(),
                c.string("password")?.unwrap_or("").to_owned(),
            ));
        }
        out.timeout =
            Duration::from_millis(c.bounded("timeoutMs", 600_000)?.unwrap_or(2000).max(1));
        if c.bool("subscribe")?.unwrap_or(false) {
            let mut sub = SubscribeConfig::default();
            if let Some(ms) = c.bounded("publishingIntervalMs", 3_600_000)? {
                sub.publishing_interval = Duration::from_millis(ms.max(1));
            }
            out.subscribe = Some(sub);
        }
        Ok(out)
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

/// One property of an OPC UA device: its node.
#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaProperty {
    /// The model's view.
    pub spec: PropertySpec,
    /// The variable node holding the value.
    pub node: NodeId,
}

impl OpcUaProperty {
    /// Reads a visitor's configData, `{nodeID: "ns=2;s=temp"}` as in KubeEdge
    /// (`nodeId` is accepted too).
    pub fn from_config(
        spec: PropertySpec,
        config: &serde_json::Value,
    ) -> Result<Self, VisitorError> {
        let err = |reason: String| VisitorError {
            property: spec.name.clone(),
            reason,
        };
        let c = ConfigData::new(config).map_err(|e| err(e.to_string()))?;
        let text = match c.string("nodeID").map_err(|e| err(e.to_string()))? {
            Some(t) => t,
            None => c
                .required_string("nodeId")
                .map_err(|_| err("configData: nodeID is required".into()))?,
        };
        let node = NodeId::from_str(text).map_err(|_| {
            err(format!(
                "{text:?} is not an OPC UA node id (like ns=2;s=temp)"
            ))
        })?;
        Ok(Self { spec, node })
    }
}

/// Counters, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpcUaStats {
    /// Read and write requests sent.
    pub requests: u64,
    /// Sessions opened.
    pub connects: u64,
    /// Subscriptions created (the first included).
    pub subscriptions_created: u64,
}

struct Connection {
    session: Arc<Session>,
    up: watch::Receiver<bool>,
    event_loop: JoinHandle<()>,
    subscription: Option<u32>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.event_loop.abort();
    }
}

/// An OPC UA device.
pub struct OpcUaDriver {
    config: OpcUaConfig,
    properties: Vec<OpcUaProperty>,
    specs: Vec<PropertySpec>,
    scalar_types: Vec<Option<VariantScalarTypeId>>,
    conn: Option<Connection>,
    health: Health,
    stats: OpcUaStats,
    changes_tx: ChangeSender,
    changes_rx: Option<Changes>,
    last_heard: Arc<Mutex<Instant>>,
}

impl std::fmt::Debug for OpcUaDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpcUaDriver")
            .field("url", &self.config.url)
            .field("properties", &self.properties.len())
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl OpcUaDriver {
    /// A driver for the given properties (not yet connected).
    pub fn new(config: OpcUaConfig, properties: Vec<OpcUaProperty>) -> Self {
        let specs = properties.iter().map(|p| p.spec.clone()).collect();
        let (changes_tx, changes_rx) = change_channel(1024);
        Self {
            scalar_types: vec![None; properties.len()],
            config,
            properties,
            specs,
            conn: None,
            health: Health::default(),
            stats: OpcUaStats::default(),
            changes_tx,
            changes_rx: Some(changes_rx),
            last_heard: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> OpcUaStats {
        self.stats
    }

    /// Closes the session.
    pub async fn disconnect(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = timeout(self.config.timeout, conn.session.disconnect()).await;
        }
    }

    fn drop_connection(&mut self, error: &impl std::fmt::Display) {
        debug!(url = %self.config.url, error = %error, "dropping OPC UA session");
        self.conn = None;
        self.health.failure(error);
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.conn
            .as_ref()
            .filter(|c| *c.up.borrow())
            .map(|c| c.session.clone())
    }

    /// Reads the given properties (indices) in one request.
    async fn read_nodes(
        &mut self,
        indices: &[usize],
    ) -> Result<Vec<Result<Value, PropertyError>>, ReadError> {
        let session = self.session().ok_or(ReadError::NotConnected)?;
        let ids: Vec<ReadValueId> = indices
            .iter()
            .map(|&i| ReadValueId {
                node_id: self.properties[i].node.clone(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            })
            .collect();
        self.stats.requests += 1;
        let limit = self.config.timeout;
        let values =
            match timeout(limit, session.read(&ids, TimestampsToReturn::Neither, 0.0)).await {
                Err(_) => {
                    self.drop_connection(&ReadError::Timeout(limit));
                    return Err(ReadError::Timeout(limit));
                }
                Ok(Err(e)) => {
                    let e = ReadError::Transport(e.to_string());
                    self.drop_connection(&e);
                    return Err(e);
                }
                Ok(Ok(v)) => v,
            };
        if values.len() != indices.len() {
            let e = ReadError::Transport(format!(
                "asked for {} values, got {}",
                indices.len(),
                values.len()
            ));
            self.drop_connection(&e);
            return Err(e);
        }
        Ok(indices
            .iter()
            .zip(values)
            .map(|(&i, dv)| {
                if let Some(t) = dv.value.as_ref().and_then(Variant::scalar_type_id) {
                    self.scalar_types[i] = Some(t);
                }
                data_value_to_value(self.properties[i].spec.data_type, &dv)
            })
            .collect())
    }

    /// Checks the subscription's liveness and recreates a silent one.
    /// Returns whether it recreated it.
    pub async fn check_subscription(&mut self) -> Result<bool, ReadError> {
        let Some(sub) = self.config.subscribe else {
            return Ok(false);
        };
        let silent_for = self
            .last_heard
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        let has = self.conn.as_ref().is_some_and(|c| c.subscription.is_some());
        if has && silent_for <= sub.silence_limit(self.config.timeout) {
            return Ok(false);
        }
        if has {
            warn!(url = %self.config.url, silent_for = ?silent_for, "subscription silent; recreating it");
        }
        self.subscribe().await?;
        Ok(true)
    }

    async fn subscribe(&mut self) -> Result<(), ReadError> {
        let Some(sub) = self.config.subscribe else {
            return Ok(());
        };
        let session = self.session().ok_or(ReadError::NotConnected)?;
        let limit = self.config.timeout;
        if let Some(old) = self.conn.as_mut().and_then(|c| c.subscription.take()) {
            // Best effort: the server may have forgotten it already.
            let _ = timeout(limit, session.delete_subscription(old)).await;
        }
        if let Ok(mut t) = self.last_heard.lock() {
            *t = Instant::now();
        }
        let notifier = Notifier {
            properties: self
                .properties
                .iter()
                .map(|p| (p.spec.name.clone(), p.spec.data_type))
                .collect(),
            tx: self.changes_tx.clone(),
            last_heard: self.last_heard.clone(),
        };
        let created = timeout(
            limit,
            session.create_subscription(
                sub.publishing_interval,
                sub.keep_alive_count.saturating_mul(3).max(3),
                sub.keep_alive_count.max(1),
                0,
                0,
                true,
                notifier,
            ),
        )
        .await;
        let id = match created {
            Err(_) => {
                self.drop_connection(&ReadError::Timeout(limit));
                return Err(ReadError::Timeout(limit));
            }
            Ok(Err(e)) => {
                let e = ReadError::Transport(format!("create subscription: {e}"));
                self.drop_connection(&e);
                return Err(e);
            }
            Ok(Ok(id)) => id,
        };
        let items: Vec<MonitoredItemCreateRequest> = self
            .properties
            .iter()
            .enumerate()
            .map(|(i, p)| MonitoredItemCreateRequest {
                item_to_monitor: ReadValueId {
                    node_id: p.node.clone(),
                    attribute_id: AttributeId::Value as u32,
                    ..Default::default()
                },
                monitoring_mode: MonitoringMode::Reporting,
                requested_parameters: MonitoringParameters {
                    client_handle: handle_of(i),
                    sampling_interval: sub.publishing_interval.as_secs_f64() * 1000.0,
                    filter: ExtensionObject::null(),
                    queue_size: 1,
                    discard_oldest: true,
                },
            })
            .collect();
        match timeout(
            limit,
            session.create_monitored_items(id, TimestampsToReturn::Neither, items),
        )
        .await
        {
            Err(_) => {
                self.drop_connection(&ReadError::Timeout(limit));
                return Err(ReadError::Timeout(limit));
            }
            Ok(Err(e)) => {
                let e = ReadError::Transport(format!("create monitored items: {e}"));
                self.drop_connection(&e);
                return Err(e);
            }
            Ok(Ok(results)) => {
                for (p, r) in self.properties.iter().zip(results) {
                    if !r.result.status_code.is_good() {
                        warn!(url = %self.config.url, property = %p.spec.name, status = %r.result.status_code, "cannot monitor property");
                    }
                }
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            conn.subscription = Some(id);
        }
        self.stats.subscriptions_created += 1;
        Ok(())
    }
}

fn handle_of(index: usize) -> u32 {
    u32::try_from(index)
        .unwrap_or(u32::MAX - 1)
        .saturating_add(1)
}

/// Receives a subscription's notifications (keep-alives included).
struct Notifier {
    properties: Vec<(String, DataType)>,
    tx: ChangeSender,
    last_heard: Arc<Mutex<Instant>>,
}

impl OnSubscriptionNotificationCore for Notifier {
    fn on_subscription_notification(
        &mut self,
        notification: NotificationMessage,
        _items: MonitoredItemMap<'_>,
    ) {
        if let Ok(mut t) = self.last_heard.lock() {
            *t = Instant::now();
        }
        for object in notification.notification_data.into_iter().flatten() {
            let Some(change) = object.inner_as::<DataChangeNotification>() else {
                continue;
            };
            for item in change.monitored_items.iter().flatten() {
                let index = item.client_handle.wrapping_sub(1) as usize;
                let Some((name, data_type)) = self.properties.get(index) else {
                    continue;
                };
                let reading = Reading {
                    property: name.clone(),
                    value: data_value_to_value(*data_type, &item.value),
                };
                // A full channel means the consumer lags: a later change
                // or the next collect cycle carries the value.
                let _ = self.tx.try_send(Box::new(reading));
            }
        }
    }
}

/// Converts an OPC UA value to the property's type.
pub fn data_value_to_value(data_type: DataType, dv: &DataValue) -> Result<Value, PropertyError> {
    if let Some(status) = dv.status.filter(|s| !s.is_good()) {
        return Err(PropertyError::Rejected(format!("status {status}")));
    }
    let variant = dv.value.as_ref().ok_or(PropertyError::NoValue)?;
    variant_to_value(data_type, variant)
}

fn integer(variant: &Variant) -> Option<i64> {
    Some(match variant {
        Variant::SByte(v) => i64::from(*v),
        Variant::Byte(v) => i64::from(*v),
        Variant::Int16(v) => i64::from(*v),
        Variant::UInt16(v) => i64::from(*v),
        Variant::Int32(v) => i64::from(*v),
        Variant::UInt32(v) => i64::from(*v),
        Variant::Int64(v) => *v,
        Variant::UInt64(v) => i64::try_from(*v).ok()?,
        _ => return None,
    })
}

/// Converts a variant to the property's type: integers of any width to INT,
/// any number to FLOAT or DOUBLE, and the rest only from their own kind.
pub fn variant_to_value(data_type: DataType, variant: &Variant) -> Result<Value, PropertyError> {
    let wrong = || PropertyError::Decode(format!("{variant:?} is not a {data_type} value"));
    match data_type {
        DataType::Int => integer(variant).map(Value::Int).ok_or_else(wrong),
        DataType::Float | DataType::Double => {
            let number = match variant {
                Variant::Float(v) => f64::from(*v),
                Variant::Double(v) => *v,
                other => integer(other).map(|i| i as f64).ok_or_else(wrong)?,
            };
            if data_type == DataType::Float {
                #[allow(clippy::cast_possible_truncation)]
                Ok(Value::Float(number as f32))
            } else {
                Ok(Value::Double(number))
            }
        }
        DataType::String => match variant {
            Variant::String(s) => Ok(Value::String(s.value().clone().unwrap_or_default())),
            _ => Err(wrong()),
        },
        DataType::Boolean => match variant {
            Variant::Boolean(b) => Ok(Value::Boolean(*b)),
            _ => Err(wrong()),
        },
        DataType::Bytes => match variant {
            Variant::ByteString(b) => Ok(Value::Bytes(b.value.clone().unwrap_or_default())),
            _ => Err(wrong()),
        },
    }
}

/// Builds the variant to write: of the node's scalar type when known,
/// otherwise the natural one for the value. Refuses a value the node's type
/// cannot hold.
pub fn value_to_variant(
    value: &Value,
    node_type: Option<VariantScalarTypeId>,
) -> Result<Variant, String> {
    use VariantScalarTypeId as T;
    let int = |v: &Value| -> Result<i64, String> {
        match v {
            Value::Int(i) => Ok(*i),
            Value::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 =>
            {
                #[allow(clippy::cast_possible_truncation)]
                Ok(*d as i64)
            }
            other => Err(format!("{other} is not an integer")),
        }
    };
    let too_big = |name: &str| format!("{value} does not fit {name}");
    let variant = match (node_type, value) {
        (Some(T::SByte), v) => Variant::SByte(i8::try_from(int(v)?).map_err(|_| too_big("SByte"))?),
        (Some(T::Byte), v) => Variant::Byte(u8::try_from(int(v)?).map_err(|_| too_big("Byte"))?),
        (Some(T::Int16), v) => {
            Variant::Int16(i16::try_from(int(v)?).map_err(|_| too_big("Int16"))?)
        }
        (Some(T::UInt16), v) => {
            Variant::UInt16(u16::try_from(int(v)?).map_err(|_| too_big("UInt16"))?)
        }
        (Some(T::Int32), v) => {
            Variant::Int32(i32::try_from(int(v)?).map_err(|_| too_big("Int32"))?)
        }
        (Some(T::UInt32), v) => {
            Variant::UInt32(u32::try_from(int(v)?).map_err(|_| too_big("UInt32"))?)
        }
        (Some(T::Int64), v) => Variant::Int64(int(v)?),
        (Some(T::UInt64), v) => {
            Variant::UInt64(u64::try_from(int(v)?).map_err(|_| too_big("UInt64"))?)
        }
        (Some(T::Float), v) => {
            let n = v.as_f64().ok_or_else(|| format!("{v} is not a number"))?;
            #[allow(clippy::cast_possible_truncation)]
            let f = n as f32;
            if !f.is_finite() {
                return Err(too_big("Float"));
            }
            Variant::Float(f)
        }
        (Some(T::Double), v) => {
            Variant::Double(v.as_f64().ok_or_else(|| format!("{v} is not a number"))?)
        }
        (_, Value::Int(i)) => Variant::Int64(*i),
        (_, Value::Float(f)) => Variant::Float(*f),
        (_, Value::Double(d)) => Variant::Double(*d),
        (_, Value::String(s)) => Variant::String(UAString::from(s.as_str())),
        (_, Value::Boolean(b)) => Variant::Boolean(*b),
        (_, Value::Bytes(b)) => Variant::ByteString(ByteString::from(b.clone())),
    };
    Ok(variant)
}

impl Driver for OpcUaDriver {
    fn properties(&self) -> &[PropertySpec] {
        &self.specs
    }

    fn is_connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| *c.up.borrow() && !c.event_loop.is_finished())
    }

    async fn connect(&mut self) -> Result<(), ConnectError> {
        self.conn = None;
        let limit = self.config.timeout;
        let result = timeout(limit, open_session(&self.config)).await;
        let conn = match result {
            Err(_) => Err(ConnectError::Timeout(limit)),
            Ok(r) => r,
        };
        match conn {
            Ok(conn) => {
                self.conn = Some(conn);
                self.stats.connects += 1;
                if let Err(e) = self.subscribe().await {
                    return Err(ConnectError::Transport(e.to_string()));
                }
                Ok(())
            }
            Err(e) => {
                self.health.failure(&e);
                Err(e)
            }
        }
    }

    async fn read(&mut self) -> Result<Vec<Reading>, ReadError> {
        self.check_subscription().await?;
        let all: Vec<usize> = (0..self.properties.len()).collect();
        let values = self.read_nodes(&all).await?;
        self.health.success();
        Ok(self
            .properties
            .iter()
            .zip(values)
            .map(|(p, value)| Reading {
                property: p.spec.name.clone(),
                value,
            })
            .collect())
    }

    async fn write(&mut self, property: &str, text: &str) -> Result<(), WriteError> {
        let index = self
            .properties
            .iter()
            .position(|p| p.spec.name == property)
            .ok_or_else(|| WriteError::UnknownProperty(property.to_owned()))?;
        let value = self.properties[index].spec.check_write(text)?;
        if self.session().is_none() {
            return Err(WriteError::NotConnected);
        }
        if self.scalar_types[index].is_none() {
            // Learn the node's type, so the write carries the same one.
            match self.read_nodes(&[index]).await {
                Ok(_) => {}
                Err(ReadError::NotConnected) => return Err(WriteError::NotConnected),
                Err(ReadError::Timeout(d)) => return Err(WriteError::Timeout(d)),
                Err(ReadError::Transport(e)) => return Err(WriteError::Transport(e)),
            }
        }
        let variant = value_to_variant(&value, self.scalar_types[index]).map_err(|reason| {
            WriteError::Refused(ValueError::DoesNotFit {
                property: property.to_owned(),
                reason,
            })
        })?;
        let session = self.session().ok_or(WriteError::NotConnected)?;
        let node = WriteValue {
            node_id: self.properties[index].node.clone(),
            attribute_id: AttributeId::Value as u32,
            index_range: Default::default(),
            value: DataValue::value_only(variant),
        };
        self.stats.requests += 1;
        let limit = self.config.timeout;
        match timeout(limit, session.write(&[node])).await {
            Err(_) => {
                self.drop_connection(&WriteError::Timeout(limit));
                Err(WriteError::Timeout(limit))
            }
            Ok(Err(e)) => {
                let e = WriteError::Transport(e.to_string());
                self.drop_connection(&e);
                Err(e)
            }
            Ok(Ok(codes)) => match codes.first() {
                Some(code) if code.is_good() => {
                    self.health.success();
                    Ok(())
                }
                Some(code) => Err(WriteError::Rejected(format!("status {code}"))),
                None => Err(WriteError::Rejected("no status returned".into())),
            },
        }
    }

    fn health(&self) -> &Health {
        &self.health
    }

    fn link(&self) -> Option<watch::Receiver<bool>> {
        self.conn.as_ref().map(|c| c.up.clone())
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        self.config
            .subscribe
            .map(|s| s.silence_limit(self.config.timeout) / 2)
    }

    async fn maintain(&mut self) -> Result<(), ReadError> {
        self.check_subscription().await.map(|_| ())
    }

    fn take_changes(&mut self) -> Option<Changes> {
        if self.config.subscribe.is_some() {
            self.changes_rx.take()
        } else {
            None
        }
    }
}

async fn open_session(config: &OpcUaConfig) -> Result<Connection, ConnectError> {
    let transport = |e: &dyn std::fmt::Display| ConnectError::Transport(e.to_string());
    let mut builder = ClientBuilder::new()
        .application_name("Outpost mapper")
        .application_uri("urn:outpost:mapper")
        .product_uri("urn:outpost:mapper")
        .pki_dir(&config.pki_dir)
        .trust_server_certs(config.trust_server_certs)
        .create_sample_keypair(config.security != Security::None && config.certificate.is_none())
        .session_retry_limit(0)
        .request_timeout(config.timeout)
        .session_timeout(60_000);
    if let Some(cert) = &config.certificate {
        builder = builder.certificate_path(cert);
    }
    if let Some(key) = &config.private_key {
        builder = builder.private_key_path(key);
    }
    let mut client = builder.client().map_err(|errors| {
        ConnectError::Transport(format!("client configuration: {}", errors.join("; ")))
    })?;
    let (identity, policy) = match &config.user {
        None => (IdentityToken::Anonymous, UserTokenPolicy::anonymous()),
        Some((user, password)) => (
            IdentityToken::UserName(user.clone(), Password::new(password.clone())),
            UserTokenPolicy {
                token_type: opcua::types::UserTokenType::UserName,
                ..Default::default()
            },
        ),
    };
    let endpoint: EndpointDescription = (
        config.url.as_str(),
        config.security.policy(),
        config.security.mode(),
        policy,
    )
        .into();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(endpoint, identity)
        .await
        .map_err(|e| transport(&e))?;
    let (up_tx, mut up) = watch::channel(false);
    let (why_tx, why) = tokio::sync::oneshot::channel::<String>();
    let mut why_tx = Some(why_tx);
    let url = config.url.clone();
    let event_loop = tokio::spawn(async move {
        let mut events = std::pin::pin!(event_loop.enter());
        while let Some(event) = events.next().await {
            match event {
                Ok(SessionPollResult::Reconnected(_)) => {
                    let _ = up_tx.send(true);
                }
                Ok(
                    SessionPollResult::ConnectionLost(status)
                    | SessionPollResult::ReconnectFailed(status),
                ) => {
                    debug!(url = %url, %status, "OPC UA connection lost");
                    if let Some(tx) = why_tx.take() {
                        let _ = tx.send(status.to_string());
                    }
                    break;
                }
                Err(status) => {
                    debug!(url = %url, %status, "OPC UA session ended");
                    if let Some(tx) = why_tx.take() {
                        let _ = tx.send(status.to_string());
                    }
                    break;
                }
                Ok(_) => {}
            }
        }
        let _ = up_tx.send(false);
    });
    let connected = up.wait_for(|up| *up).await.is_ok() && *up.borrow();
    if !connected {
        event_loop.abort();
        let why = why.await.unwrap_or_else(|_| "session ended".into());
        return Err(ConnectError::Transport(format!(
            "no session with {}: {why}",
            config.url
        )));
    }
    Ok(Connection {
        session,
        up,
        event_loop,
        subscription: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn visitors_and_protocol_config() {
        let spec = PropertySpec::new("t", DataType::Int);
        let p = OpcUaProperty::from_config(spec.clone(), &json!({"nodeID": "ns=2;s=int"})).unwrap();
        assert_eq!(p.node, NodeId::new(2, "int"));
        assert!(OpcUaProperty::from_config(spec.clone(), &json!({"nodeID": "garbage;;"})).is_err());
        assert!(OpcUaProperty::from_config(spec, &json!({})).is_err());
        let c = OpcUaConfig::from_config(&json!({"url": "opc.tcp://127.0.0.1:4840/", "securityPolicy": "Basic256Sha256", "securityMode": "Sign", "subscribe": true})).unwrap();
        assert_eq!(c.security, Security::Basic256Sha256Sign);
        assert!(c.subscribe.is_some());
        assert!(
            OpcUaConfig::from_config(&json!({"url": "x", "securityPolicy": "Basic128"})).is_err()
        );
    }

    #[test]
    fn variants_convert_both_ways() {
        assert_eq!(
            variant_to_value(DataType::Int, &Variant::UInt16(7)),
            Ok(Value::Int(7))
        );
        assert_eq!(
            variant_to_value(DataType::Double, &Variant::Int32(2)),
            Ok(Value::Double(2.0))
        );
        assert!(variant_to_value(DataType::Int, &Variant::Double(2.5)).is_err());
        assert!(variant_to_value(DataType::Boolean, &Variant::Int32(1)).is_err());
        assert_eq!(
            value_to_variant(&Value::Int(7), Some(VariantScalarTypeId::Int32)),
            Ok(Variant::Int32(7))
        );
        assert!(value_to_variant(&Value::Int(70000), Some(VariantScalarTypeId::Int16)).is_err());
        assert!(value_to_variant(&Value::Double(1.5), Some(VariantScalarTypeId::Int32)).is_err());
        assert_eq!(
            value_to_variant(&Value::Double(1.5), Some(VariantScalarTypeId::Float)),
            Ok(Variant::Float(1.5))
        );
    }
}
