//! /healthz, /readyz and /metrics over plain HTTP/1.1 on the agent's listen address. Three fixed
//! GET endpoints need no HTTP framework: read the request head, answer, close.

use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Health {
    /// The backend reconciled at least once.
    pub ready: AtomicBool,
    /// The Services table synced at least once.
    pub services_ready: AtomicBool,
    pub registry: Mutex<Registry>,
}

/// Reads a request head (bounded in size and time) and returns its path.
pub async fn read_request(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    Some(head.split_whitespace().nth(1).unwrap_or("/").to_string())
}

/// Writes one response and lets the connection close.
pub async fn respond(conn: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes()).await;
}

pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let Some(path) = read_request(&mut conn).await else {
                return;
            };
            let ready = health.ready.load(Ordering::Relaxed)
                && health.services_ready.load(Ordering::Relaxed);
            let (status, content_type, body) = match path.as_str() {
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if ready => ("200 OK", "text/plain", "ready\n".to_string()),
                "/readyz" => (
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n".to_string(),
                ),
                "/metrics" => {
                    let mut text = String::new();
                    let reg = health.registry.lock().expect("not poisoned");
                    let _ = prometheus_client::encoding::text::encode(&mut text, &reg);
                    (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    )
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            respond(&mut conn, status, content_type, &body).await;
        });
    }
}
