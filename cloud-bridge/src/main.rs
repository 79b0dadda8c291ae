//! `outpost-cloud`: the cloud bridge between the Kubernetes API and Outpost's
//! replicated edge state.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost_cloud_bridge::join::{self, JOIN_ALPN};
use outpost_cloud_bridge::shard::{self, ShardConfig};
use outpost_cloud_bridge::{Bridge, BridgeConfig, admission};
use outpost_sync::PeerId;
use outpost_sync::engine::Engine;
use outpost_sync::metrics::SyncMetrics;
use outpost_sync::replica::{Replica, ReplicaOptions};
use outpost_sync::transport::iroh::{self as transport, PeerAddr, SYNC_ALPN};
use tracing::{info, warn};

/// `outpost-cloud`: the cloud bridge between the Kubernetes API and Outpost's
/// replicated edge state.
///
/// It watches the Kubernetes API for the nodes, pods and devices of Outpost's
/// edges, replicates them to the edges over iroh (QUIC), and writes what the
/// edges report back to the API. Edges are admitted with join tokens.
#[derive(Debug, Parser)]
#[command(name = "outpost-cloud", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bridge until interrupted (Ctrl-C or SIGTERM).
    Run(RunArgs),
    /// Join tokens that admit edge nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print the CRDs the bridge serves (KubeEdge's devices.kubeedge.io
    /// Device, DeviceModel, DeviceStatus) as YAML, as deploy/crds.yaml holds
    /// them. The bridge also installs them at start when they are missing.
    Crds,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a join token for a node and print it (once: only its hash is kept).
    Create(TokenCreateArgs),
}

#[derive(Debug, clap::Args)]
struct KubeArgs {
    /// kubeconfig of the cluster to bridge [default: in-cluster config, then ~/.kube/config].
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct TokenCreateArgs {
    /// The name the admitted edge's Node gets.
    #[arg(long)]
    node: String,
    /// The site the node belongs to (edges of a site share site documents).
    #[arg(long)]
    site: Option<String>,
    /// How long the token stays valid (e.g. 30m, 1h, 2d).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: std::time::Duration,
    #[command(flatten)]
    kube: KubeArgs,
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let d: k8s_openapi::jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("not a duration like 30m, 1h or 2d: {e}"))?;
    std::time::Duration::try_from(d)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "the time to live must be positive".to_owned())
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Where the bridge keeps its identity and replica.
    #[arg(
        long,
        env = "OUTPOST_DATA_DIR",
        default_value = "/var/lib/outpost-cloud"
    )]
    data_dir: PathBuf,
    /// UDP address the bridge's iroh endpoint listens on.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// leaseDurationSeconds of the edge nodes' Leases.
    #[arg(long, env = "OUTPOST_LEASE_DURATION_S", default_value_t = 40)]
    lease_duration_s: i32,
    /// The most API writes a second of device twin status (DeviceStatus and
    /// Device.status); reports coalesce meanwhile, each write carries a
    /// device's latest values.
    #[arg(
        long,
        env = "OUTPOST_DEVICE_STATUS_WRITES_PER_S",
        default_value_t = 20.0,
        value_parser = parse_rate
    )]
    device_status_writes_per_s: f64,
    /// Address of /metrics (Prometheus) and /healthz, as `ip:port`, or
    /// `off`.
    #[arg(long, env = "OUTPOST_METRICS_LISTEN", default_value = "127.0.0.1:9464", value_parser = parse_listen)]
    metrics_listen: Listen,
    /// Replicas with the same group split the admitted nodes between them
    /// with Leases in outpost-system; each writes only the nodes it holds.
    #[arg(long, env = "OUTPOST_SHARD_GROUP", default_value = "outpost-cloud")]
    shard_group: String,
    /// This replica's id in its group (the holder identity of its Leases)
    /// [default: the first 16 hex digits of the bridge's key, stable for a
    /// data dir].
    #[arg(long, env = "OUTPOST_REPLICA_ID")]
    replica_id: Option<String>,
    /// leaseDurationSeconds of the replicas' Leases: a dead replica's nodes
    /// are taken over after about this long and a third.
    #[arg(long, env = "OUTPOST_SHARD_LEASE_S", default_value_t = 15)]
    shard_lease_s: i32,
    /// The sync address (ip:port) the group's other replicas reach this one
    /// at, published in its Lease; replicas keep sessions with each other so
    /// that each holds the whole state [default: none: only edges connect].
    #[arg(long, env = "OUTPOST_ADVERTISE")]
    advertise: Option<SocketAddr>,
    /// Serve only the admitted edges whose node name starts with this
    /// prefix (several bridges for separate fleets on one cluster)
    /// [default: every admitted edge].
    #[arg(long, env = "OUTPOST_NODE_PREFIX")]
    node_prefix: Option<String>,
    #[command(flatten)]
    kube: KubeArgs,
}

/// An address to listen on, or none.
#[derive(Debug, Clone)]
struct Listen(Option<SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not ip:port or off"))
}

/// Serves `/metrics` and `/healthz` on `listener`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: std::sync::Arc<prometheus_client::registry::Registry>,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            text,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

fn parse_rate(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| "a positive number of writes a second, like 20 or 0.5".to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Token(TokenCommand::Create(args)) => token_create(args).await,
        Command::Crds => {
            print!("{}", outpost_cloud_bridge::crd::crds_yaml()?);
            Ok(())
        }
    }
}

async fn kube_client(args: &KubeArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let client = kube_client(&args.kube).await?;
    let issued = admission::create_token(&client, &args.node, args.site.as_deref(), args.ttl)
        .await
        .context("cannot issue a join token")?;
    eprintln!(
        "join token for node {} (expires {}); it is shown only this once:",
        issued.node, issued.expires_at
    );
    println!("{}", issued.token);
    Ok(())
}

/// Keeps a sync session with every other replica of the group that
/// advertises an address (the one with the smaller key dials), so that each
/// replica holds the whole state whichever replica an edge reaches.
async fn keep_sessions_with_replicas(
    engine: Engine,
    endpoint: iroh::Endpoint,
    mut replicas: tokio::sync::watch::Receiver<outpost_cloud_bridge::bridge::Replicas>,
) {
    let mut dialing: std::collections::HashMap<PeerId, tokio::task::JoinHandle<()>> =
        std::collections::HashMap::new();
    loop {
        let wanted: Vec<(PeerId, SocketAddr)> = replicas
            .borrow_and_update()
            .iter()
            .filter(|(key, _)| engine.me() < **key)
            .filter_map(|(key, addr)| Some((*key, (*addr)?)))
            .collect();
        dialing.retain(|key, task| {
            let keep = wanted.iter().any(|(k, _)| k == key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, addr) in wanted {
            let Ok(id) = iroh::EndpointId::from_bytes(&key.0) else {
                continue;
            };
            dialing.entry(key).or_insert_with(|| {
                info!(replica = %key, %addr, "syncing with a replica of the group");
                let (engine, endpoint) = (engine.clone(), endpoint.clone());
                tokio::spawn(async move { engine.dial_loop(endpoint, PeerAddr { id, addr }).await })
            });
        }
        if replicas.changed().await.is_err() {
            break;
        }
    }
    for task in dialing.into_values() {
        task.abort();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube_client(&args.kube).await?;
    let version = client
        .apiserver_version()
        .await
        .context("the Kubernetes API server does not answer")?;
    info!(version = %version.git_version, "connected to the Kubernetes API");

    let key = outpost_sync::identity::load_or_create(&args.data_dir)?;
    let me = outpost_sync::PeerId::from(key.public());
    let replica = Replica::open(args.data_dir.join("replica"), me, ReplicaOptions::default())
        .context("opening the replica")?;
    let engine = Engine::new(
        replica,
        outpost_sync::access::Roster::new(),
        SyncMetrics::default(),
    );
    let endpoint = transport::bind(key, args.listen).await?;
    endpoint.set_alpns(vec![SYNC_ALPN.to_vec(), JOIN_ALPN.to_vec()]);
    let addr = PeerAddr {
        id: endpoint.id(),
        addr: endpoint
            .bound_sockets()
            .first()
            .copied()
            .unwrap_or(args.listen),
    };
    let addr_file = args.data_dir.join("peer-addr");
    std::fs::write(&addr_file, format!("{addr}\n"))
        .with_context(|| format!("writing {}", addr_file.display()))?;
    info!(peer = %addr, file = %addr_file.display(), "listening for edges");

    let shards = ShardConfig {
        group: args.shard_group.clone(),
        replica_id: args
            .replica_id
            .clone()
            .unwrap_or_else(|| shard::default_replica_id(&me)),
        lease_duration_s: args.shard_lease_s,
        advertise: args.advertise,
    };
    shards.validate().map_err(anyhow::Error::msg)?;
    let bridge = Bridge::new(
        client.clone(),
        engine.clone(),
        BridgeConfig {
            lease_duration_s: args.lease_duration_s,
            device_status_writes_per_s: args.device_status_writes_per_s,
            shards: Some(shards),
            node_prefix: args.node_prefix.clone(),
            ..BridgeConfig::default()
        },
    );
    let mesh = tokio::spawn(keep_sessions_with_replicas(
        engine.clone(),
        endpoint.clone(),
        bridge.replicas(),
    ));
    if let Listen(Some(addr)) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for /metrics (set --metrics-listen, or off)")
        })?;
        let mut registry = prometheus_client::registry::Registry::default();
        engine.metrics().register(&mut registry);
        bridge.metrics().register(&mut registry);
        let registry = std::sync::Arc::new(registry);
        info!(addr = %listener.local_addr().unwrap_or(addr), "metrics listening");
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(listener, registry).await {
                warn!(error = %e, "the metrics endpoint stopped");
            }
        });
    }
    let accept = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (engine, client) = (engine.clone(), client.clone());
                tokio::spawn(async move {
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => {
                            warn!(error = %e, "incoming connection failed");
                            return;
                        }
                    };
                    if conn.alpn() == JOIN_ALPN {
                        join::serve(conn, &client).await;
                    } else {
                        engine.serve_connection(conn).await;
                    }
                });
            }
        })
    };
    let result = tokio::select! {
        r = bridge.run() => r.context("the bridge stopped"),
        () = outpost_sync::signal::shutdown() => Ok(()),
    };
    info!("shutting down");
    accept.abort();
    mesh.abort();
    endpoint.close().await;
    result
}
