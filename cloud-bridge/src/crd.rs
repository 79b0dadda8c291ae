//! KubeEdge's device CRDs (`devices.kubeedge.io/v1beta1`) as Rust types,
//! the CRD manifests generated from them, and their installation.
//!
//! The types accept the Device and DeviceModel YAML a KubeEdge user already
//! has, unchanged: the same field names, `configData` and `pushMethod`
//! free-form (`x-kubernetes-preserve-unknown-fields`), twin values as strings.
//! A device's twin status has the shape KubeEdge gives it
//! (`{twins[], state, lastOnlineTime}`, each twin
//! `{propertyName, reported, observedDesired}`) and lives in two places:
//! a [`DeviceStatus`] object named like its Device and owned by it (KubeEdge
//! 1.23 and later), and the Device's own `status` (older clients). Outpost
//! adds two fields of its own, which KubeEdge clients ignore: `twinSummary`
//! (for `kubectl get`) and, per twin, `conflicts` (desired values that lost a
//! concurrent write).
//!
//! `deploy/crds.yaml` is the output of [`crds_yaml`] (`outpost-cloud crds`),
//! never edited by hand; a test fails when it differs.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracing::info;

/// The API group of KubeEdge's device CRDs.
pub const GROUP: &str = "devices.kubeedge.io";

/// A free-form object: any JSON object, kept as written.
fn free_form(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A device: which model, which node, how to reach it, its properties
/// (KubeEdge `Device` spec).
// One `printcolumn(...)` per column looks like a repeated attribute to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "Device",
    doc = "A KubeEdge device: its model, node, protocol and properties; status holds its twins.",
    namespaced,
    status = "TwinStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.deviceModelRef.name"
    ),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Twins", type_ = "string", json_path = ".status.twinSummary"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The DeviceModel (same namespace) this device is an instance of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_model_ref: Option<LocalObjectReference>,
    /// The edge node that owns the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// How to reach the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ProtocolConfig>,
    /// The device's properties: desired values and how to read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<DeviceProperty>,
    /// Methods the device offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<DeviceMethod>,
    /// Whether and how often the device's state is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_report: Option<StateReport>,
}

/// A reference by name to an object of the same namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct LocalObjectReference {
    /// The object's name.
    #[serde(default)]
    pub name: String,
}

/// A protocol and its free-form configuration (also a property's visitor).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolConfig {
    /// `modbus`, `opcua`, `mqtt`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_name: Option<String>,
    /// Free-form: whatever the protocol's mapper reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub config_data: Option<serde_json::Value>,
}

/// A property of a device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    /// Its name, as in the model.
    pub name: String,
    /// The desired value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<TwinProperty>,
    /// How to read it (register, offset, node id, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitors: Option<ProtocolConfig>,
    /// How often to report it (ns in KubeEdge's samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    /// How often to read it (ns in KubeEdge's samples).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle: Option<i64>,
    /// Whether reported values go to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// Where a mapper pushes telemetry (`http`, `mqtt`, `otel`, `dbMethod`;
    /// free-form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form")]
    pub push_method: Option<serde_json::Value>,
}

/// A twin value with its metadata (`timestamp`, `type`). Values are strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct TwinProperty {
    /// The value.
    #[serde(default)]
    pub value: String,
    /// Metadata such as `timestamp` (ms since the epoch) and `type`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A method a device offers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMethod {
    /// Its name.
    pub name: String,
    /// A description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The properties it acts on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub property_names: Vec<String>,
}

/// How a device's state is reported.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateReport {
    /// Whether the state goes to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// How often, ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
}

/// A device's twins and state: `Device.status`, and the `status` of its
/// [`DeviceStatus`] object.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TwinStatus {
    /// One per property with a reported value or a desired-value conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub twins: Vec<Twin>,
    /// `online`, `offline` or `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When the device last answered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_online_time: Option<String>,
    /// Whether the state is reported to the cloud (KubeEdge up to 1.22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to_cloud: Option<bool>,
    /// How often the state is reported, ns (KubeEdge up to 1.22).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle: Option<i64>,
    /// Outpost: the reported values in one line (`temp=31 hum=40`), for
    /// `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_summary: Option<String>,
    /// Outpost: `Ready`, whether the node serves the device and it answers,
    /// with the reason when it does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<DeviceCondition>,
}

/// A condition of a device, as Kubernetes writes conditions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceCondition {
    /// `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One word: `Online`, `Connecting`, `DeviceOffline`, `ConfigurationInvalid`.
    pub reason: String,
    /// What the node said, when it says something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A property's twin: what the device reported and the desired value it
/// had then.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// The property.
    pub property_name: String,
    /// The value the device reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<TwinProperty>,
    /// The desired value the device had when it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<TwinProperty>,
    /// Outpost: desired values written concurrently with the one that won,
    /// which lost by the hybrid-logical-clock rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<DesiredConflict>,
}

/// A desired value that lost to a concurrent write.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesiredConflict {
    /// Who wrote it: `cloud`, or `edge:<node>`, with the writer's key.
    pub writer: String,
    /// When it was written (RFC 3339, the writer's hybrid logical clock).
    pub time: String,
    /// The value that lost.
    pub value: String,
    /// The value that won.
    pub winner: String,
}

/// A device's twin status as its own object (KubeEdge 1.23 and later),
/// named like its Device and owned by it.
#[allow(clippy::duplicated_attributes)]
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "DeviceStatus",
    plural = "devicestatuses",
    doc = "The twins and state of the Device of the same name, which owns it.",
    namespaced,
    status = "TwinStatus",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "Twins", type_ = "string", json_path = ".status.twinSummary"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatusSpec {
    /// The node of the device (copied from the Device, for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// A device model: the protocol and the properties of a kind of device
/// (KubeEdge `DeviceModel` spec).
#[derive(
    CustomResource, Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema,
)]
#[kube(
    group = "devices.kubeedge.io",
    version = "v1beta1",
    kind = "DeviceModel",
    doc = "A KubeEdge device model: the protocol and properties of a kind of device.",
    namespaced,
    printcolumn(name = "Protocol", type_ = "string", json_path = ".spec.protocol"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    /// `modbus`, `opcua`, `mqtt`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The model's properties.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub properties: Vec<ModelProperty>,
}

/// A property of a device model.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    /// Its name.
    pub name: String,
    /// A description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `INT`, `FLOAT`, `DOUBLE`, `STRING`, `BOOLEAN`, `BYTES` or `STREAM`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `ReadWrite` or `ReadOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    /// The smallest value a write may set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<String>,
    /// The largest value a write may set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<String>,
    /// The unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// The CRDs the bridge serves, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![DeviceModel::crd(), Device::crd(), DeviceStatus::crd()]
}

/// Why the CRD manifests could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the CRDs as YAML: {0}")]
pub struct RenderError(#[from] serde_yaml::Error);

/// The CRD manifests as one YAML stream: what `deploy/crds.yaml` holds.
pub fn crds_yaml() -> Result<String, RenderError> {
    let mut out = String::from(
        "# Generated by `outpost-cloud crds` from cloud-bridge/src/crd.rs; do not edit.\n\
         # Regenerate: OUTPOST_UPDATE_CRDS=1 cargo test --workspace --locked --test crds\n",
    );
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Why the CRDs could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The API refused a read or the apply.
    #[error("cannot install CRD {name}: {source}")]
    Kube {
        /// The CRD.
        name: String,
        /// The API's answer.
        #[source]
        source: kube::Error,
    },
    /// Watching the CRD for its Established condition failed.
    #[error("cannot watch CRD {name}: {source}")]
    Wait {
        /// The CRD.
        name: String,
        /// The watch's failure.
        #[source]
        source: kube::runtime::wait::Error,
    },
    /// The CRD did not become Established in time.
    #[error("CRD {0} was not Established within {1:?}")]
    NotEstablished(String, Duration),
}

/// Installs the CRDs that are missing, or that this field manager installed
/// before (to update them), by server-side apply, and waits until each is
/// Established. A CRD someone else installed (KubeEdge's own, say) is left
/// as it is.
pub async fn install(
    client: &Client,
    field_manager: &str,
    timeout: Duration,
) -> Result<(), InstallError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let kube_err = |source| InstallError::Kube {
            name: name.clone(),
            source,
        };
        let existing = api.get_opt(&name).await.map_err(kube_err)?;
        let ours = existing.as_ref().is_none_or(|c| {
            c.metadata
                .managed_fields
                .iter()
                .flatten()
                .any(|m| m.manager.as_deref() == Some(field_manager))
        });
        if ours {
            api.patch(
                &name,
                &PatchParams::apply(field_manager),
                &Patch::Apply(&crd),
            )
            .await
            .map_err(kube_err)?;
            if existing.is_none() {
                info!(crd = %name, "CRD installed");
            }
        } else {
            info!(crd = %name, "CRD installed by someone else; left as it is");
        }
        tokio::time::timeout(
            timeout,
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| InstallError::NotEstablished(name.clone(), timeout))?
        .map_err(|source| InstallError::Wait {
            name: name.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: thermo-1, namespace: default}
spec:
  deviceModelRef: {name: thermo-model}
  nodeName: edge-1
  protocol: {protocolName: modbus, configData: {ip: 127.0.0.1, port: 1502}}
  properties:
  - name: temp
    collectCycle: 10000000000
    reportCycle: 10000000000
    reportToCloud: true
    desired: {value: "30"}
    visitors:
      protocolName: modbus
      configData: {register: HoldingRegister, offset: 2, limit: 1, scale: 1, isSwap: true, isRegisterSwap: true}
"#;

    #[test]
    fn the_kubeedge_example_reads_and_writes_back_unchanged() {
        let yaml: serde_json::Value = serde_yaml::from_str(EXAMPLE).unwrap();
        let device: Device = serde_json::from_value(yaml.clone()).unwrap();
        assert_eq!(device.spec.node_name.as_deref(), Some("edge-1"));
        assert_eq!(
            device.spec.properties[0].collect_cycle,
            Some(10_000_000_000)
        );
        let config = device.spec.properties[0]
            .visitors
            .as_ref()
            .and_then(|v| v.config_data.as_ref())
            .unwrap();
        assert_eq!(config["register"], "HoldingRegister");
        assert_eq!(serde_json::to_value(&device).unwrap(), yaml);
    }

    #[test]
    fn crds_are_namespaced_structural_and_free_form_where_kubeedge_is() {
        let crds = crds();
        let names: Vec<_> = crds
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        assert_eq!(
            names,
            [
                "devicemodels.devices.kubeedge.io",
                "devices.devices.kubeedge.io",
                "devicestatuses.devices.kubeedge.io"
            ]
        );
        for crd in &crds {
            assert_eq!(crd.spec.scope, "Namespaced");
        }
        let json = serde_json::to_value(&crds[1]).unwrap();
        let spec = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let protocol = &spec["properties"]["protocol"]["properties"]["configData"];
        assert_eq!(
            protocol["x-kubernetes-preserve-unknown-fields"], true,
            "{protocol}"
        );
        let property = &spec["properties"]["properties"]["items"]["properties"];
        assert_eq!(
            property["pushMethod"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
        assert_eq!(property["desired"]["properties"]["value"]["type"], "string");
        let columns = &json["spec"]["versions"][0]["additionalPrinterColumns"];
        let columns: Vec<&str> = columns
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(columns, ["Node", "Model", "State", "Twins", "Age"]);
        let status = serde_json::to_value(&crds[2]).unwrap();
        assert!(status["spec"]["versions"][0]["subresources"]["status"].is_object());
    }
}
