//! `outpost-mapper run` as a separate process, speaking KubeEdge's DMI over
//! unix sockets: it registers with an edge agent (the agent side of
//! DeviceManagerService, served here by the test), reads the devices it was
//! given (real pymodbus and asyncua), reports twins and states, and answers
//! DeviceMapperService calls (register, get, remove, bad requests).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_mappers::dmi::v1beta1::device_manager_service_server::{
    DeviceManagerService, DeviceManagerServiceServer,
};
use outpost_mappers::dmi::v1beta1::device_mapper_service_client::DeviceMapperServiceClient;
use outpost_mappers::dmi::{self, v1beta1};
use outpost_sync::test_utils::{env_value, unique_name};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// The edge agent's side of DMI, as edgecore serves it.
struct Agent {
    answer: v1beta1::MapperRegisterResponse,
    registered: mpsc::Sender<v1beta1::MapperInfo>,
    status: mpsc::Sender<v1beta1::ReportDeviceStatusRequest>,
    states: mpsc::Sender<v1beta1::ReportDeviceStatesRequest>,
}

#[tonic::async_trait]
impl DeviceManagerService for Agent {
    async fn mapper_register(
        &self,
        request: Request<v1beta1::MapperRegisterRequest>,
    ) -> Result<Response<v1beta1::MapperRegisterResponse>, Status> {
        let r = request.into_inner();
        let _ = self.registered.send(r.mapper.unwrap_or_default()).await;
        Ok(Response::new(if r.with_data {
            self.answer.clone()
        } else {
            Default::default()
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<v1beta1::ReportDeviceStatusRequest>,
    ) -> Result<Response<v1beta1::ReportDeviceStatusResponse>, Status> {
        let _ = self.status.try_send(request.into_inner());
        Ok(Response::new(v1beta1::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<v1beta1::ReportDeviceStatesRequest>,
    ) -> Result<Response<v1beta1::ReportDeviceStatesResponse>, Status> {
        let _ = self.states.try_send(request.into_inner());
        Ok(Response::new(v1beta1::ReportDeviceStatesResponse {}))
    }
}

fn model(name: &str, properties: &[(&str, &str, &str, &str)]) -> v1beta1::DeviceModel {
    v1beta1::DeviceModel {
        name: name.into(),
        namespace: "default".into(),
        spec: Some(v1beta1::DeviceModelSpec {
            properties: properties
                .iter()
                .map(|(n, t, min, max)| v1beta1::ModelProperty {
                    name: (*n).into(),
                    r#type: (*t).into(),
                    access_mode: "ReadWrite".into(),
                    minimum: (*min).into(),
                    maximum: (*max).into(),
                    ..Default::default()
                })
                .collect(),
            commands: vec![],
        }),
    }
}

fn device(
    name: &str,
    model: &str,
    protocol: &str,
    config: serde_json::Value,
    props: &[(&str, serde_json::Value)],
) -> v1beta1::Device {
    v1beta1::Device {
        name: name.into(),
        namespace: "default".into(),
        spec: Some(v1beta1::DeviceSpec {
            device_model_reference: model.into(),
            protocol: Some(v1beta1::ProtocolConfig {
                protocol_name: protocol.into(),
                config_data: Some(dmi::json_to_config(&config)),
            }),
            properties: props
                .iter()
                .map(|(n, visitor)| v1beta1::DeviceProperty {
                    name: (*n).into(),
                    visitors: Some(v1beta1::VisitorConfig {
                        protocol_name: protocol.into(),
                        config_data: Some(dmi::json_to_config(visitor)),
                    }),
                    collect_cycle: 200_000_000,
                    report_cycle: 200_000_000,
                    ..Default::default()
                })
                .collect(),
        }),
        status: None,
    }
}

struct Mapper(Child);

impl Drop for Mapper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {}", path.display());
}

async fn twin(
    rx: &mut mpsc::Receiver<v1beta1::ReportDeviceStatusRequest>,
    device: &str,
    property: &str,
) -> v1beta1::TwinProperty {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let r = rx.recv().await.unwrap();
            if r.device_name != device {
                continue;
            }
            for t in r.reported_device.unwrap_or_default().twins {
                if t.property_name == property {
                    return t.reported.unwrap();
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no twin {device}/{property}"))
}

#[tokio::test]
async fn standalone_mapper_serves_what_the_agent_sends() {
    let dir: PathBuf = std::env::temp_dir().join(unique_name("outpost-dmi"));
    std::fs::create_dir_all(&dir).unwrap();
    let agent_socket = dir.join("dmi.sock");
    let mapper_socket = dir.join("mapper.sock");

    let modbus_addr = env_value("OUTPOST_MODBUS_ADDR").unwrap();
    let (ip, port) = modbus_addr.rsplit_once(':').unwrap();
    let thermo = device(
        "thermo-1",
        "thermo",
        "modbus",
        json!({"ip": ip, "port": port.parse::<u16>().unwrap(), "slaveID": 1}),
        &[
            (
                "setpoint",
                json!({"register": "HoldingRegister", "offset": 0, "limit": 1, "scale": 0.1}),
            ),
            (
                "power",
                json!({"register": "HoldingRegister", "offset": 2, "limit": 2}),
            ),
        ],
    );
    let (registered_tx, mut registered) = mpsc::channel(4);
    let (status_tx, mut status) = mpsc::channel(1024);
    let (states_tx, mut states) = mpsc::channel(64);
    let agent = Agent {
        answer: v1beta1::MapperRegisterResponse {
            model_list: vec![model(
                "thermo",
                &[("setpoint", "INT", "5", "30"), ("power", "FLOAT", "", "")],
            )],
            device_list: vec![thermo],
        },
        registered: registered_tx,
        status: status_tx,
        states: states_tx,
    };
    let listener = tokio::net::UnixListener::bind(&agent_socket).unwrap();
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(DeviceManagerServiceServer::new(agent))
            .serve_with_incoming(incoming),
    );

    let _mapper = Mapper(
        Command::new(env!("CARGO_BIN_EXE_outpost-mapper"))
            .arg("run")
            .arg("--socket")
            .arg(&mapper_socket)
            .arg("--agent-socket")
            .arg(&agent_socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let info = tokio::time::timeout(Duration::from_secs(20), registered.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(info.api_version, "v1beta1");
    assert_eq!(info.address, mapper_socket.to_string_lossy().as_bytes());

    let state = tokio::time::timeout(Duration::from_secs(20), states.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            state.device_namespace.as_str(),
            state.device_name.as_str(),
            state.state.as_str()
        ),
        ("default", "thermo-1", "online")
    );
    let setpoint = twin(&mut status, "thermo-1", "setpoint").await;
    assert_eq!(setpoint.value, "21.5");
    assert_eq!(
        setpoint.metadata.get("type").map(String::as_str),
        Some("double")
    );
    assert!(setpoint.metadata.contains_key("timestamp"));
    assert_eq!(twin(&mut status, "thermo-1", "power").await.value, "1500.5");

    // The agent drives the mapper through DeviceMapperService.
    wait_for_socket(&mapper_socket).await;
    let channel = dmi::unix_channel(&mapper_socket).await.unwrap();
    let mut mapper = DeviceMapperServiceClient::new(channel);
    let got = mapper
        .get_device(v1beta1::GetDeviceRequest {
            device_name: "thermo-1".into(),
            device_namespace: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.device.unwrap().name, "thermo-1");

    let opc_model = model("opc-model", &[("double", "DOUBLE", "", "")]);
    mapper
        .create_device_model(v1beta1::CreateDeviceModelRequest {
            model: Some(opc_model),
        })
        .await
        .unwrap();
    let opc = device(
        "opc-1",
        "opc-model",
        "opcua",
        json!({"url": env_value("OUTPOST_OPCUA_URL").unwrap(), "pkiDir": dir.join("pki").to_string_lossy()}),
        &[("double", json!({"nodeID": "ns=2;s=double"}))],
    );
    let answer = mapper
        .register_device(v1beta1::RegisterDeviceRequest { device: Some(opc) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            answer.device_name.as_str(),
            answer.device_namespace.as_str()
        ),
        ("opc-1", "default")
    );
    assert_eq!(twin(&mut status, "opc-1", "double").await.value, "21.5");

    // Bad requests get clear errors, and the mapper keeps serving.
    let no_model = device(
        "x",
        "missing-model",
        "modbus",
        json!({"ip": "127.0.0.1"}),
        &[],
    );
    let err = mapper
        .register_device(v1beta1::RegisterDeviceRequest {
            device: Some(no_model),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = mapper
        .register_device(v1beta1::RegisterDeviceRequest {
            device: Some(v1beta1::Device {
                name: "y".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let bad_visitor = device(
        "z",
        "thermo",
        "modbus",
        json!({"ip": "127.0.0.1"}),
        &[("setpoint", json!({"register": "NoSuchRegister"}))],
    );
    let err = mapper
        .register_device(v1beta1::RegisterDeviceRequest {
            device: Some(bad_visitor),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("NoSuchRegister"), "{err:?}");

    mapper
        .remove_device(v1beta1::RemoveDeviceRequest {
            device_name: "thermo-1".into(),
            device_namespace: "default".into(),
        })
        .await
        .unwrap();
    let err = mapper
        .get_device(v1beta1::GetDeviceRequest {
            device_name: "thermo-1".into(),
            device_namespace: "default".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // The remaining device still reports.
    assert_eq!(twin(&mut status, "opc-1", "double").await.value, "21.5");
    let _ = std::fs::remove_dir_all(dir);
}
