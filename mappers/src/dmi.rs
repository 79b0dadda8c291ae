//! KubeEdge's DMI gRPC interface (v1beta1): the mapper side.
//!
//! A standalone mapper ([`Mapper`]) serves `DeviceMapperService` on its own
//! unix socket, registers with the edge agent's `DeviceManagerService` (on the
//! agent's unix socket) to learn the models and devices it serves, runs one
//! task per device, and reports twins (`ReportDeviceStatus`) and online /
//! offline states (`ReportDeviceStates`) back to the agent.
//!
//! The wire format is KubeEdge's: `proto/dmi/v1beta1/api.proto` repeats its
//! package, services, messages and field numbers. The Rust code generated from
//! it is committed and checked by `tests/dmi_codegen.rs`.
//!
//! configData arrives as a map of `google.protobuf.Any`; [`any_to_json`]
//! unpacks the well-known wrappers (StringValue, Int64Value, DoubleValue,
//! BoolValue, ...) and `google.protobuf.Value`/`Struct`/`ListValue`.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1beta1 {
    //! Messages and services generated from `proto/dmi/v1beta1/api.proto`.
    include!("dmi/v1beta1.generated.rs");
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use serde_json::Value as Json;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::device::{self, DeviceHandle, DeviceSender, Report};
use crate::driver::{DeviceState, WriteError};
use crate::property::PropertySpec;
use crate::spec::{DeviceSpec, ModelSpec, PropertyBinding, build};
use v1beta1::device_manager_service_client::DeviceManagerServiceClient;
use v1beta1::device_mapper_service_server::{DeviceMapperService, DeviceMapperServiceServer};

/// A configData value that cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnyError {
    /// A type this mapper does not unpack.
    #[error("configData value of type {0} is not supported")]
    UnsupportedType(String),
    /// The bytes do not decode as the named type.
    #[error("configData value of type {type_url} does not decode: {reason}")]
    Decode {
        /// The type.
        type_url: String,
        /// Why.
        reason: String,
    },
}

fn well_known_value(value: &prost_types::Value) -> Json {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number)
        }
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(well_known_value).collect()),
    }
}

fn struct_to_json(s: &prost_types::Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), well_known_value(v)))
            .collect(),
    )
}

/// Unpacks one configData value.
pub fn any_to_json(any: &prost_types::Any) -> Result<Json, AnyError> {
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    let bytes = any.value.as_slice();
    let decode_err = |e: prost::DecodeError| AnyError::Decode {
        type_url: any.type_url.clone(),
        reason: e.to_string(),
    };
    Ok(match name {
        "google.protobuf.StringValue" => Json::String(String::decode(bytes).map_err(decode_err)?),
        "google.protobuf.BytesValue" => {
            use base64::Engine as _;
            Json::String(
                base64::engine::general_purpose::STANDARD
                    .encode(Vec::<u8>::decode(bytes).map_err(decode_err)?),
            )
        }
        "google.protobuf.Int32Value" => Json::from(i32::decode(bytes).map_err(decode_err)?),
        "google.protobuf.Int64Value" => Json::from(i64::decode(bytes).map_err(decode_err)?),
        "google.protobuf.UInt32Value" => Json::from(u32::decode(bytes).map_err(decode_err)?),
        "google.protobuf.UInt64Value" => Json::from(u64::decode(bytes).map_err(decode_err)?),
        "google.protobuf.FloatValue" => {
            serde_json::Number::from_f64(f64::from(f32::decode(bytes).map_err(decode_err)?))
                .map_or(Json::Null, Json::Number)
        }
        "google.protobuf.DoubleValue" => {
            serde_json::Number::from_f64(f64::decode(bytes).map_err(decode_err)?)
                .map_or(Json::Null, Json::Number)
        }
        "google.protobuf.BoolValue" => Json::Bool(bool::decode(bytes).map_err(decode_err)?),
        "google.protobuf.Value" => {
            well_known_value(&prost_types::Value::decode(bytes).map_err(decode_err)?)
        }
        "google.protobuf.Struct" => {
            struct_to_json(&prost_types::Struct::decode(bytes).map_err(decode_err)?)
        }
        "google.protobuf.ListValue" => Json::Array(
            prost_types::ListValue::decode(bytes)
                .map_err(decode_err)?
                .values
                .iter()
                .map(well_known_value)
                .collect(),
        ),
        _ => return Err(AnyError::UnsupportedType(any.type_url.clone())),
    })
}

/// Packs a JSON value as KubeEdge's configData values are packed (strings,
/// integers, doubles and booleans as wrappers, the rest as
/// `google.protobuf.Value`).
pub fn json_to_any(value: &Json) -> prost_types::Any {
    let pack = |name: &str, value: Vec<u8>| prost_types::Any {
        type_url: format!("type.googleapis.com/google.protobuf.{name}"),
        value,
    };
    match value {
        Json::String(s) => pack("StringValue", s.encode_to_vec()),
        Json::Bool(b) => pack("BoolValue", b.encode_to_vec()),
        Json::Number(n) => match n.as_i64() {
            Some(i) => pack("Int64Value", i.encode_to_vec()),
            None => pack(
                "DoubleValue",
                n.as_f64().unwrap_or_default().encode_to_vec(),
            ),
        },
        other => pack("Value", json_to_value(other).encode_to_vec()),
    }
}

fn json_to_value(value: &Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Unpacks a configData map.
pub fn config_to_json(config: Option<&v1beta1::CustomizedValue>) -> Result<Json, AnyError> {
    let mut out = serde_json::Map::new();
    for (key, any) in config.map(|c| &c.data).into_iter().flatten() {
        out.insert(key.clone(), any_to_json(any)?);
    }
    Ok(Json::Object(out))
}

/// Packs a JSON object as a configData map.
pub fn json_to_config(value: &Json) -> v1beta1::CustomizedValue {
    v1beta1::CustomizedValue {
        data: value
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), json_to_any(v))).collect())
            .unwrap_or_default(),
    }
}

/// A gRPC message that does not describe a usable device or model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MessageError {
    /// A required part is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// configData cannot be read.
    #[error(transparent)]
    Any(#[from] AnyError),
    /// The model's strings cannot be used.
    #[error(transparent)]
    Model(#[from] crate::property::ModelError),
}

/// Reads a DeviceModel message.
pub fn model_from_proto(model: &v1beta1::DeviceModel) -> Result<ModelSpec, MessageError> {
    let spec = model
        .spec
        .as_ref()
        .ok_or(MessageError::Missing("model spec"))?;
    let properties = spec
        .properties
        .iter()
        .map(|p| {
            PropertySpec::from_model(&p.name, &p.r#type, &p.access_mode, &p.minimum, &p.maximum)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ModelSpec {
        name: model.name.clone(),
        namespace: namespace_or_default(&model.namespace),
        properties,
    })
}

/// Reads a Device message.
pub fn device_from_proto(device: &v1beta1::Device) -> Result<DeviceSpec, MessageError> {
    let spec = device
        .spec
        .as_ref()
        .ok_or(MessageError::Missing("device spec"))?;
    let protocol = spec
        .protocol
        .as_ref()
        .ok_or(MessageError::Missing("device protocol"))?;
    let properties = spec
        .properties
        .iter()
        .map(|p| {
            Ok(PropertyBinding {
                name: p.name.clone(),
                visitor: config_to_json(p.visitors.as_ref().and_then(|v| v.config_data.as_ref()))?,
                collect_cycle: p.collect_cycle,
                desired: p
                    .desired
                    .as_ref()
                    .map(|d| d.value.clone())
                    .filter(|v| !v.is_empty()),
            })
        })
        .collect::<Result<Vec<_>, MessageError>>()?;
    Ok(DeviceSpec {
        name: device.name.clone(),
        namespace: namespace_or_default(&device.namespace),
        model: spec.device_model_reference.clone(),
        protocol: protocol.protocol_name.clone(),
        protocol_config: config_to_json(protocol.config_data.as_ref())?,
        properties,
    })
}

fn namespace_or_default(ns: &str) -> String {
    if ns.is_empty() {
        "default".into()
    } else {
        ns.to_owned()
    }
}

fn model_key(namespace: &str, name: &str) -> String {
    format!("{}/{name}", namespace_or_default(namespace))
}

struct Served {
    message: v1beta1::Device,
    spec: DeviceSpec,
    // Dropping the handle stops the device's task.
    handle: DeviceHandle,
}

/// The devices and models a mapper serves.
pub struct Mapper {
    models: Mutex<HashMap<String, (v1beta1::DeviceModel, ModelSpec)>>,
    devices: Mutex<HashMap<String, Served>>,
    reports: mpsc::Sender<Report>,
}

impl std::fmt::Debug for Mapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let devices = self.devices.lock().map(|d| d.len()).unwrap_or(0);
        f.debug_struct("Mapper").field("devices", &devices).finish()
    }
}

impl Mapper {
    /// A mapper with no devices; reports of its devices go to the returned
    /// receiver.
    pub fn new() -> (Arc<Self>, mpsc::Receiver<Report>) {
        let (reports, rx) = mpsc::channel(1024);
        (
            Arc::new(Self {
                models: Mutex::default(),
                devices: Mutex::default(),
                reports,
            }),
            rx,
        )
    }

    /// Adds or replaces a model; devices of that model are rebuilt.
    pub fn put_model(&self, message: v1beta1::DeviceModel) -> Result<(), Status> {
        let spec =
            model_from_proto(&message).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = model_key(&spec.namespace, &spec.name);
        self.models
            .lock()
            .map_err(|_| Status::internal("model table poisoned"))?
            .insert(key.clone(), (message, spec));
        let stale: Vec<v1beta1::Device> = self
            .devices
            .lock()
            .map_err(|_| Status::internal("device table poisoned"))?
            .values()
            .filter(|s| model_key(&s.spec.namespace, &s.spec.model) == key)
            .map(|s| s.message.clone())
            .collect();
        for device in stale {
            self.put_device(device)?;
        }
        Ok(())
    }

    /// Removes a model (its devices keep running until they are removed).
    pub fn remove_model(&self, namespace: &str, name: &str) -> Result<(), Status> {
        self.models
            .lock()
            .map_err(|_| Status::internal("model table poisoned"))?
            .remove(&model_key(namespace, name));
        Ok(())
    }

    /// Starts (or restarts with new settings) a device's task.
    pub fn put_device(&self, message: v1beta1::Device) -> Result<String, Status> {
        let spec =
            device_from_proto(&message).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let model = self
            .models
            .lock()
            .map_err(|_| Status::internal("model table poisoned"))?
            .get(&model_key(&spec.namespace, &spec.model))
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "device {}: model {} is unknown",
                    spec.id(),
                    spec.model
                ))
            })?;
        let (driver, run) =
            build(&spec, &model).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = spec.id();
        let handle = device::spawn(id.clone(), driver, run, self.reports.clone());
        info!(device = %id, protocol = %spec.protocol, "serving device");
        // Desired values new to this message are written to the device.
        let before: HashMap<String, Option<String>> = self
            .devices
            .lock()
            .map_err(|_| Status::internal("device table poisoned"))?
            .get(&id)
            .map(|s| {
                s.spec
                    .properties
                    .iter()
                    .map(|p| (p.name.clone(), p.desired.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for p in &spec.properties {
            if let Some(want) = &p.desired
                && before.get(&p.name) != Some(&Some(want.clone()))
            {
                apply_desired(handle.sender(), id.clone(), p.name.clone(), want.clone());
            }
        }
        self.devices
            .lock()
            .map_err(|_| Status::internal("device table poisoned"))?
            .insert(
                id.clone(),
                Served {
                    message,
                    spec,
                    handle,
                },
            );
        Ok(id)
    }

    /// Stops a device's task.
    pub fn remove_device(&self, namespace: &str, name: &str) -> Result<bool, Status> {
        let id = format!("{}/{name}", namespace_or_default(namespace));
        let removed = self
            .devices
            .lock()
            .map_err(|_| Status::internal("device table poisoned"))?
            .remove(&id)
            .is_some();
        if removed {
            info!(device = %id, "device removed");
        }
        Ok(removed)
    }

    /// The Device message a device was registered with.
    pub fn device(&self, namespace: &str, name: &str) -> Option<v1beta1::Device> {
        let id = format!("{}/{name}", namespace_or_default(namespace));
        self.devices
            .lock()
            .ok()?
            .get(&id)
            .map(|s| s.message.clone())
    }

    /// Writes a property through the device's task.
    pub async fn write(
        &self,
        namespace: &str,
        name: &str,
        property: &str,
        value: &str,
    ) -> Result<(), Status> {
        let id = format!("{}/{name}", namespace_or_default(namespace));
        // The handle cannot be held across the await under the lock: build a
        // fresh sender instead.
        let sender = {
            let devices = self
                .devices
                .lock()
                .map_err(|_| Status::internal("device table poisoned"))?;
            let served = devices
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("no device {id}")))?;
            served.handle.sender()
        };
        match sender.write(property, value).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }
}

/// Writes a desired value through a device's task, retrying while the
/// device is unreachable (up to about a minute); a value the property
/// refuses is not retried, and a replaced task ends the attempt.
fn apply_desired(sender: DeviceSender, id: String, property: String, value: String) {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(200);
        for _ in 0..12 {
            match sender.write(&property, &value).await {
                Ok(Ok(())) => {
                    info!(device = %id, %property, %value, "desired value applied");
                    return;
                }
                Ok(Err(e @ (WriteError::Refused(_) | WriteError::UnknownProperty(_)))) => {
                    warn!(device = %id, %property, %value, error = %e, "desired value refused");
                    return;
                }
                Ok(Err(e)) => {
                    debug!(device = %id, %property, error = %e, "desired value not applied yet")
                }
                Err(_) => return,
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        warn!(device = %id, %property, %value, "desired value not applied: the device did not take it");
    });
}

/// `DeviceMapperService` over a [`Mapper`].
#[derive(Debug, Clone)]
pub struct MapperService(pub Arc<Mapper>);

#[tonic::async_trait]
impl DeviceMapperService for MapperService {
    async fn register_device(
        &self,
        request: Request<v1beta1::RegisterDeviceRequest>,
    ) -> Result<Response<v1beta1::RegisterDeviceResponse>, Status> {
        let device = request
            .into_inner()
            .device
            .ok_or_else(|| Status::invalid_argument("device is missing"))?;
        let (name, namespace) = (device.name.clone(), namespace_or_default(&device.namespace));
        self.0.put_device(device)?;
        Ok(Response::new(v1beta1::RegisterDeviceResponse {
            device_name: name,
            device_namespace: namespace,
        }))
    }

    async fn remove_device(
        &self,
        request: Request<v1beta1::RemoveDeviceRequest>,
    ) -> Result<Response<v1beta1::RemoveDeviceResponse>, Status> {
        let r = request.into_inner();
        self.0.remove_device(&r.device_namespace, &r.device_name)?;
        Ok(Response::new(v1beta1::RemoveDeviceResponse {}))
    }

    async fn update_device(
        &self,
        request: Request<v1beta1::UpdateDeviceRequest>,
    ) -> Result<Response<v1beta1::UpdateDeviceResponse>, Status> {
        let device = request
            .into_inner()
            .device
            .ok_or_else(|| Status::invalid_argument("device is missing"))?;
        self.0.put_device(device)?;
        Ok(Response::new(v1beta1::UpdateDeviceResponse {}))
    }

    async fn create_device_model(
        &self,
        request: Request<v1beta1::CreateDeviceModelRequest>,
    ) -> Result<Response<v1beta1::CreateDeviceModelResponse>, Status> {
        let model = request
            .into_inner()
            .model
            .ok_or_else(|| Status::invalid_argument("model is missing"))?;
        let (name, namespace) = (model.name.clone(), namespace_or_default(&model.namespace));
        self.0.put_model(model)?;
        Ok(Response::new(v1beta1::CreateDeviceModelResponse {
            device_model_name: name,
            device_model_namespace: namespace,
        }))
    }

    async fn remove_device_model(
        &self,
        request: Request<v1beta1::RemoveDeviceModelRequest>,
    ) -> Result<Response<v1beta1::RemoveDeviceModelResponse>, Status> {
        let r = request.into_inner();
        self.0.remove_model(&r.model_namespace, &r.model_name)?;
        Ok(Response::new(v1beta1::RemoveDeviceModelResponse {}))
    }

    async fn update_device_model(
        &self,
        request: Request<v1beta1::UpdateDeviceModelRequest>,
    ) -> Result<Response<v1beta1::UpdateDeviceModelResponse>, Status> {
        let model = request
            .into_inner()
            .model
            .ok_or_else(|| Status::invalid_argument("model is missing"))?;
        self.0.put_model(model)?;
        Ok(Response::new(v1beta1::UpdateDeviceModelResponse {}))
    }

    async fn get_device(
        &self,
        request: Request<v1beta1::GetDeviceRequest>,
    ) -> Result<Response<v1beta1::GetDeviceResponse>, Status> {
        let r = request.into_inner();
        let device = self
            .0
            .device(&r.device_namespace, &r.device_name)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no device {}/{}",
                    r.device_namespace, r.device_name
                ))
            })?;
        Ok(Response::new(v1beta1::GetDeviceResponse {
            device: Some(device),
        }))
    }
}

/// Why the mapper could not serve or reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum DmiError {
    /// The socket could not be bound.
    #[error("binding {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// gRPC transport failure.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// The agent answered with an error.
    #[error("edge agent: {0}")]
    Agent(#[from] Status),
}

/// Serves `DeviceMapperService` on a unix socket until `shutdown` resolves.
pub async fn serve(
    mapper: Arc<Mapper>,
    socket: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), DmiError> {
    // A socket file left by a previous run would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|source| DmiError::Bind {
        path: socket.to_owned(),
        source,
    })?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| stream);
        Some((next, listener))
    });
    tonic::transport::Server::builder()
        .add_service(DeviceMapperServiceServer::new(MapperService(mapper)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// A gRPC channel over a unix socket.
pub async fn unix_channel(socket: &Path) -> Result<Channel, DmiError> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await?;
    Ok(channel)
}

/// Registers with the agent and serves what it answers.
pub async fn register(
    mapper: &Mapper,
    agent: &mut DeviceManagerServiceClient<Channel>,
    info: v1beta1::MapperInfo,
) -> Result<usize, DmiError> {
    let answer = agent
        .mapper_register(v1beta1::MapperRegisterRequest {
            with_data: true,
            mapper: Some(info),
        })
        .await?
        .into_inner();
    for model in answer.model_list {
        if let Err(e) = mapper.put_model(model) {
            warn!(error = %e.message(), "skipping a model the agent sent");
        }
    }
    let mut served = 0;
    for device in answer.device_list {
        match mapper.put_device(device) {
            Ok(_) => served += 1,
            Err(e) => warn!(error = %e.message(), "skipping a device the agent sent"),
        }
    }
    Ok(served)
}

/// Sends device reports to the agent until the channel closes. A failed call
/// is logged and dropped: the next cycle brings fresh values, and states are
/// sent again on every change.
pub async fn forward_reports(
    mut agent: DeviceManagerServiceClient<Channel>,
    mut reports: mpsc::Receiver<Report>,
) {
    while let Some(report) = reports.recv().await {
        let result = match report {
            Report::Values { device, readings } => {
                let (namespace, name) = split_id(&device);
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis().to_string())
                    .unwrap_or_default();
                let twins = readings
                    .into_iter()
                    .filter_map(|r| {
                        let value = r.value.ok()?;
                        let metadata = HashMap::from([
                            ("timestamp".to_owned(), timestamp.clone()),
                            ("type".to_owned(), value.data_type().as_str().to_owned()),
                        ]);
                        Some(v1beta1::Twin {
                            property_name: r.property,
                            observed_desired: None,
                            reported: Some(v1beta1::TwinProperty {
                                value: value.to_string(),
                                metadata,
                            }),
                        })
                    })
                    .collect::<Vec<_>>();
                if twins.is_empty() {
                    continue;
                }
                agent
                    .report_device_status(v1beta1::ReportDeviceStatusRequest {
                        device_name: name,
                        device_namespace: namespace,
                        reported_device: Some(v1beta1::DeviceStatus { twins }),
                    })
                    .await
                    .map(|_| ())
            }
            Report::State { device, state, .. } => {
                let (namespace, name) = split_id(&device);
                if state == DeviceState::Unknown {
                    continue;
                }
                agent
                    .report_device_states(v1beta1::ReportDeviceStatesRequest {
                        device_name: name,
                        device_namespace: namespace,
                        state: state.as_str().to_owned(),
                    })
                    .await
                    .map(|_| ())
            }
        };
        if let Err(e) = result {
            debug!(error = %e.message(), "report to the edge agent failed");
        }
    }
}

fn split_id(id: &str) -> (String, String) {
    match id.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => ("default".to_owned(), id.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_data_round_trips_through_any() {
        let config = json!({"ip": "127.0.0.1", "port": 1502, "scale": 0.1, "isSwap": true, "nested": {"a": [1, "x"]}});
        let packed = json_to_config(&config);
        assert_eq!(
            packed.data["ip"].type_url,
            "type.googleapis.com/google.protobuf.StringValue"
        );
        assert_eq!(
            config_to_json(Some(&packed)).unwrap(),
            json!({"ip": "127.0.0.1", "port": 1502, "scale": 0.1, "isSwap": true, "nested": {"a": [1.0, "x"]}})
        );
        let odd = prost_types::Any {
            type_url: "type.googleapis.com/example.Unknown".into(),
            value: vec![],
        };
        assert!(matches!(
            any_to_json(&odd),
            Err(AnyError::UnsupportedType(_))
        ));
        let broken = prost_types::Any {
            type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
            value: vec![0x0a, 0x05, b'a'],
        };
        assert!(matches!(any_to_json(&broken), Err(AnyError::Decode { .. })));
    }

    #[test]
    fn messages_without_their_parts_are_refused() {
        assert_eq!(
            device_from_proto(&v1beta1::Device::default()),
            Err(MessageError::Missing("device spec"))
        );
        assert_eq!(
            model_from_proto(&v1beta1::DeviceModel::default()),
            Err(MessageError::Missing("model spec"))
        );
    }
}
