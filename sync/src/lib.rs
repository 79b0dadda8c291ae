//! Outpost's replication core.
//!
//! Everything an edge node and the cloud share lives here as automerge
//! documents: one document per object and per writer (pod spec, pod status,
//! node status, configmap, secret, device model, device desired, device
//! reported). This crate owns those documents and their schemas, the RocksDB
//! event store that persists them as an append-only log of changes, the
//! sans-IO sync protocol that reconciles and ships changes between peers, the
//! transports that carry it (iroh, and an in-memory network for tests and
//! simulation), the access rules that decide who may read and write which
//! document, and the sync metrics.
//!
//! It must never depend on Kubernetes or CRI: the cloud bridge, the edge node,
//! the mappers and the simulation depend on this crate, never the reverse.

/// The name and version of this crate, as the other crates log it.
pub const VERSION: &str = concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION"));

#[cfg(feature = "test-utils")]
pub mod test_utils;

pub mod document;
pub mod hlc;
pub mod identity;
pub mod replica;
pub mod schema;
pub mod signal;
pub mod store;
pub mod transport;

/// A peer's identity: its iroh public key, 32 bytes.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct PeerId(pub [u8; 32]);

impl std::fmt::Debug for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerId({})", &hex::encode(self.0)[..10])
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl From<iroh::PublicKey> for PeerId {
    fn from(key: iroh::PublicKey) -> Self {
        PeerId(*key.as_bytes())
    }
}
pub mod access;
pub mod desired;
pub mod engine;
pub mod metrics;
pub mod protocol;
