//! Trust: who a peer is, what it may read and what it may write.
//!
//! Every peer is known by its iroh key. The roster maps keys to roles; a key
//! not on the roster is refused. Scopes are functions of document ids (which
//! name their owner, see [`crate::document`]):
//! - the cloud reads everything and writes the kinds the cloud writes;
//! - an edge reads the documents of its node and of its site, and writes the
//!   kinds an owning edge writes, for its own node (or its site).
//!
//! A change is accepted only when its author (the identity in its actor id)
//! may write the document, whichever peer delivered it: that is what lets an
//! edge relay for another. Changes are not signed yet, so a peer that may
//! deliver a document could forge authorship of a change to it; the roster
//! is the boundary of trust until they are.

use std::collections::HashMap;

use crate::PeerId;
use crate::document::{DocId, Owner, Writers};

/// What a known peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A cloud bridge replica.
    Cloud,
    /// An edge node.
    Edge {
        /// The node's name.
        node: String,
        /// The site it belongs to, if any.
        site: Option<String>,
    },
}

/// The known peers and their roles.
#[derive(Debug, Clone, Default)]
pub struct Roster {
    peers: HashMap<PeerId, Role>,
    /// Who reads what, kept with `peers`: the clouds, and the edges by the
    /// owner they read (`<node>` or `site:<site>`).
    clouds: Vec<PeerId>,
    by_owner: HashMap<String, Vec<PeerId>>,
}

impl Roster {
    /// An empty roster: every peer is unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a peer.
    pub fn insert(&mut self, peer: PeerId, role: Role) {
        self.remove(&peer);
        match &role {
            Role::Cloud => self.clouds.push(peer),
            Role::Edge { node, site } => {
                self.by_owner.entry(node.clone()).or_default().push(peer);
                if let Some(site) = site {
                    self.by_owner
                        .entry(format!("site:{site}"))
                        .or_default()
                        .push(peer);
                }
            }
        }
        self.peers.insert(peer, role);
    }

    /// Removes a peer; it is unknown from then on.
    pub fn remove(&mut self, peer: &PeerId) {
        if self.peers.remove(peer).is_some() {
            self.clouds.retain(|p| p != peer);
            self.by_owner.retain(|_, peers| {
                peers.retain(|p| p != peer);
                !peers.is_empty()
            });
        }
    }

    /// Every peer that may read `doc`: the clouds and the edges that own
    /// it. Finding them costs the same however many peers there are.
    pub fn readers(&self, doc: &DocId) -> Vec<PeerId> {
        let owner = match doc.owner() {
            Owner::Node(node) => node.to_owned(),
            Owner::Site(site) => format!("site:{site}"),
        };
        let mut readers = self.clouds.clone();
        if let Some(edges) = self.by_owner.get(&owner) {
            readers.extend(edges.iter().copied());
        }
        readers
    }

    /// The role of a peer, `None` for an unknown one.
    pub fn role(&self, peer: &PeerId) -> Option<&Role> {
        self.peers.get(peer)
    }

    /// Document id prefixes covering everything `peer` may read, so that its
    /// scope can be read from the index without scanning every document.
    /// `None` when the peer may read everything (the cloud), or is unknown.
    /// A prefix may match more than the scope (`node-status/edge-1` also
    /// matches `node-status/edge-10`): filter with [`Roster::may_read`].
    pub fn read_prefixes(&self, peer: &PeerId) -> Option<Vec<String>> {
        let Some(Role::Edge { node, site }) = self.role(peer) else {
            return None;
        };
        let mut prefixes = Vec::new();
        for kind in crate::document::DocKind::ALL {
            prefixes.push(format!("{}/{node}", kind.as_str()));
            if let Some(site) = site {
                prefixes.push(format!("{}/site:{site}", kind.as_str()));
            }
        }
        Some(prefixes)
    }

    fn owns(role: &Role, doc: &DocId) -> bool {
        match (role, doc.owner()) {
            (Role::Cloud, _) => false,
            (Role::Edge { node, .. }, Owner::Node(owner)) => node == owner,
            (Role::Edge { site, .. }, Owner::Site(owner)) => site.as_deref() == Some(owner),
        }
    }

    /// May `peer` read `doc`?
    pub fn may_read(&self, peer: &PeerId, doc: &DocId) -> bool {
        match self.role(peer) {
            None => false,
            Some(Role::Cloud) => true,
            Some(role) => Self::owns(role, doc),
        }
    }

    /// May `author` write `doc`?
    pub fn may_write(&self, author: &PeerId, doc: &DocId) -> bool {
        let Some(role) = self.role(author) else {
            return false;
        };
        let cloud = matches!(role, Role::Cloud);
        match doc.kind().writers() {
            Writers::Cloud => cloud,
            Writers::OwningEdge => Self::owns(role, doc),
            Writers::CloudAndOwningEdge => cloud || Self::owns(role, doc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_owners_and_kinds() {
        let (cloud, e1, e2) = (PeerId([0; 32]), PeerId([1; 32]), PeerId([2; 32]));
        let mut roster = Roster::new();
        roster.insert(cloud, Role::Cloud);
        roster.insert(
            e1,
            Role::Edge {
                node: "edge-1".into(),
                site: Some("north".into()),
            },
        );
        roster.insert(
            e2,
            Role::Edge {
                node: "edge-2".into(),
                site: Some("north".into()),
            },
        );
        let spec: DocId = "pod-spec/edge-1/default/web/u".parse().unwrap();
        let status: DocId = "pod-status/edge-1/default/web/u".parse().unwrap();
        let desired: DocId = "device-desired/edge-1/default/thermo".parse().unwrap();
        let shared: DocId = "configmap/site:north/default/cfg".parse().unwrap();
        assert!(roster.may_read(&e1, &spec) && !roster.may_read(&e2, &spec));
        assert!(roster.may_read(&e2, &shared) && roster.may_read(&cloud, &spec));
        assert!(roster.may_write(&cloud, &spec) && !roster.may_write(&e1, &spec));
        assert!(
            roster.may_write(&e1, &status)
                && !roster.may_write(&cloud, &status)
                && !roster.may_write(&e2, &status)
        );
        assert!(
            roster.may_write(&e1, &desired)
                && roster.may_write(&cloud, &desired)
                && !roster.may_write(&e2, &desired)
        );
        assert!(
            !roster.may_read(&PeerId([9; 32]), &spec),
            "unknown peers read nothing"
        );
    }

    #[test]
    fn readers_are_exactly_the_peers_that_may_read() {
        let mut roster = Roster::new();
        let peers: Vec<PeerId> = (0..6).map(|i| PeerId([i; 32])).collect();
        roster.insert(peers[0], Role::Cloud);
        roster.insert(peers[1], Role::Cloud);
        for (i, (node, site)) in [
            ("edge-1", Some("north")),
            ("edge-10", Some("north")),
            ("edge-2", None),
            ("edge-3", Some("south")),
        ]
        .into_iter()
        .enumerate()
        {
            roster.insert(
                peers[i + 2],
                Role::Edge {
                    node: node.into(),
                    site: site.map(Into::into),
                },
            );
        }
        // A peer that changes role is indexed by its new role only.
        roster.insert(
            peers[5],
            Role::Edge {
                node: "edge-4".into(),
                site: Some("north".into()),
            },
        );
        roster.remove(&peers[1]);
        let docs = [
            "pod-spec/edge-1/default/a/u",
            "node-status/edge-1",
            "node-status/edge-10",
            "configmap/site:north/default/c",
            "configmap/site:south/default/c",
            "device-desired/edge-2/default/d",
            "device-desired/edge-3/default/d",
            "pod-spec/edge-9/default/a/u",
        ];
        for doc in docs {
            let doc: DocId = doc.parse().unwrap();
            let mut readers = roster.readers(&doc);
            readers.sort();
            let mut expected: Vec<PeerId> = peers
                .iter()
                .copied()
                .filter(|p| roster.may_read(p, &doc))
                .collect();
            expected.sort();
            assert_eq!(readers, expected, "{doc}");
        }
    }
}
