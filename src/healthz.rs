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
//! otherwise, served by the minimal HTTP of [`crate::http`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::http::{self, Request, Response};
use csi_proto as csi;

/// How long a Probe may take before the check fails (the livenessprobe
/// sidecar's default `--probe-timeout`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

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
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, http::BindError> {
    http::bind("health", addr).await
}

/// Serves `/healthz` on `listener` until `shutdown` completes, checking
/// the driver through its CSI socket `csi_socket`.
pub async fn serve(
    listener: TcpListener,
    csi_socket: PathBuf,
    shutdown: impl Future<Output = ()> + Send,
) {
    let csi_socket = Arc::new(csi_socket);
    let handler = move |request: Request| {
        let csi_socket = Arc::clone(&csi_socket);
        async move { route(&request, &csi_socket).await }
    };
    http::serve(listener, "/healthz", handler, shutdown).await;
}

/// The answer to a request.
async fn route(request: &Request, csi_socket: &Path) -> Response {
    if request.path != "/healthz" {
        return Response::not_found(&request.path, "/healthz");
    }
    if request.method != "GET" && request.method != "HEAD" {
        return Response::text(405, "only GET and HEAD\n");
    }
    match probe(csi_socket).await {
        Ok(()) => Response::text(200, "ok\n"),
        Err(why) => Response::text(503, format!("{why}\n")),
    }
}

/// Calls the driver's Probe through its socket; the reason when it is
/// not ready.
pub async fn probe(csi_socket: &Path) -> Result<(), String> {
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
