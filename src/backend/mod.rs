//! Storage backends: how a pool of a given kind makes, sizes, measures and
//! removes the storage behind a volume.
//!
//! Backends work on paths inside their pool directory only and are called
//! with the volume's lock held. Every operation must be idempotent and must
//! cope with the leftovers of an earlier attempt that was killed half-way,
//! because that is exactly what a retried call after a crash looks like.

pub mod btrfs;
pub mod dir;
pub mod image;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use crate::config::{PoolConfig, PoolKind};
use crate::error::{Error, Result};

/// What a volume uses and has left, as NodeGetVolumeStats reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeUsage {
    /// Bytes used by this volume alone.
    pub used_bytes: u64,
    /// Bytes it may still write.
    pub available_bytes: u64,
    /// Its size: used plus available.
    pub total_bytes: u64,
    /// Inodes used by this volume alone.
    pub used_inodes: u64,
    /// Inodes it may still create.
    pub available_inodes: u64,
    /// Used plus available inodes.
    pub total_inodes: u64,
}

/// A pool kind's storage operations.
pub trait Backend: Send + Sync + Debug {
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

    /// Makes the storage for volume `token` holding `capacity` bytes at
    /// `pool_dir/token`. Called only while no record exists for the token.
    /// Leftovers of an interrupted attempt are reused or redone; anything
    /// that may hold someone else's data answers ALREADY_EXISTS.
    fn create(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()>;

    /// Removes the storage of volume `token`, including leftovers of an
    /// interrupted earlier delete. Missing storage is not an error.
    fn delete(&self, pool_dir: &Path, token: &str) -> Result<()>;

    /// Size and free bytes of the pool's filesystem, in one `statfs`.
    fn space(&self, pool_dir: &Path) -> Result<crate::sys::fs::FsSpace> {
        crate::sys::fs::space(pool_dir)
            .map_err(|e| Error::io(format!("statfs {}", pool_dir.display()), e))
    }

    /// Makes the volume's data reachable at `pool_dir/token` and returns
    /// that path, the directory to bind-mount when publishing. Image
    /// volumes mount their filesystem there first if it is not (after a
    /// reboot, say); the other kinds only return the path.
    fn make_available(&self, pool_dir: &Path, token: &str) -> Result<PathBuf> {
        Ok(pool_dir.join(token))
    }

    /// Called after each unpublish of the volume, for backends that tidy up
    /// (image pools detach a stray loop device a killed call left).
    fn unpublished(&self, _pool_dir: &Path, _token: &str) -> Result<()> {
        Ok(())
    }

    /// What the volume uses; `capacity` is the size promised to the CO.
    fn usage(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<VolumeUsage>;

    /// Grows the volume to `capacity` bytes while it may be in use (the
    /// controller half of an expansion: raise the limit, grow the image).
    /// Must be idempotent: a retry after a crash calls it again.
    fn expand(&self, _pool_dir: &Path, _token: &str, _capacity: u64) -> Result<()> {
        Err(Error::Unimplemented(format!(
            "pools of kind {} cannot expand volumes",
            self.kind().as_str()
        )))
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

    /// Suffixes of the backend's own scratch files in the pool directory
    /// (`.<token><suffix>`): half-made storage of an interrupted call,
    /// removable whenever no call is working on that token.
    fn scratch_suffixes(&self) -> &'static [&'static str] {
        &[]
    }
}

/// Builds the backend for a configured pool.
pub fn for_pool(pool: &PoolConfig) -> Box<dyn Backend> {
    match pool.kind {
        PoolKind::Dir => Box::new(dir::DirBackend),
        PoolKind::Btrfs => Box::new(btrfs::BtrfsBackend),
        PoolKind::Image => Box::new(image::ImageBackend::new(pool.filesystem())),
    }
}

/// Figures of a mounted filesystem as a volume's usage: used is what the
/// filesystem says is taken, available what an unprivileged writer can
/// still use.
fn usage_of_fs(path: &Path) -> Result<VolumeUsage> {
    let s = crate::sys::fs::space(path)
        .map_err(|e| Error::io(format!("statfs {}", path.display()), e))?;
    Ok(VolumeUsage {
        used_bytes: s.total_bytes.saturating_sub(s.free_bytes),
        available_bytes: s.available_bytes,
        total_bytes: s.total_bytes,
        used_inodes: s.total_inodes.saturating_sub(s.free_inodes),
        available_inodes: s.available_inodes,
        total_inodes: s.total_inodes,
    })
}
