//! `GET /healthz` over HTTP, for a Kubernetes livenessProbe.
//!
//! Upstream, the livenessprobe sidecar serves this: it calls the driver's
//! CSI Probe and answers 200 or 500. It cannot be built here (the Go
//! module proxy refuses `github.com/kubernetes-csi/livenessprobe`), so the
//! driver serves the endpoint itself when `--healthz-address` is given,
//! and does what the sidecar did: each request calls Probe through the
//! driver's own CSI socket. A driver whose gRPC server hangs, or whose
//! socket is gone, fails the check just as one that is not ready does.
//!
//! The answer is 200 `ok` when Probe says ready, and 503 with the reason
//! otherwise. The HTTP is the least a probe needs (a request line,
//! headers, one answer, connection closed), written here rather than
//! pulling in an HTTP server for one path.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use csi_proto as csi;

/// How long a Probe may take before the check fails (the livenessprobe
/// sidecar's default `--probe-timeout`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read; a probe's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// Why the health endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum HealthzError {
    /// The address cannot be listened on (not an address of this host, a
    /// port in use, a privileged port without the right).
    #[error("cannot listen on health address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// Parses a health address: `HOST:PORT`, `[V6]:PORT`, or `:PORT` for every
/// interface (as the upstream sidecars write it).
pub fn parse_address(s: &str) -> Option<SocketAddr> {
    match s.strip_prefix(':') {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        None => s.parse().ok(),
    }
}

/// Listens on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, HealthzError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HealthzError::Bind { addr, source })
}

/// Serves `/healthz` on `listener` until `shutdown` completes, checking
/// the driver through its CSI socket `csi_socket`.
pub async fn serve(
    listener: TcpListener,
    csi_socket: PathBuf,
    shutdown: impl Future<Output = ()> + Send,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /healthz");
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, csi_socket.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "healthz: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads one request and answers it.
async fn answer(mut stream: TcpStream, csi_socket: PathBuf) {
    let (status, body) = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => route(&head, &csi_socket).await,
        Ok(None) => (400, "bad request\n".to_string()),
        Err(_) => (408, "request timed out\n".to_string()),
    };
    if status != 200 {
        tracing::debug!(status, reason = %body.trim_end(), "healthz");
    }
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Service Unavailable",
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads the request head (up to the blank line); None when it is too
/// long, not text, or the client hung up first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// The status and body for a request head.
async fn route(head: &str, csi_socket: &std::path::Path) -> (u16, String) {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path != "/healthz" {
        return (404, format!("no such path {path:?}; try /healthz\n"));
    }
    if method != "GET" && method != "HEAD" {
        return (405, "only GET and HEAD\n".to_string());
    }
    match probe(csi_socket).await {
        Ok(()) => (200, "ok\n".to_string()),
        Err(why) => (503, format!("{why}\n")),
    }
}

/// Calls the driver's Probe through its socket; the reason when it is
/// not ready.
pub async fn probe(csi_socket: &std::path::Path) -> Result<(), String> {
    let call = async {
        let channel = csi::connect(csi_socket).await.map_err(|e| {
            format!(
                "cannot reach the driver's CSI socket {}: {e}",
                csi_socket.display()
            )
        })?;
        let reply = csi::identity_client::IdentityClient::new(channel)
            .probe(csi::ProbeRequest {})
            .await
            .map_err(|s| format!("Probe failed: {}: {}", s.code(), s.message()))?;
        // CSI: an unset `ready` means ready.
        match reply.into_inner().ready {
            Some(false) => Err(
                "Probe: not ready (the driver is still opening its pools; its log says why)"
                    .to_string(),
            ),
            _ => Ok(()),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(format!("Probe did not answer within {PROBE_TIMEOUT:?}")))
}
