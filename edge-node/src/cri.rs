//! The connection to the container runtime over the CRI v1 gRPC API.
//!
//! containerd (with its CRI plugin) serves the runtime and image services on
//! one unix socket. This module only opens that channel; the pod lifecycle
//! built on it lives beside it.

use std::path::{Path, PathBuf};

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

impl CriClient {
    /// Connects to the CRI services on a unix socket, such as containerd's
    /// `/run/containerd/containerd.sock`.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self, ConnectError> {
        let path = socket.as_ref().to_path_buf();
        let dial = path.clone();
        // The URI is required by tonic but unused: the connector dials the socket.
        let channel =
            Endpoint::from_static("http://[::1]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let dial = dial.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(dial).await?))
                    }
                }))
                .await
                .map_err(|source| ConnectError::Transport { path, source })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}
