//! `dir` pools: a plain directory per volume.
//!
//! Nothing limits how much a volume writes: the size in the claim is
//! recorded and reported, and the volume context says `sizeEnforced:
//! "false"` rather than pretending otherwise. Usage is measured by walking
//! the volume's own tree, so it is the volume's figure, not the disk's.

use std::io;
use std::path::Path;

use nix::errno::Errno;

use super::{Backend, BackendError, RESTORE, Result, Source, VolumeUsage};
use crate::config::PoolKind;
use crate::sys;

/// Suffix of a volume parked for removal (`.<token>.deleting`): renamed
/// out of its path in one step, then removed; a leftover is swept.
const PARKED: &str = ".deleting";

/// The `dir` backend.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DirBackend;

impl Backend for DirBackend {
    fn kind(&self) -> PoolKind {
        PoolKind::Dir
    }

    fn create(&self, pool_dir: &Path, token: &str, _capacity: u64) -> Result<()> {
        let path = pool_dir.join(token);
        // Private until the pool gives it the StorageClass's mode and owner
        // (`Pool::set_root`), before the volume's record exists.
        match nix::unistd::mkdir(&path, nix::sys::stat::Mode::from_bits_truncate(0o700)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                // Either an earlier attempt of this very call made it before
                // being killed (it is then empty), or somebody else's
                // directory carries the name: never take over data.
                let meta = std::fs::symlink_metadata(&path)
                    .map_err(|e| BackendError::io(format!("inspecting {}", path.display()), e))?;
                let empty = meta.is_dir()
                    && sys::fs::is_empty_dir(&path)
                        .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
                if !empty {
                    return Err(BackendError::Occupied {
                        path,
                        what: "holds data",
                    });
                }
            }
            Err(e) => {
                return Err(BackendError::io(
                    format!("creating {}", path.display()),
                    io::Error::from(e),
                ));
            }
        }
        Ok(())
    }

    fn delete(&self, pool_dir: &Path, token: &str) -> Result<()> {
        let path = pool_dir.join(token);
        let parked = pool_dir.join(format!(".{token}{PARKED}"));
        // Park first: the volume vanishes from its path in one rename, and
        // a delete killed half-way through the tree resumes from the parked
        // copy on retry.
        match std::fs::rename(&path, &parked) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackendError::io(format!("parking {}", path.display()), e)),
        }
        sys::fs::remove_tree(&parked)
            .map_err(|e| BackendError::io(format!("removing {}", parked.display()), e))
    }

    fn scratch_suffixes(&self) -> &'static [&'static str] {
        &[PARKED, RESTORE]
    }

    fn snapshot(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        // A plain directory cannot be frozen: the copy is taken file by
        // file while the volume may still be written (see the README).
        copy_tree(&pool_dir.join(token), dest)
    }

    fn create_from(
        &self,
        pool_dir: &Path,
        token: &str,
        _capacity: u64,
        source: Source<'_>,
    ) -> Result<()> {
        let from = match source {
            Source::Snapshot(p) => p.to_path_buf(),
            Source::Volume(t) => pool_dir.join(t),
        };
        let scratch = pool_dir.join(format!(".{token}{RESTORE}"));
        self.discard(&scratch)?;
        copy_tree(&from, &scratch).inspect_err(|_| {
            let _ = self.discard(&scratch);
        })?;
        // The copy's root has the source's mode and owner until the pool
        // gives it the new volume's (`Pool::set_root`).
        std::fs::rename(&scratch, pool_dir.join(token))
            .map_err(|e| BackendError::io(format!("moving {} into place", scratch.display()), e))
    }

    fn usage(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<VolumeUsage> {
        let path = pool_dir.join(token);
        let used = sys::fs::usage(&path)
            .map_err(|e| BackendError::io(format!("measuring {}", path.display()), e))?;
        let fs = sys::fs::space(&path)
            .map_err(|e| BackendError::io(format!("statfs {}", path.display()), e))?;
        // Nothing caps a dir volume but the disk: what is left is the disk's
        // free space, and the size is what it uses plus that.
        let _ = capacity;
        Ok(VolumeUsage {
            used_bytes: used.bytes,
            available_bytes: fs.available_bytes,
            total_bytes: used.bytes + fs.available_bytes,
            used_inodes: used.inodes,
            available_inodes: fs.available_inodes,
            total_inodes: used.inodes + fs.available_inodes,
        })
    }
}

/// Copies the tree `from` to `dest` and flushes it: a copy that is
/// recorded as made is on disk.
pub(super) fn copy_tree(from: &Path, dest: &Path) -> Result<()> {
    if !from.is_dir() {
        return Err(BackendError::io(
            format!("copying {}", from.display()),
            io::Error::from(io::ErrorKind::NotFound),
        ));
    }
    sys::copy::copy_tree(from, dest).map_err(|source| BackendError::Copy {
        from: from.to_path_buf(),
        source,
    })?;
    sys::copy::sync_fs(dest)
        .map_err(|e| BackendError::io(format!("flushing {}", dest.display()), e))
}
