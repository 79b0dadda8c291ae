//! Device ↔ document conversions, free of I/O: the documents a Device and a
//! DeviceModel become, the twin status the documents give back, and the
//! decision of which way a desired value flows.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use outpost_sync::desired::{DesiredWrite, Resolved};
use outpost_sync::document::{DocId, DocIdError, DocKind, Owner};
use outpost_sync::hlc::Hlc;
use outpost_sync::schema::{self, DeviceDesiredDoc, DeviceModelDoc, DeviceReportedDoc};
use serde_json::{Value, json};

use crate::crd::{
    DesiredConflict, Device, DeviceCondition, DeviceModel, ProtocolConfig, Twin, TwinProperty,
    TwinStatus,
};

/// The longest `twinSummary` written, in bytes.
pub const SUMMARY_MAX_LEN: usize = 120;

/// A device (or model) by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl DeviceKey {
    /// The key of an object of the API.
    pub fn of(obj: &impl kube::Resource) -> Option<Self> {
        Some(Self {
            namespace: obj.meta().namespace.clone()?,
            name: obj.meta().name.clone()?,
        })
    }
}

impl std::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a Device cannot become documents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `spec.deviceModelRef.name` is missing or empty.
    #[error("spec.deviceModelRef.name is missing: a device needs a DeviceModel")]
    NoModel,
    /// Two properties share a name.
    #[error("spec.properties has two properties named {0:?}")]
    DuplicateProperty(String),
    /// A property has no name.
    #[error("spec.properties[{0}] has an empty name")]
    UnnamedProperty(usize),
    /// A name does not make a valid document id.
    #[error("its names do not make a document id: {0}")]
    DocId(#[from] DocIdError),
}

/// The device-desired document of a device on a node.
pub fn desired_id(node: &str, key: &DeviceKey) -> Result<DocId, DocIdError> {
    DocId::new(
        DocKind::DeviceDesired,
        Owner::Node(node),
        &[&key.namespace, &key.name],
    )
}

/// The device-reported document of a device on a node.
pub fn reported_id(node: &str, key: &DeviceKey) -> Result<DocId, DocIdError> {
    DocId::new(
        DocKind::DeviceReported,
        Owner::Node(node),
        &[&key.namespace, &key.name],
    )
}

/// The device-model document of a model for a node.
pub fn model_id(node: &str, namespace: &str, model: &str) -> Result<DocId, DocIdError> {
    DocId::new(DocKind::DeviceModel, Owner::Node(node), &[namespace, model])
}

/// The node, namespace and name of a per-node device document id
/// (`<kind>/<node>/<ns>/<name>`).
pub fn split_id(doc: &DocId) -> Option<(&str, DeviceKey)> {
    let mut parts = doc.as_str().split('/');
    let (_, node, namespace, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || node.starts_with("site:") {
        return None;
    }
    Some((
        node,
        DeviceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
    ))
}

/// The model a Device names, if any.
pub fn model_name(device: &Device) -> Option<&str> {
    device
        .spec
        .device_model_ref
        .as_ref()
        .map(|r| r.name.as_str())
        .filter(|n| !n.is_empty())
}

fn protocol(p: Option<&ProtocolConfig>) -> schema::ProtocolConfig {
    schema::ProtocolConfig {
        protocol_name: p.and_then(|p| p.protocol_name.clone()).unwrap_or_default(),
        config_data: p
            .and_then(|p| p.config_data.clone())
            .unwrap_or_else(|| json!({})),
    }
}

/// The configuration part of a Device's device-desired document. `slots`
/// (the writers' desired values) come from the document as it is, so that
/// a read-modify-write keeps them.
pub fn desired_config(
    device: &Device,
    slots: BTreeMap<String, Value>,
) -> Result<DeviceDesiredDoc, DeviceError> {
    let model = model_name(device).ok_or(DeviceError::NoModel)?;
    let mut names = BTreeSet::new();
    let mut properties = Vec::with_capacity(device.spec.properties.len());
    for (i, p) in device.spec.properties.iter().enumerate() {
        if p.name.is_empty() {
            return Err(DeviceError::UnnamedProperty(i));
        }
        if !names.insert(p.name.as_str()) {
            return Err(DeviceError::DuplicateProperty(p.name.clone()));
        }
        properties.push(schema::DeviceProperty {
            name: p.name.clone(),
            visitors: protocol(p.visitors.as_ref()),
            collect_cycle: p.collect_cycle,
            report_cycle: p.report_cycle,
            report_to_cloud: p.report_to_cloud,
            push_method: p.push_method.clone(),
        });
    }
    let state_report_cycle = device
        .spec
        .state_report
        .as_ref()
        .and_then(|s| s.report_cycle)
        .or_else(|| device.status.as_ref().and_then(|s| s.report_cycle));
    Ok(DeviceDesiredDoc {
        namespace: device.namespace().unwrap_or_default(),
        name: device.name_any(),
        model: model.to_owned(),
        protocol: protocol(device.spec.protocol.as_ref()),
        properties,
        state_report_cycle,
        slots,
    })
}

/// Properties of a Device that its model does not have.
pub fn unknown_properties<'a>(device: &'a Device, model: &DeviceModel) -> Vec<&'a str> {
    device
        .spec
        .properties
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !model.spec.properties.iter().any(|m| m.name == *n))
        .collect()
}

/// The device-model document of a DeviceModel.
pub fn model_doc(model: &DeviceModel) -> DeviceModelDoc {
    DeviceModelDoc {
        namespace: model.namespace().unwrap_or_default(),
        name: model.name_any(),
        protocol: model.spec.protocol.clone().unwrap_or_default(),
        properties: model
            .spec
            .properties
            .iter()
            .map(|p| schema::ModelProperty {
                name: p.name.clone(),
                description: p.description.clone(),
                kind: p.kind.clone().unwrap_or_default(),
                access_mode: p.access_mode.clone(),
                minimum: p.minimum.clone(),
                maximum: p.maximum.clone(),
                unit: p.unit.clone(),
            })
            .collect(),
    }
}

/// RFC 3339 of milliseconds since the epoch.
pub fn ms_time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A desired write's time for people: RFC 3339, with the HLC counter when
/// it is not zero.
pub fn hlc_time(at: Hlc) -> String {
    match at.counter {
        0 => ms_time(at.wall_ms),
        n => format!("{} (+{n})", ms_time(at.wall_ms)),
    }
}

fn conflict(loser: &DesiredWrite, winner: &str, name: &impl Fn(&str) -> String) -> DesiredConflict {
    DesiredConflict {
        writer: name(&loser.writer),
        time: hlc_time(loser.at),
        value: loser.value.clone(),
        winner: winner.to_owned(),
    }
}

/// The twin status of a device from its reported document and its resolved
/// desired values. `name` turns a writer's key into who it is
/// (`cloud`, `edge:<node>`). Twins are ordered by property; a property
/// appears when it has a reported value or a lost desired write.
pub fn twin_status(
    reported: Option<&DeviceReportedDoc>,
    resolved: &BTreeMap<String, Resolved>,
    name: impl Fn(&str) -> String,
) -> TwinStatus {
    let mut twins: BTreeMap<&str, Twin> = BTreeMap::new();
    if let Some(doc) = reported {
        for (property, r) in &doc.twins {
            let mut metadata =
                BTreeMap::from([("timestamp".to_owned(), r.timestamp_ms.to_string())]);
            if let Some(kind) = &r.kind {
                metadata.insert("type".to_owned(), kind.clone());
            }
            twins.insert(
                property,
                Twin {
                    property_name: property.clone(),
                    reported: Some(TwinProperty {
                        value: r.value.clone(),
                        metadata,
                    }),
                    observed_desired: r.observed_desired.as_ref().map(|v| TwinProperty {
                        value: v.clone(),
                        metadata: BTreeMap::new(),
                    }),
                    conflicts: Vec::new(),
                },
            );
        }
    }
    for (property, r) in resolved {
        if r.losers.is_empty() {
            continue;
        }
        let twin = twins.entry(property).or_insert_with(|| Twin {
            property_name: property.clone(),
            ..Twin::default()
        });
        twin.conflicts = r
            .losers
            .iter()
            .map(|l| conflict(l, &r.winner.value, &name))
            .collect();
    }
    let twins: Vec<Twin> = twins.into_values().collect();
    let summary = summary(&twins);
    let conditions = reported.map(ready_condition).into_iter().collect();
    TwinStatus {
        conditions,
        state: reported.map(|r| r.state.clone()).filter(|s| !s.is_empty()),
        last_online_time: reported.and_then(|r| r.last_online_ms).map(ms_time),
        twin_summary: (!summary.is_empty()).then_some(summary),
        twins,
        report_to_cloud: None,
        report_cycle: None,
    }
}

/// The `Ready` condition of a device from what its node reports.
pub fn ready_condition(reported: &DeviceReportedDoc) -> DeviceCondition {
    let (status, reason) = if reported.unservable {
        ("False", "ConfigurationInvalid")
    } else {
        match reported.state.as_str() {
            "online" => ("True", "Online"),
            "offline" => ("False", "DeviceOffline"),
            _ => ("Unknown", "Connecting"),
        }
    };
    DeviceCondition {
        kind: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: reported
            .error
            .clone()
            .filter(|_| status != "True")
            .map(|m| m.chars().take(1024).collect()),
    }
}

/// `temp=31 hum=40`, cut at [`SUMMARY_MAX_LEN`] bytes with `…`.
fn summary(twins: &[Twin]) -> String {
    let mut out = String::new();
    for t in twins {
        let Some(r) = &t.reported else { continue };
        let item = format!("{}={}", t.property_name, r.value);
        let sep = usize::from(!out.is_empty());
        if out.len() + sep + item.len() > SUMMARY_MAX_LEN {
            out.push('…');
            break;
        }
        if sep == 1 {
            out.push(' ');
        }
        out.push_str(&item);
    }
    out
}

/// Which way a property's desired value flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredAction {
    /// The Device and the documents agree (or there is nothing to do).
    None,
    /// The Device's value is new: write it as the cloud's desired value.
    CloudWrite(String),
    /// Another writer's value won: write it to the Device (the Device now
    /// holds `current`, `None` when it has no desired value).
    WriteBack {
        /// The value the Device has now.
        current: Option<String>,
        /// The winning value.
        winner: String,
    },
}

/// Decides a property's desired-value flow.
///
/// - `device`: the Device's `spec.properties[].desired.value`;
/// - `last_seen`: the Device's value when this bridge last looked (`None`
///   after a restart);
/// - `own`: the cloud's own slot in the document (the last value it wrote);
/// - `resolved`: the document's winner and losers; `me`: the cloud's key.
///
/// The Device's value is a new cloud write when it differs from the winner
/// and the user changed it: it differs from what the bridge last saw, or,
/// with nothing seen yet, from what the cloud last wrote. Otherwise a winner
/// by another writer goes back to the Device. So the edge's value, once
/// written back, does not come back as a cloud write.
pub fn decide(
    device: Option<&str>,
    last_seen: Option<Option<&str>>,
    own: Option<&str>,
    resolved: Option<&Resolved>,
    me: &str,
) -> DesiredAction {
    let winner = resolved.map(|r| &r.winner);
    match (device, winner) {
        (None, None) => DesiredAction::None,
        (Some(v), None) => DesiredAction::CloudWrite(v.to_owned()),
        (Some(v), Some(w)) if v == w.value => DesiredAction::None,
        (v, Some(w)) => {
            let changed = match last_seen {
                Some(seen) => v != seen,
                None => v != own,
            };
            match v {
                Some(v) if changed || w.writer == me => DesiredAction::CloudWrite(v.to_owned()),
                _ if w.writer == me => DesiredAction::None,
                _ => DesiredAction::WriteBack {
                    current: v.map(str::to_owned),
                    winner: w.value.clone(),
                },
            }
        }
    }
}

/// A JSON patch that sets the desired value of the property at `index`,
/// guarded by `test`s of the property's name and its current value: it
/// changes exactly that field, and fails (to be decided again) if someone
/// changed it meanwhile.
pub fn write_back_ops(
    index: usize,
    property: &str,
    current: Option<&str>,
    winner: &str,
) -> Vec<Value> {
    let base = format!("/spec/properties/{index}");
    let mut ops = vec![json!({"op": "test", "path": format!("{base}/name"), "value": property})];
    match current {
        Some(current) => {
            ops.push(
                json!({"op": "test", "path": format!("{base}/desired/value"), "value": current}),
            );
            ops.push(
                json!({"op": "replace", "path": format!("{base}/desired/value"), "value": winner}),
            );
        }
        None => {
            ops.push(
                json!({"op": "add", "path": format!("{base}/desired"), "value": {"value": winner}}),
            );
        }
    }
    ops
}

/// The message of a conflict Event.
pub fn conflict_note(property: &str, c: &DesiredConflict, winner_by: &str) -> String {
    let note = format!(
        "desired value of {property:?}: {:?} written by {} at {} lost to {:?} written by {winner_by} (concurrent writes resolve by hybrid logical clock)",
        c.value, c.writer, c.time, c.winner
    );
    // Events take at most 1 kB of note.
    note.chars().take(1000).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        DeviceModelSpec, DeviceProperty, DeviceSpec, LocalObjectReference, ModelProperty,
    };
    use outpost_sync::schema::ReportedValue;

    fn device(props: &[(&str, Option<&str>)]) -> Device {
        let mut d = Device::new(
            "thermo-1",
            DeviceSpec {
                device_model_ref: Some(LocalObjectReference {
                    name: "thermo-model".into(),
                }),
                node_name: Some("edge-1".into()),
                protocol: Some(ProtocolConfig {
                    protocol_name: Some("modbus".into()),
                    config_data: Some(json!({"ip": "127.0.0.1", "port": 1502})),
                }),
                properties: props
                    .iter()
                    .map(|(n, v)| DeviceProperty {
                        name: (*n).into(),
                        desired: v.map(|v| TwinProperty {
                            value: v.into(),
                            metadata: BTreeMap::new(),
                        }),
                        visitors: Some(ProtocolConfig {
                            protocol_name: Some("modbus".into()),
                            config_data: Some(json!({"register": "HoldingRegister", "offset": 2})),
                        }),
                        collect_cycle: Some(10_000_000_000),
                        push_method: Some(json!({"mqtt": {"topic": "t", "qos": 1}})),
                        ..DeviceProperty::default()
                    })
                    .collect(),
                ..DeviceSpec::default()
            },
        );
        d.metadata.namespace = Some("default".into());
        d
    }

    fn write(writer: &str, value: &str, wall_ms: u64, seen_ms: u64) -> DesiredWrite {
        DesiredWrite {
            writer: writer.into(),
            value: value.into(),
            at: Hlc {
                wall_ms,
                counter: 0,
            },
            seen: Hlc {
                wall_ms: seen_ms,
                counter: 0,
            },
        }
    }

    #[test]
    fn a_device_becomes_its_desired_document_keeping_the_slots() {
        let slots = BTreeMap::from([("desired:abc".to_owned(), json!({"temp": {"value": "25"}}))]);
        let doc = desired_config(&device(&[("temp", Some("30"))]), slots.clone()).unwrap();
        assert_eq!(
            (doc.namespace.as_str(), doc.name.as_str()),
            ("default", "thermo-1")
        );
        assert_eq!(doc.model, "thermo-model");
        assert_eq!(doc.protocol.protocol_name, "modbus");
        assert_eq!(doc.protocol.config_data["port"], 1502);
        let p = &doc.properties[0];
        assert_eq!(p.name, "temp");
        assert_eq!(p.visitors.config_data["register"], "HoldingRegister");
        assert_eq!(p.collect_cycle, Some(10_000_000_000));
        assert_eq!(p.push_method.as_ref().unwrap()["mqtt"]["qos"], 1);
        assert_eq!(doc.slots, slots);
    }

    #[test]
    fn malformed_devices_are_refused_with_a_reason() {
        let mut d = device(&[("temp", None)]);
        d.spec.device_model_ref = None;
        let err = desired_config(&d, BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("deviceModelRef"), "{err}");
        let d = device(&[("temp", None), ("temp", None)]);
        assert_eq!(
            desired_config(&d, BTreeMap::new()).unwrap_err(),
            DeviceError::DuplicateProperty("temp".into())
        );
        let d = device(&[("", None)]);
        assert_eq!(
            desired_config(&d, BTreeMap::new()).unwrap_err(),
            DeviceError::UnnamedProperty(0)
        );
        let mut model = DeviceModel::new(
            "thermo-model",
            DeviceModelSpec {
                protocol: Some("modbus".into()),
                properties: vec![ModelProperty {
                    name: "temp".into(),
                    kind: Some("INT".into()),
                    ..ModelProperty::default()
                }],
            },
        );
        model.metadata.namespace = Some("default".into());
        let d = device(&[("temp", None), ("hum", None)]);
        assert_eq!(unknown_properties(&d, &model), ["hum"]);
        let doc = model_doc(&model);
        assert_eq!(
            (doc.protocol.as_str(), doc.properties[0].kind.as_str()),
            ("modbus", "INT")
        );
    }

    #[test]
    fn ids_round_trip() {
        let key = DeviceKey {
            namespace: "default".into(),
            name: "thermo-1".into(),
        };
        let id = desired_id("edge-1", &key).unwrap();
        assert_eq!(id.as_str(), "device-desired/edge-1/default/thermo-1");
        assert_eq!(split_id(&id), Some(("edge-1", key.clone())));
        let id = model_id("edge-1", "default", "m").unwrap();
        assert_eq!(id.as_str(), "device-model/edge-1/default/m");
        assert!(split_id(&"node-status/edge-1".parse().unwrap()).is_none());
    }

    #[test]
    fn reported_values_and_conflicts_become_kubeedge_twins() {
        let reported = DeviceReportedDoc {
            state: "online".into(),
            last_online_ms: Some(1_700_000_000_000),
            error: None,
            unservable: false,
            twins: BTreeMap::from([
                (
                    "temp".to_owned(),
                    ReportedValue {
                        value: "31".into(),
                        timestamp_ms: 1_700_000_000_123,
                        kind: Some("INT".into()),
                        observed_desired: Some("30".into()),
                    },
                ),
                (
                    "hum".to_owned(),
                    ReportedValue {
                        value: "40".into(),
                        timestamp_ms: 1,
                        ..ReportedValue::default()
                    },
                ),
            ]),
        };
        let resolved = BTreeMap::from([(
            "mode".to_owned(),
            Resolved {
                winner: write("edge", "eco", 2_000, 0),
                losers: vec![write("cloud", "fast", 1_000, 0)],
            },
        )]);
        let status = twin_status(Some(&reported), &resolved, |w| format!("who:{w}"));
        assert_eq!(status.state.as_deref(), Some("online"));
        assert_eq!(
            status.last_online_time.as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(status.twin_summary.as_deref(), Some("hum=40 temp=31"));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["twins"][2],
            json!({
                "propertyName": "temp",
                "reported": {"value": "31", "metadata": {"timestamp": "1700000000123", "type": "INT"}},
                "observedDesired": {"value": "30"}
            })
        );
        assert_eq!(
            json["twins"][1],
            json!({
                "propertyName": "mode",
                "conflicts": [{"writer": "who:cloud", "time": "1970-01-01T00:00:01Z", "value": "fast", "winner": "eco"}]
            })
        );
        let empty = twin_status(None, &BTreeMap::new(), |w| w.to_owned());
        assert_eq!(empty, TwinStatus::default());
    }

    #[test]
    fn the_ready_condition_says_why_a_device_is_not_served() {
        let doc = |state: &str, error: Option<&str>, unservable| DeviceReportedDoc {
            state: state.into(),
            error: error.map(Into::into),
            unservable,
            ..Default::default()
        };
        let c = ready_condition(&doc("offline", Some("unknown protocol \"zigbee\""), true));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "ConfigurationInvalid")
        );
        assert!(c.message.unwrap().contains("zigbee"));
        let c = ready_condition(&doc("offline", Some("connect failed"), false));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "DeviceOffline")
        );
        let c = ready_condition(&doc("online", Some("old error"), false));
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message),
            ("True", "Online", None)
        );
        let c = ready_condition(&doc("unknown", None, false));
        assert_eq!(c.status, "Unknown");
    }

    #[test]
    fn the_summary_is_bounded() {
        let twins: Vec<Twin> = (0..50)
            .map(|i| Twin {
                property_name: format!("property-{i}"),
                reported: Some(TwinProperty {
                    value: "1234".into(),
                    metadata: BTreeMap::new(),
                }),
                ..Twin::default()
            })
            .collect();
        let s = summary(&twins);
        assert!(
            s.len() <= SUMMARY_MAX_LEN + '…'.len_utf8() && s.ends_with('…'),
            "{s}"
        );
    }

    #[test]
    fn desired_values_flow_one_way_at_a_time() {
        let me = "cloud";
        let edge_won = Resolved {
            winner: write("edge", "25", 3_000, 1_000),
            losers: vec![write("cloud", "22", 2_000, 0)],
        };
        let cloud_won = Resolved {
            winner: write("cloud", "22", 2_000, 0),
            losers: vec![],
        };
        // A new Device: its value is the cloud's.
        assert_eq!(
            decide(Some("30"), None, None, None, me),
            DesiredAction::CloudWrite("30".into())
        );
        assert_eq!(decide(None, None, None, None, me), DesiredAction::None);
        // Agreement.
        assert_eq!(
            decide(
                Some("22"),
                Some(Some("22")),
                Some("22"),
                Some(&cloud_won),
                me
            ),
            DesiredAction::None
        );
        // The user changed the Device.
        assert_eq!(
            decide(
                Some("23"),
                Some(Some("22")),
                Some("22"),
                Some(&cloud_won),
                me
            ),
            DesiredAction::CloudWrite("23".into())
        );
        // The edge won; the Device still holds what the cloud wrote: back.
        let back = DesiredAction::WriteBack {
            current: Some("22".into()),
            winner: "25".into(),
        };
        assert_eq!(
            decide(
                Some("22"),
                Some(Some("22")),
                Some("22"),
                Some(&edge_won),
                me
            ),
            back
        );
        // ... also after a restart (nothing seen: the cloud's slot decides).
        assert_eq!(
            decide(Some("22"), None, Some("22"), Some(&edge_won), me),
            back
        );
        // The written-back value does not bounce as a cloud write.
        assert_eq!(
            decide(
                Some("25"),
                Some(Some("22")),
                Some("22"),
                Some(&edge_won),
                me
            ),
            DesiredAction::None
        );
        // After the write-back the user sets the old value again: a new write.
        assert_eq!(
            decide(
                Some("22"),
                Some(Some("25")),
                Some("22"),
                Some(&edge_won),
                me
            ),
            DesiredAction::CloudWrite("22".into())
        );
        // A Device with no desired value gets the edge's.
        assert_eq!(
            decide(None, Some(None), None, Some(&edge_won), me),
            DesiredAction::WriteBack {
                current: None,
                winner: "25".into()
            }
        );
    }

    #[test]
    fn write_back_patches_test_what_they_replace() {
        let ops = write_back_ops(1, "temp", Some("22"), "25");
        assert_eq!(
            ops,
            [
                json!({"op": "test", "path": "/spec/properties/1/name", "value": "temp"}),
                json!({"op": "test", "path": "/spec/properties/1/desired/value", "value": "22"}),
                json!({"op": "replace", "path": "/spec/properties/1/desired/value", "value": "25"}),
            ]
        );
        let ops = write_back_ops(0, "temp", None, "25");
        assert_eq!(
            ops[1],
            json!({"op": "add", "path": "/spec/properties/0/desired", "value": {"value": "25"}})
        );
        let c = DesiredConflict {
            writer: "cloud".into(),
            time: "t".into(),
            value: "22".into(),
            winner: "25".into(),
        };
        let note = conflict_note("temp", &c, "edge:edge-1");
        assert!(
            note.contains("\"22\" written by cloud at t lost to \"25\" written by edge:edge-1"),
            "{note}"
        );
    }
}
