//! Smoke test of the test environment's Prometheus: it is ready and has
//! scraped itself, so a query returns a sample.

use std::time::Duration;

use outpost_sync::test_utils::env_value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(base: &str, path: &str) -> String {
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(host).await.expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[tokio::test]
async fn prometheus_scrapes_and_answers_queries() {
    let base = env_value("OUTPOST_PROMETHEUS_URL").expect("test environment");
    assert!(get(&base, "/-/ready").await.starts_with("HTTP/1.0 200"));
    // The first scrape can take one scrape interval (5 s) after start-up.
    let mut body = String::new();
    for _ in 0..40 {
        body = get(&base, "/api/v1/query?query=up%7Bjob%3D%22prometheus%22%7D").await;
        if body.contains("\"value\":[") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(body.contains("\"status\":\"success\""), "{body}");
    assert!(
        body.contains("\"value\":[") && body.contains("\"1\"]"),
        "up == 1: {body}"
    );
}
