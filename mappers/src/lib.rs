//! Outpost's device mappers.
//!
//! One driver trait (connect, read properties, write a property, health) with
//! implementations for Modbus TCP and RTU, OPC UA and MQTT, property visitors
//! as KubeEdge defines them, and KubeEdge's DMI gRPC interface so a mapper can
//! run in-process or standalone. It owns no replicated state.
