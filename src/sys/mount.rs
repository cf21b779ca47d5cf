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
/// Both are opened with `O_NOFOLLOW` and mounted through those handles,
/// so a symlink swapped in at either path cannot redirect the mount.
///
/// With per-mount flags (read-only, noexec, ...), the bind is made
/// detached first, given its flags, and only then attached at the target
/// (`open_tree`, `mount_setattr`, `move_mount`). Attaching it is what
/// propagates it: in the node plugin's container the target lies under
/// the kubelet's directory, shared with the host (`mountPropagation:
/// Bidirectional`), and every copy the kernel makes for the host and the
/// pod is a clone of the mount as attached, flags included. The classic
/// way (`MS_BIND`, then `MS_BIND|MS_REMOUNT|flags`) changes only this
/// namespace's copy: the host's stayed writable where read-only was asked
/// (found by the Kubernetes storage e2e suite's mount-options spec).
/// Kernels older than 5.12 lack `mount_setattr`: there the remount is
/// used, with that limit.
pub(crate) fn bind(source: &Path, target: &Path, opts: MountFlags) -> io::Result<()> {
    let src = open_dir_path(source)?;
    let dst = open_dir_path(target)?;
    let extra = opts.flags();
    if extra.is_empty() {
        return bind_plain(&src, &dst);
    }
    let attrs = mount_attr::Attrs {
        read_only: opts.read_only,
        nosuid: opts.nosuid,
        nodev: opts.nodev,
        noexec: opts.noexec,
        noatime: opts.noatime,
    };
    match mount_attr::bind_with_attrs(&src, &dst, attrs) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => {}
        other => return other,
    }
    bind_plain(&src, &dst)?;
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

/// `MS_BIND` of the directory open as `src` onto the one open as `dst`,
/// through their `/proc/self/fd` links.
fn bind_plain(src: &std::os::fd::OwnedFd, dst: &std::os::fd::OwnedFd) -> io::Result<()> {
    nix::mount::mount(
        Some(&fd_path(src)),
        &fd_path(dst),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io::Error::from)
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

/// A process that keeps a mount busy, and how: `fd 7`, `cwd`, `root` or
/// `maps` (a mapped file), each with the path `/proc` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountUser {
    /// The process.
    pub holder: super::lock::Holder,
    /// What of it points into the mount, e.g. `fd 7 -> /t/data`.
    pub uses: Vec<String>,
}

impl std::fmt::Display for MountUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.holder, self.uses.join(", "))
    }
}

/// The processes with a descriptor, working directory, root or mapped
/// file at or below `mount_point`, from `/proc` (what `fuser -m` reads):
/// the ones an unmount's EBUSY is about. Only read once an unmount was
/// refused, for the message; a process that goes while it is read is
/// skipped. Paths are as this process sees them, so a holder in another
/// mount namespace may show under another path and be missed.
pub fn users(mount_point: &Path) -> Vec<MountUser> {
    let inside = |p: &Path| p.starts_with(mount_point);
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let mut uses = Vec::new();
        for link in ["cwd", "root"] {
            if std::fs::read_link(dir.join(link)).is_ok_and(|t| inside(&t)) {
                uses.push(link.to_string());
            }
        }
        for fd in std::fs::read_dir(dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(fd.path())
                && inside(&t)
            {
                uses.push(format!(
                    "fd {} -> {}",
                    fd.file_name().to_string_lossy(),
                    t.display()
                ));
            }
        }
        let maps = std::fs::read_to_string(dir.join("maps")).unwrap_or_default();
        if maps
            .lines()
            .filter_map(|l| l.split_once('/').map(|(_, p)| Path::new("/").join(p)))
            .any(|p| inside(&p))
        {
            uses.push("maps".to_string());
        }
        if !uses.is_empty() {
            found.push(MountUser {
                holder: super::lock::Holder::of(pid),
                uses,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process, with a file open inside a directory, is named as a
    /// user of that directory with the descriptor; a sibling directory has
    /// no user.
    #[test]
    fn users_names_a_process_with_a_file_open_inside() {
        let dir = tempfile::tempdir().unwrap();
        let held = dir.path().join("held");
        std::fs::create_dir(&held).unwrap();
        std::fs::create_dir(dir.path().join("free")).unwrap();
        let _file = std::fs::File::create(held.join("data")).unwrap();
        let me = std::process::id() as i32;
        let found = users(&held);
        let mine = found.iter().find(|u| u.holder.pid == me);
        let mine = mine.unwrap_or_else(|| panic!("{me} not among {found:?}"));
        assert!(
            mine.uses
                .iter()
                .any(|u| u.starts_with("fd ") && u.ends_with("/held/data")),
            "{mine}"
        );
        assert!(
            mine.to_string().starts_with(&format!("process {me} (")),
            "{mine}"
        );
        assert!(users(&dir.path().join("free")).is_empty());
    }
}
