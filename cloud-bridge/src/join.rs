//! The bridge's side of the join protocol: it admits the key of the edge
//! that presents a token. The wire format and the edge's side live in
//! [`outpost_sync::transport::join`], re-exported here. On an admission the
//! bridge's roster knows the edge's key within the time its watch of
//! admission records takes (typically milliseconds); the edge's sync dial
//! loop retries with back-off anyway.

use iroh::endpoint::Connection;
use kube::Client;
use outpost_sync::PeerId;
pub use outpost_sync::transport::join::{
    JOIN_ALPN, JoinReply, JoinRequest, JoinRequestError, MAX_REPLY_BYTES, MAX_REQUEST_BYTES,
    TIMEOUT, request,
};
use tracing::{info, warn};

use crate::admission::{self, AdmitError};

fn refused(reason: &str, message: impl Into<String>) -> JoinReply {
    JoinReply::Refused {
        reason: reason.into(),
        message: message.into(),
    }
}

/// The reply to an admission's outcome.
pub fn reply_to(result: &Result<admission::Admitted, AdmitError>) -> JoinReply {
    match result {
        Ok(a) => JoinReply::Admitted {
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
            refused(reason, e.to_string())
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
        Err(e) => refused("protocol", format!("unreadable request: {e}")),
        Ok(bytes) => match serde_json::from_slice::<JoinRequest>(&bytes) {
            Err(e) => refused("protocol", format!("malformed request: {e}")),
            Ok(request) => {
                let result = admission::admit(client, &request.token, key).await;
                match &result {
                    Ok(a) => info!(peer = %key, node = %a.node, "edge admitted"),
                    Err(e) => warn!(peer = %key, error = %e, "edge refused"),
                }
                reply_to(&result)
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
        let no = refused("expired", "gone");
        assert_eq!(
            serde_json::to_string(&no).expect("json"),
            r#"{"refused":{"reason":"expired","message":"gone"}}"#
        );
    }
}
