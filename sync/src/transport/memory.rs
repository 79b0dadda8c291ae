//! An in-memory transport: two engines in one process joined by a byte
//! stream, running exactly the protocol and framing code that runs over
//! iroh. For tests, benchmarks and simulations that want the engine's tasks
//! without sockets.

use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::protocol::SessionError;

/// Bytes buffered in each direction of a link before the writer waits.
pub const DEFAULT_LINK_BUFFER: usize = 64 << 10;

/// A connection between two engines. Dropping it (or [`MemoryLink::cut`])
/// ends both sessions, as a network failure would.
#[derive(Debug)]
pub struct MemoryLink {
    dialler: JoinHandle<Result<(), SessionError>>,
    listener: JoinHandle<Result<(), SessionError>>,
}

/// Connects `dialler` to `listener` (the dialler initiates reconciliation)
/// with `buffer` bytes in flight at most in each direction.
pub fn connect(dialler: &Engine, listener: &Engine, buffer: usize) -> MemoryLink {
    let (a, b) = tokio::io::duplex(buffer.max(1));
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let (d, l) = (dialler.clone(), listener.clone());
    let (d_peer, l_peer) = (listener.me(), dialler.me());
    MemoryLink {
        dialler: tokio::spawn(async move { d.run_session(d_peer, true, a_read, a_write).await }),
        listener: tokio::spawn(async move { l.run_session(l_peer, false, b_read, b_write).await }),
    }
}

impl MemoryLink {
    /// Ends the connection now.
    pub fn cut(self) {
        drop(self);
    }

    /// Waits for both sessions to end by themselves (a protocol error or a
    /// refused peer) and returns their results: (dialler, listener).
    pub async fn join(mut self) -> (Result<(), SessionError>, Result<(), SessionError>) {
        let d = (&mut self.dialler).await.unwrap_or(Ok(()));
        let l = (&mut self.listener).await.unwrap_or(Ok(()));
        (d, l)
    }
}

impl Drop for MemoryLink {
    fn drop(&mut self) {
        self.dialler.abort();
        self.listener.abort();
    }
}
