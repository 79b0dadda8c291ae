//! The join protocol's wire format and its edge side: how an edge presents
//! a join token to the cloud, on its own ALPN. The cloud bridge serves it.
//!
//! The edge connects to the bridge's iroh endpoint with ALPN [`JOIN_ALPN`]
//! (the QUIC handshake proves it holds its key), opens one bidirectional
//! stream, writes a [`JoinRequest`] as JSON (at most [`MAX_REQUEST_BYTES`])
//! and finishes its side. The bridge answers with one [`JoinReply`] as JSON
//! and finishes. On [`JoinReply::Admitted`] the edge dials the bridge again
//! with the sync ALPN.
//!
//! ```text
//! edge → bridge: {"token":"abcd1234.<32 characters>"}
//! bridge → edge: {"admitted":{"node":"edge-1","site":null}}
//!            or  {"refused":{"reason":"expired","message":"join token ... expired at ..."}}
//! ```
//! `reason` is one of `malformed`, `unknown`, `expired`, `spent`, `damaged`,
//! `unavailable` (the cloud's API failed: retrying later may help) or `protocol`.

use std::time::Duration;

use iroh::{Endpoint, EndpointAddr};
use serde::{Deserialize, Serialize};

use crate::transport::iroh::PeerAddr;

/// The ALPN of the join protocol.
pub const JOIN_ALPN: &[u8] = b"outpost/join/0";
/// The largest request the bridge reads.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// The largest reply an edge reads.
pub const MAX_REPLY_BYTES: usize = 4096;
/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What the edge sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The join token, `<id>.<secret>`.
    pub token: String,
}

/// What the bridge answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinReply {
    /// The edge is admitted under this node name.
    Admitted {
        /// The node's name.
        node: String,
        /// Its site, if any.
        site: Option<String>,
    },
    /// The edge is refused.
    Refused {
        /// A machine-readable reason (see the module docs).
        reason: String,
        /// What to tell the operator.
        message: String,
    },
}

/// Why a join request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum JoinRequestError {
    /// The bridge could not be reached.
    #[error("cannot reach the bridge at {addr}: {reason}")]
    Connect {
        /// Where it was dialled.
        addr: String,
        /// What iroh said.
        reason: String,
    },
    /// The exchange broke off or the reply does not parse.
    #[error("join exchange with the bridge failed: {0}")]
    Exchange(String),
    /// The bridge took too long.
    #[error("the bridge did not answer the join request within {0:?}")]
    Timeout(Duration),
}

/// The edge side: presents `token` to the bridge at `bridge` from
/// `endpoint` (whose key is the one admitted) and returns the bridge's
/// answer. The endpoint needs no ALPN of its own for this.
pub async fn request(
    endpoint: &Endpoint,
    bridge: &PeerAddr,
    token: &str,
) -> Result<JoinReply, JoinRequestError> {
    let work = async {
        let conn = endpoint
            .connect(EndpointAddr::from(bridge), JOIN_ALPN)
            .await
            .map_err(|e| JoinRequestError::Connect {
                addr: bridge.to_string(),
                reason: e.to_string(),
            })?;
        let exchange = |e: &dyn std::fmt::Display| JoinRequestError::Exchange(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| exchange(&e))?;
        let body = serde_json::to_vec(&JoinRequest {
            token: token.to_owned(),
        })
        .map_err(|e| exchange(&e))?;
        send.write_all(&body).await.map_err(|e| exchange(&e))?;
        send.finish().map_err(|e| exchange(&e))?;
        let bytes = recv
            .read_to_end(MAX_REPLY_BYTES)
            .await
            .map_err(|e| exchange(&e))?;
        conn.close(0u32.into(), b"done");
        serde_json::from_slice(&bytes).map_err(|e| exchange(&e))
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| JoinRequestError::Timeout(TIMEOUT))?
}
