//! Exclusive locks that the kernel drops when their holder dies, and who
//! holds them.
//!
//! A pool is served by one driver at a time: the driver takes an `flock`
//! on the pool's directory itself and keeps it for as long as it runs. The
//! directory rather than a lock file inside it, so the pool holds nothing
//! but volumes (no file to mistake for a leftover, or to list). `flock`
//! rather than a pid file, because the kernel drops it when the holder
//! dies, `kill -9` included: nothing stale is ever left to clean up.
//!
//! When a lock is taken, [`holders`] names the processes that hold it, from
//! `/proc/locks`, so the refusal can say where the other driver is.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};

/// An exclusive lock on a directory, held until dropped or until the
/// process ends.
#[derive(Debug)]
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

/// A process holding a lock or serving a socket, as far as this node's
/// `/proc` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id (in this process's pid namespace; 0 when the holder
    /// lives in another one that the kernel cannot map).
    pub pid: i32,
    /// Its command line, when `/proc` shows it.
    pub command: Option<String>,
}

impl Holder {
    /// Describes process `pid` from `/proc/<pid>/cmdline`.
    pub(crate) fn of(pid: i32) -> Holder {
        let command = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .map(|raw| {
                let words: Vec<String> = raw
                    .split(|b| *b == 0)
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect();
                words.join(" ")
            })
            .filter(|c| !c.is_empty());
        Holder { pid, command }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pid, &self.command) {
            (0, _) => write!(f, "a process in another pid namespace"),
            (pid, Some(cmd)) => write!(f, "process {pid} (`{cmd}`)"),
            (pid, None) => write!(f, "process {pid}"),
        }
    }
}

/// Takes an exclusive lock on directory `dir` without waiting: `Ok(None)`
/// when another open file description (another driver) holds it.
pub(crate) fn try_lock_dir(dir: &Path) -> io::Result<Option<DirLock>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
        .open(dir)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(DirLock { _lock: lock })),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// The processes holding an `flock` on `path`, from `/proc/locks`; empty
/// when none is found (the lock was just released, or `/proc` is not
/// this node's).
pub(crate) fn holders(path: &Path) -> Vec<Holder> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(table) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let found = flock_holders(&table, meta.ino());
    // btrfs reports a device of its own per subvolume to stat, and the
    // filesystem's to /proc/locks: prefer an exact match, else the inode's.
    let exact: Vec<i32> = found
        .iter()
        .filter(|l| l.major == major && l.minor == minor)
        .map(|l| l.pid)
        .collect();
    let mut pids = if exact.is_empty() {
        found.iter().map(|l| l.pid).collect()
    } else {
        exact
    };
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter().map(Holder::of).collect()
}

/// One granted `flock` from `/proc/locks`.
#[derive(Debug, PartialEq, Eq)]
struct LockLine {
    pid: i32,
    major: u64,
    minor: u64,
}

/// Parses the granted `flock`s on inode `ino` out of `/proc/locks`, e.g.
/// `1: FLOCK  ADVISORY  WRITE 16912 fe:00:5497172 0 EOF` (waiters, marked
/// `->`, hold nothing and are skipped).
fn flock_holders(table: &str, ino: u64) -> Vec<LockLine> {
    table
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip(1);
            if words.next()? != "FLOCK" {
                return None;
            }
            let pid = words.nth(2)?.parse().ok()?;
            let mut id = words.next()?.split(':');
            let major = u64::from_str_radix(id.next()?, 16).ok()?;
            let minor = u64::from_str_radix(id.next()?, 16).ok()?;
            let inode: u64 = id.next()?.parse().ok()?;
            (inode == ino).then_some(LockLine { pid, major, minor })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_granted_flocks_of_one_inode() {
        let table = "\
1: FLOCK  ADVISORY  WRITE 16912 fe:00:5497172 0 EOF
1: -> FLOCK  ADVISORY  WRITE 17000 fe:00:5497172 0 EOF
2: POSIX  ADVISORY  WRITE 17035 fe:00:5497172 0 EOF
3: FLOCK  ADVISORY  READ 42 00:2f:5497172 0 EOF
4: FLOCK  ADVISORY  WRITE 7 fe:00:99 0 EOF
";
        assert_eq!(
            flock_holders(table, 5_497_172),
            [
                LockLine {
                    pid: 16912,
                    major: 0xfe,
                    minor: 0
                },
                LockLine {
                    pid: 42,
                    major: 0,
                    minor: 0x2f
                },
            ]
        );
        assert!(flock_holders(table, 1).is_empty());
    }

    #[test]
    fn a_second_lock_is_refused_and_freed_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock_dir(dir.path()).unwrap().expect("first lock");
        // Another open file description: what a second driver would have.
        assert!(try_lock_dir(dir.path()).unwrap().is_none());
        let me = std::process::id() as i32;
        let held_by = holders(dir.path());
        assert!(held_by.iter().any(|h| h.pid == me), "{held_by:?}");
        assert!(held_by[0].to_string().contains(&me.to_string()));
        drop(first);
        assert!(try_lock_dir(dir.path()).unwrap().is_some());
    }
}
