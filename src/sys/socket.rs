//! Asking a Unix socket file whether a process still serves it, and which.
//!
//! A driver must never take over a socket that another live driver serves
//! (both would then serve, and the first to stop would delete the other's
//! socket); a socket file left by a driver that died is replaced. The only
//! reliable test is a connect: a live listener accepts it (or its backlog
//! is full), a dead one is refused by the kernel.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, UnixAddr, connect, getsockopt, socket, sockopt,
};

use super::lock::Holder;

/// What a connect to a socket file found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Listener {
    /// A process listens on it: named when the kernel tells (the listener's
    /// credentials from when it called listen).
    Alive(Option<Holder>),
    /// Nobody listens: a socket file left by a process that is gone.
    Dead,
    /// The process that listened is gone, but a copy of its listening
    /// socket lives on in a process it forked (a tool started just before
    /// it died, between fork and exec): connects still succeed, and are
    /// never answered. As stale as [`Listener::Dead`].
    Orphaned {
        /// The pid that listened.
        pid: i32,
    },
    /// No such file (any more).
    Gone,
}

/// Connects to the socket file at `path` without blocking and says whether
/// anybody listens on it.
pub(crate) fn listener(path: &Path) -> io::Result<Listener> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) => match getsockopt(&fd, sockopt::PeerCredentials).map(|c| c.pid()) {
            Ok(pid) if pid > 0 && !alive(pid) => Ok(Listener::Orphaned { pid }),
            Ok(pid) if pid > 0 => Ok(Listener::Alive(Some(Holder::of(pid)))),
            _ => Ok(Listener::Alive(None)),
        },
        // A full backlog: someone listens, but is slow to accept.
        Err(Errno::EAGAIN) => Ok(Listener::Alive(None)),
        Err(Errno::ECONNREFUSED) => Ok(Listener::Dead),
        Err(Errno::ENOENT) => Ok(Listener::Gone),
        Err(e) => Err(e.into()),
    }
}

/// Whether process `pid` still runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_dead_and_missing_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(listener(&path).unwrap(), Listener::Gone);
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        match listener(&path).unwrap() {
            Listener::Alive(Some(h)) => assert_eq!(h.pid, std::process::id() as i32),
            other => panic!("{other:?}"),
        }
        drop(l);
        // The file stays, nobody listens: what a killed driver leaves.
        assert!(path.exists());
        assert_eq!(listener(&path).unwrap(), Listener::Dead);
        assert!(alive(std::process::id() as i32));
        assert!(!alive(i32::MAX));
    }
}
