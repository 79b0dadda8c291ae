//! External mappers over KubeEdge's DMI: the agent's DeviceManagerService
//! with the real `outpost-mapper run` binary registering on it, against a
//! real Modbus device (pymodbus):
//!
//! - a device served in-process moves to the mapper when it registers (the
//!   registration's answer carries it), and its values keep reaching the
//!   cloud from the mapper's reports;
//! - a desired value from the cloud, and one set locally, reach the device
//!   through the mapper (UpdateDevice);
//! - a device added after the registration is sent to the mapper
//!   (RegisterDevice), and a deleted one is removed from it (RemoveDevice);
//! - a report naming an unknown device is refused and stores nothing.

#![allow(clippy::unwrap_used)]

#[path = "support/twins.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_edge_node::twins::set_local_desired;
use outpost_mappers::dmi::v1beta1::device_manager_service_client::DeviceManagerServiceClient;
use outpost_mappers::dmi::v1beta1::device_mapper_service_client::DeviceMapperServiceClient;
use outpost_mappers::dmi::{self, v1beta1};
use outpost_mappers::test_utils::SimProcess;
use outpost_sync::document::DocKind;
use support::{Fleet, value};

struct MapperProcess(Child);

impl Drop for MapperProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `outpost-mapper` binary `cargo test --workspace` built beside this test.
fn mapper_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("outpost-mapper");
    assert!(
        bin.exists(),
        "{} is built by cargo build --workspace",
        bin.display()
    );
    bin
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

async fn mapper_has(socket: &Path, name: &str) -> bool {
    let mut c = DeviceMapperServiceClient::new(dmi::unix_channel(socket).await.unwrap());
    c.get_device(v1beta1::GetDeviceRequest {
        device_name: name.into(),
        device_namespace: "default".into(),
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_mapper_takes_over_its_protocols_devices() {
    let sim = SimProcess::start("modbus_device.py", &[]).await.unwrap();
    let fleet = Fleet::new("dmi");
    let _link = fleet.connect();
    let twins = fleet.twins();
    let agent_socket = fleet.dir.join("dmi.sock");
    let mapper_socket = fleet.dir.join("mapper.sock");
    tokio::spawn(outpost_edge_node::dmi::serve(
        twins.view(),
        agent_socket.clone(),
    ));
    wait_for_socket(&agent_socket).await;

    // Served in-process first.
    fleet.put_device("thermo", "modbus", sim.addr().port());
    fleet
        .wait_reported(&fleet.cloud, "thermo", "online in-process", |d| {
            d.state == "online" && value(d, "fan").as_deref() == Some("3")
        })
        .await;

    // The mapper registers and takes the device over.
    let _mapper = MapperProcess(
        Command::new(mapper_binary())
            .args(["run", "--protocol", "modbus", "--name", "test-mapper"])
            .arg("--socket")
            .arg(&mapper_socket)
            .arg("--agent-socket")
            .arg(&agent_socket)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&mapper_socket).await;
    for _ in 0..100 {
        if mapper_has(&mapper_socket, "thermo").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        mapper_has(&mapper_socket, "thermo").await,
        "the registration carried the device"
    );

    // Desired values from the cloud and from a local app go through it.
    let desired = fleet.id(DocKind::DeviceDesired, &["default", "thermo"]);
    fleet.cloud.set_desired(&desired, "fan", "5").unwrap();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "the cloud's value through the mapper",
            |d| d.state == "online" && value(d, "fan").as_deref() == Some("5"),
        )
        .await;
    let view = twins.view();
    set_local_desired(
        &fleet.edge,
        &view,
        &fleet.node,
        "default/thermo",
        "fan",
        "2",
    )
    .unwrap();
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo",
            "the local value through the mapper",
            |d| value(d, "fan").as_deref() == Some("2"),
        )
        .await;

    // A device added now is registered with the mapper; deleting it removes it.
    fleet.put_device("thermo-2", "modbus", sim.addr().port());
    fleet
        .wait_reported(
            &fleet.cloud,
            "thermo-2",
            "the new device through the mapper",
            |d| d.state == "online" && value(d, "measured").as_deref() == Some("204"),
        )
        .await;
    assert!(mapper_has(&mapper_socket, "thermo-2").await);
    let second = fleet.id(DocKind::DeviceDesired, &["default", "thermo-2"]);
    fleet.cloud.delete(&second).unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if !mapper_has(&mapper_socket, "thermo-2").await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the deleted device was removed from the mapper");

    // A report of a device this node does not have is refused.
    let mut agent =
        DeviceManagerServiceClient::new(dmi::unix_channel(&agent_socket).await.unwrap());
    let refused = agent
        .report_device_status(v1beta1::ReportDeviceStatusRequest {
            device_name: "ghost".into(),
            device_namespace: "default".into(),
            reported_device: Some(v1beta1::DeviceStatus { twins: vec![] }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    assert!(twins.view().device("default/ghost").is_none());
    twins.shutdown().await;
}
