//! Raw block volumes (`volumeMode: Block`), in a pool of any kind: a sparse
//! file at the volume's path, attached to a loop device while the volume
//! is published, whose device node is bind-mounted onto each target file.
//!
//! Layout inside the pool directory:
//!
//! ```text
//! <token>            the volume: a sparse file exactly as large as the
//!                    volume (whole 512-byte sectors, as a loop device is)
//! .<token>.blk.new   a file being made (create, size, fsync), renamed to
//!                    <token> when complete
//! ```
//!
//! Why every kind can hold them: the loop device ends where the file ends,
//! so the size is enforced by the device itself, whatever the pool's
//! filesystem; no filesystem is made, so there is nothing kind-specific
//! left to do. The file is sparse: it takes on the pool's disk what the pod
//! wrote (a write to a hole fails with an I/O error when that disk is
//! full, as with image pools under overcommit).
//!
//! Loop device lifetime: attached by the first publish (`losetup
//! --nooverlap`, which reuses a device already attached to the file, so one
//! file is never behind two devices), kept while any bind of its node
//! exists, detached by the unpublish that removes the last one, and by
//! DeleteVolume. Auto-clear cannot do this job, unlike for image volumes:
//! a bind mount of a device node does not open the device, so an
//! auto-clear device would be freed at once. A device attached by a call
//! killed before it bound the node is released by the next publish or
//! unpublish of the volume, or by the sweep at startup
//! ([`release_unused`]); after a reboot there are no devices and no binds,
//! and the next publish attaches again.

use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::image::{autoclear, detach, devices_of};
use super::{BackendError, Result, VolumeUsage};
use crate::sys;
use crate::sys::cmd;
use crate::sys::mountinfo::MountEntry;

const BLK_NEW: &str = ".blk.new";
/// A loop device's size is its file's in whole sectors.
const SECTOR: u64 = 512;

/// Suffix of the scratch file of a block volume being made.
pub(crate) const SCRATCH_SUFFIX: &str = BLK_NEW;

fn file(pool_dir: &Path, token: &str) -> PathBuf {
    pool_dir.join(token)
}

fn scratch(pool_dir: &Path, token: &str) -> PathBuf {
    pool_dir.join(format!(".{token}{BLK_NEW}"))
}

/// Makes the sparse file of block volume `token`, `capacity` bytes
/// (rounded up to whole sectors). A complete file of that size left by a
/// killed attempt is reused; anything else at the volume's path is someone
/// else's (ALREADY_EXISTS).
pub(crate) fn create(pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
    let path = file(pool_dir, token);
    let len = capacity.div_ceil(SECTOR) * SECTOR;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() && m.len() == len => return Ok(()),
        Ok(_) => {
            return Err(BackendError::Occupied {
                path,
                what: "is not a block volume's file of this size",
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(BackendError::io(
                format!("inspecting {}", path.display()),
                e,
            ));
        }
    }
    let tmp = scratch(pool_dir, token);
    let _ = std::fs::remove_file(&tmp);
    let build = || -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| BackendError::io(format!("creating {}", tmp.display()), e))?;
        f.set_len(len)
            .and_then(|()| f.sync_all())
            .map_err(|e| BackendError::io(format!("sizing {}", tmp.display()), e))?;
        // Never replaces: something that appeared at the path meanwhile
        // is not ours.
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &tmp,
            nix::fcntl::AT_FDCWD,
            &path,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| BackendError::io(format!("renaming {}", tmp.display()), e.into()))?;
        sys::fs::sync_dir(pool_dir)
            .map_err(|e| BackendError::io(format!("flushing {}", pool_dir.display()), e))
    };
    build().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Removes block volume `token`: detaches its loop devices, then removes
/// the file. Missing storage is not an error. The caller has checked that
/// no target shows the volume.
pub(crate) fn delete(pool_dir: &Path, token: &str) -> Result<()> {
    let path = file(pool_dir, token);
    if path.exists() {
        for dev in devices_of(&path)? {
            detach(&dev, &path);
            gone(&dev);
        }
    }
    for p in [path, scratch(pool_dir, token)] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BackendError::io(format!("removing {}", p.display()), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Detaches block volume `token`'s loop device `device` if its node is
/// bound nowhere (`table`) and it is still that volume's device; returns
/// whether it asked for the detach.
pub(crate) fn release_device_of(
    pool_dir: &Path,
    token: &str,
    device: &Path,
    table: &[MountEntry],
) -> bool {
    release_device(device, &file(pool_dir, token), table)
}

/// The loop device behind block volume `token`, attached now if it is not
/// (after a reboot, or its last unpublish).
pub(crate) fn attach(pool_dir: &Path, token: &str) -> Result<PathBuf> {
    let path = file(pool_dir, token);
    if let Some(dev) = attached(pool_dir, token)? {
        if !autoclear(&dev) {
            return Ok(dev);
        }
        // Released while something still had it open (udev probing it,
        // a pod that outlived its unpublish): it goes at that last close,
        // and must not be bound again. Wait for it, then attach anew.
        if !gone(&dev) {
            return Err(BackendError::ImageInUse {
                image: path,
                devices: dev.display().to_string(),
            });
        }
    }
    if !path.is_file() {
        return Err(BackendError::BlockFileMissing { path });
    }
    let out = cmd::run(
        "losetup",
        [
            "--find".as_ref(),
            "--show".as_ref(),
            "--nooverlap".as_ref(),
            path.as_os_str(),
        ],
    )?;
    Ok(PathBuf::from(out.stdout.trim()))
}

/// The loop device attached to block volume `token`, if one is.
pub(crate) fn attached(pool_dir: &Path, token: &str) -> Result<Option<PathBuf>> {
    let path = file(pool_dir, token);
    if !path.is_file() {
        return Ok(None);
    }
    Ok(devices_of(&path)?.into_iter().next())
}

/// Detaches the loop devices of block volume `token` whose node is bound
/// nowhere (`table` is the mount table): the volume is published nowhere
/// through them, so nothing needs them. A device someone still has open
/// (a pod that outlived its unpublish, kubelet's own hold) only gets
/// auto-clear and goes at its last close.
pub(crate) fn release_unused(pool_dir: &Path, token: &str, table: &[MountEntry]) -> Result<()> {
    let path = file(pool_dir, token);
    if !path.is_file() {
        return Ok(());
    }
    for dev in devices_of(&path)? {
        release_device(&dev, &path, table);
    }
    Ok(())
}

/// Whether a mount entry shows block volume `token`'s device node, or the
/// node of a loop device with nothing behind it any more (detached under
/// a live bind: unmounting it cannot hide anything).
pub(crate) fn shows_volume(pool_dir: &Path, token: &str, entry: &MountEntry) -> Result<bool> {
    let Some(name) = entry.root.file_name().and_then(|n| n.to_str()) else {
        return Ok(false);
    };
    if entry.root.parent() != Some(Path::new("/")) || !name.starts_with("loop") {
        return Ok(false);
    }
    match std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) {
        Ok(backing) => Ok(Path::new(backing.trim()) == file(pool_dir, token)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackendError::io(
            format!("reading the backing file of {name}"),
            e,
        )),
    }
}

/// Grows the file of block volume `token` to `capacity` bytes (whole
/// sectors); the loop device sees it after [`refresh`].
pub(crate) fn expand(pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
    let path = file(pool_dir, token);
    let len = capacity.div_ceil(SECTOR) * SECTOR;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| BackendError::io(format!("opening {}", path.display()), e))?;
    let now = f
        .metadata()
        .map_err(|e| BackendError::io(format!("inspecting {}", path.display()), e))?
        .len();
    if now < len {
        f.set_len(len)
            .and_then(|()| f.sync_all())
            .map_err(|e| BackendError::io(format!("growing {}", path.display()), e))?;
    }
    Ok(())
}

/// Makes an attached loop device take its file's size (`losetup -c`), the
/// node half of an expansion; nothing to do while none is attached (the
/// next attach sees the new size).
pub(crate) fn refresh(pool_dir: &Path, token: &str) -> Result<()> {
    if let Some(dev) = attached(pool_dir, token)? {
        cmd::run("losetup", ["-c".as_ref(), dev.as_os_str()])?;
    }
    Ok(())
}

/// What block volume `token` takes: its size, and the bytes its sparse
/// file has allocated on the pool's filesystem (no inodes: a raw device
/// has none the driver could count).
pub(crate) fn usage(pool_dir: &Path, token: &str) -> Result<VolumeUsage> {
    let path = file(pool_dir, token);
    let m = std::fs::metadata(&path)
        .map_err(|e| BackendError::io(format!("inspecting {}", path.display()), e))?;
    let used = (m.blocks() * 512).min(m.len());
    Ok(VolumeUsage {
        used_bytes: used,
        available_bytes: m.len() - used,
        total_bytes: m.len(),
        ..VolumeUsage::default()
    })
}

/// Block volumes of the pool at `pool_dir` that have a loop device
/// attached now, as (token, device), read from sysfs: the sweep at
/// startup releases the ones nothing shows. Image volumes' devices back
/// dot-files and are not listed.
pub(crate) fn attached_in(pool_dir: &Path) -> Vec<(String, PathBuf)> {
    sys::loopdev::attached()
        .into_iter()
        .filter(|d| d.backing.parent() == Some(pool_dir))
        .filter_map(|d| {
            let token = d.backing.file_name()?.to_str()?;
            crate::volume::id::valid_token(token).then(|| (token.to_string(), d.device))
        })
        .collect()
}

/// Detaches `device` if its node is bound nowhere (`table`) and it is
/// still `path`'s device; returns whether it asked for the detach.
fn release_device(device: &Path, path: &Path, table: &[MountEntry]) -> bool {
    if sys::mountinfo::binds_of(table, device).is_empty() {
        detach(device, path);
        gone(device);
        return true;
    }
    false
}

/// Waits (at most a second) until loop device `dev` has nothing attached:
/// `losetup -d` on a device that udev is still probing only marks it
/// auto-clear. Returns whether it went.
fn gone(dev: &Path) -> bool {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let backing = format!("/sys/block/{name}/loop/backing_file");
    for _ in 0..50 {
        if !Path::new(&backing).exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Copies block volume `token`'s file to `dest` (a snapshot), with shared
/// extents where the filesystem can and holes kept, and flushes it;
/// returns its size. What a pod wrote through the device and the kernel
/// still buffers for it is flushed first. A raw device cannot be frozen
/// like a filesystem: the copy is what a power cut at that moment would
/// have left (crash-consistent) only while nothing writes during it.
pub(crate) fn snapshot(pool_dir: &Path, token: &str, dest: &Path) -> Result<u64> {
    let path = file(pool_dir, token);
    if let Some(dev) = attached(pool_dir, token)? {
        std::fs::File::open(&dev)
            .and_then(|f| f.sync_all())
            .map_err(|e| BackendError::io(format!("flushing {}", dev.display()), e))?;
    }
    sys::copy::copy_file(&path, dest)?;
    let f = std::fs::File::open(dest)
        .map_err(|e| BackendError::io(format!("opening {}", dest.display()), e))?;
    f.sync_all()
        .and_then(|()| f.metadata())
        .map(|m| m.len())
        .map_err(|e| BackendError::io(format!("flushing {}", dest.display()), e))
}

/// Makes block volume `token`, `capacity` bytes, holding a copy of
/// `source` (a block snapshot's file, or another block volume): copied
/// under `.<token>.restore`, grown to the volume's size, flushed, then
/// renamed into place.
pub(crate) fn create_from(
    pool_dir: &Path,
    token: &str,
    capacity: u64,
    source: super::Source<'_>,
) -> Result<()> {
    let from = match source {
        super::Source::Snapshot(p) => p.to_path_buf(),
        super::Source::Volume(t) => {
            if let Some(dev) = attached(pool_dir, t)? {
                std::fs::File::open(&dev)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| BackendError::io(format!("flushing {}", dev.display()), e))?;
            }
            file(pool_dir, t)
        }
    };
    let tmp = pool_dir.join(format!(".{token}{}", super::RESTORE));
    let _ = std::fs::remove_file(&tmp);
    let build = || -> Result<()> {
        sys::copy::copy_file(&from, &tmp)?;
        let len = capacity.div_ceil(SECTOR) * SECTOR;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(|e| BackendError::io(format!("opening {}", tmp.display()), e))?;
        let now = f
            .metadata()
            .map_err(|e| BackendError::io(format!("inspecting {}", tmp.display()), e))?
            .len();
        if now < len {
            f.set_len(len)
                .map_err(|e| BackendError::io(format!("growing {}", tmp.display()), e))?;
        }
        f.sync_all()
            .map_err(|e| BackendError::io(format!("flushing {}", tmp.display()), e))?;
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &tmp,
            nix::fcntl::AT_FDCWD,
            &file(pool_dir, token),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| BackendError::io(format!("renaming {}", tmp.display()), e.into()))
    };
    build().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
