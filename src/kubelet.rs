//! Registration with the kubelet, served by the driver itself.
//!
//! The kubelet finds node plugins through its *plugin watcher*: it watches
//! a directory (`/var/lib/kubelet/plugins_registry`) for sockets, calls
//! `pluginregistration.Registration/GetInfo` on each new one, connects to
//! the CSI endpoint named in the answer (NodeGetInfo, to fill in the
//! node's CSINode object), and reports the outcome with
//! `NotifyRegistrationStatus`. When the socket disappears, it deregisters
//! the plugin.
//!
//! Upstream, the node-driver-registrar sidecar serves that socket. It
//! cannot be built here (the Go module proxy refuses
//! `github.com/kubernetes-csi/node-driver-registrar`, every version), and
//! the service is two small calls, so the driver serves it on
//! `<dir>/<driver name>-reg.sock` (the file name node-driver-registrar
//! uses) when `--kubelet-registration-dir` is given.
//!
//! The socket follows the plugin watcher's rules: a stale socket from an
//! earlier run is replaced at start; it is removed at exit, but only if it
//! is still the one this process made, so the kubelet deregisters the
//! driver; and should it vanish while the driver runs (someone cleaned
//! the directory), it is made again, so the kubelet finds the driver
//! without a restart; should another process put its own socket there,
//! the driver leaves it alone. A kubelet restart needs nothing: the watcher finds
//! the socket still there and registers the driver again.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use csi_proto::pluginregistration as reg;

use crate::grpc::authority::AuthorityFix;

/// The plugin type the kubelet hands CSI drivers to.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";
/// CSI versions the kubelet may speak to the driver.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];
/// How often the driver checks that its registration socket is still in
/// place. The plugin watcher sees a new socket within a second; a few
/// seconds more to notice a deleted one costs little.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// How long calls in flight may finish after the socket is removed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why the registration socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The directory does not exist: the kubelet's is made by the kubelet,
    /// so a missing one is a wrong flag (or a host path not mounted).
    #[error(
        "kubelet registration directory {0} does not exist; pass the kubelet's plugins_registry directory (usually /var/lib/kubelet/plugins_registry)"
    )]
    NoDirectory(PathBuf),
    /// The path given as the directory is something else.
    #[error("kubelet registration directory {0} is not a directory")]
    NotADirectory(PathBuf),
    /// Something other than a socket sits where the socket belongs; it is
    /// never replaced.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Reading, removing or binding the socket failed.
    #[error("registration socket {path}: {source}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("serving the registration socket: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What the driver tells the kubelet, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The kubelet's plugin registration directory.
    pub dir: PathBuf,
    /// The driver's name (the CSIDriver object's name).
    pub driver_name: String,
    /// The CSI socket's path as the kubelet sees it (on the host; it
    /// differs from the serving path inside a container).
    pub csi_endpoint: PathBuf,
}

impl Registration {
    /// The socket the kubelet's plugin watcher picks up.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(format!("{}-reg.sock", self.driver_name))
    }

    /// The answer to GetInfo.
    pub fn plugin_info(&self) -> reg::PluginInfo {
        reg::PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_string(),
            name: self.driver_name.clone(),
            endpoint: self.csi_endpoint.to_string_lossy().into_owned(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// A bound registration socket, remembered by its inode so that only this
/// socket is ever removed.
#[derive(Debug)]
pub struct RegistrationSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
    listener: Option<UnixListener>,
}

impl RegistrationSocket {
    /// Whether the file at the socket's path is still this socket.
    fn still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket if it is still ours; the kubelet then
    /// deregisters the driver.
    fn remove(&self) {
        if self.still_ours() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {
                    tracing::info!(socket = %self.path.display(), "removed the kubelet registration socket")
                }
                Err(e) => {
                    tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the kubelet registration socket")
                }
            }
        }
    }
}

impl Drop for RegistrationSocket {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Binds the registration socket in `registration.dir`: the directory must
/// exist; a stale socket there is replaced; any other kind of file is
/// refused.
pub fn bind(registration: &Registration) -> Result<RegistrationSocket, RegistrationError> {
    let dir = &registration.dir;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(RegistrationError::NotADirectory(dir.clone())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(RegistrationError::NoDirectory(dir.clone()));
        }
        Err(source) => {
            return Err(RegistrationError::Io {
                path: dir.clone(),
                source,
            });
        }
    }
    let path = registration.socket_path();
    let io_err = |source| RegistrationError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path).map_err(io_err)?,
        Ok(_) => return Err(RegistrationError::NotASocket(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io_err)?;
    // Only the kubelet (root) needs to connect.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    let m = std::fs::symlink_metadata(&path).map_err(io_err)?;
    Ok(RegistrationSocket {
        path,
        dev: m.dev(),
        ino: m.ino(),
        listener: Some(listener),
    })
}

/// Serves the Registration service on `socket` until `shutdown`
/// completes, then removes the socket. A socket that disappears meanwhile
/// is bound again (and a failure to do so is returned); one that another
/// process replaced is left to it, and serving ends.
pub async fn serve(
    registration: Registration,
    mut socket: RegistrationSocket,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RegistrationError> {
    tokio::pin!(shutdown);
    let service = Service {
        info: registration.plugin_info(),
    };
    tracing::info!(
        socket = %socket.path.display(),
        endpoint = %registration.csi_endpoint.display(),
        "serving kubelet plugin registration"
    );
    loop {
        let stopping = AtomicBool::new(false);
        let taken_over = AtomicBool::new(false);
        {
            let listener = socket
                .listener
                .take()
                .expect("a freshly bound socket has its listener");
            let (fired, on_fire) = tokio::sync::oneshot::channel::<()>();
            let signal = async {
                tokio::select! {
                    () = &mut shutdown => stopping.store(true, Ordering::Relaxed),
                    gone = vanished(&socket) => taken_over.store(gone == Gone::Replaced, Ordering::Relaxed),
                }
                // Deregister first, then let calls in flight finish.
                socket.remove();
                let _ = fired.send(());
            };
            let server = tonic::transport::Server::builder()
                .add_service(reg::registration_server::RegistrationServer::new(
                    service.clone(),
                ))
                .serve_with_incoming_shutdown(rewriting(listener), signal);
            tokio::pin!(server);
            // A kubelet that keeps its connection open must not hold the
            // driver back: once the signal fired, calls get STOP_GRACE.
            let result = tokio::select! {
                r = &mut server => Some(r),
                _ = on_fire => tokio::time::timeout(STOP_GRACE, &mut server).await.ok(),
            };
            if let Some(r) = result {
                r?;
            }
        }
        if stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Removed, but maybe another process is putting its own socket
        // there right now (a new instance removes the old socket, then
        // binds): only a path that is still empty is taken back.
        if !taken_over.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if std::fs::symlink_metadata(&socket.path).is_ok() {
                taken_over.store(true, Ordering::Relaxed);
            }
        }
        if taken_over.load(Ordering::Relaxed) {
            // Another process (a second instance during a rolling update,
            // say) serves the path now; replacing its socket would only
            // start a tug of war.
            tracing::warn!(
                socket = %socket.path.display(),
                "another process replaced the kubelet registration socket; leaving it to that process"
            );
            return Ok(());
        }
        tracing::warn!(
            socket = %socket.path.display(),
            "the kubelet registration socket was removed; making it again"
        );
        socket = bind(&registration)?;
    }
}

/// The connections of `listener`, each passed through
/// [`AuthorityFix`] so that the kubelet's requests (whose `:authority` is
/// the socket's path) are not refused by the HTTP/2 layer: the same
/// filter as on the CSI socket.
fn rewriting(listener: UnixListener) -> impl Stream<Item = io::Result<AuthorityFix<UnixStream>>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new))
}

/// How the registration socket stopped being ours.
#[derive(Debug, PartialEq, Eq)]
enum Gone {
    /// Nothing is at its path any more.
    Removed,
    /// Something else is.
    Replaced,
}

/// Completes once the file at the socket's path is no longer this socket.
async fn vanished(socket: &RegistrationSocket) -> Gone {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        match std::fs::symlink_metadata(&socket.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Gone::Removed,
            Ok(m)
                if !(m.file_type().is_socket()
                    && m.dev() == socket.dev
                    && m.ino() == socket.ino) =>
            {
                return Gone::Replaced;
            }
            // Ours, or unreadable for a moment: look again later.
            _ => {}
        }
    }
}

/// The Registration service: static information, and a log line for each
/// status the kubelet reports.
#[derive(Debug, Clone)]
struct Service {
    info: reg::PluginInfo,
}

#[tonic::async_trait]
impl reg::registration_server::Registration for Service {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_info(
        &self,
        _request: Request<reg::InfoRequest>,
    ) -> Result<Response<reg::PluginInfo>, Status> {
        tracing::info!(
            endpoint = %self.info.endpoint,
            "the kubelet asked for the driver's registration info"
        );
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<reg::RegistrationStatus>,
    ) -> Result<Response<reg::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.info.name, "registered with the kubelet");
        } else {
            // The kubelet keeps retrying; the driver keeps serving, so the
            // reason in the log is what an operator needs.
            tracing::error!(
                driver = %self.info.name,
                reason = %status.error,
                "the kubelet refused the driver's registration"
            );
        }
        Ok(Response::new(reg::RegistrationStatusResponse {}))
    }
}
