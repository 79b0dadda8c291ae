//! The agent: everything `outpost-edge run` starts, wired together.
//!
//! The identity and the replica live in the data dir; the pod manager and
//! the heartbeat work from the replica alone, so the agent starts and runs
//! its pods with no network. When a cloud peer is configured, the sync
//! engine keeps a session with it (reconnecting with back-off) and accepts
//! sessions from known peers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_sync::PeerId;
use outpost_sync::access::{Role, Roster};
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tracing::info;

use crate::api::ApiState;
use crate::config::Config;
use crate::cri::CriClient;
use crate::eventbus::{EventBus, EventBusConfig};
use crate::metrics::EdgeMetrics;
use crate::pods::{PodManager, PodManagerConfig};
use crate::twins::{TwinConfig, TwinManager, TwinView};

/// The replica's folder inside the data dir.
pub const REPLICA_DIR: &str = "replica";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] outpost_sync::identity::IdentityError),
    /// The replica could not be opened (a corrupt data dir is reported, never wiped).
    #[error("cannot open the replica in {path}: {source}")]
    Replica {
        /// The replica's folder.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: outpost_sync::replica::ReplicaError,
    },
    /// The iroh endpoint could not be bound.
    #[error(transparent)]
    Bind(#[from] outpost_sync::transport::iroh::BindError),
    /// The local API's address could not be bound.
    #[error("cannot listen on {addr} for the local API (set api_listen, or off): {source}")]
    Api {
        /// The address.
        addr: std::net::SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// The file in the data dir holding the local API's address, for
/// `outpost-edge status`.
pub const API_ADDR_FILE: &str = "api-addr";

/// A running agent.
pub struct Agent {
    engine: Engine,
    pods: PodManager,
    twins: TwinManager,
    eventbus: Option<EventBus>,
    tasks: JoinSet<()>,
    endpoint: Option<iroh::Endpoint>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("me", &self.engine.me())
            .finish()
    }
}

/// Automerge documents the edge's replica keeps loaded. The pod manager
/// reads a pod's spec again only when it changed, the twins read their
/// devices' documents when these change (and at each resync), and the
/// reported values and statuses the node writes are kept without their
/// automerge documents: a small cache serves them all, and each loaded
/// document costs some 10 KB. What it does not hold is read from the store
/// when asked for (the local API's pod list reads each pod's spec). 16, not
/// more: the cache stays full of whatever was read last (the specs read at
/// start, a resync's desired values), about 0.9 MB for 64 documents.
const CACHED_DOCS: usize = 16;

/// The replica's RocksDB block cache. A node reads its documents from the
/// store when it starts, and seldom after: the twins' reported values are
/// written without reading, and specs are read again only when they change.
/// The default 2 MB cache stayed full of the blocks read at start (1.3 MB
/// resident with 1,000 devices); the operating system's page cache keeps the
/// files anyway.
const BLOCK_CACHE_BYTES: usize = 512 << 10;

/// The replica's memtable size per column family. Twin reports fill the
/// memtables of a node with many devices (about 45 KB a second at 100
/// reports a second); at the default 1 MB each they held 1-2 MB more while
/// reports came in. A flush every few seconds under that load is cheap.
const MEMTABLE_BYTES: usize = 256 << 10;

/// Opens the replica of a data dir for the identity kept there.
pub fn open_replica(data_dir: &std::path::Path) -> Result<Replica, StartError> {
    let key = outpost_sync::identity::load_or_create(data_dir)?;
    let path = data_dir.join(REPLICA_DIR);
    let options = ReplicaOptions {
        cache_docs: std::num::NonZeroUsize::new(CACHED_DOCS).unwrap_or(std::num::NonZeroUsize::MIN),
        store: outpost_sync::store::StoreOptions {
            block_cache_bytes: BLOCK_CACHE_BYTES,
            memtable_bytes: MEMTABLE_BYTES,
            ..Default::default()
        },
        ..ReplicaOptions::default()
    };
    Replica::open(&path, PeerId::from(key.public()), options)
        .map_err(|source| StartError::Replica { path, source })
}

impl Agent {
    /// Starts the agent: replica, pod manager, heartbeat and, when a cloud
    /// is configured, the sync endpoint.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let key = outpost_sync::identity::load_or_create(&config.data_dir)?;
        let replica = open_replica(&config.data_dir)?;
        let mut roster = Roster::new();
        let clouds = config.cloud_peers();
        for cloud in &clouds {
            roster.insert(PeerId::from(cloud.id), Role::Cloud);
        }
        let engine = Engine::new(replica, roster, SyncMetrics::default());
        let cri = CriClient::connect_lazy(&config.containerd_socket);
        let pods = PodManager::spawn(
            engine.clone(),
            cri.clone(),
            PodManagerConfig {
                node: config.node_name.clone(),
                site: config.site.clone(),
                data_dir: config.data_dir.clone(),
                pod_log_dir: config.pod_log_dir.clone(),
                pause_image: Some(config.pause_image.clone()),
                node_ip: config.node_ip.clone(),
                sync_interval: Duration::from_millis(config.sync_interval_ms),
                backoff: config.backoff(),
            },
        );
        let metrics = EdgeMetrics::default();
        let mut twin_config = TwinConfig::new(config.node_name.clone());
        twin_config.mapper_metrics = Some(metrics.mappers.clone());
        let twins = TwinManager::spawn(engine.clone(), twin_config);
        let eventbus = config.mqtt.as_ref().map(|(host, port)| {
            EventBus::spawn(
                engine.clone(),
                twins.view(),
                EventBusConfig {
                    host: host.clone(),
                    port: *port,
                    node: config.node_name.clone(),
                    client_id: format!("outpost-edge-{}", config.node_name),
                },
            )
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::node::heartbeat_loop(
            engine.clone(),
            cri,
            config.node_name.clone(),
            config.node_ip.clone(),
            Duration::from_secs(config.heartbeat_s),
        ));
        if let Some(socket) = config.dmi_socket.clone() {
            let view = twins.view();
            tasks.spawn(async move {
                if let Err(e) = crate::dmi::serve(view, socket).await {
                    tracing::warn!(error = %e, "the DMI service for external mappers stopped");
                }
            });
        }
        if let Some(addr) = config.api_listen {
            let listener = crate::api::bind(addr)
                .await
                .map_err(|source| StartError::Api { addr, source })?;
            if let Ok(bound) = listener.local_addr()
                && let Err(e) =
                    std::fs::write(config.data_dir.join(API_ADDR_FILE), bound.to_string())
            {
                tracing::warn!(error = %e, "cannot record the local API's address in the data dir");
            }
            let mut registry = Registry::default();
            metrics.register(&mut registry, &engine);
            let state = ApiState {
                engine: engine.clone(),
                twins: twins.view(),
                node: config.node_name.clone(),
                site: config.site.clone(),
                peers: config
                    .cloud_peers()
                    .iter()
                    .map(|c| PeerId::from(c.id))
                    .collect(),
                metrics,
                registry: Arc::new(registry),
            };
            tasks.spawn(async move {
                if let Err(e) = crate::api::serve(listener, state).await {
                    tracing::warn!(error = %e, "the local API stopped");
                }
            });
        }
        let mut endpoint = None;
        if !clouds.is_empty() {
            let ep = outpost_sync::transport::iroh::bind(key, config.listen).await?;
            let (e1, ep1) = (engine.clone(), ep.clone());
            tasks.spawn(async move { e1.accept_loop(ep1).await });
            // Every bridge replica keeps a full replica: sessions with each,
            // so that the loss of one changes nothing here.
            for cloud in clouds {
                info!(id = %ep.id(), cloud = %cloud, "syncing with the cloud");
                let (e2, ep2) = (engine.clone(), ep.clone());
                tasks.spawn(async move { e2.dial_loop(ep2, cloud).await });
            }
            endpoint = Some(ep);
        } else {
            info!("no cloud configured: running alone from the local replica");
        }
        info!(node = %config.node_name, me = %engine.me(), data_dir = %config.data_dir.display(), "edge agent started");
        Ok(Self {
            engine,
            pods,
            twins,
            eventbus,
            tasks,
            endpoint,
        })
    }

    /// The agent's sync engine (and through it, its replica).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The node's device twins.
    pub fn twins(&self) -> TwinView {
        self.twins.view()
    }

    /// Stops every task and closes the replica. Containers keep running.
    pub async fn shutdown(mut self) {
        self.pods.shutdown().await;
        if let Some(bus) = self.eventbus.take() {
            bus.shutdown().await;
        }
        self.twins.shutdown().await;
        if let Some(ep) = self.endpoint.take() {
            ep.close().await;
        }
        self.tasks.shutdown().await;
    }
}
