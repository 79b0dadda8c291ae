//! Devices and models as KubeEdge describes them, and the driver each one
//! needs.
//!
//! [`DeviceSpec`] and [`ModelSpec`] hold what a Device and its DeviceModel say,
//! with the protocol and visitor configData as JSON. [`build`] turns the pair
//! into an [`AnyDriver`] and the [`RunConfig`] of its task. The DMI server
//! builds them from gRPC messages; an edge agent hosting the drivers
//! in-process builds them from its replicated documents.
//!
//! Choices where KubeEdge leaves room:
//! - protocol names: `modbus` (also `modbus-tcp`; `modbus-rtu` means RTU
//!   framing over TCP), `opcua`, `mqtt`;
//! - `collectCycle` is nanoseconds, as in KubeEdge's samples; values below
//!   one millisecond's worth (under 1,000,000) are taken as milliseconds, the
//!   other spelling KubeEdge's docs use. A device is read as often as its most
//!   frequent property asks (1 s when none says);
//! - a Device property missing from its model is an error; model properties the
//!   Device does not bind are not read.

use std::time::Duration;

use serde_json::Value as Json;
use tokio::sync::watch;

use crate::device::RunConfig;
use crate::driver::{Changes, ConnectError, Driver, Health, ReadError, Reading, WriteError};
use crate::modbus::visitor::ModbusVisitor;
use crate::modbus::{Framing, ModbusConfig, ModbusDriver, ModbusProperty};
use crate::mqtt::{MqttConfig, MqttDriver, MqttProperty};
use crate::opcua::{OpcUaConfig, OpcUaDriver, OpcUaProperty};
use crate::property::PropertySpec;

/// A DeviceModel.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// Its properties.
    pub properties: Vec<PropertySpec>,
}

/// One property a Device binds.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyBinding {
    /// The property name (as in the model).
    pub name: String,
    /// The visitor's configData.
    pub visitor: Json,
    /// KubeEdge's `collectCycle` (see the module docs), 0 when unset.
    pub collect_cycle: i64,
    /// The desired value, if any.
    pub desired: Option<String>,
}

/// A Device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSpec {
    /// Its name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The name of its DeviceModel.
    pub model: String,
    /// The protocol name.
    pub protocol: String,
    /// The protocol's configData.
    pub protocol_config: Json,
    /// The properties it binds.
    pub properties: Vec<PropertyBinding>,
}

impl DeviceSpec {
    /// `namespace/name`, the id KubeEdge uses since 1.17.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a Device cannot be served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BuildError {
    /// No driver for this protocol.
    #[error(
        "device {device}: unknown protocol {protocol:?}: expected modbus, modbus-rtu, opcua or mqtt"
    )]
    UnknownProtocol {
        /// The device id.
        device: String,
        /// The protocol given.
        protocol: String,
    },
    /// The Device binds a property its model lacks.
    #[error("device {device}: property {property} is not in model {model}")]
    UnknownProperty {
        /// The device id.
        device: String,
        /// The property.
        property: String,
        /// The model.
        model: String,
    },
    /// The protocol or a visitor's configData cannot be used.
    #[error("device {device}: {reason}")]
    Config {
        /// The device id.
        device: String,
        /// What is wrong.
        reason: String,
    },
}

/// Converts KubeEdge's `collectCycle` to a duration (see the module docs).
pub fn collect_cycle(value: i64) -> Option<Duration> {
    match u64::try_from(value) {
        Ok(0) | Err(_) => None,
        Ok(v) if v < 1_000_000 => Some(Duration::from_millis(v)),
        Ok(v) => Some(Duration::from_nanos(v)),
    }
}

/// Builds the driver and task settings for a Device of a model.
pub fn build(device: &DeviceSpec, model: &ModelSpec) -> Result<(AnyDriver, RunConfig), BuildError> {
    let id = device.id();
    let config_err = |reason: String| BuildError::Config {
        device: id.clone(),
        reason,
    };
    let mut bound = Vec::new();
    for binding in &device.properties {
        let spec = model
            .properties
            .iter()
            .find(|p| p.name == binding.name)
            .cloned()
            .ok_or_else(|| BuildError::UnknownProperty {
                device: id.clone(),
                property: binding.name.clone(),
                model: model.name.clone(),
            })?;
        bound.push((spec, &binding.visitor));
    }
    let driver = match device.protocol.to_ascii_lowercase().as_str() {
        "modbus" | "modbus-tcp" | "modbus-rtu" => {
            let mut config = ModbusConfig::from_config(&device.protocol_config)
                .map_err(|e| config_err(e.to_string()))?;
            if device.protocol.eq_ignore_ascii_case("modbus-rtu") {
                config.framing = Framing::RtuOverTcp;
            }
            let properties = bound
                .into_iter()
                .map(|(spec, visitor)| {
                    let visitor = ModbusVisitor::from_config(&spec, visitor)
                        .map_err(|e| config_err(e.to_string()))?;
                    Ok(ModbusProperty { spec, visitor })
                })
                .collect::<Result<Vec<_>, BuildError>>()?;
            AnyDriver::Modbus(ModbusDriver::new(config, properties))
        }
        "opcua" => {
            let config = OpcUaConfig::from_config(&device.protocol_config)
                .map_err(|e| config_err(e.to_string()))?;
            let properties = bound
                .into_iter()
                .map(|(spec, visitor)| {
                    OpcUaProperty::from_config(spec, visitor).map_err(|e| config_err(e.to_string()))
                })
                .collect::<Result<Vec<_>, BuildError>>()?;
            AnyDriver::OpcUa(OpcUaDriver::new(config, properties))
        }
        "mqtt" => {
            let config = MqttConfig::from_config(&device.protocol_config)
                .map_err(|e| config_err(e.to_string()))?;
            let properties = bound
                .into_iter()
                .map(|(spec, visitor)| {
                    MqttProperty::from_config(spec, visitor).map_err(|e| config_err(e.to_string()))
                })
                .collect::<Result<Vec<_>, BuildError>>()?;
            AnyDriver::Mqtt(MqttDriver::new(config, properties))
        }
        other => {
            return Err(BuildError::UnknownProtocol {
                device: id,
                protocol: other.to_owned(),
            });
        }
    };
    let cycle = device
        .properties
        .iter()
        .filter_map(|p| collect_cycle(p.collect_cycle))
        .min()
        .unwrap_or(Duration::from_secs(1));
    let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let run = RunConfig {
        collect_cycle: cycle,
        seed,
        ..RunConfig::default()
    };
    Ok((driver, run))
}

/// Any of the drivers, so devices of every protocol share one code path.
#[derive(Debug)]
pub enum AnyDriver {
    /// Modbus TCP or RTU.
    Modbus(ModbusDriver),
    /// OPC UA.
    OpcUa(OpcUaDriver),
    /// MQTT.
    Mqtt(MqttDriver),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            AnyDriver::Modbus($d) => $e,
            AnyDriver::OpcUa($d) => $e,
            AnyDriver::Mqtt($d) => $e,
        }
    };
}

impl Driver for AnyDriver {
    fn properties(&self) -> &[PropertySpec] {
        dispatch!(self, d => d.properties())
    }

    fn is_connected(&self) -> bool {
        dispatch!(self, d => d.is_connected())
    }

    async fn connect(&mut self) -> Result<(), ConnectError> {
        dispatch!(self, d => d.connect().await)
    }

    async fn read(&mut self) -> Result<Vec<Reading>, ReadError> {
        dispatch!(self, d => d.read().await)
    }

    async fn write(&mut self, property: &str, value: &str) -> Result<(), WriteError> {
        dispatch!(self, d => d.write(property, value).await)
    }

    fn health(&self) -> &Health {
        dispatch!(self, d => d.health())
    }

    fn link(&self) -> Option<watch::Receiver<bool>> {
        dispatch!(self, d => d.link())
    }

    fn maintenance_interval(&self) -> Option<Duration> {
        dispatch!(self, d => d.maintenance_interval())
    }

    async fn maintain(&mut self) -> Result<(), ReadError> {
        dispatch!(self, d => d.maintain().await)
    }

    fn take_changes(&mut self) -> Option<Changes> {
        dispatch!(self, d => d.take_changes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::property::DataType;
    use serde_json::json;

    fn model() -> ModelSpec {
        ModelSpec {
            name: "thermo".into(),
            namespace: "default".into(),
            properties: vec![PropertySpec::new("temp", DataType::Int)],
        }
    }

    fn device(protocol: &str, config: Json, visitor: Json) -> DeviceSpec {
        DeviceSpec {
            name: "t1".into(),
            namespace: "default".into(),
            model: "thermo".into(),
            protocol: protocol.into(),
            protocol_config: config,
            properties: vec![PropertyBinding {
                name: "temp".into(),
                visitor,
                collect_cycle: 10_000_000_000,
                desired: None,
            }],
        }
    }

    #[test]
    fn builds_drivers_and_refuses_bad_devices() {
        let modbus = device(
            "modbus",
            json!({"ip": "127.0.0.1", "port": 1502}),
            json!({"register": "HoldingRegister", "offset": 0}),
        );
        let (driver, run) = build(&modbus, &model()).unwrap();
        assert!(matches!(driver, AnyDriver::Modbus(_)));
        assert_eq!(run.collect_cycle, Duration::from_secs(10));
        let opc = device(
            "opcua",
            json!({"url": "opc.tcp://127.0.0.1:4840/"}),
            json!({"nodeID": "ns=2;s=t"}),
        );
        assert!(matches!(
            build(&opc, &model()).unwrap().0,
            AnyDriver::OpcUa(_)
        ));
        let mqtt = device(
            "mqtt",
            json!({"broker": "127.0.0.1:1883", "telemetryTopic": "t"}),
            json!({"jsonKey": "temp"}),
        );
        assert!(matches!(
            build(&mqtt, &model()).unwrap().0,
            AnyDriver::Mqtt(_)
        ));

        let zigbee = device("zigbee", json!({}), json!({}));
        assert!(matches!(
            build(&zigbee, &model()),
            Err(BuildError::UnknownProtocol { .. })
        ));
        let bad_visitor = device(
            "modbus",
            json!({"ip": "127.0.0.1"}),
            json!({"register": "Nope"}),
        );
        assert!(matches!(
            build(&bad_visitor, &model()),
            Err(BuildError::Config { .. })
        ));
        let mut stray = modbus.clone();
        stray.properties[0].name = "humidity".into();
        assert!(matches!(
            build(&stray, &model()),
            Err(BuildError::UnknownProperty { .. })
        ));
        assert_eq!(collect_cycle(500), Some(Duration::from_millis(500)));
        assert_eq!(collect_cycle(0), None);
        assert_eq!(collect_cycle(-1), None);
    }
}
