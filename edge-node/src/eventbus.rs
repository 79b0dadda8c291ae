//! KubeEdge's MQTT event bus, on the node's broker, served from the twins.
//!
//! Edge apps written for KubeEdge talk to their devices through these
//! topics (device ids are `<namespace>/<name>`; the older `<name>` alone
//! means the `default` namespace):
//!
//! | app publishes | the node answers on |
//! |---|---|
//! | `$hw/events/device/{id}/twin/update` | `.../twin/update/result` |
//! | `$hw/events/device/{id}/twin/get` | `.../twin/get/result` |
//! | `$hw/events/device/{id}/state/update` | `.../state/update/result` |
//! | `$hw/events/node/{node}/membership/get` | `.../membership/get/result` |
//!
//! and the node publishes, as twins change, `.../twin/update/document`
//! (`last` and `current` of every property whose expected or actual value
//! changed), `.../twin/update/delta` (properties whose expected value
//! differs from the actual one) and `.../state/update/result` when a
//! device goes online or offline.
//!
//! A twin update's `expected` values become this node's desired values
//! (checked against the model, merged with the cloud's by the conflict
//! rule, applied to the device, and sent to the cloud when the link is up);
//! its `actual` values are taken as readings. It all works with the cloud
//! unreachable: only the local broker is needed.
//!
//! Bad requests get a result with an error code and leave the stored data
//! alone: 400 for a payload that is not JSON or not a twin update, an
//! unknown property, a read-only property, or keys and values over
//! KubeEdge's limits (128 and 512 bytes); 404 for an unknown device; 500
//! when the replica refuses the write. An update is checked whole before
//! any of it is stored.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_sync::engine::Engine;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::twins::{DeviceTwin, LocalWriteError, TwinView, set_local_desired};

/// KubeEdge's limit on twin keys, bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// KubeEdge's limit on twin values, bytes.
pub const MAX_VALUE_BYTES: usize = 512;

/// Where the event bus connects and as whom.
#[derive(Debug, Clone)]
pub struct EventBusConfig {
    /// The broker's host.
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// This node's name (for membership topics).
    pub node: String,
    /// The MQTT client id.
    pub client_id: String,
}

/// The running event bus. Dropping it disconnects.
pub struct EventBus {
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

impl EventBus {
    /// Connects to the broker (and keeps reconnecting) and serves the
    /// topics above.
    pub fn spawn(engine: Engine, view: TwinView, config: EventBusConfig) -> Self {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options
            .set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut events) = AsyncClient::new(options, 256);
        let (incoming_tx, incoming) = mpsc::channel(256);
        let mut tasks = JoinSet::new();
        let (sub_client, node) = (client.clone(), config.node.clone());
        let broker = format!("{}:{}", config.host, config.port);
        tasks.spawn(async move {
            let mut down_since_logged = false;
            let mut delay = Duration::from_millis(500);
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        info!(%broker, "event bus connected");
                        down_since_logged = false;
                        delay = Duration::from_millis(500);
                        // A clean session forgets subscriptions.
                        for topic in [
                            "$hw/events/device/#".to_owned(),
                            format!("$hw/events/node/{node}/membership/get"),
                        ] {
                            if let Err(e) = sub_client.try_subscribe(&topic, QoS::AtLeastOnce) {
                                warn!(%topic, error = %e, "cannot subscribe");
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if incoming_tx
                            .send((p.topic, p.payload.to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if down_since_logged {
                            debug!(%broker, error = %e, "event bus still disconnected");
                        } else {
                            warn!(%broker, error = %e, "event bus disconnected; retrying");
                            down_since_logged = true;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
        tasks.spawn(serve(engine, view, config, client, incoming));
        Self { tasks }
    }

    /// Disconnects and waits for the tasks.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
    }
}

/// What a topic asks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    TwinUpdate(String),
    TwinGet(String),
    StateUpdate(String),
    Membership,
}

/// Parses a topic the node serves; `None` for everything else (including
/// the node's own results, which the broker sends back to it).
fn parse_topic(topic: &str, node: &str) -> Option<Request> {
    if let Some(rest) = topic.strip_prefix("$hw/events/node/") {
        return (rest == format!("{node}/membership/get")).then_some(Request::Membership);
    }
    let rest = topic.strip_prefix("$hw/events/device/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (id, tail) = match parts.as_slice() {
        [ns, name, tail @ ..] if !tail.is_empty() && !["twin", "state"].contains(name) => {
            (format!("{ns}/{name}"), tail.to_vec())
        }
        [name, tail @ ..] => (format!("default/{name}"), tail.to_vec()),
        [] => return None,
    };
    if id.split('/').any(str::is_empty) {
        return None;
    }
    match tail.as_slice() {
        ["twin", "update"] => Some(Request::TwinUpdate(id)),
        ["twin", "get"] => Some(Request::TwinGet(id)),
        ["state", "update"] => Some(Request::StateUpdate(id)),
        _ => None,
    }
}

fn device_topic(id: &str, suffix: &str) -> String {
    format!("$hw/events/device/{id}/{suffix}")
}

fn error_result(event_id: &str, code: u16, reason: &str) -> Value {
    json!({"event_id": event_id, "timestamp": now_ms(), "code": code, "reason": reason})
}

/// A property's twin in KubeEdge's shape.
fn property_json(twin: &DeviceTwin, name: &str) -> Value {
    let Some(p) = twin.properties.get(name) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    if let Some(v) = &p.desired {
        out.insert("expected".into(), json!({"value": v}));
    }
    if let Some(r) = &p.reported {
        out.insert(
            "actual".into(),
            json!({"value": r.value, "metadata": {"timestamp": r.timestamp_ms}}),
        );
    }
    out.insert("metadata".into(), json!({"type": p.kind}));
    Value::Object(out)
}

/// A device's whole twin in KubeEdge's shape.
fn twin_json(twin: &DeviceTwin) -> Value {
    Value::Object(
        twin.properties
            .keys()
            .map(|name| (name.clone(), property_json(twin, name)))
            .collect(),
    )
}

fn state_json(twin: &DeviceTwin) -> Value {
    json!({
        "event_id": "",
        "timestamp": now_ms(),
        "device": {
            "id": twin.id(),
            "name": twin.name,
            "namespace": twin.namespace,
            "state": twin.state,
            "last_online": twin.last_online_ms,
        }
    })
}

/// A checked twin update: expected and actual values by property.
#[derive(Debug, Default, PartialEq, Eq)]
struct Update {
    event_id: String,
    expected: BTreeMap<String, String>,
    actual: BTreeMap<String, String>,
}

/// Checks a twin update against KubeEdge's shape and limits and the
/// device's twin. Errors are (code, reason).
fn parse_update(
    payload: &[u8],
    twin: Option<&DeviceTwin>,
    id: &str,
) -> Result<Update, (String, u16, String)> {
    let body: Value = serde_json::from_slice(payload).map_err(|e| {
        (
            String::new(),
            400,
            format!("the payload is not valid JSON: {e}"),
        )
    })?;
    let event_id = body
        .get("event_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let fail = |code: u16, reason: String| (event_id.clone(), code, reason);
    let Some(twin) = twin else {
        return Err(fail(404, format!("no device {id} on this node")));
    };
    let Some(props) = body.get("twin").and_then(Value::as_object) else {
        return Err(fail(400, "a twin update needs a \"twin\" object".into()));
    };
    let mut update = Update {
        event_id: event_id.clone(),
        ..Default::default()
    };
    for (name, p) in props {
        if name.len() > MAX_KEY_BYTES {
            return Err(fail(
                400,
                format!("property name longer than {MAX_KEY_BYTES} bytes"),
            ));
        }
        let Some(known) = twin.properties.get(name) else {
            return Err(fail(400, format!("device {id} has no property {name}")));
        };
        for (which, map) in [
            ("expected", &mut update.expected),
            ("actual", &mut update.actual),
        ] {
            let Some(v) = p.get(which) else { continue };
            let value = match v.get("value") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => continue,
                Some(other) => {
                    return Err(fail(
                        400,
                        format!("{name}.{which}.value must be a string, not {other}"),
                    ));
                }
            };
            if value.len() > MAX_VALUE_BYTES {
                return Err(fail(
                    400,
                    format!("{name}.{which}.value is longer than {MAX_VALUE_BYTES} bytes"),
                ));
            }
            if which == "expected" && !known.writable {
                return Err(fail(
                    400,
                    format!("property {name} of device {id} is read-only"),
                ));
            }
            map.insert(name.clone(), value);
        }
    }
    if update.expected.is_empty() && update.actual.is_empty() {
        return Err(fail(
            400,
            "the update sets no expected or actual value".into(),
        ));
    }
    Ok(update)
}

/// What a document or delta compares: expected and actual per property.
type Values = BTreeMap<String, (Option<String>, Option<String>)>;

fn values_of(twin: &DeviceTwin) -> Values {
    twin.properties
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                (
                    p.desired.clone(),
                    p.reported.as_ref().map(|r| r.value.clone()),
                ),
            )
        })
        .collect()
}

fn pair_json((expected, actual): &(Option<String>, Option<String>)) -> Value {
    json!({
        "expected": expected.as_ref().map(|v| json!({"value": v})),
        "actual": actual.as_ref().map(|v| json!({"value": v})),
    })
}

async fn serve(
    engine: Engine,
    view: TwinView,
    config: EventBusConfig,
    client: AsyncClient,
    mut incoming: mpsc::Receiver<(String, Vec<u8>)>,
) {
    let mut changes = view.subscribe();
    // What was last published per device: values and state.
    let mut last: BTreeMap<String, (Values, String)> = view
        .snapshot()
        .iter()
        .map(|(id, t)| (id.clone(), (values_of(t), t.state.clone())))
        .collect();
    let publish = |topic: String, body: Value| {
        if let Err(e) = client.try_publish(&topic, QoS::AtLeastOnce, false, body.to_string()) {
            debug!(%topic, error = %e, "event bus message dropped");
        }
    };
    loop {
        tokio::select! {
            msg = incoming.recv() => {
                let Some((topic, payload)) = msg else { return };
                let Some(request) = parse_topic(&topic, &config.node) else { continue };
                match request {
                    Request::TwinUpdate(id) => {
                        let topic = device_topic(&id, "twin/update/result");
                        let twin = view.device(&id);
                        match parse_update(&payload, twin.as_ref(), &id) {
                            Err((event_id, code, reason)) => {
                                debug!(device = %id, code, %reason, "twin update refused");
                                publish(topic, error_result(&event_id, code, &reason));
                            }
                            Ok(update) => {
                                let result = apply_update(&engine, &view, &config.node, &id, &update).await;
                                match result {
                                    Ok(()) => publish(topic, json!({
                                        "event_id": update.event_id,
                                        "timestamp": now_ms(),
                                        "code": 200,
                                        "reason": "",
                                    })),
                                    Err(e) => {
                                        let code = match e {
                                            LocalWriteError::UnknownDevice(_) => 404,
                                            LocalWriteError::Store(_) => 500,
                                            _ => 400,
                                        };
                                        publish(topic, error_result(&update.event_id, code, &e.to_string()));
                                    }
                                }
                            }
                        }
                    }
                    Request::TwinGet(id) => {
                        let event_id = serde_json::from_slice::<Value>(&payload)
                            .ok()
                            .and_then(|v| v.get("event_id").and_then(Value::as_str).map(str::to_owned))
                            .unwrap_or_default();
                        let topic = device_topic(&id, "twin/get/result");
                        match view.device(&id) {
                            Some(twin) => publish(topic, json!({
                                "event_id": event_id,
                                "timestamp": now_ms(),
                                "code": 200,
                                "twin": twin_json(&twin),
                            })),
                            None => publish(topic, error_result(&event_id, 404, &format!("no device {id} on this node"))),
                        }
                    }
                    Request::StateUpdate(id) => {
                        // The node's own driver tracks the state; the
                        // answer says what it is.
                        let topic = device_topic(&id, "state/update/result");
                        match view.device(&id) {
                            Some(twin) => publish(topic, state_json(&twin)),
                            None => publish(topic, error_result("", 404, &format!("no device {id} on this node"))),
                        }
                    }
                    Request::Membership => {
                        let event_id = serde_json::from_slice::<Value>(&payload)
                            .ok()
                            .and_then(|v| v.get("event_id").and_then(Value::as_str).map(str::to_owned))
                            .unwrap_or_default();
                        let devices: Vec<Value> = view.snapshot().values().map(|t| json!({
                            "id": t.id(),
                            "name": t.name,
                            "namespace": t.namespace,
                            "model": t.model,
                            "protocol": t.protocol,
                            "state": t.state,
                            "twin": twin_json(t),
                        })).collect();
                        publish(
                            format!("$hw/events/node/{}/membership/get/result", config.node),
                            json!({"event_id": event_id, "timestamp": now_ms(), "devices": devices}),
                        );
                    }
                }
            }
            changed = changes.recv() => {
                let ids: Vec<String> = match changed {
                    Ok(id) => vec![id],
                    Err(broadcast::error::RecvError::Lagged(_)) => view.snapshot().keys().cloned().collect(),
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                for id in ids {
                    let Some(twin) = view.device(&id) else {
                        last.remove(&id);
                        continue;
                    };
                    let now = values_of(&twin);
                    let (before, state) = last.remove(&id).unwrap_or_default();
                    let changed: Vec<&String> = now.keys().filter(|k| before.get(*k) != now.get(*k)).collect();
                    if !changed.is_empty() {
                        let doc: serde_json::Map<String, Value> = changed.iter().map(|k| {
                            let empty = (None, None);
                            ((*k).clone(), json!({
                                "last": pair_json(before.get(*k).unwrap_or(&empty)),
                                "current": pair_json(&now[*k]),
                            }))
                        }).collect();
                        publish(device_topic(&id, "twin/update/document"), json!({
                            "event_id": "",
                            "timestamp": now_ms(),
                            "twin": doc,
                        }));
                        let delta: serde_json::Map<String, Value> = now.iter().filter_map(|(k, (e, a))| {
                            let e = e.as_ref()?;
                            (Some(e) != a.as_ref()).then(|| (k.clone(), Value::String(e.clone())))
                        }).collect();
                        if !delta.is_empty() {
                            publish(device_topic(&id, "twin/update/delta"), json!({
                                "event_id": "",
                                "timestamp": now_ms(),
                                "twin": twin_json(&twin),
                                "delta": delta,
                            }));
                        }
                    }
                    if state != twin.state {
                        publish(device_topic(&id, "state/update/result"), state_json(&twin));
                    }
                    last.insert(id, (now, twin.state.clone()));
                }
            }
        }
    }
}

async fn apply_update(
    engine: &Engine,
    view: &TwinView,
    node: &str,
    id: &str,
    update: &Update,
) -> Result<(), LocalWriteError> {
    for (property, value) in &update.expected {
        set_local_desired(engine, view, node, id, property, value)?;
    }
    for (property, value) in &update.actual {
        view.report_actual(id, property, value).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twins::PropertyTwin;

    fn twin() -> DeviceTwin {
        let mut t = DeviceTwin {
            namespace: "default".into(),
            name: "thermo".into(),
            ..Default::default()
        };
        t.properties.insert(
            "fan".into(),
            PropertyTwin {
                kind: "INT".into(),
                writable: true,
                ..Default::default()
            },
        );
        t.properties.insert(
            "measured".into(),
            PropertyTwin {
                kind: "INT".into(),
                writable: false,
                ..Default::default()
            },
        );
        t
    }

    #[test]
    fn topics_parse_with_and_without_namespace_and_results_are_ignored() {
        let p = |t: &str| parse_topic(t, "edge-1");
        assert_eq!(
            p("$hw/events/device/default/thermo/twin/update"),
            Some(Request::TwinUpdate("default/thermo".into()))
        );
        assert_eq!(
            p("$hw/events/device/thermo/twin/get"),
            Some(Request::TwinGet("default/thermo".into()))
        );
        assert_eq!(
            p("$hw/events/device/ns/d/state/update"),
            Some(Request::StateUpdate("ns/d".into()))
        );
        assert_eq!(
            p("$hw/events/device/default/thermo/twin/update/result"),
            None
        );
        assert_eq!(
            p("$hw/events/device/default/thermo/twin/update/document"),
            None
        );
        assert_eq!(p("$hw/events/device//x/twin/update"), None);
        assert_eq!(
            p("$hw/events/node/edge-1/membership/get"),
            Some(Request::Membership)
        );
        assert_eq!(p("$hw/events/node/edge-2/membership/get"), None);
        assert_eq!(p("something/else"), None);
    }

    #[test]
    fn updates_are_checked_whole() {
        let t = twin();
        let ok = parse_update(
            br#"{"event_id":"e1","twin":{"fan":{"expected":{"value":"4"}},"measured":{"actual":{"value":"20"}}}}"#,
            Some(&t),
            "default/thermo",
        )
        .unwrap();
        assert_eq!(ok.event_id, "e1");
        assert_eq!(ok.expected["fan"], "4");
        assert_eq!(ok.actual["measured"], "20");

        let code = |payload: &[u8], twin: Option<&DeviceTwin>| {
            parse_update(payload, twin, "default/thermo").unwrap_err().1
        };
        assert_eq!(code(b"not json", Some(&t)), 400);
        assert_eq!(
            code(br#"{"twin":{"fan":{"expected":{"value":"1"}}}}"#, None),
            404
        );
        assert_eq!(code(br#"{"twin":[]}"#, Some(&t)), 400);
        assert_eq!(
            code(br#"{"twin":{"nope":{"expected":{"value":"1"}}}}"#, Some(&t)),
            400
        );
        assert_eq!(
            code(
                br#"{"twin":{"measured":{"expected":{"value":"1"}}}}"#,
                Some(&t)
            ),
            400
        );
        assert_eq!(
            code(br#"{"twin":{"fan":{"expected":{"value":4}}}}"#, Some(&t)),
            400
        );
        assert_eq!(code(br#"{"twin":{"fan":{}}}"#, Some(&t)), 400);
        let long = format!(
            r#"{{"twin":{{"fan":{{"expected":{{"value":"{}"}}}}}}}}"#,
            "9".repeat(513)
        );
        assert_eq!(code(long.as_bytes(), Some(&t)), 400);
        let (event, _, reason) = parse_update(
            br#"{"event_id":"e2","twin":{"measured":{"expected":{"value":"1"}}}}"#,
            Some(&t),
            "default/thermo",
        )
        .unwrap_err();
        assert_eq!(event, "e2");
        assert!(reason.contains("read-only"), "{reason}");
    }
}
