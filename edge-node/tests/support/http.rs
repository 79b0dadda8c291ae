//! HTTP helpers of the tests that read the local API: a plain GET and the
//! first line of a watch stream.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

/// A GET over HTTP/1.0 (the server closes when done): the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// The first line of a streamed (watch) body.
pub async fn http_get_first_line(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    // Headers, then chunked body: a size line, then the first JSON line.
    loop {
        line.clear();
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        if line.trim_start().starts_with('{') {
            return line.trim().to_owned();
        }
        assert!(!line.is_empty(), "the stream ended");
    }
}
