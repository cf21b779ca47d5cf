//! Storage backends: how a pool of a given kind makes, sizes, measures and
//! removes the storage behind a volume.
//!
//! Backends work on paths inside their pool directory only and are called
//! with the volume's lock held. Every operation must be idempotent and must
//! cope with the leftovers of an earlier attempt that was killed half-way,
//! because that is exactly what a retried call after a crash looks like.

pub(crate) mod block;
mod btrfs;
mod dir;
mod image;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::{PoolConfig, PoolKind};
use crate::sys::cmd::{CmdError, Failure};

/// Why storage could not be made, measured, grown or removed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A file operation or syscall failed.
    #[error("{context}: {source}")]
    Io {
        /// What the backend was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A storage tool (`btrfs`, `mkfs.*`, `losetup`, ...) is missing or
    /// failed.
    #[error(transparent)]
    Tool(#[from] CmdError),
    /// Something that is not a leftover of this driver sits where the
    /// volume belongs (someone else's data is never taken over).
    #[error(
        "{} already exists, {what} and was not created by this driver; \
         use another volume name or move it away",
        path.display()
    )]
    Occupied {
        /// The volume's path.
        path: PathBuf,
        /// What is wrong with it ("holds data", "is not an empty
        /// subvolume").
        what: &'static str,
    },
    /// A btrfs pool's directory is on another filesystem.
    #[error(
        "pool directory {} is not on btrfs; a pool of kind btrfs needs a btrfs filesystem",
        dir.display()
    )]
    NotBtrfs {
        /// The pool directory.
        dir: PathBuf,
    },
    /// Quotas are off on a btrfs pool's filesystem and could not be
    /// switched on.
    #[error(
        "quotas are off on the btrfs filesystem of {} and enabling them failed \
         (run `btrfs quota enable` on it by hand): {source}",
        dir.display()
    )]
    QuotasOff {
        /// The pool directory.
        dir: PathBuf,
        /// Why `btrfs quota enable` failed.
        source: CmdError,
    },
    /// Quotas are off on a btrfs pool's filesystem and the kernel refused
    /// to switch on simple quotas.
    #[error(
        "quotas are off on the btrfs filesystem of {} and enabling simple quotas failed \
         (run `btrfs quota enable` on it by hand for full qgroups): {source}",
        dir.display()
    )]
    SimpleQuotasOff {
        /// The pool directory.
        dir: PathBuf,
        /// What the kernel answered.
        source: io::Error,
    },
    /// Quotas were switched on for a btrfs pool's filesystem, and the
    /// kernel still says they are off.
    #[error("quotas are still off on the btrfs filesystem of {} after enabling them", dir.display())]
    QuotasStillOff {
        /// The pool directory.
        dir: PathBuf,
    },
    /// The quota state of a btrfs pool's filesystem could not be had.
    #[error(transparent)]
    Btrfs(#[from] crate::sys::btrfs::BtrfsError),
    /// `btrfs qgroup show` printed nothing for the volume.
    #[error("`btrfs qgroup show` printed no qgroup for {}", path.display())]
    NoQgroup {
        /// The volume's subvolume.
        path: PathBuf,
    },
    /// No mount holds the pool directory (the mount table is inconsistent).
    #[error("no mount holds {}", dir.display())]
    NotMounted {
        /// The pool directory.
        dir: PathBuf,
    },
    /// A btrfs volume holds nested subvolumes, which `btrfs subvolume
    /// delete` refuses to remove with it.
    #[error("{0}; the volume holds nested subvolumes, which must be deleted first")]
    NestedSubvolumes(Failure),
    /// A btrfs volume that is a plain directory cannot be resized.
    #[error("{} is not a subvolume, so its size cannot be changed", path.display())]
    NotSubvolume {
        /// The volume's path.
        path: PathBuf,
    },
    /// An image volume's image file is gone.
    #[error("the image {} of this volume is missing", path.display())]
    ImageMissing {
        /// The image file.
        path: PathBuf,
    },
    /// A block volume's file is gone.
    #[error("the file {} of this raw block volume is missing", path.display())]
    BlockFileMissing {
        /// The volume's file.
        path: PathBuf,
    },
    /// An image is still attached to loop devices that do not go away (it
    /// is mounted somewhere).
    #[error(
        "the image {} is still in use through {devices}; unpublish it everywhere first",
        image.display()
    )]
    ImageInUse {
        /// The image file.
        image: PathBuf,
        /// The loop devices, comma-separated.
        devices: String,
    },
    /// An image volume's filesystem cannot be unmounted: something uses it.
    #[error("the filesystem of this volume at {} is busy", path.display())]
    Busy {
        /// The mount point.
        path: PathBuf,
    },
    /// The kernel grows a mounted ext4 only for a caller with
    /// CAP_SYS_RESOURCE, which the driver lacks.
    #[error(
        "cannot grow the ext4 filesystem of volume {token} while it is mounted: that needs \
         CAP_SYS_RESOURCE, which the driver lacks; run the node plugin privileged ({failure})"
    )]
    NeedsCapSysResource {
        /// The volume's token.
        token: String,
        /// What `resize2fs` said.
        failure: Failure,
    },
    /// A copy for a snapshot or a clone failed half-way; what it made was
    /// taken back.
    #[error("copying {}: {source}", from.display())]
    Copy {
        /// What was being copied.
        from: PathBuf,
        /// Why it failed.
        source: CmdError,
    },
    /// The source of a snapshot or clone is not storage of the pool's kind
    /// (a volume made while the pool had another kind).
    #[error("{} is not a volume of this pool's kind {}, so it cannot be copied", path.display(), kind.as_str())]
    NotOfKind {
        /// The source.
        path: PathBuf,
        /// The pool's kind.
        kind: PoolKind,
    },
    /// The pool's kind cannot take snapshots of several volumes at one
    /// point in time.
    #[error(
        "pools of kind {} cannot snapshot volumes together at one point in time (a plain \
         directory cannot be frozen); use a btrfs or image pool for group snapshots",
        kind.as_str()
    )]
    NoGroupSnapshots {
        /// The kind.
        kind: PoolKind,
    },
    /// Volumes of a group snapshot were written between their snapshots
    /// at every attempt, so no attempt was one point in time.
    #[error(
        "volumes {volumes} were written while the group was being snapshotted ({attempts} \
         attempts); nothing was kept. Retry, or pause the application's writes for a moment"
    )]
    WrittenDuringGroup {
        /// The volumes written, comma-separated.
        volumes: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The pool's kind has no way to grow a volume.
    #[error("pools of kind {} cannot expand volumes", kind.as_str())]
    CannotExpand {
        /// The kind.
        kind: PoolKind,
    },
}

impl BackendError {
    /// Wraps an I/O error with what the backend was doing at the time.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        BackendError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Failure> for BackendError {
    fn from(f: Failure) -> Self {
        BackendError::Tool(f.into())
    }
}

/// Results of backend operations.
pub(crate) type Result<T, E = BackendError> = std::result::Result<T, E>;

/// What a volume uses and has left, as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VolumeUsage {
    /// Bytes used by this volume alone.
    pub(crate) used_bytes: u64,
    /// Bytes it may still write.
    pub(crate) available_bytes: u64,
    /// Its size: used plus available.
    pub(crate) total_bytes: u64,
    /// Inodes used by this volume alone.
    pub(crate) used_inodes: u64,
    /// Inodes it may still create.
    pub(crate) available_inodes: u64,
    /// Used plus available inodes.
    pub(crate) total_inodes: u64,
}

/// Where the data of a volume made from a source comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A snapshot's data, made by [`Backend::snapshot`], at this path.
    Snapshot(&'a Path),
    /// Another volume of the same pool, by token.
    Volume(&'a str),
}

/// Suffix of a volume being made from a snapshot or another volume
/// (`.<token>.restore`): copied there, then renamed into place in one
/// step; a leftover is swept.
pub(crate) const RESTORE: &str = ".restore";

/// A pool kind's storage operations.
pub(crate) trait Backend: Send + Sync + Debug {
    /// The kind this backend implements.
    fn kind(&self) -> PoolKind;

    /// Whether a volume's size is enforced (writes beyond it fail).
    fn enforces_size(&self) -> bool {
        self.kind().enforces_size()
    }

    /// Checks the pool directory is usable for this kind.
    fn prepare(&self, _pool_dir: &Path) -> Result<()> {
        Ok(())
    }

    /// Why the pool cannot keep its size promises right now, if it cannot
    /// (btrfs: quota accounting that the kernel reports inconsistent or is
    /// rebuilding, quotas turned off). While it cannot, the pool promises
    /// nothing (GetCapacity 0, creates and expansions RESOURCE_EXHAUSTED)
    /// and its volumes report the reason as an abnormal condition. The
    /// reason says how to repair. Asked on every call that needs it, so it
    /// must be cheap.
    fn unreliable(&self, _pool_dir: &Path) -> Option<String> {
        None
    }

    /// Volumes (tokens) whose storage exists but has lost its size limit,
    /// so that the pool can set each again from its record when it opens
    /// (btrfs: quotas were turned off, which drops every limit, and on
    /// again). Only tokens with a record are acted on.
    fn missing_limits(&self, _pool_dir: &Path) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Makes the storage for volume `token` holding `capacity` bytes at
    /// `pool_dir/token`. Called only while no record exists for the token.
    /// Leftovers of an interrupted attempt are reused or redone; anything
    /// that may hold someone else's data answers ALREADY_EXISTS.
    fn create(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()>;

    /// Removes the storage of volume `token`, including leftovers of an
    /// interrupted earlier delete. Missing storage is not an error.
    fn delete(&self, pool_dir: &Path, token: &str) -> Result<()>;

    /// Moves the storage of volume `token` to `dest`, a path in the pool's
    /// trash (same filesystem), as something [`Backend::purge`] removes
    /// later: the volume's directory or subvolume by default (one rename,
    /// whatever it holds). Idempotent: storage already moved (a retry after
    /// a crash) or missing is not an error; `dest` is never replaced.
    fn archive(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        let path = pool_dir.join(token);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(
                format!("inspecting {}", path.display()),
                e,
            )),
            Ok(_) => crate::sys::fs::rename_noreplace(&path, dest).map_err(|e| {
                BackendError::io(
                    format!("moving {} to {}", path.display(), dest.display()),
                    e,
                )
            }),
        }
    }

    /// Removes storage that [`Backend::archive`] moved to `path`; missing
    /// storage is not an error.
    fn purge(&self, path: &Path) -> Result<()> {
        crate::sys::fs::remove_tree(path)
            .map_err(|e| BackendError::io(format!("removing {}", path.display()), e))
    }

    /// Size and free bytes of the pool's filesystem, in one `statfs`.
    fn space(&self, pool_dir: &Path) -> Result<crate::sys::fs::FsSpace> {
        crate::sys::fs::space(pool_dir)
            .map_err(|e| BackendError::io(format!("statfs {}", pool_dir.display()), e))
    }

    /// Makes the volume's data reachable at `pool_dir/token` and returns
    /// that path, the directory to bind-mount when publishing. Image
    /// volumes mount their filesystem there first if it is not (after a
    /// reboot, say); the other kinds only return the path.
    fn make_available(&self, pool_dir: &Path, token: &str) -> Result<PathBuf> {
        Ok(pool_dir.join(token))
    }

    /// The file that holds a volume's data where it is not the volume's
    /// path itself (an image pool's image; the volume's path is where it is
    /// mounted), for health checks.
    fn storage_file(&self, _pool_dir: &Path, _token: &str) -> Option<PathBuf> {
        None
    }

    /// Called after each unpublish of the volume, for backends that tidy up
    /// (image pools detach a stray loop device a killed call left).
    fn unpublished(&self, _pool_dir: &Path, _token: &str) -> Result<()> {
        Ok(())
    }

    /// Releases what the volume holds on the node beyond its storage (an
    /// image volume's loop mount and device) when no target shows it
    /// (`table`); for volumes of a pool gone from the configuration.
    fn release_unshown(
        &self,
        _pool_dir: &Path,
        _token: &str,
        _table: &[crate::sys::mountinfo::MountEntry],
    ) -> Result<()> {
        Ok(())
    }

    /// What the volume uses; `capacity` is the size promised to the CO.
    fn usage(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<VolumeUsage>;

    /// Grows the volume to `capacity` bytes while it may be in use (the
    /// controller half of an expansion: raise the limit, grow the image).
    /// Must be idempotent: a retry after a crash calls it again.
    fn expand(&self, _pool_dir: &Path, _token: &str, _capacity: u64) -> Result<()> {
        Err(BackendError::CannotExpand { kind: self.kind() })
    }

    /// Whether the node must do its half of an expansion (grow a
    /// filesystem) after [`Backend::expand`].
    fn needs_node_expand(&self) -> bool {
        false
    }

    /// The node half of an expansion: makes the space that
    /// [`Backend::expand`] added usable in the mounted volume. Idempotent.
    fn node_expand(&self, _pool_dir: &Path, _token: &str) -> Result<()> {
        Ok(())
    }

    /// Smallest volume this kind can make; requests below it are rounded up.
    fn min_volume_size(&self) -> u64 {
        0
    }

    /// Volume sizes are rounded up to a multiple of this.
    fn granularity(&self) -> u64 {
        1
    }

    /// Bytes that the volumes `tokens` hold on the pool's filesystem, all
    /// together: the part of their promises that is already spent.
    fn used_by(&self, _pool_dir: &Path, _tokens: &[&str]) -> Result<u64> {
        Ok(0)
    }

    /// Bytes each of the volumes `tokens` holds, for listings and metrics,
    /// measured without changing anything (no mount, no sync, no rescan);
    /// a volume that cannot be measured is left out. By default a walk of
    /// each volume's tree.
    fn held(&self, pool_dir: &Path, tokens: &[&str]) -> Result<BTreeMap<String, u64>> {
        Ok(tokens
            .iter()
            .filter_map(|t| {
                let bytes = crate::sys::fs::usage(&pool_dir.join(t)).ok()?.bytes;
                Some((t.to_string(), bytes))
            })
            .collect())
    }

    /// Makes a point-in-time copy of volume `token` at `dest`, a path
    /// in the pool's snapshot directory that does not exist yet, and
    /// flushes it to disk. A failure leaves whatever it made at `dest`
    /// for the caller to [`Backend::discard`].
    fn snapshot(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()>;

    /// The size to report for the snapshot at `path`: the least a volume
    /// made from it needs.
    fn snapshot_size(&self, path: &Path) -> Result<u64> {
        crate::sys::fs::usage(path)
            .map(|u| u.bytes)
            .map_err(|e| BackendError::io(format!("measuring {}", path.display()), e))
    }

    /// Snapshots several volumes of the pool at one point in time, each
    /// `(token, dest)` as [`Backend::snapshot`] would: write-order
    /// consistent (no write to any of them lands between two of the
    /// snapshots), or an error. A failure leaves whatever it made for the
    /// caller to [`Backend::discard`]. Kinds that cannot refuse.
    fn snapshot_group(&self, pool_dir: &Path, members: &[(&str, &Path)]) -> Result<()> {
        let _ = (pool_dir, members);
        Err(BackendError::NoGroupSnapshots { kind: self.kind() })
    }

    /// Whether [`Backend::snapshot_group`] can succeed, so a pool that
    /// cannot refuses before it makes anything.
    fn snapshots_groups(&self) -> bool {
        false
    }

    /// Makes the storage of volume `token`, `capacity` bytes, holding a
    /// copy of `source`. Called only while no record and no storage exist
    /// for the token. The copy is made under a scratch name and renamed
    /// into place, so the volume's path only ever names a complete copy.
    fn create_from(
        &self,
        pool_dir: &Path,
        token: &str,
        capacity: u64,
        source: Source<'_>,
    ) -> Result<()>;

    /// Removes snapshot data or a scratch copy at `path` (a subvolume on
    /// btrfs, a file or a tree otherwise); a missing path is not an error.
    fn discard(&self, path: &Path) -> Result<()> {
        crate::sys::fs::remove_tree(path)
            .map_err(|e| BackendError::io(format!("removing {}", path.display()), e))
    }

    /// Suffixes of the backend's own scratch files in the pool directory
    /// (`.<token><suffix>`): half-made storage of an interrupted call,
    /// removable whenever no call is working on that token.
    fn scratch_suffixes(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Builds the backend for a configured pool.
pub(crate) fn for_pool(pool: &PoolConfig) -> Box<dyn Backend> {
    match pool.kind {
        PoolKind::Dir => Box::new(dir::DirBackend),
        PoolKind::Btrfs => Box::new(btrfs::BtrfsBackend::default()),
        PoolKind::Image => Box::new(image::ImageBackend::new(pool.filesystem())),
    }
}

/// Figures of a mounted filesystem as a volume's usage: used is what the
/// filesystem says is taken, available what an unprivileged writer can
/// still use.
fn usage_of_fs(path: &Path) -> Result<VolumeUsage> {
    let s = crate::sys::fs::space(path)
        .map_err(|e| BackendError::io(format!("statfs {}", path.display()), e))?;
    Ok(VolumeUsage {
        used_bytes: s.total_bytes.saturating_sub(s.free_bytes),
        available_bytes: s.available_bytes,
        total_bytes: s.total_bytes,
        used_inodes: s.total_inodes.saturating_sub(s.free_inodes),
        available_inodes: s.available_inodes,
        total_inodes: s.total_inodes,
    })
}
