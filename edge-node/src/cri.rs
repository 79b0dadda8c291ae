//! The connection to the container runtime over the CRI v1 gRPC API.
//!
//! containerd (with its CRI plugin) serves the runtime and image services on
//! one unix socket. This module only opens that channel; the pod lifecycle
//! built on it lives beside it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why the runtime could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The gRPC channel over the socket could not be opened.
    #[error("cannot connect to the container runtime at {path}: {source}")]
    Transport {
        /// The socket tried.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The CRI runtime and image services of one runtime endpoint.
#[derive(Debug, Clone)]
pub struct CriClient {
    /// Pod sandboxes and containers.
    pub runtime: RuntimeServiceClient<Channel>,
    /// Images present on the node, and pulls.
    pub images: ImageServiceClient<Channel>,
}

fn endpoint() -> Endpoint {
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
}

/// The longest a CRI call may take (stopping a container waits for its
/// grace period, so that call sets its own deadline).
pub const REQUEST_TIMEOUT_S: u64 = 120;

fn connector(
    dial: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<UnixStream>,
    Error = std::io::Error,
    Future = impl Future<Output = Result<TokioIo<UnixStream>, std::io::Error>> + Send,
> + Clone
+ Send {
    tower::service_fn(move |_: Uri| {
        let dial = dial.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?)) }
    })
}

impl CriClient {
    /// Connects to the CRI services on a unix socket, such as containerd's
    /// `/run/containerd/containerd.sock`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ConnectError> {
        let path = socket.as_ref().to_path_buf();
        let channel = endpoint()
            .connect_with_connector(connector(path.clone()))
            .await
            .map_err(|source| ConnectError::Transport { path, source })?;
        Ok(Self::from_channel(channel))
    }

    /// A client that dials the socket on first use and again whenever the
    /// runtime went away (containerd restarted, or not started yet): calls
    /// fail while it is down and succeed once it is back.
    pub fn connect_lazy(socket: impl AsRef<Path>) -> Self {
        let channel =
            endpoint().connect_with_connector_lazy(connector(socket.as_ref().to_path_buf()));
        Self::from_channel(channel)
    }

    fn from_channel(channel: Channel) -> Self {
        Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }
}
