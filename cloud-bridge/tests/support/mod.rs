//! Helpers shared by the bridge's tests against the test environment's API
//! server: an admin client, keys, the wall clock and polling.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use outpost_sync::PeerId;
use outpost_sync::test_utils::env_value;
use tokio::time::Instant;

/// The configuration of the environment's admin kubeconfig.
pub async fn kube_config() -> kube::Config {
    let path = env_value("KUBECONFIG").expect("test environment: run scripts/env up");
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig")
}

/// A client with the environment's admin credentials.
pub async fn client() -> Client {
    Client::try_from(kube_config().await).expect("client")
}

/// A fresh peer key.
pub fn new_key() -> PeerId {
    PeerId::from(iroh::SecretKey::generate().public())
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls `f` until it yields a value; panics naming `what` after `limit`.
pub async fn until<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
