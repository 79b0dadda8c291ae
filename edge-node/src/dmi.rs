//! KubeEdge's DMI: the agent's side, for external mappers.
//!
//! Devices are served in-process by default. When `dmi_socket` is set, the
//! agent also serves `DeviceManagerService` on that unix socket, and a
//! mapper that registers there for a protocol (KubeEdge's own mappers, or
//! `outpost-mapper run`) takes over this node's devices of that protocol:
//!
//! - `MapperRegister` answers with those devices and their models (so a
//!   mapper started after its devices exist gets them at once), and their
//!   in-process drivers stop;
//! - devices added, changed or deleted later reach the mapper through its
//!   `DeviceMapperService` (`RegisterDevice`, `CreateDeviceModel`,
//!   `UpdateDevice` carrying the resolved desired values, `RemoveDevice`);
//! - `ReportDeviceStatus` and `ReportDeviceStates` are taken as the
//!   in-process drivers' readings and states are.
//!
//! A report naming a device this node does not have is refused with
//! `NOT_FOUND`; nothing is stored for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_mappers::device::Report;
use outpost_mappers::dmi::v1beta1::device_manager_service_server::{
    DeviceManagerService, DeviceManagerServiceServer,
};
use outpost_mappers::dmi::v1beta1::device_mapper_service_client::DeviceMapperServiceClient;
use outpost_mappers::dmi::{self, v1beta1};
use outpost_mappers::driver::{DeviceState, Reading, WriteError};
use outpost_mappers::property::Value;
use outpost_sync::schema::{DeviceDesiredDoc, DeviceModelDoc};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::twins::{TwinView, WriteDone};

/// A model document as a DMI message.
pub fn model_proto(model: &DeviceModelDoc) -> v1beta1::DeviceModel {
    v1beta1::DeviceModel {
        name: model.name.clone(),
        namespace: model.namespace.clone(),
        spec: Some(v1beta1::DeviceModelSpec {
            properties: model
                .properties
                .iter()
                .map(|p| v1beta1::ModelProperty {
                    name: p.name.clone(),
                    description: p.description.clone().unwrap_or_default(),
                    r#type: p.kind.clone(),
                    access_mode: p.access_mode.clone().unwrap_or_default(),
                    minimum: p.minimum.clone().unwrap_or_default(),
                    maximum: p.maximum.clone().unwrap_or_default(),
                    unit: p.unit.clone().unwrap_or_default(),
                })
                .collect(),
            commands: vec![],
        }),
    }
}

/// A device document, with its resolved desired values, as a DMI message.
pub fn device_proto(doc: &DeviceDesiredDoc, desired: &BTreeMap<String, String>) -> v1beta1::Device {
    v1beta1::Device {
        name: doc.name.clone(),
        namespace: doc.namespace.clone(),
        spec: Some(v1beta1::DeviceSpec {
            device_model_reference: doc.model.clone(),
            protocol: Some(v1beta1::ProtocolConfig {
                protocol_name: doc.protocol.protocol_name.clone(),
                config_data: Some(dmi::json_to_config(&doc.protocol.config_data)),
            }),
            properties: doc
                .properties
                .iter()
                .map(|p| v1beta1::DeviceProperty {
                    name: p.name.clone(),
                    desired: desired.get(&p.name).map(|v| v1beta1::TwinProperty {
                        value: v.clone(),
                        metadata: Default::default(),
                    }),
                    visitors: Some(v1beta1::VisitorConfig {
                        protocol_name: p.visitors.protocol_name.clone(),
                        config_data: Some(dmi::json_to_config(&p.visitors.config_data)),
                    }),
                    report_cycle: p.report_cycle.unwrap_or(0),
                    collect_cycle: p.collect_cycle.unwrap_or(0),
                    report_to_cloud: p.report_to_cloud.unwrap_or(true),
                    push_method: None,
                })
                .collect(),
        }),
        status: None,
    }
}

async fn client(
    socket: &Path,
) -> Result<DeviceMapperServiceClient<tonic::transport::Channel>, String> {
    dmi::unix_channel(socket)
        .await
        .map(DeviceMapperServiceClient::new)
        .map_err(|e| e.to_string())
}

/// Announces a device (and its model) to its mapper, in the background.
pub(crate) fn send_register(
    socket: PathBuf,
    (model, device): (v1beta1::DeviceModel, v1beta1::Device),
) {
    tokio::spawn(async move {
        let id = format!("{}/{}", device.namespace, device.name);
        let result = async {
            let mut c = client(&socket).await?;
            c.create_device_model(v1beta1::CreateDeviceModelRequest { model: Some(model) })
                .await
                .map_err(|e| e.message().to_owned())?;
            c.register_device(v1beta1::RegisterDeviceRequest {
                device: Some(device),
            })
            .await
            .map_err(|e| e.message().to_owned())?;
            Ok::<_, String>(())
        }
        .await;
        match result {
            Ok(()) => {
                info!(device = %id, mapper = %socket.display(), "device sent to its external mapper")
            }
            Err(e) => {
                warn!(device = %id, mapper = %socket.display(), error = %e, "cannot send the device to its external mapper")
            }
        }
    });
}

/// Tells a mapper a device is gone, in the background.
pub(crate) fn send_remove(socket: PathBuf, namespace: String, name: String) {
    tokio::spawn(async move {
        let result = async {
            client(&socket)
                .await?
                .remove_device(v1beta1::RemoveDeviceRequest {
                    device_name: name.clone(),
                    device_namespace: namespace.clone(),
                })
                .await
                .map_err(|e| e.message().to_owned())
        }
        .await;
        if let Err(e) = result {
            warn!(device = %format!("{namespace}/{name}"), error = %e, "cannot remove the device from its external mapper");
        }
    });
}

/// Sends a device with new desired values to its mapper; each property in
/// `due` is then reported done (or failed) to the twin manager.
pub(crate) fn send_update(
    socket: PathBuf,
    device_id: String,
    device: v1beta1::Device,
    due: Vec<(String, String)>,
    done: mpsc::Sender<WriteDone>,
) {
    tokio::spawn(async move {
        let result = async {
            client(&socket)
                .await?
                .update_device(v1beta1::UpdateDeviceRequest {
                    device: Some(device),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.message().to_owned())
        }
        .await;
        for (property, value) in due {
            let result = result.clone().map_err(WriteError::Transport);
            let _ = done
                .send(WriteDone {
                    device: device_id.clone(),
                    property,
                    value,
                    result,
                })
                .await;
        }
    });
}

/// `DeviceManagerService` over the twins.
#[derive(Debug, Clone)]
pub struct ManagerService {
    twins: TwinView,
}

fn device_id(namespace: &str, name: &str) -> String {
    let ns = if namespace.is_empty() {
        "default"
    } else {
        namespace
    };
    format!("{ns}/{name}")
}

#[tonic::async_trait]
impl DeviceManagerService for ManagerService {
    async fn mapper_register(
        &self,
        request: Request<v1beta1::MapperRegisterRequest>,
    ) -> Result<Response<v1beta1::MapperRegisterResponse>, Status> {
        let r = request.into_inner();
        let mapper = r
            .mapper
            .ok_or_else(|| Status::invalid_argument("mapper is missing"))?;
        if mapper.protocol.is_empty() {
            return Err(Status::invalid_argument("the mapper names no protocol"));
        }
        let socket = PathBuf::from(String::from_utf8_lossy(&mapper.address).into_owned());
        if socket.as_os_str().is_empty() {
            return Err(Status::invalid_argument(
                "the mapper gives no address (its unix socket)",
            ));
        }
        info!(name = %mapper.name, protocol = %mapper.protocol, socket = %socket.display(), "mapper registering");
        let (models, devices) = self
            .twins
            .register_mapper(&mapper.protocol, socket)
            .await
            .ok_or_else(|| Status::unavailable("the twin manager has stopped"))?;
        Ok(Response::new(if r.with_data {
            v1beta1::MapperRegisterResponse {
                model_list: models,
                device_list: devices,
            }
        } else {
            v1beta1::MapperRegisterResponse::default()
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<v1beta1::ReportDeviceStatusRequest>,
    ) -> Result<Response<v1beta1::ReportDeviceStatusResponse>, Status> {
        let r = request.into_inner();
        let id = device_id(&r.device_namespace, &r.device_name);
        if self.twins.device(&id).is_none() {
            return Err(Status::not_found(format!("no device {id} on this node")));
        }
        let readings: Vec<Reading> = r
            .reported_device
            .map(|d| d.twins)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|t| {
                let reported = t.reported?;
                Some(Reading {
                    property: t.property_name,
                    value: Ok(Value::String(reported.value)),
                })
            })
            .collect();
        if !readings.is_empty() {
            self.twins
                .report(Report::Values {
                    device: id,
                    readings,
                })
                .await;
        }
        Ok(Response::new(v1beta1::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<v1beta1::ReportDeviceStatesRequest>,
    ) -> Result<Response<v1beta1::ReportDeviceStatesResponse>, Status> {
        let r = request.into_inner();
        let id = device_id(&r.device_namespace, &r.device_name);
        if self.twins.device(&id).is_none() {
            return Err(Status::not_found(format!("no device {id} on this node")));
        }
        let state = match r.state.to_ascii_lowercase().as_str() {
            "online" | "ok" => DeviceState::Online,
            "offline" | "disconnected" => DeviceState::Offline,
            _ => DeviceState::Unknown,
        };
        self.twins
            .report(Report::State {
                device: id,
                state,
                error: None,
            })
            .await;
        Ok(Response::new(v1beta1::ReportDeviceStatesResponse {}))
    }
}

/// Serves `DeviceManagerService` on `socket` until the task is dropped.
pub async fn serve(twins: TwinView, socket: PathBuf) -> Result<(), String> {
    // A socket file left by a previous run would make bind fail.
    let _ = std::fs::remove_file(&socket);
    if let Some(dir) = socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let listener = UnixListener::bind(&socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    info!(socket = %socket.display(), "DMI DeviceManagerService listening for external mappers");
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| stream);
        Some((next, listener))
    });
    tonic::transport::Server::builder()
        .add_service(DeviceManagerServiceServer::new(ManagerService { twins }))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| e.to_string())
}
