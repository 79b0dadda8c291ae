//! What several of this crate's test files share: a cloud, one edge
//! (`edge-1`) and the roster that knows them.

#![allow(dead_code)] // each test file uses what it needs

use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};

/// The cloud's identity.
pub const CLOUD: PeerId = PeerId([1; 32]);
/// The edge's identity; its node is `edge-1`.
pub const EDGE: PeerId = PeerId([2; 32]);

/// A roster of [`CLOUD`] and [`EDGE`].
pub fn roster() -> Roster {
    let mut r = Roster::new();
    r.insert(CLOUD, Role::Cloud);
    r.insert(
        EDGE,
        Role::Edge {
            node: "edge-1".into(),
            site: None,
        },
    );
    r
}
