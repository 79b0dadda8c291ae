//! The agent's configuration: a TOML file, overridden by environment
//! variables (`OUTPOST_*`), overridden by command-line flags.
//!
//! Every setting has a default, so an agent runs with no file at all. The
//! file uses the same names as the flags, with underscores:
//!
//! ```toml
//! data_dir = "/var/lib/outpost"
//! node_name = "edge-1"
//! containerd_socket = "/run/containerd/containerd.sock"
//! heartbeat_s = 10
//! backoff_base_ms = 10000
//! ```
//!
//! A file that does not parse, or names a setting that does not exist, is an
//! error at start-up: the agent never runs on a half-understood
//! configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_sync::transport::iroh::PeerAddr;
use serde::{Deserialize, Serialize};

/// Default data dir.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/outpost";
/// Default containerd socket.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Default pause (sandbox) image.
pub const DEFAULT_PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.9";
/// Default directory of container logs (kubelet's).
pub const DEFAULT_POD_LOG_DIR: &str = "/var/log/pods";
/// Default UDP address of the iroh endpoint.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:0";

/// The event bus's default broker: the node's own mosquitto.
pub const DEFAULT_MQTT: &str = "127.0.0.1:1883";

/// `host:port` or `off`.
fn parse_mqtt(text: &str) -> Result<Option<(String, u16)>, ConfigError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let invalid = |reason: String| ConfigError::Invalid {
        name: "mqtt",
        reason,
    };
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("{text:?} is not host:port or off")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| invalid(format!("{port:?} is not a port number")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(invalid(format!("{text:?} is not host:port or off")));
    }
    Ok(Some((host.to_owned(), port)))
}

/// `ip:port` or `off`.
fn parse_api_listen(text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| ConfigError::Invalid {
        name: "api_listen",
        reason: format!("{text:?} is not ip:port or off"),
    })
}

/// The settings of `outpost-edge run` as flags and environment variables.
/// Each is optional: what is not given comes from the file, then from the
/// default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunArgs {
    /// A TOML configuration file (same names as the flags, with underscores).
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the agent keeps its identity and replica [default: /var/lib/outpost].
    #[arg(long, env = "OUTPOST_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's name [default: the host name].
    #[arg(long, env = "OUTPOST_NODE_NAME")]
    pub node_name: Option<String>,
    /// The site this node belongs to, for documents shared by a site [default: none].
    #[arg(long, env = "OUTPOST_SITE")]
    pub site: Option<String>,
    /// The cloud bridge, as `<endpoint id>@<ip:port>`; several bridge replicas
    /// separated by commas [default: none; the node runs alone].
    #[arg(long, env = "OUTPOST_CLOUD")]
    pub cloud: Option<String>,
    /// UDP address of this agent's iroh endpoint [default: 0.0.0.0:0].
    #[arg(long, env = "OUTPOST_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// containerd's CRI socket [default: /run/containerd/containerd.sock].
    #[arg(long, env = "OUTPOST_CONTAINERD_SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// The pod sandbox image, kept present on the node; it must match
    /// containerd's `sandbox_image` [default: registry.k8s.io/pause:3.9].
    #[arg(long, env = "OUTPOST_PAUSE_IMAGE")]
    pub pause_image: Option<String>,
    /// Where container logs go, one folder per pod [default: /var/log/pods].
    #[arg(long, env = "OUTPOST_POD_LOG_DIR")]
    pub pod_log_dir: Option<PathBuf>,
    /// The node's IP as reported in its status [default: the address of the default route].
    #[arg(long, env = "OUTPOST_NODE_IP")]
    pub node_ip: Option<String>,
    /// Seconds between node heartbeats [default: 10].
    #[arg(long, env = "OUTPOST_HEARTBEAT_S")]
    pub heartbeat_s: Option<u64>,
    /// Milliseconds between two reconciliations of the pods with the runtime [default: 1000].
    #[arg(long, env = "OUTPOST_SYNC_INTERVAL_MS")]
    pub sync_interval_ms: Option<u64>,
    /// First restart back-off of a crashing container, doubled at each crash [default: 10000].
    #[arg(long, env = "OUTPOST_BACKOFF_BASE_MS")]
    pub backoff_base_ms: Option<u64>,
    /// Longest restart back-off [default: 300000].
    #[arg(long, env = "OUTPOST_BACKOFF_MAX_MS")]
    pub backoff_max_ms: Option<u64>,
    /// A container that ran this long before exiting restarts with no back-off [default: 600].
    #[arg(long, env = "OUTPOST_BACKOFF_RESET_S")]
    pub backoff_reset_s: Option<u64>,
    /// The node's MQTT broker for KubeEdge's event bus, as `host:port`, or
    /// `off` [default: 127.0.0.1:1883].
    #[arg(long, env = "OUTPOST_MQTT")]
    pub mqtt: Option<String>,
    /// Address of the local API and /metrics, as `ip:port`, or `off`
    /// [default: 127.0.0.1:10550].
    #[arg(long, env = "OUTPOST_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Unix socket where external mappers register over KubeEdge's DMI
    /// (e.g. /etc/kubeedge/dmi.sock) [default: none; devices are served
    /// in-process].
    #[arg(long, env = "OUTPOST_DMI_SOCKET")]
    pub dmi_socket: Option<PathBuf>,
}

/// The configuration file: every setting optional, no unknown names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`RunArgs::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`RunArgs::node_name`].
    pub node_name: Option<String>,
    /// See [`RunArgs::site`].
    pub site: Option<String>,
    /// See [`RunArgs::cloud`].
    pub cloud: Option<String>,
    /// See [`RunArgs::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`RunArgs::containerd_socket`].
    pub containerd_socket: Option<PathBuf>,
    /// See [`RunArgs::pause_image`].
    pub pause_image: Option<String>,
    /// See [`RunArgs::pod_log_dir`].
    pub pod_log_dir: Option<PathBuf>,
    /// See [`RunArgs::node_ip`].
    pub node_ip: Option<String>,
    /// See [`RunArgs::heartbeat_s`].
    pub heartbeat_s: Option<u64>,
    /// See [`RunArgs::sync_interval_ms`].
    pub sync_interval_ms: Option<u64>,
    /// See [`RunArgs::backoff_base_ms`].
    pub backoff_base_ms: Option<u64>,
    /// See [`RunArgs::backoff_max_ms`].
    pub backoff_max_ms: Option<u64>,
    /// See [`RunArgs::backoff_reset_s`].
    pub backoff_reset_s: Option<u64>,
    /// See [`RunArgs::mqtt`].
    pub mqtt: Option<String>,
    /// See [`RunArgs::api_listen`].
    pub api_listen: Option<String>,
    /// See [`RunArgs::dmi_socket`].
    pub dmi_socket: Option<PathBuf>,
}

/// The effective configuration of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Identity, replica, pod volumes.
    pub data_dir: PathBuf,
    /// This node's name.
    pub node_name: String,
    /// This node's site, if any.
    pub site: Option<String>,
    /// The cloud bridge to sync with, if any.
    pub cloud: Option<String>,
    /// The iroh endpoint's UDP address.
    pub listen: SocketAddr,
    /// containerd's CRI socket.
    pub containerd_socket: PathBuf,
    /// The sandbox image.
    pub pause_image: String,
    /// Container logs.
    pub pod_log_dir: PathBuf,
    /// The node's IP, if given.
    pub node_ip: Option<String>,
    /// Seconds between heartbeats.
    pub heartbeat_s: u64,
    /// Milliseconds between reconciliations.
    pub sync_interval_ms: u64,
    /// First restart back-off, ms.
    pub backoff_base_ms: u64,
    /// Longest restart back-off, ms.
    pub backoff_max_ms: u64,
    /// Running time that resets the back-off, s.
    pub backoff_reset_s: u64,
    /// The event bus's broker (`host`, `port`), or `None` when off.
    pub mqtt: Option<(String, u16)>,
    /// The local API's address, or `None` when off.
    pub api_listen: Option<SocketAddr>,
    /// The DMI socket for external mappers, if any.
    pub dmi_socket: Option<PathBuf>,
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or names unknown settings.
    #[error("the configuration file {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// A value is out of range or malformed.
    #[error("invalid setting {name}: {reason}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// Why.
        reason: String,
    },
}

impl FileConfig {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

impl Config {
    /// Resolves the configuration: flags and environment (already folded by
    /// clap, flags first), then the file named by `--config`, then defaults.
    pub fn resolve(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Merges flags over a file's settings over the defaults.
    pub fn merge(args: &RunArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let a = args.clone();
        let node_name = match a.node_name.or(file.node_name) {
            Some(name) => name,
            None => hostname(),
        };
        if node_name.is_empty() || !node_name.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(ConfigError::Invalid {
                name: "node_name",
                reason: format!("{node_name:?} must be printable ASCII without spaces or '/'"),
            });
        }
        let listen = match a.listen.or(file.listen) {
            Some(addr) => addr,
            None => DEFAULT_LISTEN.parse().map_err(|e| ConfigError::Invalid {
                name: "listen",
                reason: format!("{e}"),
            })?,
        };
        let cloud = a.cloud.or(file.cloud);
        if let Some(cloud) = &cloud {
            for one in cloud.split(',').map(str::trim) {
                one.parse::<PeerAddr>().map_err(|e| ConfigError::Invalid {
                    name: "cloud",
                    reason: format!("{one:?}: {e}"),
                })?;
            }
        }
        let config = Config {
            data_dir: a
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            node_name,
            site: a.site.or(file.site),
            cloud,
            listen,
            containerd_socket: a
                .containerd_socket
                .or(file.containerd_socket)
                .unwrap_or_else(|| DEFAULT_CONTAINERD_SOCKET.into()),
            pause_image: a
                .pause_image
                .or(file.pause_image)
                .unwrap_or_else(|| DEFAULT_PAUSE_IMAGE.into()),
            pod_log_dir: a
                .pod_log_dir
                .or(file.pod_log_dir)
                .unwrap_or_else(|| DEFAULT_POD_LOG_DIR.into()),
            node_ip: a.node_ip.or(file.node_ip),
            heartbeat_s: a.heartbeat_s.or(file.heartbeat_s).unwrap_or(10),
            sync_interval_ms: a.sync_interval_ms.or(file.sync_interval_ms).unwrap_or(1000),
            backoff_base_ms: a.backoff_base_ms.or(file.backoff_base_ms).unwrap_or(10_000),
            backoff_max_ms: a.backoff_max_ms.or(file.backoff_max_ms).unwrap_or(300_000),
            backoff_reset_s: a.backoff_reset_s.or(file.backoff_reset_s).unwrap_or(600),
            mqtt: parse_mqtt(a.mqtt.or(file.mqtt).as_deref().unwrap_or(DEFAULT_MQTT))?,
            api_listen: parse_api_listen(
                a.api_listen
                    .or(file.api_listen)
                    .as_deref()
                    .unwrap_or(crate::api::DEFAULT_API_LISTEN),
            )?,
            dmi_socket: a.dmi_socket.or(file.dmi_socket),
        };
        for (name, value) in [
            ("heartbeat_s", config.heartbeat_s),
            ("sync_interval_ms", config.sync_interval_ms),
            ("backoff_base_ms", config.backoff_base_ms),
            ("backoff_max_ms", config.backoff_max_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if config.backoff_max_ms < config.backoff_base_ms {
            return Err(ConfigError::Invalid {
                name: "backoff_max_ms",
                reason: "must not be less than backoff_base_ms".into(),
            });
        }
        Ok(config)
    }

    /// The cloud bridge replicas, parsed (the agent syncs with each).
    pub fn cloud_peers(&self) -> Vec<PeerAddr> {
        self.cloud
            .as_deref()
            .map(|c| {
                c.split(',')
                    .filter_map(|one| one.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The restart back-off settings.
    pub fn backoff(&self) -> crate::pods::Backoff {
        crate::pods::Backoff {
            base: Duration::from_millis(self.backoff_base_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            reset_after: Duration::from_secs(self.backoff_reset_s),
        }
    }
}

/// The machine's host name, `edge` when it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "edge".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: FileConfig = toml::from_str(
            "data_dir = \"/srv/outpost\"\nnode_name = \"from-file\"\nheartbeat_s = 3\n",
        )
        .expect("parse");
        let args = RunArgs {
            node_name: Some("from-flag".into()),
            ..Default::default()
        };
        let config = Config::merge(&args, file).expect("merge");
        assert_eq!(config.node_name, "from-flag");
        assert_eq!(config.data_dir, PathBuf::from("/srv/outpost"));
        assert_eq!(config.heartbeat_s, 3);
        assert_eq!(config.backoff_base_ms, 10_000);
        assert_eq!(
            config.containerd_socket,
            PathBuf::from(DEFAULT_CONTAINERD_SOCKET)
        );
    }

    #[test]
    fn unknown_settings_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("data_dri = \"/x\"").is_err());
        let args = RunArgs {
            node_name: Some("n".into()),
            backoff_base_ms: Some(0),
            ..Default::default()
        };
        assert!(Config::merge(&args, FileConfig::default()).is_err());
        let args = RunArgs {
            node_name: Some("bad/name".into()),
            ..Default::default()
        };
        assert!(Config::merge(&args, FileConfig::default()).is_err());
        for (mqtt, api) in [
            ("nohost", "off"),
            ("h:99999", "off"),
            ("off", "10550"),
            ("off", "x:1"),
        ] {
            let args = RunArgs {
                node_name: Some("n".into()),
                mqtt: Some(mqtt.into()),
                api_listen: Some(api.into()),
                ..Default::default()
            };
            let e = Config::merge(&args, FileConfig::default()).unwrap_err();
            assert!(
                e.to_string().contains("mqtt") || e.to_string().contains("api_listen"),
                "{e}"
            );
        }
    }

    #[test]
    fn event_bus_and_api_default_to_loopback_and_can_be_turned_off() {
        let args = RunArgs {
            node_name: Some("n".into()),
            ..Default::default()
        };
        let c = Config::merge(&args, FileConfig::default()).unwrap();
        assert_eq!(c.mqtt, Some(("127.0.0.1".into(), 1883)));
        assert_eq!(c.api_listen, Some("127.0.0.1:10550".parse().unwrap()));
        let file: FileConfig = toml::from_str("mqtt = \"off\"\napi_listen = \"off\"").unwrap();
        let c = Config::merge(&args, file).unwrap();
        assert_eq!((c.mqtt, c.api_listen), (None, None));
    }
}
