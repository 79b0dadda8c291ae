//! The iroh transport: QUIC endpoints identified by their public keys.
//!
//! Offline by default: no relay servers and no public address lookup. Peers
//! are given by address (`<endpoint id>@<ip:port>`); relays and discovery are
//! opt-in configuration for deployments that have them.

use std::net::SocketAddr;
use std::str::FromStr;

use iroh::endpoint::{IdleTimeout, QuicTransportConfig, presets};
use iroh::{Endpoint, EndpointAddr, EndpointId, SecretKey};

/// The ALPN of Outpost's sync protocol.
pub const SYNC_ALPN: &[u8] = b"outpost/sync/0";

/// Why an endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The socket address is not usable.
    #[error("invalid bind address {addr}: {reason}")]
    Address {
        /// The address asked for.
        addr: SocketAddr,
        /// What iroh said about it.
        reason: String,
    },
    /// iroh could not bind the endpoint.
    #[error("cannot bind the iroh endpoint on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What iroh said.
        reason: String,
    },
}

/// Interval of QUIC keep-alives on sync connections.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(3);
/// A connection silent this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(12);

/// Binds an endpoint for the sync protocol on one UDP socket address, with
/// no relay and no address lookup.
pub async fn bind(secret_key: SecretKey, addr: SocketAddr) -> Result<Endpoint, BindError> {
    let builder = Endpoint::builder(presets::Minimal)
        .clear_ip_transports()
        .bind_addr(addr)
        .map_err(|e| BindError::Address {
            addr,
            reason: e.to_string(),
        })?;
    // A peer that vanished (killed, powered off, cut off) is noticed within
    // IDLE_TIMEOUT, so that its replacement or its return starts a new
    // session instead of waiting on a dead one; keep-alives every
    // KEEP_ALIVE leave several chances on a lossy link.
    let transport = QuicTransportConfig::builder()
        .keep_alive_interval(KEEP_ALIVE)
        .max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .build();
    builder
        .transport_config(transport)
        .secret_key(secret_key)
        .alpns(vec![SYNC_ALPN.to_vec()])
        .bind()
        .await
        .map_err(|e| BindError::Bind {
            addr,
            reason: e.to_string(),
        })
}

/// A peer address as users write it: `<endpoint id>@<ip:port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer's public key.
    pub id: EndpointId,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Why a peer address could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {input:?}: {reason} (expected <endpoint id>@<ip:port>)")]
pub struct PeerAddrError {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for PeerAddr {
    type Err = PeerAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| PeerAddrError {
            input: s.to_owned(),
            reason,
        };
        let (id, addr) = s.split_once('@').ok_or_else(|| err("no '@'".into()))?;
        let id = EndpointId::from_str(id).map_err(|e| err(format!("endpoint id: {e}")))?;
        let addr = SocketAddr::from_str(addr).map_err(|e| err(format!("socket address: {e}")))?;
        Ok(Self { id, addr })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

impl From<&PeerAddr> for EndpointAddr {
    fn from(peer: &PeerAddr) -> Self {
        EndpointAddr::new(peer.id).with_ip_addr(peer.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addr_round_trips_and_rejects_garbage() {
        let id = SecretKey::generate().public();
        let text = format!("{id}@127.0.0.1:7700");
        let parsed: PeerAddr = text.parse().expect("valid");
        assert_eq!(parsed.to_string(), text);
        for bad in [
            "",
            "nope",
            "@127.0.0.1:1",
            &format!("{id}@nowhere"),
            &format!("{id}127.0.0.1:1"),
        ] {
            assert!(bad.parse::<PeerAddr>().is_err(), "{bad:?} must not parse");
        }
    }

    #[tokio::test]
    async fn two_endpoints_talk_on_loopback() {
        let a = bind(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind a");
        let b = bind(SecretKey::generate(), "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind b");
        let a_addr = PeerAddr {
            id: a.id(),
            addr: a.bound_sockets()[0],
        };
        let server = tokio::spawn(async move {
            let conn = a
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("connection");
            let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
            let got = recv.read_to_end(64).await.expect("read");
            send.write_all(&got).await.expect("write");
            send.finish().expect("finish");
            conn.closed().await;
            conn.remote_id()
        });
        let conn = b
            .connect(EndpointAddr::from(&a_addr), SYNC_ALPN)
            .await
            .expect("connect");
        let (mut send, mut recv) = conn.open_bi().await.expect("open");
        send.write_all(b"ping").await.expect("write");
        send.finish().expect("finish");
        assert_eq!(recv.read_to_end(64).await.expect("read"), b"ping");
        conn.close(0u32.into(), b"done");
        assert_eq!(server.await.expect("server"), b.id());
        b.close().await;
    }
}
