//! Storage backends: how a pool of a given kind makes, sizes, measures and
//! removes the storage behind a volume.
//!
//! Backends work on paths inside their pool directory only and are called
//! with the volume's lock held. Every operation must be idempotent and must
//! cope with the leftovers of an earlier attempt that was killed half-way,
//! because that is exactly what a retried call after a crash looks like.

pub mod dir;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use crate::config::PoolKind;
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
    fn enforces_size(&self) -> bool;

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

    /// Bytes of the pool's filesystem still free for new volumes.
    fn free_bytes(&self, pool_dir: &Path) -> Result<u64> {
        let s = crate::sys::fs::space(pool_dir)
            .map_err(|e| Error::io(format!("statfs {}", pool_dir.display()), e))?;
        Ok(s.available_bytes)
    }

    /// Size of the pool's filesystem, the most any one volume could get.
    fn total_bytes(&self, pool_dir: &Path) -> Result<u64> {
        let s = crate::sys::fs::space(pool_dir)
            .map_err(|e| Error::io(format!("statfs {}", pool_dir.display()), e))?;
        Ok(s.total_bytes)
    }

    /// The directory to bind-mount when publishing (image volumes mount
    /// their filesystem here first).
    fn publish_source(&self, pool_dir: &Path, token: &str) -> Result<PathBuf> {
        Ok(pool_dir.join(token))
    }

    /// Called after an unpublish; `still_published` tells whether other
    /// targets still use the volume.
    fn unpublished(&self, _pool_dir: &Path, _token: &str, _still_published: bool) -> Result<()> {
        Ok(())
    }

    /// What the volume uses; `capacity` is the size promised to the CO.
    fn usage(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<VolumeUsage>;

    /// Grows the volume to `capacity` bytes while it may be in use.
    fn expand(&self, _pool_dir: &Path, _token: &str, _capacity: u64) -> Result<()> {
        Err(Error::Unimplemented(format!(
            "pools of kind {} cannot expand volumes",
            self.kind().as_str()
        )))
    }
}

/// Builds the backend for a pool kind.
pub fn for_kind(kind: PoolKind) -> Box<dyn Backend> {
    match kind {
        PoolKind::Dir => Box::new(dir::DirBackend),
    }
}
