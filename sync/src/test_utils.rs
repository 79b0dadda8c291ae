//! Helpers for the tests of every Outpost crate (feature `test-utils`).
//!
//! `scripts/env up` starts the real parts tests run against (Kubernetes,
//! containerd, mosquitto, device simulators, Prometheus) and records where they
//! listen in an env file, one `KEY=value` per line, in `$OUTPOST_ENV_DIR/env`
//! (default `/tmp/outpost-env/env`). A variable set in the process environment
//! wins over the file.

use std::path::PathBuf;

/// What the environment does not provide.
#[derive(Debug, thiserror::Error)]
pub enum TestEnvError {
    /// The key is neither in the process environment nor in the env file.
    #[error(
        "{key} is not set and not in {file}: start the test environment with `scripts/env up` (or run `scripts/test`)"
    )]
    Missing {
        /// The key asked for.
        key: String,
        /// The env file that was read.
        file: PathBuf,
    },
}

/// The env file `scripts/env up` writes.
pub fn env_file() -> PathBuf {
    let dir = std::env::var_os("OUTPOST_ENV_DIR").unwrap_or_else(|| "/tmp/outpost-env".into());
    PathBuf::from(dir).join("env")
}

/// One fact about the running test environment, such as `KUBECONFIG` or
/// `OUTPOST_MQTT_ADDR`.
pub fn env_value(key: &str) -> Result<String, TestEnvError> {
    if let Ok(value) = std::env::var(key) {
        return Ok(value);
    }
    let file = env_file();
    std::fs::read_to_string(&file)
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|line| line.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
        })
        .ok_or_else(|| TestEnvError::Missing {
            key: key.to_owned(),
            file,
        })
}

/// A name that is unique for this process and moment, for objects tests
/// create in shared services (namespaces, topics, sandboxes).
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:08x}", std::process::id())
}
