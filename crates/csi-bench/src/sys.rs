//! The bench's only syscalls beyond plain file I/O: the bind mount and
//! unmount the floor times, bare, with no driver in between, and the
//! filesystem flush the copy floor ends each copy with.
//!
//! Kept here, apart from the scenarios, so that every mount the bench
//! makes is in one short file: the bench must never leave one behind.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// `mount(source, target, MS_BIND)`: what a driver's NodePublishVolume
/// costs at the least.
pub fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// `umount2(target, UMOUNT_NOFOLLOW)`: what NodeUnpublishVolume costs at
/// the least.
pub fn unmount(target: &Path) -> io::Result<()> {
    nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(io::Error::from)
}

/// Whether the bench runs as root, which the mounts need.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `syncfs` of the filesystem holding `path`: what a driver that copied a
/// volume with `cp` does before it records the copy as made.
pub fn sync_fs(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}
