//! Node-side operations: publish (bind mount), unpublish, usage stats.
//!
//! Target paths come from the CO and are treated as hostile: the final
//! component must not be a symlink, the target must not be inside (or
//! above) a pool, and only mounts whose source is one of the driver's
//! volumes are ever unmounted.

use std::io;
use std::path::{Path, PathBuf};

use super::Volumes;
use crate::backend::VolumeUsage;
use crate::error::{Error, Result};
use crate::sys;
use crate::sys::mountinfo::MountEntry;
use crate::validate::{AccessMode, AccessType, Capability};

/// A checked NodePublishVolume request.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Volume id.
    pub volume_id: String,
    /// Where to mount it (checked by `validate::node_path`).
    pub target: PathBuf,
    /// The capability to publish with.
    pub capability: Capability,
    /// Whether the CO asks for a read-only mount.
    pub read_only: bool,
}

/// What NodeGetVolumeStats answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Usage figures (zero when abnormal).
    pub usage: VolumeUsage,
    /// Why the volume is abnormal, if it is.
    pub abnormal: Option<String>,
}

impl Volumes {
    /// NodePublishVolume: bind-mounts the volume at the target; idempotent
    /// for the same volume and target.
    pub fn publish(&self, req: &PublishRequest) -> Result<()> {
        let (id, pool) = self.locate(&req.volume_id)?;
        if let Some(why) = req.capability.unsupported_reason() {
            return Err(Error::InvalidArgument(why));
        }
        let AccessType::Mount { flags, .. } = req.capability.access else {
            return Err(Error::InvalidArgument(
                "only mount access is supported".into(),
            ));
        };
        let target = self.resolve_target(&req.target)?;
        let _guard = self.inflight.claim(&id.token)?;

        let has_record = pool.read_record(&id.token)?.is_some();
        let data = pool.volume_path(&id.token);
        match std::fs::symlink_metadata(&data) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::NotFound(format!(
                    "volume {id}: {} is not a directory",
                    data.display()
                )));
            }
            Err(_) if has_record => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id}: its directory {} is missing",
                    data.display()
                )));
            }
            Err(_) => return Err(Error::NotFound(format!("volume {id} does not exist"))),
        }
        let source = pool.backend.publish_source(&pool.dir, &id.token)?;
        let source_ident = sys::fs::identity(&source)
            .map_err(|e| Error::io(format!("inspecting {}", source.display()), e))?;

        let opts = sys::mount::BindOptions {
            read_only: req.read_only
                || flags.read_only
                || req.capability.mode == AccessMode::SingleNodeReaderOnly,
            nosuid: flags.nosuid,
            nodev: flags.nodev,
            noexec: flags.noexec,
            noatime: flags.noatime,
        };
        let single_writer = req.capability.mode == AccessMode::SingleNodeSingleWriter;
        let created = match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&target)
                    .map_err(|e| Error::io(format!("creating target {}", target.display()), e))?;
                true
            }
            Err(e) => return Err(Error::io(format!("inspecting {}", target.display()), e)),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::InvalidArgument(format!(
                    "target_path {} is a symlink; refusing to follow it",
                    target.display()
                )));
            }
            Ok(m) if !m.is_dir() => {
                return Err(Error::InvalidArgument(format!(
                    "target_path {} exists and is not a directory",
                    target.display()
                )));
            }
            Ok(_) => {
                let ident = sys::fs::identity(&target)
                    .map_err(|e| Error::io(format!("inspecting {}", target.display()), e))?;
                if ident == source_ident {
                    let ro = sys::fs::space(&target)
                        .map_err(|e| Error::io(format!("statfs {}", target.display()), e))?
                        .read_only;
                    if ro == opts.read_only {
                        return Ok(());
                    }
                    return Err(Error::AlreadyExists(format!(
                        "volume {id} is already published at {} {}",
                        target.display(),
                        if ro { "read-only" } else { "read-write" }
                    )));
                }
                let table = read_mounts()?;
                if sys::mountinfo::mounted_at(&table, &target).is_some() {
                    return Err(Error::FailedPrecondition(format!(
                        "target_path {} already has another mount; unpublish it first",
                        target.display()
                    )));
                }
                if !sys::fs::is_empty_dir(&target)
                    .map_err(|e| Error::io(format!("reading {}", target.display()), e))?
                {
                    return Err(Error::FailedPrecondition(format!(
                        "target_path {} is not empty; refusing to mount over its contents",
                        target.display()
                    )));
                }
                false
            }
        };
        // ReadWriteOncePod: one publication at a time (CSI spec,
        // NodePublishVolume errors: FAILED_PRECONDITION).
        if single_writer {
            let table = read_mounts()?;
            if let Some(at) = sys::mountinfo::binds_of(&table, &source)
                .into_iter()
                .find(|m| *m != target)
            {
                if created {
                    let _ = std::fs::remove_dir(&target);
                }
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                    at.display()
                )));
            }
        }
        if let Err(e) = sys::mount::bind(&source, &target, opts) {
            if created {
                let _ = std::fs::remove_dir(&target);
            }
            return Err(Error::io(
                format!("bind-mounting {} at {}", source.display(), target.display()),
                e,
            ));
        }
        tracing::info!(volume_id = %id, target = %target.display(), read_only = opts.read_only, "volume published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts the volume from the target and removes
    /// the target directory if it is empty. A target that is already gone
    /// or not mounted is success.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<()> {
        let (id, pool) = self.locate(volume_id)?;
        let _guard = self.inflight.claim(&id.token)?;
        let Some(target) = self.resolve_existing_parent(target)? else {
            return Ok(());
        };
        match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("inspecting {}", target.display()), e)),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::InvalidArgument(format!(
                    "target_path {} is a symlink; refusing to follow it",
                    target.display()
                )));
            }
            Ok(_) => {}
        }
        // A target may carry the same bind twice after a crash between
        // mount and reply followed by a retry; take them all off. One read
        // of the mount table covers them all: it is the costly part on a
        // node with many mounts.
        let table = read_mounts()?;
        let stacked: Vec<&MountEntry> = table.iter().filter(|e| e.mount_point == target).collect();
        if let Some(foreign) = stacked.iter().find(|e| !self.is_our_mount(&table, e)) {
            return Err(Error::FailedPrecondition(format!(
                "{} is mounted from {}, which is not a volume of this driver; refusing to unmount it",
                target.display(),
                foreign.source
            )));
        }
        for _ in &stacked {
            sys::mount::unmount(&target)
                .map_err(|e| Error::io(format!("unmounting {}", target.display()), e))?;
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTEMPTY as i32) => {
                tracing::warn!(target = %target.display(), "target is not a mount and not empty; left in place");
            }
            Err(e) => return Err(Error::io(format!("removing {}", target.display()), e)),
        }
        pool.backend.unpublished(&pool.dir, &id.token)?;
        tracing::info!(volume_id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// NodeGetVolumeStats: the volume's own usage, or an abnormal condition
    /// when its directory has gone missing.
    pub fn stats(&self, volume_id: &str, volume_path: &Path) -> Result<Stats> {
        let (id, pool) = self.locate(volume_id)?;
        let path = self.resolve_existing_parent(volume_path)?.ok_or_else(|| {
            Error::NotFound(format!(
                "volume_path {} does not exist",
                volume_path.display()
            ))
        })?;
        let path_ident = sys::fs::identity(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Error::NotFound(format!("volume_path {} does not exist", path.display()))
            }
            _ => Error::io(format!("inspecting {}", path.display()), e),
        })?;
        let record = pool.read_record(&id.token)?;
        let data = pool.volume_path(&id.token);
        let data_ident = match sys::fs::identity(&data) {
            Ok(i) => i,
            Err(_) if record.is_some() => {
                return Ok(Stats {
                    usage: VolumeUsage::default(),
                    abnormal: Some(format!(
                        "the volume's directory {} is missing on node {}",
                        data.display(),
                        self.node_id
                    )),
                });
            }
            Err(_) => return Err(Error::NotFound(format!("volume {id} does not exist"))),
        };
        if path_ident != data_ident {
            return Err(Error::NotFound(format!(
                "volume {id} is not published at {}",
                path.display()
            )));
        }
        let capacity = record.map(|r| r.capacity_bytes).unwrap_or(0);
        let usage = pool.backend.usage(&pool.dir, &id.token, capacity)?;
        Ok(Stats {
            usage,
            abnormal: None,
        })
    }

    /// Resolves symlinks in the target's parent (kubelet's own directory
    /// may be a symlink), keeps the last component as given, and refuses
    /// targets inside or above a pool.
    fn resolve_target(&self, target: &Path) -> Result<PathBuf> {
        self.resolve_existing_parent(target)?.ok_or_else(|| {
            Error::NotFound(format!(
                "the parent directory of target_path {} does not exist",
                target.display()
            ))
        })
    }

    pub(super) fn resolve_existing_parent(&self, target: &Path) -> Result<Option<PathBuf>> {
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(Error::InvalidArgument(format!(
                "{} is not a usable path",
                target.display()
            )));
        };
        let parent = match std::fs::canonicalize(parent) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("resolving {}", parent.display()), e)),
        };
        let resolved = parent.join(name);
        if let Some(pool) = self.pools.iter().find(|p| p.overlaps(&resolved)) {
            return Err(Error::InvalidArgument(format!(
                "path {} lies inside or above pool {} ({}); refusing to use it",
                target.display(),
                pool.name,
                pool.dir.display()
            )));
        }
        Ok(Some(resolved))
    }

    /// Whether a mount's source lies inside one of the pools (directly, or
    /// on a filesystem mounted inside a pool, like an image volume's).
    fn is_our_mount(&self, table: &[MountEntry], m: &MountEntry) -> bool {
        self.pools.iter().any(|pool| {
            table.iter().filter(|e| e.device == m.device).any(|e| {
                if let Ok(rel) = pool.dir.strip_prefix(&e.mount_point) {
                    m.root.starts_with(e.root.join(rel))
                } else {
                    e.mount_point.starts_with(&pool.dir) && m.root.starts_with(&e.root)
                }
            })
        })
    }
}

fn read_mounts() -> Result<Vec<MountEntry>> {
    sys::mountinfo::read().map_err(|e| Error::io("reading the mount table", e))
}
