//! Transports that carry the sync protocol between peers.
//!
//! The protocol itself is sans-IO; a transport moves its messages. `iroh`
//! runs it over QUIC between real endpoints.

pub mod iroh;
