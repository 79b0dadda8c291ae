//! The driver trait every protocol implements, its errors, and device health.
//!
//! A driver owns one device's connection. It is driven by one task (see
//! [`crate::device`]), so its methods take `&mut self` and need no locking; a
//! slow or dead device only ever blocks its own task. Every method that talks
//! to the device bounds the time it takes, and a timed-out connection is
//! dropped, never reused.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::property::{PropertySpec, Value, ValueError};

/// The connection could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConnectError {
    /// No answer within the timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The network or the peer refused.
    #[error("connect failed: {0}")]
    Transport(String),
}

/// The device as a whole did not answer a read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReadError {
    /// There is no connection (connect first).
    #[error("not connected")]
    NotConnected,
    /// No answer within the timeout; the connection was dropped.
    #[error("no answer within {0:?}; connection dropped")]
    Timeout(Duration),
    /// The connection failed; it was dropped.
    #[error("transport failed: {0}")]
    Transport(String),
}

/// One property could not be read although the device answered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PropertyError {
    /// The device refused (a Modbus exception, a bad OPC UA status).
    #[error("device refused: {0}")]
    Rejected(String),
    /// The answer does not decode as the property's type.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// No value yet (a subscription or telemetry that has not arrived).
    #[error("no value yet")]
    NoValue,
}

/// A write that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    /// The device has no such property.
    #[error("no property {0}")]
    UnknownProperty(String),
    /// Refused before anything was sent.
    #[error("refused: {0}")]
    Refused(#[from] ValueError),
    /// The device answered with an error.
    #[error("device refused: {0}")]
    Rejected(String),
    /// There is no connection.
    #[error("not connected")]
    NotConnected,
    /// No answer within the timeout; the connection was dropped.
    #[error("no answer within {0:?}; connection dropped")]
    Timeout(Duration),
    /// The connection failed; it was dropped.
    #[error("transport failed: {0}")]
    Transport(String),
}

/// The value (or error) of one property after a read.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// The property name.
    pub property: String,
    /// Its value, or why there is none.
    pub value: Result<Value, PropertyError>,
}

/// A change-driven reading as its channel carries it. Boxed, so that a
/// queue grown by a burst keeps 8 bytes a slot, not a whole reading.
pub type Change = Box<Reading>;

/// The receiving end of a driver's change-driven readings.
///
/// A flume channel rather than tokio's: every device has one, and an idle
/// tokio channel takes 800 bytes (its cache-padded state and a first block
/// of 32 slots) where flume's takes about 200 and grows its queue only as
/// messages wait.
pub type Changes = flume::Receiver<Change>;

/// The sending end of [`Changes`].
pub type ChangeSender = flume::Sender<Change>;

/// A bounded channel of change-driven readings.
pub fn change_channel(capacity: usize) -> (ChangeSender, Changes) {
    flume::bounded(capacity)
}

/// Whether a device answers, as KubeEdge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Not yet known (never connected, no failures counted yet).
    Unknown,
    /// The last exchange succeeded.
    Online,
    /// Several exchanges in a row failed.
    Offline,
}

impl DeviceState {
    /// KubeEdge's spelling of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }
}

/// Online/offline tracking: a device goes offline after `offline_after`
/// failures in a row, and online at its first success.
#[derive(Debug, Clone)]
pub struct Health {
    state: DeviceState,
    failures: u32,
    offline_after: u32,
    last_online: Option<SystemTime>,
    last_error: Option<String>,
}

impl Health {
    /// Tracking that marks a device offline after `offline_after` failures.
    pub fn new(offline_after: u32) -> Self {
        Self {
            state: DeviceState::Unknown,
            failures: 0,
            offline_after: offline_after.max(1),
            last_online: None,
            last_error: None,
        }
    }

    /// Counts a successful exchange; returns the new state if it changed.
    pub fn success(&mut self) -> Option<DeviceState> {
        self.failures = 0;
        self.last_online = Some(SystemTime::now());
        self.last_error = None;
        self.set(DeviceState::Online)
    }

    /// Counts a failed exchange; returns the new state if it changed.
    pub fn failure(&mut self, error: impl ToString) -> Option<DeviceState> {
        self.failures = self.failures.saturating_add(1);
        self.last_error = Some(error.to_string());
        if self.failures >= self.offline_after {
            self.set(DeviceState::Offline)
        } else {
            None
        }
    }

    fn set(&mut self, state: DeviceState) -> Option<DeviceState> {
        (self.state != state).then(|| {
            self.state = state;
            state
        })
    }

    /// The current state.
    pub fn state(&self) -> DeviceState {
        self.state
    }

    /// Failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the device last answered.
    pub fn last_online(&self) -> Option<SystemTime> {
        self.last_online
    }

    /// The last error seen since the last success.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new(3)
    }
}

/// One device behind one protocol.
///
/// `read` returns `Err` when the device as a whole failed (and the connection
/// is gone); per-property failures, such as a Modbus exception for one
/// address, are in the returned readings.
pub trait Driver: Send {
    /// The properties this driver serves.
    fn properties(&self) -> &[PropertySpec];

    /// Whether a connection is up.
    fn is_connected(&self) -> bool;

    /// Opens the connection (replacing any old one).
    fn connect(&mut self) -> impl Future<Output = Result<(), ConnectError>> + Send;

    /// Reads every property.
    fn read(&mut self) -> impl Future<Output = Result<Vec<Reading>, ReadError>> + Send;

    /// Checks `value` against the property's type and bounds, and writes it.
    fn write(
        &mut self,
        property: &str,
        value: &str,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Online/offline tracking, updated by every exchange.
    fn health(&self) -> &Health;

    /// A watch of whether the connection is up, for drivers whose
    /// connection can drop between requests (a session with its own event
    /// loop); the device task reconnects as soon as it turns false.
    fn link(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// How often [`Driver::maintain`] should run while connected, if at all.
    fn maintenance_interval(&self) -> Option<Duration> {
        None
    }

    /// Periodic upkeep between reads (such as a subscription watchdog).
    fn maintain(&mut self) -> impl Future<Output = Result<(), ReadError>> + Send {
        async { Ok(()) }
    }

    /// Change-driven values (OPC UA subscriptions, MQTT telemetry), if the
    /// driver has them; taken once by the task that runs the driver.
    fn take_changes(&mut self) -> Option<Changes> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_after_repeated_failures_online_at_once() {
        let mut h = Health::new(3);
        assert_eq!(h.failure("x"), None);
        assert_eq!(h.failure("x"), None);
        assert_eq!(h.failure("x"), Some(DeviceState::Offline));
        assert_eq!(h.failure("x"), None);
        assert_eq!(h.last_error(), Some("x"));
        assert_eq!(h.success(), Some(DeviceState::Online));
        assert_eq!(h.success(), None);
        assert_eq!(h.failures(), 0);
    }
}
