//! Outpost's device mappers.
//!
//! What it is for: talking to industrial devices on an edge node. One driver
//! trait ([`driver::Driver`]: connect, read properties, write a property,
//! health) with implementations for Modbus TCP and RTU framing over TCP
//! ([`modbus`]), OPC UA ([`opcua`]) and MQTT ([`mqtt`]); property visitors and
//! model checks as KubeEdge's Device and DeviceModel define them
//! ([`property`], [`modbus::visitor`]); drivers built from a Device and its
//! model ([`spec`]); one task per device with its own collect cycle,
//! reconnect backoff with jitter and online/offline tracking ([`device`]); and
//! KubeEdge's DMI gRPC interface ([`dmi`]) so that `outpost-mapper run` serves
//! devices standalone beside an edge agent, while `outpost-edge` can host the
//! same drivers in-process through [`spec::build`] and [`device::spawn`].
//!
//! What it owns: device connections and the last values read from them. It
//! owns no replicated state: reported values and device states go to whoever
//! hosts the drivers (the edge agent), which decides what to sync.
//!
//! What it must never do: let one device stall another, send a write that
//! the DeviceModel refuses, reuse a connection after a timeout, or panic on
//! what a device, a broker or a configuration sends it.

pub mod backoff;
pub mod config;
pub mod device;
pub mod dmi;
pub mod driver;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod property;
pub mod spec;
#[cfg(feature = "test-utils")]
pub mod test_utils;
