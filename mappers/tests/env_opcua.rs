//! Smoke test of the test environment's asyncua device: an async-opcua
//! client reads variables it serves.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use opcua::client::{ClientBuilder, IdentityToken};
use opcua::types::{
    AttributeId, DataValue, EndpointDescription, MessageSecurityMode, NodeId, ReadValueId,
    TimestampsToReturn, UserTokenPolicy, Variant,
};
use outpost_sync::test_utils::env_value;

#[tokio::test]
async fn asyncua_serves_a_readable_variable() {
    let url = env_value("OUTPOST_OPCUA_URL").expect("test environment");
    let pki = std::env::temp_dir().join(format!("outpost-opcua-smoke-{}", std::process::id()));
    let mut client = ClientBuilder::new()
        .application_name("outpost-smoke")
        .application_uri("urn:outpost:smoke")
        .pki_dir(&pki)
        .create_sample_keypair(false)
        .trust_server_certs(true)
        .session_retry_limit(3)
        .client()
        .expect("client config");
    let endpoint: EndpointDescription = (
        url.as_str(),
        "None",
        MessageSecurityMode::None,
        UserTokenPolicy::anonymous(),
    )
        .into();
    let (session, event_loop) = client
        .connect_to_matching_endpoint(endpoint, IdentityToken::Anonymous)
        .await
        .expect("connect");
    let handle = event_loop.spawn();
    tokio::time::timeout(Duration::from_secs(10), session.wait_for_connection())
        .await
        .expect("session within 10 s");

    let ids = ["double", "string", "int"].map(|name| ReadValueId {
        node_id: NodeId::new(2, name),
        attribute_id: AttributeId::Value as u32,
        ..Default::default()
    });
    let values: Vec<DataValue> = session
        .read(&ids, TimestampsToReturn::Neither, 0.0)
        .await
        .expect("read");
    let values: Vec<Option<Variant>> = values.into_iter().map(|v| v.value).collect();
    assert_eq!(
        values,
        vec![
            Some(Variant::Double(21.5)),
            Some(Variant::String("thermo-1".into())),
            Some(Variant::Int32(42)),
        ]
    );

    session.disconnect().await.expect("disconnect");
    handle.abort();
    let _ = std::fs::remove_dir_all(pki);
}
