//! The join protocol: how an edge presents its token, on its own ALPN.
//!
//! The edge connects to the bridge's iroh endpoint with ALPN [`JOIN_ALPN`]
//! (the QUIC handshake proves it holds its key), opens one bidirectional
//! stream, writes a [`JoinRequest`] as JSON (at most [`MAX_REQUEST_BYTES`])
//! and finishes its side. The bridge answers with one [`JoinReply`] as JSON
//! and finishes. On [`JoinReply::Admitted`] the edge dials the bridge again
//! with the sync ALPN: the bridge's roster knows its key by then (within the
//! time the bridge's watch of admission records takes, typically
//! milliseconds; the sync dial loop retries with back-off anyway).
//!
//! Wire format, for an edge written without this crate:
//! ```text
//! edge → bridge: {"token":"abcd1234.<32 characters>"}
//! bridge → edge: {"admitted":{"node":"edge-1","site":null}}
//!            or  {"refused":{"reason":"expired","message":"join token ... expired at ..."}}
//! ```
//! `reason` is one of `malformed`, `unknown`, `expired`, `spent`, `damaged`,
//! `unavailable` (the API failed: retrying later may help) or `protocol`.

use std::time::Duration;

use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr};
use kube::Client;
use outpost_sync::PeerId;
use outpost_sync::transport::iroh::PeerAddr;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::admission::{self, AdmitError};

/// The ALPN of the join protocol.
pub const JOIN_ALPN: &[u8] = b"outpost/join/0";
/// The largest request the bridge reads.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// The largest reply an edge reads.
pub const MAX_REPLY_BYTES: usize = 4096;
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(10);

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

impl JoinReply {
    fn refused(reason: &str, message: impl Into<String>) -> Self {
        Self::Refused {
            reason: reason.into(),
            message: message.into(),
        }
    }

    /// The reply to an admission's outcome.
    pub fn from_result(result: &Result<admission::Admitted, AdmitError>) -> Self {
        match result {
            Ok(a) => Self::Admitted {
                node: a.node.clone(),
                site: a.site.clone(),
            },
            Err(e) => {
                let reason = match e {
                    AdmitError::Malformed(_) => "malformed",
                    AdmitError::Unknown { .. } => "unknown",
                    AdmitError::Expired { .. } => "expired",
                    AdmitError::Spent { .. } => "spent",
                    AdmitError::Damaged { .. } => "damaged",
                    AdmitError::Kube(_) => "unavailable",
                };
                Self::refused(reason, e.to_string())
            }
        }
    }
}

/// Serves one join connection: reads the request, admits the remote key,
/// answers, and waits for the edge to close.
pub async fn serve(conn: Connection, client: &Client) {
    let key = PeerId::from(conn.remote_id());
    let reply = match tokio::time::timeout(TIMEOUT, exchange(&conn, client, key)).await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(_) => "the edge did not send its request in time".to_owned(),
    };
    warn!(peer = %key, error = %reply, "join exchange failed");
    conn.close(400u32.into(), b"join protocol error");
}

async fn exchange(conn: &Connection, client: &Client, key: PeerId) -> Result<(), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let reply = match recv.read_to_end(MAX_REQUEST_BYTES).await {
        Err(e) => JoinReply::refused("protocol", format!("unreadable request: {e}")),
        Ok(bytes) => match serde_json::from_slice::<JoinRequest>(&bytes) {
            Err(e) => JoinReply::refused("protocol", format!("malformed request: {e}")),
            Ok(request) => {
                let result = admission::admit(client, &request.token, key).await;
                match &result {
                    Ok(a) => info!(peer = %key, node = %a.node, "edge admitted"),
                    Err(e) => warn!(peer = %key, error = %e, "edge refused"),
                }
                JoinReply::from_result(&result)
            }
        },
    };
    let bytes = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    // Let the edge read the reply before the connection goes.
    let _ = tokio::time::timeout(TIMEOUT, conn.closed()).await;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_as_documented() {
        let ok = JoinReply::Admitted {
            node: "edge-1".into(),
            site: None,
        };
        assert_eq!(
            serde_json::to_string(&ok).expect("json"),
            r#"{"admitted":{"node":"edge-1","site":null}}"#
        );
        let no = JoinReply::refused("expired", "gone");
        assert_eq!(
            serde_json::to_string(&no).expect("json"),
            r#"{"refused":{"reason":"expired","message":"gone"}}"#
        );
    }
}
