//! Connecting to a CSI driver's Unix socket, as a CO does: for csi-bench
//! and the driver's tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Opens a gRPC channel to the driver listening on `socket`. Accepts a
/// plain path or a `unix://` endpoint.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let raw = socket.as_ref().to_string_lossy();
    let path = PathBuf::from(raw.strip_prefix("unix://").unwrap_or(&raw));
    // The URI is required by the API but unused: every connection goes to
    // the socket.
    Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
}
