//! The node's calls: NodePublishVolume (a bind mount), NodeUnpublishVolume,
//! NodeGetVolumeStats and NodeExpandVolume. The paths they are given are
//! the CO's and are handled as hostile (`target`).

use std::path::PathBuf;

use super::id::VolumeId;
use super::pool::Pool;
use super::target::{self, Inspection, MountTable, TargetDir};
use super::{Volumes, not_found};
use crate::backend::VolumeUsage;
use crate::error::{Error, Result};
use crate::sys;
use crate::sys::mountinfo::MountEntry;
use crate::validate::{NodePath, PublishVolume, UnpublishVolume, VolumeAtPath};

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
    pub fn publish(&self, req: &PublishVolume) -> Result<()> {
        let (id, flags) = (&req.id, req.flags);
        let pool = self.pool_of(id)?;
        let target = self.resolve_target(&req.target)?;
        let _guard = self.inflight.claim(id.token())?;

        let source = available_source(id, pool)?;
        let mut mounts = MountTable::default();
        let dir = match target::inspect(&target, &source, &mut mounts)? {
            Inspection::Shows { read_only } if read_only == flags.read_only => return Ok(()),
            Inspection::Shows { read_only } => {
                return Err(Error::AlreadyExists(format!(
                    "volume {id} is already published at {} {}",
                    target.display(),
                    if read_only { "read-only" } else { "read-write" }
                )));
            }
            Inspection::Missing => TargetDir::create(&target)?,
            Inspection::Empty => TargetDir::existing(&target),
        };
        // ReadWriteOncePod: one publication at a time (CSI spec,
        // NodePublishVolume errors: FAILED_PRECONDITION).
        if req.single_writer
            && let Some(at) = sys::mountinfo::binds_of(mounts.get()?, &source)
                .into_iter()
                .find(|m| *m != target)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                at.display()
            )));
        }
        dir.bind(&source, flags)?;
        tracing::info!(volume_id = %id, target = %target.display(), read_only = flags.read_only, "volume published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts the volume from the target and removes
    /// the target directory if it is empty. A target that is already gone
    /// or not mounted is success.
    pub fn unpublish(&self, req: &UnpublishVolume) -> Result<()> {
        let id = &req.id;
        let pool = self.pool_of(id)?;
        let _guard = self.inflight.claim(id.token())?;
        let Some(target) = target::resolve(&req.target, &self.pools)? else {
            return Ok(());
        };
        if !target::exists_unfollowed(&target)? {
            return Ok(());
        }
        // A target may carry the same bind twice after a crash between
        // mount and reply followed by a retry; take them all off. One read
        // of the mount table covers them all.
        let table = target::read_mounts()?;
        let stacked: Vec<&MountEntry> = table.iter().filter(|e| e.mount_point == target).collect();
        if let Some(foreign) = stacked
            .iter()
            .find(|e| !target::is_ours(&self.pools, &table, e))
        {
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
        target::remove_if_empty(&target)?;
        pool.unpublished(id.token())?;
        tracing::info!(volume_id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// NodeGetVolumeStats: the volume's own usage, or an abnormal condition
    /// when its directory has gone missing.
    pub fn stats(&self, req: &VolumeAtPath) -> Result<Stats> {
        let id = &req.id;
        let pool = self.pool_of(id)?;
        let path = target::resolve(&req.path, &self.pools)?.ok_or_else(|| {
            Error::NotFound(format!("volume_path {} does not exist", req.path.display()))
        })?;
        let path_ident = sys::fs::identity(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::NotFound(format!("volume_path {} does not exist", path.display()))
            }
            _ => Error::io(format!("inspecting {}", path.display()), e),
        })?;
        let record = pool.record(id.token())?;
        let data = pool.volume_path(id.token());
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
        Ok(Stats {
            usage: pool.usage(id.token(), capacity)?,
            abnormal: None,
        })
    }

    /// NodeExpandVolume: makes the space the controller added usable in
    /// the mounted volume (grows an image's filesystem). Idempotent.
    /// Returns the volume's capacity.
    pub fn node_expand(&self, req: &VolumeAtPath) -> Result<u64> {
        let (id, volume_path) = (&req.id, &req.path);
        let pool = self.pool_of(id)?;
        let _guard = self.inflight.claim(id.token())?;
        let rec = pool.record(id.token())?.ok_or_else(|| not_found(id))?;
        // Only where the volume is published (CSI spec: NOT_FOUND when the
        // volume is not at volume_path), as for NodeGetVolumeStats.
        let not_here = || {
            Error::NotFound(format!(
                "volume {id} is not published at volume_path {}",
                volume_path.display()
            ))
        };
        let path = target::resolve(volume_path, &self.pools)
            .ok()
            .flatten()
            .ok_or_else(not_here)?;
        let source = pool.make_available(id.token())?;
        let here = sys::fs::identity(&path).map_err(|_| not_here())?;
        if here != target::identity(&source)? || path == source {
            return Err(not_here());
        }
        pool.node_expand(id.token())?;
        tracing::info!(volume_id = %id, capacity = rec.capacity_bytes, "volume expanded on the node");
        Ok(rec.capacity_bytes)
    }

    /// The publish target, resolved (its parent must exist).
    fn resolve_target(&self, target: &NodePath) -> Result<PathBuf> {
        target::resolve(target, &self.pools)?.ok_or_else(|| {
            Error::NotFound(format!(
                "the parent directory of target_path {} does not exist",
                target.display()
            ))
        })
    }
}

/// The directory a volume is bind-mounted from, made available (an image
/// volume's filesystem mounted): NOT_FOUND for no such volume,
/// FAILED_PRECONDITION for a volume whose directory went missing.
fn available_source(id: &VolumeId, pool: &Pool) -> Result<PathBuf> {
    let has_record = pool.record(id.token())?.is_some();
    let data = pool.volume_path(id.token());
    match std::fs::symlink_metadata(&data) {
        Ok(m) if m.is_dir() => pool.make_available(id.token()),
        Ok(_) => Err(Error::NotFound(format!(
            "volume {id}: {} is not a directory",
            data.display()
        ))),
        Err(_) if has_record => Err(Error::FailedPrecondition(format!(
            "volume {id}: its directory {} is missing",
            data.display()
        ))),
        Err(_) => Err(Error::NotFound(format!("volume {id} does not exist"))),
    }
}
