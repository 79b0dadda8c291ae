//! Documents: what is replicated, who writes it and who reads it.
//!
//! One automerge document per object and per writer, so that who may write a
//! document is a property of the document rather than of each field. A
//! document id names its kind, the node it belongs to, and the object:
//!
//! ```text
//! <kind>/<node>/<namespace>/<name>[/<uid>]     e.g. pod-spec/edge-1/default/web-7d9/2f1c...
//! <kind>/site:<site>/<namespace>/<name>        a document shared by every edge of a site
//! node-status/<node>                           a node's own status
//! ```
//!
//! Because the owner is part of the id, a peer's read and write scopes are a
//! function of ids alone (see [`crate::access`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kinds of document Outpost replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DocKind {
    /// A pod's spec, from the API (containers, volumes, env, restart policy, probes).
    PodSpec,
    /// A pod's status as the owning edge runs it.
    PodStatus,
    /// A node's status: heartbeat, conditions, capacity, addresses, versions.
    NodeStatus,
    /// A ConfigMap referenced by the edge's pods.
    ConfigMap,
    /// A Secret referenced by the edge's pods.
    Secret,
    /// A device model.
    DeviceModel,
    /// A device's desired twin values and its protocol and visitor config.
    DeviceDesired,
    /// A device's reported twin values, state and last online time.
    DeviceReported,
}

/// Who may write a kind of document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Only the cloud bridge.
    Cloud,
    /// Only the edge the document belongs to.
    OwningEdge,
    /// The cloud bridge and the owning edge (multi-writer, resolved by HLC).
    CloudAndOwningEdge,
}

impl DocKind {
    /// Every kind, in a fixed order.
    pub const ALL: [DocKind; 8] = [
        DocKind::PodSpec,
        DocKind::PodStatus,
        DocKind::NodeStatus,
        DocKind::ConfigMap,
        DocKind::Secret,
        DocKind::DeviceModel,
        DocKind::DeviceDesired,
        DocKind::DeviceReported,
    ];

    /// The kind's name as it appears in document ids.
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::PodSpec => "pod-spec",
            DocKind::PodStatus => "pod-status",
            DocKind::NodeStatus => "node-status",
            DocKind::ConfigMap => "configmap",
            DocKind::Secret => "secret",
            DocKind::DeviceModel => "device-model",
            DocKind::DeviceDesired => "device-desired",
            DocKind::DeviceReported => "device-reported",
        }
    }

    /// Who may write documents of this kind.
    pub fn writers(self) -> Writers {
        match self {
            DocKind::PodSpec | DocKind::ConfigMap | DocKind::Secret | DocKind::DeviceModel => {
                Writers::Cloud
            }
            DocKind::PodStatus | DocKind::NodeStatus | DocKind::DeviceReported => {
                Writers::OwningEdge
            }
            DocKind::DeviceDesired => Writers::CloudAndOwningEdge,
        }
    }

    /// Fast-changing single-writer kinds whose history is not worth keeping:
    /// their writer rolls them over to a new generation holding only the
    /// current values, so storage stays bounded however many updates they take.
    pub fn rolls_over(self) -> bool {
        matches!(
            self,
            DocKind::DeviceReported | DocKind::NodeStatus | DocKind::PodStatus
        )
    }
}

impl FromStr for DocKind {
    type Err = DocIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DocIdError::UnknownKind(s.to_owned()))
    }
}

/// Who a document belongs to: one node, or every edge of a site.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Owner<'a> {
    /// The node of this name.
    Node(&'a str),
    /// Every edge of this site.
    Site(&'a str),
}

/// Why a document id is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocIdError {
    /// The first segment names no kind.
    #[error("unknown document kind {0:?}")]
    UnknownKind(String),
    /// The id is empty, too long, or has a character outside printable ASCII.
    #[error("invalid document id {0:?}: {1}")]
    Invalid(String, &'static str),
}

/// The longest document id accepted, in bytes.
pub const DOC_ID_MAX_LEN: usize = 512;

/// A document id: `<kind>/<owner>/...`, printable ASCII, stable.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

impl DocId {
    /// Builds an id from its kind, owner and object path segments.
    pub fn new(kind: DocKind, owner: Owner<'_>, object: &[&str]) -> Result<Self, DocIdError> {
        let mut id = String::from(kind.as_str());
        id.push('/');
        match owner {
            Owner::Node(node) => id.push_str(node),
            Owner::Site(site) => {
                id.push_str("site:");
                id.push_str(site);
            }
        }
        for part in object {
            id.push('/');
            id.push_str(part);
        }
        id.parse()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's kind.
    pub fn kind(&self) -> DocKind {
        // Validated on construction: the first segment is a known kind.
        self.0
            .split('/')
            .next()
            .and_then(|k| k.parse().ok())
            .unwrap_or(DocKind::PodSpec)
    }

    /// Who the document belongs to.
    pub fn owner(&self) -> Owner<'_> {
        let seg = self.0.split('/').nth(1).unwrap_or_default();
        match seg.strip_prefix("site:") {
            Some(site) => Owner::Site(site),
            None => Owner::Node(seg),
        }
    }
}

impl FromStr for DocId {
    type Err = DocIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why| DocIdError::Invalid(s.chars().take(80).collect(), why);
        if s.len() > DOC_ID_MAX_LEN {
            return Err(invalid("longer than 512 bytes"));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("not printable ASCII without spaces"));
        }
        let mut parts = s.split('/');
        let kind = parts.next().unwrap_or_default();
        kind.parse::<DocKind>()?;
        let owner = parts.next().ok_or_else(|| invalid("no owner segment"))?;
        if owner.is_empty() || owner == "site:" {
            return Err(invalid("empty owner"));
        }
        if parts.any(str::is_empty) {
            return Err(invalid("empty segment"));
        }
        Ok(DocId(s.to_owned()))
    }
}

impl TryFrom<String> for DocId {
    type Error = DocIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DocId> for String {
    fn from(id: DocId) -> Self {
        id.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_kind_and_owner() {
        let id = DocId::new(
            DocKind::PodSpec,
            Owner::Node("edge-1"),
            &["default", "web", "uid-1"],
        )
        .unwrap();
        assert_eq!(id.as_str(), "pod-spec/edge-1/default/web/uid-1");
        assert_eq!(id.kind(), DocKind::PodSpec);
        assert_eq!(id.owner(), Owner::Node("edge-1"));
        let shared: DocId = "configmap/site:north/default/cfg".parse().unwrap();
        assert_eq!(shared.owner(), Owner::Site("north"));
    }

    #[test]
    fn bad_ids_are_refused() {
        for bad in [
            "",
            "pod-spec",
            "pod-spec/",
            "nope/edge-1/x",
            "pod-spec/edge 1/x",
            "pod-spec/edge-1//x",
            "pod-spec/site:",
        ] {
            assert!(bad.parse::<DocId>().is_err(), "{bad:?}");
        }
        assert!("x".repeat(600).parse::<DocId>().is_err());
    }
}
