//! Transports that carry the sync protocol between peers.
//!
//! The protocol itself is sans-IO; a transport moves its messages. `iroh`
//! runs it over QUIC between real endpoints; `memory` joins two engines in
//! one process with the same framing and session code; `join` is the wire
//! format of the join exchange and the edge's side of it.

pub mod iroh;
pub mod join;
pub mod memory;
