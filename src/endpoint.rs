//! The CSI socket: taken only when no live driver serves it, and removed at
//! exit only while it is still ours.
//!
//! Two drivers started on one endpoint (`cargo run` twice, a DaemonSet
//! update that overlaps two pods) must not both serve: the second would
//! replace the live socket, and whichever stopped first would delete the
//! other's. So [`bind`] connects to an existing socket first: a live
//! listener makes it refuse, naming the process; a dead one (left by a
//! driver that was killed) is replaced. Check and bind happen under an
//! `flock` of the socket's directory, held only while binding, so two
//! drivers starting at the same moment cannot both find it dead.
//! [`SocketFile::remove`] deletes the file only if it is still the one
//! this driver bound (same inode).

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;

use crate::sys::lock::{self, Holder};
use crate::sys::socket::{self, Listener};

/// How long a start waits for another driver that is binding in the same
/// directory right now.
const DIR_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Why the driver cannot listen on its endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Another process serves the socket: this driver must not take it.
    #[error(
        "{} is served by {}: another driver is running on this endpoint; stop it first, or \
         give this one another --endpoint",
        path.display(),
        holder.as_ref().map_or_else(|| "a live process".to_string(), Holder::to_string)
    )]
    InUse {
        /// The socket.
        path: PathBuf,
        /// The process listening on it, when the kernel names it.
        holder: Option<Holder>,
    },
    /// Something other than a socket has the socket's name.
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    /// Another process kept the socket's directory locked for too long.
    #[error(
        "{} stays locked by {}; another driver seems stuck while binding its socket there",
        dir.display(),
        describe(holders)
    )]
    DirLocked {
        /// The socket's directory.
        dir: PathBuf,
        /// Who holds its lock.
        holders: Vec<Holder>,
    },
    /// A file operation failed.
    #[error("{context} {}: {source}", path.display())]
    Io {
        /// What was being done.
        context: &'static str,
        /// On what.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Names a list of holders for a message.
pub(crate) fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "another process".to_string();
    }
    holders
        .iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bound endpoint: the listener, and the socket file to remove at exit.
#[derive(Debug)]
pub struct Socket {
    /// Accepts the CSI connections.
    pub listener: UnixListener,
    /// The file, for [`SocketFile::remove`].
    pub file: SocketFile,
}

/// The socket file this driver created, known by its inode.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the socket file if it is still the one this driver bound;
    /// a file another driver put there since is left alone.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the socket");
                }
            }
            Ok(_) => tracing::warn!(
                socket = %self.path.display(),
                "the socket file was replaced by someone else; left in place"
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot check the socket")
            }
        }
    }
}

/// How long a socket must keep answering to count as served by a live
/// driver. A process that forks (to run mount, losetup...) copies every
/// descriptor into the child until the child's exec closes it, so a
/// listener its owner has just closed can still accept connections for a
/// moment; a live driver answers throughout.
const LIVE_FOR: Duration = Duration::from_secs(1);

/// [`socket::listener`], except that an answer is believed only if the
/// socket keeps answering for [`LIVE_FOR`].
fn listener_settled(path: &Path) -> io::Result<Listener> {
    let deadline = Instant::now() + LIVE_FOR;
    loop {
        let seen = socket::listener(path)?;
        if !matches!(seen, Listener::Alive(_)) || Instant::now() >= deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Binds the CSI socket at `path`: creates its directory, refuses a socket
/// that a live process serves, replaces a dead one (but never another kind
/// of file), and restricts it to owner and group (mode 0660).
pub fn bind(path: &Path) -> Result<Socket, EndpointError> {
    let io_err = |context, path: &Path| {
        let path = path.to_path_buf();
        move |source| EndpointError::Io {
            context,
            path,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let _dir_lock = lock_dir(&dir)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            match listener_settled(path).map_err(io_err("connecting to", path))? {
                Listener::Alive(holder) => {
                    return Err(EndpointError::InUse {
                        path: path.to_path_buf(),
                        holder,
                    });
                }
                Listener::Dead => {
                    tracing::info!(socket = %path.display(), "replacing a stale socket nobody serves");
                    std::fs::remove_file(path).map_err(io_err("removing", path))?;
                }
                Listener::Orphaned { pid } => {
                    tracing::warn!(
                        socket = %path.display(),
                        pid,
                        "replacing a socket whose driver is gone (a process it forked still holds \
                         a copy; connections to it will not be answered)"
                    );
                    std::fs::remove_file(path).map_err(io_err("removing", path))?;
                }
                Listener::Gone => {}
            }
        }
        Ok(_) => return Err(EndpointError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("checking", path)(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("restricting", path))?;
    let m = std::fs::symlink_metadata(path).map_err(io_err("checking", path))?;
    Ok(Socket {
        listener,
        file: SocketFile {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        },
    })
}

/// Locks the socket's directory, waiting a little for another driver that
/// is binding there right now.
fn lock_dir(dir: &Path) -> Result<lock::DirLock, EndpointError> {
    let deadline = Instant::now() + DIR_LOCK_WAIT;
    loop {
        let got = lock::try_lock_dir(dir).map_err(|source| EndpointError::Io {
            context: "locking",
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(l) = got {
            return Ok(l);
        }
        if Instant::now() >= deadline {
            return Err(EndpointError::DirLocked {
                dir: dir.to_path_buf(),
                holders: lock::holders(dir),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
