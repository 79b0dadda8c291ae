//! A byte relay between a TCP address and a unix socket.
//!
//! Processes in the real-process mode live in their own network namespaces,
//! where the host's loopback is out of reach. A unix socket is a file, seen
//! from every namespace, so a relay started inside a namespace
//! (`outpost-sim relay`) joins the two: the cloud bridge reaches the
//! Kubernetes API server through one, and the harness reads each edge's
//! local API through another.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// One end of a relay: `tcp:IP:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A unix socket.
    Unix(PathBuf),
}

impl std::str::FromStr for End {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(End::Tcp)
                .map_err(|e| format!("{addr:?} is not ip:port: {e}"))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                Err("unix: needs a path".into())
            } else {
                Ok(End::Unix(path.into()))
            }
        } else {
            Err(format!("{s:?} is neither tcp:IP:PORT nor unix:PATH"))
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Tcp(a) => write!(f, "tcp:{a}"),
            End::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(to: &End) -> std::io::Result<Box<dyn Stream>> {
    Ok(match to {
        End::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a).await?),
        End::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
    })
}

async fn pipe(mut from: Box<dyn Stream>, to: End) {
    match connect(&to).await {
        Ok(mut out) => {
            if let Err(e) = tokio::io::copy_bidirectional(&mut from, &mut out).await {
                debug!(%to, "relayed connection ended: {e}");
            }
        }
        Err(e) => debug!(%to, "relay cannot connect: {e}"),
    }
}

/// A bound relay, not yet accepting: binding first lets the caller say
/// "ready" only once connections can arrive.
pub enum Listener {
    /// On a TCP address.
    Tcp(tokio::net::TcpListener),
    /// On a unix socket.
    Unix(tokio::net::UnixListener),
}

/// Binds `listen`. A stale unix socket file is replaced.
pub async fn bind(listen: &End) -> std::io::Result<Listener> {
    Ok(match listen {
        End::Tcp(addr) => Listener::Tcp(tokio::net::TcpListener::bind(addr).await?),
        End::Unix(path) => {
            let _ = std::fs::remove_file(path);
            Listener::Unix(tokio::net::UnixListener::bind(path)?)
        }
    })
}

impl Listener {
    /// Joins each accepted connection to a new connection to `connect`,
    /// until the process ends.
    pub async fn serve(self, connect: End) -> std::io::Result<()> {
        match self {
            Self::Tcp(l) => loop {
                let (s, _) = l.accept().await?;
                tokio::spawn(pipe(Box::new(s), connect.clone()));
            },
            Self::Unix(l) => loop {
                let (s, _) = l.accept().await?;
                tokio::spawn(pipe(Box::new(s), connect.clone()));
            },
        }
    }
}

/// The line `outpost-sim relay` prints once it accepts connections.
pub const READY: &str = "relay ready";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_parse_and_refuse_garbage() {
        assert_eq!(
            "tcp:127.0.0.1:80".parse::<End>(),
            Ok(End::Tcp("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<End>(),
            Ok(End::Unix("/tmp/x.sock".into()))
        );
        for bad in ["", "tcp:nowhere", "unix:", "http://x"] {
            assert!(bad.parse::<End>().is_err(), "{bad:?}");
        }
    }
}
