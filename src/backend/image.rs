//! `image` pools: a sparse filesystem image per volume, loop-mounted at the
//! volume's path.
//!
//! Layout inside the pool directory:
//!
//! ```text
//! .<token>.img       the volume: a sparse file holding an ext4 or xfs
//!                    filesystem exactly as large as the volume
//! .<token>.img.new   an image being made (truncate, mkfs, fsync), renamed
//!                    to .<token>.img when complete
//! <token>/           the mount point; the image's filesystem is mounted
//!                    here, and publishing bind-mounts it like a dir volume
//! ```
//!
//! Size is enforced by the filesystem itself: a write past it fails with
//! ENOSPC. Usage is the mounted filesystem's statfs. Expanding grows the
//! file (controller), then refreshes the loop device's size and grows the
//! filesystem online (node).
//!
//! Mount lifetime: the image is mounted when the volume is created and
//! stays mounted until the volume is deleted; an unpublish leaves it
//! mounted, so the bind mounts at targets can always be traced back to the
//! volume (DeleteVolume refuses while any exist) and stats need no mount.
//! After a reboot the first publish (or stats, or expand) mounts it again.
//!
//! Loop devices never outlive their mount: the device is set up with
//! `losetup --nooverlap` (reusing one already attached to the same image,
//! so one image is never behind two devices), mounted, then detached with
//! `losetup -d`, which on a device in use only sets auto-clear: the kernel
//! frees it at the last unmount. A device attached by a call killed before
//! it mounted is reused by the retry, and DeleteVolume detaches whatever is
//! still attached to the image.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Backend, BackendError, Result, Source, VolumeUsage};
use crate::config::{Filesystem, PoolKind};
use crate::sys;
use crate::sys::cmd;

const IMG: &str = ".img";
const IMG_NEW: &str = ".img.new";
/// Marks a volume whose filesystem a snapshot or clone froze
/// (`.<token>.frozen`): made before the freeze, removed after the thaw, so
/// that a driver killed in between thaws it when it starts again.
const FROZEN: &str = ".frozen";
/// Smallest ext4 volume: below this ext4 has no room for a journal.
const MIN_EXT4: u64 = 16 << 20;
/// Smallest XFS filesystem `mkfs.xfs` agrees to make.
const MIN_XFS: u64 = 300 << 20;
/// Image sizes are whole filesystem blocks.
const BLOCK: u64 = 4096;

/// The `image` backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageBackend {
    fs: Filesystem,
}

impl ImageBackend {
    /// A backend making images with filesystem `fs`.
    pub(crate) fn new(fs: Filesystem) -> Self {
        ImageBackend { fs }
    }

    fn image(pool_dir: &Path, token: &str) -> PathBuf {
        pool_dir.join(format!(".{token}{IMG}"))
    }

    fn scratch(pool_dir: &Path, token: &str) -> PathBuf {
        pool_dir.join(format!(".{token}{IMG_NEW}"))
    }

    /// Makes `.<token>.img` of `capacity` bytes with a fresh filesystem:
    /// built under a scratch name and renamed, so the image name only ever
    /// names a complete image.
    fn make_image(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
        let scratch = Self::scratch(pool_dir, token);
        remove_file(&scratch)?;
        let build = || -> Result<()> {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&scratch)
                .map_err(|e| BackendError::io(format!("creating {}", scratch.display()), e))?;
            f.set_len(capacity)
                .map_err(|e| BackendError::io(format!("sizing {}", scratch.display()), e))?;
            drop(f);
            match self.fs {
                Filesystem::Ext4 => cmd::run(
                    "mkfs.ext4",
                    [
                        "-q".as_ref(),
                        "-F".as_ref(),
                        // No blocks reserved for root: the volume's whole
                        // size belongs to the pod.
                        "-m".as_ref(),
                        "0".as_ref(),
                        // 4 KiB blocks and the usual inode ratio even for
                        // small images (mke2fs would pick its "small"
                        // profile: 1 KiB blocks, four times the inodes).
                        "-T".as_ref(),
                        "default".as_ref(),
                        "-E".as_ref(),
                        "nodiscard".as_ref(),
                        scratch.as_os_str(),
                    ],
                )?,
                Filesystem::Xfs => cmd::run(
                    "mkfs.xfs",
                    [
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "-K".as_ref(),
                        scratch.as_os_str(),
                    ],
                )?,
            };
            std::fs::File::open(&scratch)
                .and_then(|f| f.sync_all())
                .map_err(|e| BackendError::io(format!("flushing {}", scratch.display()), e))?;
            std::fs::rename(&scratch, Self::image(pool_dir, token))
                .map_err(|e| BackendError::io(format!("renaming {}", scratch.display()), e))?;
            sys::fs::sync_dir(pool_dir)
                .map_err(|e| BackendError::io(format!("flushing {}", pool_dir.display()), e))
        };
        build().inspect_err(|_| {
            let _ = std::fs::remove_file(&scratch);
        })
    }

    /// Copies volume `token`'s image to `dest`, flushed. A mounted image
    /// is frozen for the copy, so the copy is a clean filesystem holding
    /// everything written before; a marker file records the freeze until
    /// the thaw, so a driver killed in between thaws it at its start.
    fn copy_image(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        let img = Self::image(pool_dir, token);
        if !img.exists() {
            return Err(BackendError::ImageMissing { path: img });
        }
        let frozen = freeze_marked(pool_dir, token)?;
        let copied = copy_flushed(&img, dest);
        thaw_marked(frozen)?;
        copied
    }

    /// Grows the image file `img` (not mounted) to `capacity` bytes, and an
    /// ext4 filesystem in it with it; returns whether it grew (an XFS
    /// filesystem is grown once mounted).
    fn grow_image(&self, img: &Path, capacity: u64) -> Result<bool> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(img)
            .map_err(|e| BackendError::io(format!("opening {}", img.display()), e))?;
        let len = f
            .metadata()
            .map_err(|e| BackendError::io(format!("inspecting {}", img.display()), e))?
            .len();
        if len >= capacity {
            return Ok(false);
        }
        f.set_len(capacity)
            .and_then(|()| f.sync_all())
            .map_err(|e| BackendError::io(format!("growing {}", img.display()), e))?;
        if self.fs == Filesystem::Ext4 {
            // Offline, so no CAP_SYS_RESOURCE is needed; resize2fs wants a
            // freshly checked filesystem (exit codes 1 and 2: fixed).
            if let Err(f) = cmd::run_raw("e2fsck", ["-f".as_ref(), "-y".as_ref(), img.as_os_str()])?
                && f.code.is_none_or(|c| c > 2)
            {
                return Err(f.into());
            }
            cmd::run("resize2fs", [img.as_os_str()])?;
        }
        Ok(true)
    }

    /// Mounts the image at `<pool>/<token>` unless it already is; returns
    /// the loop device behind the mount.
    fn ensure_mounted(&self, pool_dir: &Path, token: &str) -> Result<PathBuf> {
        let mnt = pool_dir.join(token);
        if let Some(dev) = mounted_device(&mnt)? {
            // A call killed between mount and `losetup -d` left the device
            // without auto-clear; set it now, or it would outlive the mount.
            if !autoclear(&dev) {
                let img = Self::image(pool_dir, token);
                detach(&dev, &img);
                detach_others(&img, &dev)?;
            }
            return Ok(dev);
        }
        let img = Self::image(pool_dir, token);
        if !img.exists() {
            return Err(BackendError::ImageMissing { path: img });
        }
        let out = cmd::run(
            "losetup",
            [
                "--find".as_ref(),
                "--show".as_ref(),
                "--nooverlap".as_ref(),
                img.as_os_str(),
            ],
        )?;
        let dev = PathBuf::from(out.stdout.trim());
        // A snapshot or clone is a copy of an image, with the same XFS
        // UUID as its source, which XFS refuses to mount twice without
        // `nouuid`; the driver never relies on UUIDs.
        let options = match self.fs {
            Filesystem::Xfs => "nouuid",
            Filesystem::Ext4 => "",
        };
        if let Err(e) = sys::mount::mount_device(&dev, &mnt, self.fs.as_str(), options) {
            detach(&dev, &img);
            return Err(BackendError::io(
                format!(
                    "mounting {} ({}) at {}",
                    img.display(),
                    dev.display(),
                    mnt.display()
                ),
                e,
            ));
        }
        // The device is in use now, so this only marks it auto-clear: the
        // kernel detaches it when the last mount of it goes.
        detach(&dev, &img);
        detach_others(&img, &dev)?;
        Ok(dev)
    }

    /// Grows the mounted filesystem to the size of its image.
    fn grow_fs(&self, pool_dir: &Path, token: &str) -> Result<()> {
        let dev = self.ensure_mounted(pool_dir, token)?;
        cmd::run("losetup", ["-c".as_ref(), dev.as_os_str()])?;
        match self.fs {
            Filesystem::Xfs => {
                cmd::run("xfs_growfs", [pool_dir.join(token).as_os_str()])?;
                Ok(())
            }
            Filesystem::Ext4 => match cmd::run_raw("resize2fs", [dev.as_os_str()])? {
                Ok(_) => Ok(()),
                // The kernel grows a mounted ext4 only for a caller with
                // CAP_SYS_RESOURCE. NodeExpandVolume always finds the volume
                // published, so there is no offline way out: say what to fix.
                Err(f) if f.stderr.contains("Permission denied") => {
                    Err(BackendError::NeedsCapSysResource {
                        token: token.to_string(),
                        failure: f,
                    })
                }
                Err(f) => Err(f.into()),
            },
        }
    }
}

/// Waits until no loop device is attached to `img`, detaching idle ones
/// (left by a call killed between losetup and mount) on the way; a device
/// still in use after a second means someone else has the image mounted.
fn wait_detached(img: &Path) -> Result<()> {
    for _ in 0..50 {
        let devs = devices_of(img)?;
        if devs.is_empty() {
            return Ok(());
        }
        devs.iter().for_each(|d| detach(d, img));
        std::thread::sleep(Duration::from_millis(20));
    }
    let devs = devices_of(img)?;
    if devs.is_empty() {
        return Ok(());
    }
    Err(BackendError::ImageInUse {
        image: img.to_path_buf(),
        devices: devs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The loop device mounted at exactly `mnt`, if something is.
fn mounted_device(mnt: &Path) -> Result<Option<PathBuf>> {
    let table =
        sys::mountinfo::read().map_err(|e| BackendError::io("reading the mount table", e))?;
    Ok(sys::mountinfo::mounted_at(&table, mnt).map(|e| PathBuf::from(&e.source)))
}

/// Loop devices attached to `img`.
pub(super) fn devices_of(img: &Path) -> Result<Vec<PathBuf>> {
    let out = cmd::run("losetup", ["-j".as_ref(), img.as_os_str()])?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split_once(':').map(|(d, _)| PathBuf::from(d)))
        .collect())
}

/// Detaches idle loop devices on `img` other than `keep`: a `losetup` still
/// running when its driver was killed can attach a second device after the
/// restarted driver attached and mounted its own.
fn detach_others(img: &Path, keep: &Path) -> Result<()> {
    for d in devices_of(img)? {
        if d != keep {
            detach(&d, img);
        }
    }
    Ok(())
}

/// Whether a loop device is set to detach itself at its last close (read
/// from sysfs; anything unreadable counts as set, so nothing is touched).
pub(super) fn autoclear(dev: &Path) -> bool {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return true;
    };
    if !name.starts_with("loop") {
        return true;
    }
    std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
        .map(|s| s.trim() != "0")
        .unwrap_or(true)
}

/// `losetup -d` on `dev` while it is still the device of `backing`:
/// detaches an idle device, marks a busy one auto-clear.
///
/// `dev` comes from an earlier look (`losetup -j`, the mount table). In
/// between, a device marked auto-clear may have gone at its last close
/// (udev's probe) and been attached to another volume's file by another
/// call, which a plain `losetup -d` would then take from under that
/// volume's bind: its target would show whatever file the device gets
/// next. So the device is held open across the check of its backing file
/// and the detach: with an opener it can neither be released nor
/// attached anew, and the detach only marks it auto-clear, to go at this
/// close if nobody else has it open.
pub(super) fn detach(dev: &Path, backing: &Path) {
    let Ok(_hold) = std::fs::File::open(dev) else {
        return;
    };
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    match std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")) {
        Ok(b) if Path::new(b.trim()) == backing => {}
        other => {
            tracing::debug!(device = %dev.display(), expected = %backing.display(), now = ?other.map(|b| b.trim().to_string()).ok(), "not detaching a loop device that is no longer this file's");
            return;
        }
    }
    if let Ok(Err(f)) = cmd::run_raw("losetup", ["-d".as_ref(), dev.as_os_str()]) {
        tracing::debug!(error = %f, "detaching a loop device failed");
    }
}

/// Copies `from` to `dest` and flushes the copy.
/// Freezes the filesystem of volume `token` if it is mounted (nothing
/// writes an unmounted image: the caller holds the volume's lock), after
/// writing its freeze marker; returns the mount point and marker to give
/// to [`thaw_marked`]. The marker makes a driver killed before the thaw
/// thaw it when it starts again.
fn freeze_marked(pool_dir: &Path, token: &str) -> Result<Option<(PathBuf, PathBuf)>> {
    let mnt = pool_dir.join(token);
    if mounted_device(&mnt)?.is_none() {
        return Ok(None);
    }
    let marker = pool_dir.join(format!(".{token}{FROZEN}"));
    if marker.exists() {
        // A call killed while the filesystem was frozen, and the startup
        // sweep has not come round to it yet: freezing again would fail
        // (EBUSY), so thaw first.
        sys::copy::thaw(&mnt)?;
    }
    std::fs::write(&marker, b"")
        .map_err(|e| BackendError::io(format!("creating {}", marker.display()), e))?;
    if let Err(e) = sys::copy::freeze(&mnt) {
        let _ = std::fs::remove_file(&marker);
        return Err(e.into());
    }
    Ok(Some((mnt, marker)))
}

/// Thaws what [`freeze_marked`] froze, then removes its marker.
fn thaw_marked(frozen: Option<(PathBuf, PathBuf)>) -> Result<()> {
    let Some((mnt, marker)) = frozen else {
        return Ok(());
    };
    sys::copy::thaw(&mnt)?;
    remove_file(&marker)
}

fn copy_flushed(from: &Path, dest: &Path) -> Result<()> {
    sys::copy::copy_file(from, dest).map_err(|source| BackendError::Copy {
        from: from.to_path_buf(),
        source,
    })?;
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| BackendError::io(format!("flushing {}", dest.display()), e))
}

/// Unmounts the image's filesystem from its mount point (twice if a
/// retried call stacked a second mount).
fn unmount_all(mnt: &Path) -> Result<()> {
    for _ in 0..4 {
        if mounted_device(mnt)?.is_none() {
            break;
        }
        sys::mount::unmount(mnt).map_err(|e| match e.raw_os_error() {
            Some(c) if c == nix::errno::Errno::EBUSY as i32 => BackendError::Busy {
                path: mnt.to_path_buf(),
            },
            _ => BackendError::io(format!("unmounting {}", mnt.display()), e),
        })?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

impl Backend for ImageBackend {
    fn kind(&self) -> PoolKind {
        PoolKind::Image
    }

    fn create(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
        let mnt = pool_dir.join(token);
        let img = Self::image(pool_dir, token);
        let mounted = mounted_device(&mnt)?.is_some();
        if !mounted {
            match std::fs::symlink_metadata(&mnt) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BackendError::io(format!("inspecting {}", mnt.display()), e)),
                Ok(m) => {
                    let empty = m.is_dir()
                        && sys::fs::is_empty_dir(&mnt).map_err(|e| {
                            BackendError::io(format!("reading {}", mnt.display()), e)
                        })?;
                    if !empty {
                        return Err(BackendError::Occupied {
                            path: mnt,
                            what: "holds data",
                        });
                    }
                }
            }
        }
        let made_image = match std::fs::metadata(&img) {
            Ok(m) => {
                // Left by an attempt killed after the image was complete;
                // an image smaller than asked (an expansion killed half-way)
                // is grown below.
                if m.len() < capacity {
                    self.expand(pool_dir, token, capacity)?;
                }
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.make_image(pool_dir, token, capacity)?;
                true
            }
            Err(e) => return Err(BackendError::io(format!("inspecting {}", img.display()), e)),
        };
        let finish = || -> Result<()> {
            match std::fs::create_dir(&mnt) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(BackendError::io(format!("creating {}", mnt.display()), e));
                }
                _ => {}
            }
            self.ensure_mounted(pool_dir, token)?;
            if !made_image {
                self.grow_fs(pool_dir, token)?;
            }
            // mkfs makes the root directory 0755 root's; the pool gives it
            // the StorageClass's mode and owner (`Pool::set_root`).
            sys::fs::sync_dir(pool_dir)
                .map_err(|e| BackendError::io(format!("flushing {}", pool_dir.display()), e))
        };
        finish().inspect_err(|_| {
            if made_image {
                let _ = self.delete(pool_dir, token);
            }
        })
    }

    fn delete(&self, pool_dir: &Path, token: &str) -> Result<()> {
        let mnt = pool_dir.join(token);
        let img = Self::image(pool_dir, token);
        let has_image = img.exists();
        unmount_all(&mnt)?;
        if has_image {
            // Devices still attached: left by a call killed between losetup
            // and mount, or (auto-clear) being released right now.
            wait_detached(&img)?;
            remove_file(&img)?;
        } else if mnt.exists() && !sys::fs::is_empty_dir(&mnt).unwrap_or(true) {
            // No image but a directory with data: a volume made while the
            // pool was of kind dir. Remove it the way that kind does.
            return super::dir::DirBackend.delete(pool_dir, token);
        }
        remove_file(&Self::scratch(pool_dir, token))?;
        match std::fs::remove_dir(&mnt) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(BackendError::io(format!("removing {}", mnt.display()), e))
            }
            _ => Ok(()),
        }
    }

    fn archive(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        let mnt = pool_dir.join(token);
        let img = Self::image(pool_dir, token);
        // The image goes to the trash unmounted and with no loop device,
        // so an archived volume holds nothing but its file.
        unmount_all(&mnt)?;
        if img.exists() {
            wait_detached(&img)?;
            sys::fs::rename_noreplace(&img, dest).map_err(|e| {
                BackendError::io(format!("moving {} to {}", img.display(), dest.display()), e)
            })?;
        } else if mnt.exists() && !sys::fs::is_empty_dir(&mnt).unwrap_or(true) {
            // A volume made while the pool was of kind dir: archived the
            // way that kind does.
            return super::dir::DirBackend.archive(pool_dir, token, dest);
        }
        remove_file(&Self::scratch(pool_dir, token))?;
        match std::fs::remove_dir(&mnt) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(BackendError::io(format!("removing {}", mnt.display()), e))
            }
            _ => Ok(()),
        }
    }

    fn storage_file(&self, pool_dir: &Path, token: &str) -> Option<PathBuf> {
        Some(Self::image(pool_dir, token))
    }

    fn make_available(&self, pool_dir: &Path, token: &str) -> Result<PathBuf> {
        self.ensure_mounted(pool_dir, token)?;
        Ok(pool_dir.join(token))
    }

    fn unpublished(&self, pool_dir: &Path, token: &str) -> Result<()> {
        // The image stays mounted (see the module doc); only tidy up a
        // second device a killed call may have attached.
        if let Some(dev) = mounted_device(&pool_dir.join(token))? {
            detach_others(&Self::image(pool_dir, token), &dev)?;
        }
        Ok(())
    }

    fn release_unshown(
        &self,
        pool_dir: &Path,
        token: &str,
        table: &[sys::mountinfo::MountEntry],
    ) -> Result<()> {
        let mnt = pool_dir.join(token);
        let img = Self::image(pool_dir, token);
        let ours = devices_of(&img)?;
        match sys::mountinfo::mounted_at(table, &mnt) {
            // Not mounted: devices a call killed before its mount left.
            None => ours.iter().for_each(|d| detach(d, &img)),
            // The image's own mount, and no target binds it any more: the
            // unmount frees its auto-clear device (detached as well, for
            // one a killed call left without auto-clear).
            Some(e) if ours.contains(&PathBuf::from(&e.source)) => {
                if sys::mountinfo::binds_of(table, &mnt).is_empty() {
                    unmount_all(&mnt)?;
                    ours.iter().for_each(|d| detach(d, &img));
                }
            }
            // Something else mounted there: not ours to take off.
            Some(_) => {}
        }
        Ok(())
    }

    fn usage(&self, pool_dir: &Path, token: &str, _capacity: u64) -> Result<VolumeUsage> {
        let dev = self.ensure_mounted(pool_dir, token)?;
        // Stats come round regularly: a good moment to release a second
        // device a killed call may have attached.
        detach_others(&Self::image(pool_dir, token), &dev)?;
        super::usage_of_fs(&pool_dir.join(token))
    }

    fn expand(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
        let img = Self::image(pool_dir, token);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(|e| BackendError::io(format!("opening {}", img.display()), e))?;
        let len = f
            .metadata()
            .map_err(|e| BackendError::io(format!("inspecting {}", img.display()), e))?
            .len();
        if len < capacity {
            f.set_len(capacity)
                .and_then(|()| f.sync_all())
                .map_err(|e| BackendError::io(format!("growing {}", img.display()), e))?;
        }
        Ok(())
    }

    fn needs_node_expand(&self) -> bool {
        true
    }

    fn node_expand(&self, pool_dir: &Path, token: &str) -> Result<()> {
        self.grow_fs(pool_dir, token)
    }

    fn min_volume_size(&self) -> u64 {
        match self.fs {
            Filesystem::Ext4 => MIN_EXT4,
            Filesystem::Xfs => MIN_XFS,
        }
    }

    fn granularity(&self) -> u64 {
        BLOCK
    }

    fn held(
        &self,
        pool_dir: &Path,
        tokens: &[&str],
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        use std::os::unix::fs::MetadataExt;
        // What the volume's own filesystem says where it is mounted (as
        // NodeGetVolumeStats reports it); an image that is not mounted
        // (after a reboot) is never mounted for a listing: then the blocks
        // its image takes on the pool's disk.
        let pool_dev = std::fs::metadata(pool_dir)
            .map_err(|e| BackendError::io(format!("inspecting {}", pool_dir.display()), e))?
            .dev();
        Ok(tokens
            .iter()
            .filter_map(|t| {
                let mnt = pool_dir.join(t);
                let mounted = std::fs::metadata(&mnt).ok()?.dev() != pool_dev;
                let bytes = if mounted {
                    super::usage_of_fs(&mnt).ok()?.used_bytes
                } else {
                    std::fs::metadata(Self::image(pool_dir, t)).ok()?.blocks() * 512
                };
                Some((t.to_string(), bytes))
            })
            .collect())
    }

    fn used_by(&self, pool_dir: &Path, tokens: &[&str]) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let mut sum = 0;
        for t in tokens {
            match std::fs::metadata(Self::image(pool_dir, t)) {
                Ok(m) => sum += m.blocks() * 512,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BackendError::io(format!("inspecting the image of {t}"), e)),
            }
        }
        Ok(sum)
    }

    fn scratch_suffixes(&self) -> &'static [&'static str] {
        &[IMG_NEW, FROZEN]
    }

    fn snapshot(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        self.copy_image(pool_dir, token, dest)
    }

    fn snapshot_size(&self, path: &Path) -> Result<u64> {
        // The image's length is its filesystem's size: no volume made from
        // it can be smaller.
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| BackendError::io(format!("inspecting {}", path.display()), e))
    }

    fn snapshots_groups(&self) -> bool {
        true
    }

    fn snapshot_group(&self, pool_dir: &Path, members: &[(&str, &Path)]) -> Result<()> {
        // Every member is frozen before the first copy and thawed after the
        // last: no write reaches any of them in between, so all copies hold
        // the same moment of the application's write stream. A write to one
        // member waits, and with it whatever the application would write
        // next to another.
        let mut frozen = Vec::with_capacity(members.len());
        let mut copy_all = || -> Result<()> {
            for (token, _) in members {
                let img = Self::image(pool_dir, token);
                if !img.exists() {
                    return Err(BackendError::ImageMissing { path: img });
                }
                frozen.push(freeze_marked(pool_dir, token)?);
            }
            for (token, dest) in members {
                copy_flushed(&Self::image(pool_dir, token), dest)?;
            }
            Ok(())
        };
        let copied = copy_all();
        let mut thawed = Ok(());
        for f in frozen.into_iter().rev() {
            thawed = thawed.and(thaw_marked(f));
        }
        copied.and(thawed)
    }

    fn create_from(
        &self,
        pool_dir: &Path,
        token: &str,
        capacity: u64,
        source: Source<'_>,
    ) -> Result<()> {
        let scratch = Self::scratch(pool_dir, token);
        let img = Self::image(pool_dir, token);
        let mnt = pool_dir.join(token);
        let build = || -> Result<bool> {
            remove_file(&scratch)?;
            match source {
                Source::Snapshot(p) => copy_flushed(p, &scratch)?,
                Source::Volume(t) => self.copy_image(pool_dir, t, &scratch)?,
            }
            let grow = self.grow_image(&scratch, capacity)?;
            std::fs::rename(&scratch, &img)
                .map_err(|e| BackendError::io(format!("renaming {}", scratch.display()), e))?;
            match std::fs::create_dir(&mnt) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(BackendError::io(format!("creating {}", mnt.display()), e));
                }
                _ => {}
            }
            sys::fs::sync_dir(pool_dir)
                .map_err(|e| BackendError::io(format!("flushing {}", pool_dir.display()), e))?;
            Ok(grow)
        };
        let grew = build().inspect_err(|_| {
            let _ = std::fs::remove_file(&scratch);
        })?;
        let finish = || -> Result<()> {
            self.ensure_mounted(pool_dir, token)?;
            // XFS grows only mounted (ext4 was grown offline above).
            if grew && self.fs == Filesystem::Xfs {
                self.grow_fs(pool_dir, token)?;
            }
            Ok(())
        };
        finish().inspect_err(|_| {
            let _ = self.delete(pool_dir, token);
        })
    }

    fn discard(&self, path: &Path) -> Result<()> {
        // A freeze marker left by a killed call: thaw its volume first.
        if let Some(token) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('.')?.strip_suffix(FROZEN))
            && let Some(pool_dir) = path.parent()
        {
            let mnt = pool_dir.join(token);
            if mounted_device(&mnt)?.is_some() {
                sys::copy::thaw(&mnt)?;
                tracing::warn!(volume = %token, "thawed a filesystem a killed snapshot or clone had frozen");
            }
        }
        sys::fs::remove_tree(path)
            .map_err(|e| BackendError::io(format!("removing {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guard of [`detach`]: a device now attached to another file (as
    /// after an auto-clear release and a new attach by another call) is
    /// left alone; the right file's device is detached.
    #[test]
    fn detach_leaves_a_device_that_another_file_now_has() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: attaching loop devices needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        for f in [&a, &b] {
            std::fs::File::create(f).unwrap().set_len(1 << 20).unwrap();
        }
        let out = cmd::run(
            "losetup",
            ["--find".as_ref(), "--show".as_ref(), b.as_os_str()],
        )
        .unwrap();
        let dev = PathBuf::from(out.stdout.trim());
        // Whatever happens below, the device goes with the test.
        struct Detach(PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = cmd::run_raw("losetup", ["-d".as_ref(), self.0.as_os_str()]);
            }
        }
        let _cleanup = Detach(dev.clone());

        detach(&dev, &a);
        assert_eq!(
            devices_of(&b).unwrap(),
            vec![dev.clone()],
            "b's device was taken"
        );
        detach(&dev, &b);
        let name = dev.file_name().unwrap().to_str().unwrap();
        let backing = format!("/sys/block/{name}/loop/backing_file");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while Path::new(&backing).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} still attached to b",
                dev.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
