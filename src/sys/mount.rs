//! Bind mounts and unmounts, done with the syscalls directly: no `mount`
//! program on the hot path, so publishing costs microseconds, not a fork.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use super::fs::{fd_path, open_dir_path};

/// Per-mount flags a bind mount can honour: what a CO may ask for in a
/// volume capability's `mount_flags` (parsed by `validate`), applied
/// after the bind is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// `ro`: make the mount read-only.
    pub read_only: bool,
    /// `nosuid`.
    pub nosuid: bool,
    /// `nodev`.
    pub nodev: bool,
    /// `noexec`.
    pub noexec: bool,
    /// `noatime`.
    pub noatime: bool,
}

impl MountFlags {
    fn flags(&self) -> MsFlags {
        let mut f = MsFlags::empty();
        f.set(MsFlags::MS_RDONLY, self.read_only);
        f.set(MsFlags::MS_NOSUID, self.nosuid);
        f.set(MsFlags::MS_NODEV, self.nodev);
        f.set(MsFlags::MS_NOEXEC, self.noexec);
        f.set(MsFlags::MS_NOATIME, self.noatime);
        f
    }
}

/// Bind-mounts directory `source` onto directory `target`.
///
/// Both are opened with `O_NOFOLLOW` and mounted through their
/// `/proc/self/fd` links, so a symlink swapped in at either path cannot
/// redirect the mount. Per-mount flags such as read-only need a second
/// call: the kernel ignores them on the first `MS_BIND` (verified on this
/// kernel: a single `MS_BIND|MS_RDONLY` stays writable).
pub(crate) fn bind(source: &Path, target: &Path, opts: MountFlags) -> io::Result<()> {
    let src = open_dir_path(source)?;
    let dst = open_dir_path(target)?;
    nix::mount::mount(
        Some(&fd_path(&src)),
        &fd_path(&dst),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    let extra = opts.flags();
    if extra.is_empty() {
        return Ok(());
    }
    // Reopen: the old handle points at the covered directory, not the mount.
    let mounted = open_dir_path(target)?;
    let res = nix::mount::mount(
        None::<&str>,
        &fd_path(&mounted),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
        None::<&str>,
    );
    if let Err(e) = res {
        // Never leave a writable mount behind where read-only was asked.
        let _ = unmount(target);
        return Err(io::Error::from(e));
    }
    Ok(())
}

/// Bind-mounts the device node `device` onto the file `target` (a raw
/// block volume's publication). The target is opened with `O_NOFOLLOW`
/// and mounted through its `/proc/self/fd` link, as for directories. The
/// mount is not `nodev`: a pod opens the device through it.
pub(crate) fn bind_file(device: &Path, target: &Path) -> io::Result<()> {
    let dst = super::fs::open_file_path(target)?;
    nix::mount::mount(
        Some(device),
        &fd_path(&dst),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Unmounts whatever is mounted at `target`, never following a symlink
/// there.
pub(crate) fn unmount(target: &Path) -> io::Result<()> {
    nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(io::Error::from)
}

/// Mounts a block device (a loop device for image volumes) at `target`.
pub(crate) fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    data: &str,
) -> io::Result<()> {
    let dst = open_dir_path(target)?;
    nix::mount::mount(
        Some(device),
        &fd_path(&dst),
        Some(fs_type),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        if data.is_empty() { None } else { Some(data) },
    )
    .map_err(io::Error::from)
}
