//! The local API for edge apps and operators, on loopback by default
//! (`127.0.0.1:10550`, KubeEdge's metaserver port). It reads the local
//! replica and twins only, so it answers the same with the cloud gone.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text: sync, pod, device and mapper metrics |
//! | `GET /api/v1/pods` | this node's pods, spec and status (`{"kind":"PodList","items":[...]}`) |
//! | `GET /api/v1/configmaps` | the ConfigMaps this node holds |
//! | `GET /api/v1/devices` | the node's device twins |
//! | `GET /api/v1/status` | node, peers, pods and devices in brief (`outpost-edge status`) |
//!
//! The three lists take `?watch=true`: the answer is then a stream of JSON
//! lines, `{"type":"ADDED|MODIFIED|DELETED","object":{...}}`, starting with
//! an `ADDED` per existing object, as a Kubernetes watch does.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use outpost_sync::PeerId;
use outpost_sync::document::{DocId, DocKind};
use outpost_sync::engine::Engine;
use outpost_sync::replica::{Scope, SubscriptionError};
use outpost_sync::schema::{ConfigMapDoc, PodSpecDoc, PodStatusDoc};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info};

use crate::clock::now_ms;
use crate::metrics::EdgeMetrics;
use crate::twins::{PropertyMap, TwinView, Twins};

/// The API's default address.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:10550";

/// What the API reads.
#[derive(Clone)]
pub struct ApiState {
    /// The agent's engine.
    pub engine: Engine,
    /// The node's twins.
    pub twins: TwinView,
    /// This node's name.
    pub node: String,
    /// This node's site, if any.
    pub site: Option<String>,
    /// The peers this node syncs with (the cloud).
    pub peers: Vec<PeerId>,
    /// The edge metrics.
    pub metrics: EdgeMetrics,
    /// Everything `/metrics` shows.
    pub registry: Arc<Registry>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/pods", get(pods))
        .route("/api/v1/configmaps", get(configmaps))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/status", get(status))
        .with_state(state)
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the local API listens beyond loopback: anyone who reaches it can read this node's pods and devices");
        }
        info!(%addr, "local API and metrics listening");
    }
    axum::serve(listener, router(state)).await
}

/// Binds the API's address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// A body serde wrote, or a 500 saying why it could not.
fn json_text_response(text: serde_json::Result<String>) -> Response {
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn json_response(value: &Value) -> Response {
    json_text_response(Ok(value.to_string()))
}

fn wants_watch(uri: &Uri) -> bool {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
}

/// A stream of JSON lines fed by `lines`.
fn line_stream(lines: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures::stream::unfold(lines, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn event(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn metrics(State(s): State<ApiState>) -> Response {
    s.metrics.refresh(&s.engine, &s.node, &s.twins);
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &s.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Document ids of a kind with one of `owners` (`<node>` or `site:<site>`).
fn ids_of(engine: &Engine, kind: DocKind, owners: &[String]) -> Vec<DocId> {
    let prefixes: Vec<String> = owners
        .iter()
        .map(|o| format!("{}/{o}/", kind.as_str()))
        .collect();
    engine.with_replica(|r| {
        prefixes
            .iter()
            .flat_map(|p| r.scan_prefix(p).filter_map(Result::ok).map(|(id, _)| id))
            .collect()
    })
}

/// A pod's spec and status by its pod-spec or pod-status id; `None` when
/// neither is there (deleted).
fn pod_object(engine: &Engine, doc: &DocId) -> (Value, bool) {
    let parts: Vec<&str> = doc.as_str().split('/').collect();
    let (ns, name, uid) = match parts.as_slice() {
        [_, _, ns, name, uid] => (*ns, *name, *uid),
        _ => ("", "", ""),
    };
    let suffix = parts.get(1..).map(|p| p.join("/")).unwrap_or_default();
    let spec_id: Option<DocId> = format!("{}/{suffix}", DocKind::PodSpec.as_str())
        .parse()
        .ok();
    let status_id: Option<DocId> = format!("{}/{suffix}", DocKind::PodStatus.as_str())
        .parse()
        .ok();
    let (spec, status) = engine.with_replica(|r| {
        (
            spec_id.and_then(|id| r.get::<PodSpecDoc>(&id).ok().flatten()),
            status_id.and_then(|id| r.get::<PodStatusDoc>(&id).ok().flatten()),
        )
    });
    let exists = spec.is_some();
    (
        json!({"namespace": ns, "name": name, "uid": uid, "spec": spec, "status": status}),
        exists,
    )
}

fn node_owners(s: &ApiState) -> Vec<String> {
    let mut owners = vec![s.node.clone()];
    if let Some(site) = &s.site {
        owners.push(format!("site:{site}"));
    }
    owners
}

fn list_pods(s: &ApiState) -> Vec<Value> {
    ids_of(&s.engine, DocKind::PodSpec, std::slice::from_ref(&s.node))
        .iter()
        .filter_map(|id| {
            let (obj, exists) = pod_object(&s.engine, id);
            exists.then_some(obj)
        })
        .collect()
}

fn list_configmaps(s: &ApiState) -> Vec<Value> {
    ids_of(&s.engine, DocKind::ConfigMap, &node_owners(s))
        .iter()
        .filter_map(|id| {
            s.engine
                .with_replica(|r| r.get::<ConfigMapDoc>(id).ok().flatten())
                .and_then(|cm| serde_json::to_value(cm).ok())
        })
        .collect()
}

/// Watches documents of `kinds` in the node's scope; `object` renders a
/// changed document (`None`: it is gone).
fn watch_docs(
    s: ApiState,
    kinds: Vec<DocKind>,
    initial: Vec<Value>,
    object: fn(&ApiState, &DocId) -> (Value, bool),
) -> Response {
    let (tx, rx) = mpsc::channel(64);
    // A scope names one owner; with a site there are two, filtered here.
    let owners = node_owners(&s);
    let scope = match &s.site {
        None => Scope::all().kinds(kinds).node(s.node.clone()),
        Some(_) => Scope::all().kinds(kinds),
    };
    let mut sub = s.engine.with_replica(|r| r.subscribe_scope(scope));
    tokio::spawn(async move {
        for o in &initial {
            if tx.send(event("ADDED", o)).await.is_err() {
                return;
            }
        }
        loop {
            let doc = tokio::select! {
                () = tx.closed() => return,
                doc = sub.recv() => doc,
            };
            let line = match doc {
                Ok(doc)
                    if !owners
                        .iter()
                        .any(|o| doc.as_str().split('/').nth(1) == Some(o)) =>
                {
                    continue;
                }
                Ok(doc) => {
                    let (obj, exists) = object(&s, &doc);
                    event(if exists { "MODIFIED" } else { "DELETED" }, &obj)
                }
                // Too far behind: the client lists again.
                Err(SubscriptionError::Lagged(_)) => event(
                    "ERROR",
                    &json!({"reason": "Expired", "message": "the watch fell behind; list again"}),
                ),
                Err(SubscriptionError::Closed) => return,
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    line_stream(rx)
}

async fn pods(State(s): State<ApiState>, uri: Uri) -> Response {
    let items = list_pods(&s);
    if wants_watch(&uri) {
        return watch_docs(
            s,
            vec![DocKind::PodSpec, DocKind::PodStatus],
            items,
            |s, doc| pod_object(&s.engine, doc),
        );
    }
    json_response(&json!({"kind": "PodList", "items": items}))
}

async fn configmaps(State(s): State<ApiState>, uri: Uri) -> Response {
    let items = list_configmaps(&s);
    if wants_watch(&uri) {
        return watch_docs(s, vec![DocKind::ConfigMap], items, |s, doc| {
            match s
                .engine
                .with_replica(|r| r.get::<ConfigMapDoc>(doc).ok().flatten())
            {
                Some(cm) => (serde_json::to_value(cm).unwrap_or_default(), true),
                None => {
                    let parts: Vec<&str> = doc.as_str().split('/').collect();
                    let (ns, name) = match parts.as_slice() {
                        [_, _, ns, name] => (*ns, *name),
                        _ => ("", ""),
                    };
                    (json!({"namespace": ns, "name": name}), false)
                }
            }
        });
    }
    json_response(&json!({"kind": "ConfigMapList", "items": items}))
}

async fn devices(State(s): State<ApiState>, uri: Uri) -> Response {
    if !wants_watch(&uri) {
        // Written straight from the twins: no copy of them, and no JSON
        // tree of a thousand devices in between.
        return s.twins.read(|twins| {
            #[derive(serde::Serialize)]
            struct DeviceList<'a> {
                kind: &'static str,
                items: TwinList<'a>,
            }
            json_text_response(serde_json::to_string(&DeviceList {
                kind: "DeviceList",
                items: TwinList(twins),
            }))
        });
    }
    let items: Vec<Value> = s
        .twins
        .snapshot()
        .values()
        .filter_map(|t| serde_json::to_value(t).ok())
        .collect();
    let (tx, rx) = mpsc::channel(64);
    let mut changes = s.twins.subscribe();
    tokio::spawn(async move {
        for o in &items {
            if tx.send(event("ADDED", o)).await.is_err() {
                return;
            }
        }
        loop {
            let changed = tokio::select! {
                () = tx.closed() => return,
                c = changes.recv() => c,
            };
            let line = match changed {
                Ok(id) => match s.twins.device(&id) {
                    Some(t) => event("MODIFIED", &serde_json::to_value(t).unwrap_or_default()),
                    None => {
                        let (ns, name) = id.split_once('/').unwrap_or(("", &id));
                        event("DELETED", &json!({"namespace": ns, "name": name}))
                    }
                },
                Err(broadcast::error::RecvError::Lagged(_)) => event(
                    "ERROR",
                    &json!({"reason": "Expired", "message": "the watch fell behind; list again"}),
                ),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(line).await.is_err() {
                debug!("device watch closed by the client");
                return;
            }
        }
    });
    line_stream(rx)
}

async fn status(State(s): State<ApiState>) -> Response {
    let connected = s.engine.connected();
    let now = now_ms() as i64;
    let peers: Vec<Value> = s
        .peers
        .iter()
        .map(|p| {
            let up = connected.contains(p);
            json!({
                "peer": p.to_string(),
                "connected": up,
                "pending": s.engine.pending(p),
                "oldest_unacked_age_ms": s.engine.watermark_ms(p).map(|w| (now - w).max(0)),
            })
        })
        .collect();
    let pods: Vec<Value> = list_pods(&s)
        .into_iter()
        .map(|p| {
            let status: Option<PodStatusDoc> = serde_json::from_value(p["status"].clone()).ok();
            let total = p["spec"]["containers"].as_array().map_or(0, Vec::len);
            let (phase, ready, restarts, reason) = match &status {
                Some(st) => (
                    st.phase.clone(),
                    st.container_statuses.iter().filter(|c| c.ready).count(),
                    st.container_statuses
                        .iter()
                        .map(|c| i64::from(c.restart_count))
                        .sum::<i64>(),
                    st.reason.clone().or_else(|| {
                        st.container_statuses
                            .iter()
                            .find_map(|c| c.state.waiting.as_ref().and_then(|w| w.reason.clone()))
                    }),
                ),
                None => ("Pending".to_owned(), 0, 0, None),
            };
            json!({
                "namespace": p["namespace"],
                "name": p["name"],
                "phase": phase,
                "ready": format!("{ready}/{total}"),
                "restarts": restarts,
                "reason": reason,
            })
        })
        .collect();
    // The devices are written straight from the twins (see `devices`).
    #[derive(serde::Serialize)]
    struct Status<'a> {
        node: &'a str,
        id: String,
        peers: Vec<Value>,
        pods: Vec<Value>,
        devices: DeviceRows<'a>,
    }
    let id = s.engine.me().to_string();
    s.twins.read(|twins| {
        json_text_response(serde_json::to_string(&Status {
            node: &s.node,
            id,
            peers,
            pods,
            devices: DeviceRows(twins),
        }))
    })
}

/// The twins as a list, written from where they are.
struct TwinList<'a>(&'a Twins);

impl serde::Serialize for TwinList<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.values())
    }
}

/// The devices of `/api/v1/status`: id, protocol, state, error, and each
/// property's actual and desired value.
struct DeviceRows<'a>(&'a Twins);

impl serde::Serialize for DeviceRows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            id: String,
            protocol: &'a str,
            state: &'a str,
            error: &'a Option<String>,
            properties: PropertyRows<'a>,
        }
        serializer.collect_seq(self.0.values().map(|t| Row {
            id: t.id(),
            protocol: &t.protocol,
            state: &t.state,
            error: &t.error,
            properties: PropertyRows(&t.properties),
        }))
    }
}

struct PropertyRows<'a>(&'a PropertyMap);

impl serde::Serialize for PropertyRows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Row<'a> {
            actual: Option<&'a str>,
            desired: &'a Option<String>,
        }
        serializer.collect_map(self.0.iter().map(|(name, p)| {
            let actual = p.reported.as_ref().map(|r| r.value.as_str());
            (
                name,
                Row {
                    actual,
                    desired: &p.desired,
                },
            )
        }))
    }
}
