//! Paths the CO names on the node (publish targets, volume paths), treated
//! as hostile: the parent is resolved but the last component is never
//! followed, nothing inside (or above) a pool is accepted, and only
//! mounts whose source is one of the driver's volumes are ever unmounted.
//!
//! NodePublishVolume first inspects its target ([`inspect`]), then acts on
//! what it found through a [`TargetDir`], which owns the undo: a directory
//! the call created is removed again unless the mount was made.

use std::io;
use std::path::{Path, PathBuf};

use super::pool::Pool;
use super::record::Access;
use crate::sys;
use crate::sys::mount::MountFlags;
use crate::sys::mountinfo::MountEntry;
use crate::validate::NodePath;

/// Why a path from the CO cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Looking at the path failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The path lies inside a pool, or a pool inside it: using it could
    /// expose or hide volumes.
    #[error(
        "path {} lies inside or above pool {pool} ({}); refusing to use it",
        path.display(),
        dir.display()
    )]
    InsidePool {
        /// The path as given.
        path: PathBuf,
        /// The pool.
        pool: String,
        /// The pool's directory.
        dir: PathBuf,
    },
    /// The target is a symlink, which is never followed.
    #[error("target_path {} is a symlink; refusing to follow it", .0.display())]
    Symlink(PathBuf),
    /// The target is a file or other non-directory.
    #[error("target_path {} exists and is not a directory", .0.display())]
    NotDirectory(PathBuf),
    /// The target of a raw block volume is a directory: the device node
    /// is bound onto a file.
    #[error(
        "target_path {} is a directory; a raw block volume is published at a file",
        .0.display()
    )]
    NotFile(PathBuf),
    /// Something else is mounted at the target.
    #[error("target_path {} already has another mount; unpublish it first", .0.display())]
    OtherMount(PathBuf),
    /// The target directory holds files, which a mount would hide.
    #[error(
        "target_path {} is not empty; refusing to mount over its contents",
        .0.display()
    )]
    NotEmpty(PathBuf),
}

impl TargetError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        TargetError::Io {
            context: context.into(),
            source,
        }
    }
}

type Result<T, E = TargetError> = std::result::Result<T, E>;

/// Resolves symlinks in the path's parent (kubelet's own directory may be
/// a symlink) and keeps the last component as given; `None` when the
/// parent is not an existing directory (nothing there, or a file: either
/// way nothing can be at the path). Refuses paths inside or above a pool.
pub(super) fn resolve(path: &NodePath, pools: &[Pool]) -> Result<Option<PathBuf>> {
    let (parent, name) = (path.parent(), path.file_name());
    let parent = match std::fs::canonicalize(parent) {
        Ok(p) if p.is_dir() => p,
        Ok(_) => return Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(TargetError::io(
                format!("resolving {}", parent.display()),
                e,
            ));
        }
    };
    let resolved = parent.join(name);
    if let Some(pool) = pools.iter().find(|p| p.overlaps(&resolved)) {
        return Err(TargetError::InsidePool {
            path: path.to_path_buf(),
            pool: pool.name().to_string(),
            dir: pool.dir().to_path_buf(),
        });
    }
    Ok(Some(resolved))
}

/// The mount table, read at most once per call and only if a check needs
/// it: on a node with many mounts, reading it is the costly part.
#[derive(Debug, Default)]
pub(super) struct MountTable(Option<Vec<MountEntry>>);

impl MountTable {
    /// The table, read now if it was not yet.
    pub(super) fn get(&mut self) -> Result<&[MountEntry]> {
        if self.0.is_none() {
            self.0 = Some(read_mounts()?);
        }
        Ok(self.0.as_deref().unwrap_or_default())
    }
}

/// Reads the mount table.
pub(super) fn read_mounts() -> Result<Vec<MountEntry>> {
    sys::mountinfo::read().map_err(|e| TargetError::io("reading the mount table", e))
}

/// What a publish target holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Inspection {
    /// Nothing: the call makes the directory.
    Missing,
    /// An empty directory with nothing mounted on it.
    Empty,
    /// The volume itself (an earlier publish), mounted read-only or not.
    Shows {
        /// Whether that mount is read-only.
        read_only: bool,
    },
}

/// Looks at a publish target without following it: what it holds, or why
/// it cannot be used (a symlink, a file, another mount, someone's files).
/// `source` is the directory the volume is bind-mounted from; `mounts` is
/// read only if the target is a directory that does not show the volume.
pub(super) fn inspect(target: &Path, source: &Path, mounts: &mut MountTable) -> Result<Inspection> {
    let meta = match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Inspection::Missing),
        Err(e) => {
            return Err(TargetError::io(
                format!("inspecting {}", target.display()),
                e,
            ));
        }
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        return Err(TargetError::Symlink(target.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(TargetError::NotDirectory(target.to_path_buf()));
    }
    if identity(target)? == identity(source)? {
        let read_only = sys::fs::space(target)
            .map_err(|e| TargetError::io(format!("statfs {}", target.display()), e))?
            .read_only;
        return Ok(Inspection::Shows { read_only });
    }
    if sys::mountinfo::mounted_at(mounts.get()?, target).is_some() {
        return Err(TargetError::OtherMount(target.to_path_buf()));
    }
    if !sys::fs::is_empty_dir(target)
        .map_err(|e| TargetError::io(format!("reading {}", target.display()), e))?
    {
        return Err(TargetError::NotEmpty(target.to_path_buf()));
    }
    Ok(Inspection::Empty)
}

/// [`inspect`] for a raw block volume, whose target is a file that shows
/// the loop device node `device` once published.
pub(super) fn inspect_file(
    target: &Path,
    device: &Path,
    mounts: &mut MountTable,
) -> Result<Inspection> {
    let meta = match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Inspection::Missing),
        Err(e) => {
            return Err(TargetError::io(
                format!("inspecting {}", target.display()),
                e,
            ));
        }
        Ok(m) => m,
    };
    if meta.file_type().is_symlink() {
        return Err(TargetError::Symlink(target.to_path_buf()));
    }
    if identity(target)? == identity(device)? {
        // Block volumes are never published read-only (validate refuses).
        return Ok(Inspection::Shows { read_only: false });
    }
    if meta.is_dir() {
        return Err(TargetError::NotFile(target.to_path_buf()));
    }
    if sys::mountinfo::mounted_at(mounts.get()?, target).is_some() {
        return Err(TargetError::OtherMount(target.to_path_buf()));
    }
    if !meta.is_file() || meta.len() != 0 {
        return Err(TargetError::NotEmpty(target.to_path_buf()));
    }
    Ok(Inspection::Empty)
}

/// A raw block volume's target file, owning the undo like [`TargetDir`].
#[derive(Debug)]
pub(super) struct TargetFile<'a> {
    path: &'a Path,
    created: bool,
}

impl<'a> TargetFile<'a> {
    /// Makes the target file (its parent exists), never following or
    /// replacing anything there.
    pub(super) fn create(path: &'a Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| TargetError::io(format!("creating target {}", path.display()), e))?;
        Ok(TargetFile {
            path,
            created: true,
        })
    }

    /// An empty target file that was there already (it stays either way).
    pub(super) fn existing(path: &'a Path) -> Self {
        TargetFile {
            path,
            created: false,
        }
    }

    /// Bind-mounts the device node `device` here; the file is kept from
    /// then on.
    pub(super) fn bind(mut self, device: &Path) -> Result<()> {
        sys::mount::bind_file(device, self.path).map_err(|e| {
            TargetError::io(
                format!(
                    "bind-mounting {} at {}",
                    device.display(),
                    self.path.display()
                ),
                e,
            )
        })?;
        self.created = false;
        Ok(())
    }
}

impl Drop for TargetFile<'_> {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

/// Device and inode of a directory, not following a symlink.
pub(super) fn identity(path: &Path) -> Result<(u64, u64)> {
    sys::fs::identity(path)
        .map_err(|e| TargetError::io(format!("inspecting {}", path.display()), e))
}

/// A publish target directory, owning the undo of the call: one it created
/// is removed again when this is dropped before [`TargetDir::bind`]
/// succeeded, so no failure path leaves a stray directory.
#[derive(Debug)]
pub(super) struct TargetDir<'a> {
    path: &'a Path,
    created: bool,
}

impl<'a> TargetDir<'a> {
    /// Makes the target directory (its parent exists).
    pub(super) fn create(path: &'a Path) -> Result<Self> {
        std::fs::create_dir(path)
            .map_err(|e| TargetError::io(format!("creating target {}", path.display()), e))?;
        Ok(TargetDir {
            path,
            created: true,
        })
    }

    /// A target directory that was there already (it stays either way).
    pub(super) fn existing(path: &'a Path) -> Self {
        TargetDir {
            path,
            created: false,
        }
    }

    /// Bind-mounts `source` here with `flags`; the directory is kept from
    /// then on.
    pub(super) fn bind(mut self, source: &Path, flags: MountFlags) -> Result<()> {
        sys::mount::bind(source, self.path, flags).map_err(|e| {
            TargetError::io(
                format!(
                    "bind-mounting {} at {}",
                    source.display(),
                    self.path.display()
                ),
                e,
            )
        })?;
        self.created = false;
        Ok(())
    }
}

impl Drop for TargetDir<'_> {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_dir(self.path);
        }
    }
}

/// Whether `target` exists, not following it: `false` when it is gone,
/// INVALID_ARGUMENT when it is a symlink.
pub(super) fn exists_unfollowed(target: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TargetError::io(
            format!("inspecting {}", target.display()),
            e,
        )),
        Ok(m) if m.file_type().is_symlink() => Err(TargetError::Symlink(target.to_path_buf())),
        Ok(_) => Ok(true),
    }
}

/// Removes an unpublished target directory (or a raw block volume's
/// target file) if it is empty; one that still holds data (it was never a
/// mount) is left in place, with a warning.
pub(super) fn remove_if_empty(target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_file() && m.len() == 0 => {
            return match std::fs::remove_file(target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(TargetError::io(format!("removing {}", target.display()), e))
                }
                _ => Ok(()),
            };
        }
        Ok(m) if !m.is_dir() => {
            tracing::warn!(target = %target.display(), "target is not a mount and not empty; left in place");
            return Ok(());
        }
        _ => {}
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTEMPTY as i32) => {
            tracing::warn!(target = %target.display(), "target is not a mount and not empty; left in place");
            Ok(())
        }
        Err(e) => Err(TargetError::io(format!("removing {}", target.display()), e)),
    }
}

/// Whether a mount's source lies inside one of the pools (directly, or
/// on a filesystem mounted inside a pool, like an image volume's).
pub(super) fn is_ours(pools: &[Pool], table: &[MountEntry], m: &MountEntry) -> bool {
    pools.iter().any(|pool| {
        table.iter().filter(|e| e.device == m.device).any(|e| {
            if let Ok(rel) = pool.dir().strip_prefix(&e.mount_point) {
                m.root.starts_with(e.root.join(rel))
            } else {
                e.mount_point.starts_with(pool.dir()) && m.root.starts_with(&e.root)
            }
        })
    })
}

/// How the bind `m` at a target shows volume `token` of a pool no longer
/// configured, if it does (the pool list cannot say it any more): a
/// filesystem volume's directory ([`is_volume_bind`]), or a raw block
/// volume's loop device ([`is_block_bind`]).
pub(super) fn orphan_bind(table: &[MountEntry], m: &MountEntry, token: &str) -> Option<Access> {
    if is_volume_bind(table, m, token) {
        Some(Access::Mount)
    } else {
        is_block_bind(m, token).then_some(Access::Block)
    }
}

/// True when the bind `m` shows the node of a loop device (the target is a
/// block device, the bound file `/loopN` of the device filesystem) whose
/// file is `<dir>/<token>`, where `<dir>` holds the volume's record file:
/// a raw block volume's file, as `backend::block` names it.
fn is_block_bind(m: &MountEntry, token: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let shows_device = std::fs::symlink_metadata(&m.mount_point)
        .is_ok_and(|meta| meta.file_type().is_block_device());
    let Some(name) = m
        .root
        .strip_prefix("/")
        .ok()
        .and_then(|n| n.to_str())
        .filter(|_| shows_device)
    else {
        return false;
    };
    sys::loopdev::backing_of(name).is_some_and(|file| {
        file.file_name() == Some(std::ffi::OsStr::new(token))
            && file.parent().is_some_and(|dir| {
                exists_unfollowed(&dir.join(super::record::file_name(token))).unwrap_or(false)
            })
    })
}

/// True when the bind `m` shows a volume called `token` of a pool this
/// driver has (or had) configured: somewhere the mount table makes visible
/// (other than through `m` itself), the bound directory is `<dir>/<token>`
/// and `<dir>` holds the volume's record file. Used when the pool is gone
/// from the configuration, so the pool list cannot say it.
fn is_volume_bind(table: &[MountEntry], m: &MountEntry, token: &str) -> bool {
    table
        .iter()
        .filter(|e| e.device == m.device && e.mount_point != m.mount_point)
        .filter_map(|e| {
            let rel = m.root.strip_prefix(&e.root).ok()?;
            Some(e.mount_point.join(rel))
        })
        .any(|seen| {
            seen.file_name() == Some(std::ffi::OsStr::new(token))
                && seen.parent().is_some_and(|dir| {
                    exists_unfollowed(&dir.join(super::record::file_name(token))).unwrap_or(false)
                })
        })
}
