//! The node's calls: NodePublishVolume (a bind mount), NodeUnpublishVolume,
//! NodeGetVolumeStats and NodeExpandVolume. The paths they are given are
//! the CO's and are handled as hostile (`target`).

use std::path::{Path, PathBuf};

use super::id::VolumeId;
use super::pool::Pool;
use super::record::{Access, Use};
use super::target::{self, Inspection, MountTable, TargetDir, TargetFile};
use super::{Result, VolumeError, Volumes};
use crate::backend::VolumeUsage;
use crate::sys;
use crate::sys::mountinfo::MountEntry;
use crate::validate::{
    NodeExpandVolume, NodePath, PublishOf, PublishVolume, UnpublishVolume, VolumeRef, VolumeStats,
};

/// What NodeGetVolumeStats answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Usage figures (zero when abnormal).
    pub(crate) usage: VolumeUsage,
    /// Why the volume is abnormal, if it is.
    pub(crate) abnormal: Option<String>,
}

impl Volumes {
    /// NodePublishVolume: bind-mounts the volume at the target (an inline
    /// ephemeral volume is made first); idempotent for the same volume and
    /// target.
    pub(crate) fn publish(&self, req: &PublishVolume) -> Result<()> {
        match &req.volume {
            PublishOf::Volume(id) => self.publish_volume(id, req),
            PublishOf::Ephemeral(e) => self.publish_ephemeral(e, req),
        }
    }

    fn publish_volume(&self, id: &VolumeId, req: &PublishVolume) -> Result<()> {
        let pool = self.pool_of(id)?;
        let target = self.resolve_target(&req.target)?;
        let _guard = self.inflight.claim(id.token())?;

        // Static volumes (no record) are directories.
        let access = pool.record(id.token())?.map_or(Access::Mount, |r| r.access);
        if access != req.access {
            return Err(VolumeError::WrongAccess {
                id: id.clone(),
                access,
            });
        }
        if access == Access::Block {
            return publish_block(id, req, pool, &target);
        }
        bind_volume(id, pool, &target, req)
    }

    /// NodeUnpublishVolume: unmounts the volume from the target and removes
    /// the target directory if it is empty (and an inline ephemeral volume
    /// with it). A target that is already gone or not mounted is success.
    pub(crate) fn unpublish(&self, req: &UnpublishVolume) -> Result<()> {
        match &req.volume {
            VolumeRef::Volume(id) => self.unpublish_volume(id, &req.target),
            VolumeRef::Other(name) => self.unpublish_ephemeral(name, &req.target),
        }
    }

    fn unpublish_volume(&self, id: &VolumeId, target: &NodePath) -> Result<()> {
        let pool = match self.pool_of(id) {
            Ok(pool) => pool,
            // A volume that a configured pool holds, asked for under another
            // pool's name, is not this volume: its binds are not taken off.
            Err(e)
                if self
                    .pools
                    .iter()
                    .any(|p| p.dir().join(format!(".{}.meta", id.token())).exists()) =>
            {
                return Err(e);
            }
            Err(_) => return self.unpublish_without_pool(id, target),
        };
        let _guard = self.inflight.claim(id.token())?;
        let access = pool.record(id.token())?.map_or(Access::Mount, |r| r.access);
        // A block volume's device is released whenever nothing shows it
        // any more, also when an earlier unpublish was killed after it
        // removed the target.
        let release = || -> Result<()> {
            if access == Access::Block {
                pool.release_block(id.token(), &target::read_mounts()?)?;
            }
            Ok(())
        };
        let Some(target) = target::resolve(target, &self.pools)? else {
            return release();
        };
        if !target::exists_unfollowed(&target)? {
            return release();
        }
        let taken = take_off(&target, |table, e| match access {
            Access::Mount => Ok(target::is_ours(&self.pools, table, e)),
            Access::Block => Ok(pool.block_shown_by(id.token(), e)?),
        })?;
        match access {
            Access::Mount => pool.unpublished(id.token())?,
            Access::Block => release()?,
        }
        if taken > 0 {
            note_use(pool, id, Use::Unpublished);
        }
        tracing::info!(volume_id = %id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// NodeUnpublishVolume for a volume whose pool is no longer configured
    /// (removed from the config while the volume was still published): the
    /// kubelet would retry a NOT_FOUND forever. A bind at the target is
    /// taken off only when the mount table shows it is ours
    /// ([`target::orphan_bind`]): a directory named after the volume's
    /// token beside the volume's record file (what every pool kind keeps
    /// in its pool directory), or the node of a loop device whose file is
    /// a raw block volume's, named after the token beside its record. A
    /// foreign mount at the target is refused as usual. Then what the
    /// volume holds on the node and no target shows any more is released
    /// ([`Volumes::release_orphaned`]).
    fn unpublish_without_pool(&self, id: &VolumeId, target: &NodePath) -> Result<()> {
        let _guard = self.inflight.claim(id.token())?;
        if let Some(target) = target::resolve(target, &self.pools)?
            && target::exists_unfollowed(&target)?
        {
            let table = target::read_mounts()?;
            let stacked: Vec<&MountEntry> =
                table.iter().filter(|e| e.mount_point == target).collect();
            for e in &stacked {
                target::orphan_bind(&table, e, id.token()).ok_or_else(|| {
                    VolumeError::ForeignMount {
                        target: target.clone(),
                        from: e.source.clone(),
                    }
                })?;
            }
            for _ in &stacked {
                unmount_target(&target)?;
            }
            target::remove_if_empty(&target)?;
            tracing::warn!(volume_id = %id, target = %target.display(), "volume unpublished although its pool is no longer configured");
        }
        self.release_orphaned(id);
        Ok(())
    }

    /// Releases the loop devices and image mounts of volume `id` in pool
    /// directories that are no longer configured, once no target shows
    /// them: nothing else ever would, as the driver deletes no volume of a
    /// pool it does not have. They are found from the files behind the
    /// node's loop devices (a raw block volume's file `<dir>/<token>`, an
    /// image `<dir>/.<token>.img`) in a directory holding the volume's
    /// record, so a retry after an unpublish killed between the unmount
    /// and the release finds them too. A failure is logged, not answered:
    /// the target, which is what the CO asked about, is done.
    fn release_orphaned(&self, id: &VolumeId) {
        let token = id.token();
        let dotted = format!(".{token}.");
        let dirs: std::collections::BTreeSet<PathBuf> = sys::loopdev::attached()
            .into_iter()
            .filter_map(|d| {
                let name = d.backing.file_name()?.to_str()?;
                (name == token || name.starts_with(&dotted))
                    .then(|| d.backing.parent().map(std::path::Path::to_path_buf))
                    .flatten()
            })
            .filter(|dir| !self.pools.iter().any(|p| p.dir() == dir))
            .collect();
        for dir in dirs {
            let Some((pool, rec)) = Pool::orphan(id.pool(), &dir, token) else {
                continue;
            };
            let released = target::read_mounts()
                .map_err(VolumeError::from)
                .and_then(|table| Ok(pool.release_unshown(token, rec.access, &table)?));
            match released {
                Ok(()) => {
                    tracing::info!(volume_id = %id, dir = %dir.display(), "released the loop devices and mounts of a volume of a pool no longer configured that no target shows")
                }
                Err(e) => {
                    tracing::warn!(volume_id = %id, dir = %dir.display(), error = %e, "cannot release what a volume of a pool no longer configured holds on the node")
                }
            }
        }
    }

    /// NodeGetVolumeStats: the volume's own usage, or an abnormal condition
    /// when its directory has gone missing.
    pub(crate) fn stats(&self, req: &VolumeStats) -> Result<Stats> {
        let id = &match &req.volume {
            VolumeRef::Volume(id) => id.clone(),
            VolumeRef::Other(name) => self
                .ephemeral_id(name)?
                .ok_or_else(|| VolumeError::NoSuchVolume(name.clone()))?,
        };
        let pool = self.pool_of(id)?;
        let path = target::resolve(&req.path, &self.pools)?
            .ok_or_else(|| VolumeError::NoVolumePath(req.path.to_path_buf()))?;
        let path_ident = sys::fs::identity(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NoVolumePath(path.clone()),
            _ => VolumeError::io(format!("inspecting {}", path.display()), e),
        })?;
        let record = pool.record(id.token())?;
        if record.as_ref().is_some_and(|r| r.access == Access::Block) {
            return block_stats(id, pool, &path, path_ident);
        }
        let data = pool.volume_path(id.token());
        // An image volume whose own mount is gone (taken off by hand while
        // pods use it; see `health`) is mounted again first, through the
        // loop device their binds hold, so that it is what they show.
        if record.is_some()
            && pool
                .storage_file(id.token())
                .is_some_and(|img| img.is_file())
            && std::fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir())
        {
            pool.make_available(id.token())?;
        }
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
            Err(_) => return Err(VolumeError::Missing(id.clone())),
        };
        if path_ident != data_ident {
            return Err(VolumeError::NotPublishedAt {
                id: id.clone(),
                path,
            });
        }
        let capacity = record.map(|r| r.capacity_bytes).unwrap_or(0);
        // The pool's problems (`health`: read-only, full, size limits that
        // cannot be trusted, ...) are the volume's condition. A pool whose
        // limits cannot be trusted now still reports what the kernel says;
        // if it cannot say anything (btrfs with quotas off has no figures),
        // the condition is the answer.
        let abnormal = self.pool_condition(pool);
        let usage = match pool.usage(id.token(), capacity) {
            Ok(usage) => usage,
            Err(e) if pool.unreliable().is_some() => {
                tracing::debug!(volume_id = %id, error = %e, "no usage figures for a volume of an unreliable pool");
                VolumeUsage::default()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Stats { usage, abnormal })
    }

    /// NodeExpandVolume: makes the space the controller added usable in
    /// the mounted volume (grows an image's filesystem). With `grow` (the
    /// driver's `--expansion=node`) it first does what ControllerExpandVolume
    /// does otherwise: grows the volume to the requested size, promise,
    /// storage and record. Idempotent. Returns the volume's capacity.
    pub(crate) fn node_expand(&self, req: &NodeExpandVolume, grow: bool) -> Result<u64> {
        let (id, volume_path) = (&req.at.id, &req.at.path);
        let pool = self.pool_of(id)?;
        let _guard = self.inflight.claim(id.token())?;
        let mut rec = pool
            .record(id.token())?
            .ok_or_else(|| VolumeError::NotFound(id.clone()))?;
        // Only where the volume is published (CSI spec: NOT_FOUND when the
        // volume is not at volume_path), as for NodeGetVolumeStats.
        let not_here = || VolumeError::NotAtVolumePath {
            id: id.clone(),
            path: volume_path.to_path_buf(),
        };
        let path = target::resolve(volume_path, &self.pools)
            .ok()
            .flatten()
            .ok_or_else(not_here)?;
        if rec.access == Access::Block {
            let dev = pool.block_device(id.token())?.ok_or_else(not_here)?;
            let here = sys::fs::identity(&path).map_err(|_| not_here())?;
            if here != target::identity(&dev)? {
                return Err(not_here());
            }
            pool.refresh_block(id.token())?;
            tracing::info!(volume_id = %id, capacity = rec.capacity_bytes, "block volume expanded on the node");
            return Ok(rec.capacity_bytes);
        }
        let source = pool.make_available(id.token())?;
        let here = sys::fs::identity(&path).map_err(|_| not_here())?;
        if here != target::identity(&source)? || path == source {
            return Err(not_here());
        }
        if grow {
            if rec.kind != pool.kind() || !pool.kind().can_expand() {
                return Err(VolumeError::NotExpandable {
                    id: id.clone(),
                    kind: rec.kind,
                });
            }
            super::controller::grow(id, pool, &mut rec, req.capacity)?;
        }
        pool.node_expand(id.token())?;
        tracing::info!(volume_id = %id, capacity = rec.capacity_bytes, "volume expanded on the node");
        Ok(rec.capacity_bytes)
    }

    /// The publish target, resolved (its parent must exist).
    pub(super) fn resolve_target(&self, target: &NodePath) -> Result<PathBuf> {
        target::resolve(target, &self.pools)?
            .ok_or_else(|| VolumeError::NoTargetParent(target.to_path_buf()))
    }
}

/// Binds filesystem volume `id` of `pool` (its lock held) at `target`, a
/// resolved target path; idempotent for the same volume and target.
pub(super) fn bind_volume(
    id: &VolumeId,
    pool: &Pool,
    target: &Path,
    req: &PublishVolume,
) -> Result<()> {
    let flags = req.flags;
    let source = available_source(id, pool)?;
    let mut mounts = MountTable::default();
    let dir = match target::inspect(target, &source, &mut mounts)? {
        Inspection::Shows { read_only } if read_only == flags.read_only => return Ok(()),
        Inspection::Shows { read_only } => {
            return Err(VolumeError::PublishedOtherwise {
                id: id.clone(),
                target: target.to_path_buf(),
                read_only,
            });
        }
        Inspection::Missing => TargetDir::create(target)?,
        Inspection::Empty => TargetDir::existing(target),
    };
    // ReadWriteOncePod: one publication at a time (CSI spec,
    // NodePublishVolume errors: FAILED_PRECONDITION).
    if req.single_writer
        && let Some(at) = sys::mountinfo::binds_of(mounts.get()?, &source)
            .into_iter()
            .find(|m| m != target)
    {
        return Err(VolumeError::SingleWriter { id: id.clone(), at });
    }
    dir.bind(&source, flags)?;
    note_use(pool, id, Use::Published);
    tracing::info!(volume_id = %id, target = %target.display(), read_only = flags.read_only, "volume published");
    Ok(())
}

/// Takes every mount off `target` (a target can carry the same bind twice
/// after a crash between mount and reply followed by a retry; one read of
/// the mount table covers them all) and removes the target directory if it
/// is empty; returns how many it took off. Nothing is taken off unless
/// `ours` says every one of them shows this volume: a foreign mount is
/// refused.
pub(super) fn take_off(
    target: &Path,
    ours: impl Fn(&[MountEntry], &MountEntry) -> Result<bool>,
) -> Result<usize> {
    let table = target::read_mounts()?;
    let stacked: Vec<&MountEntry> = table.iter().filter(|e| e.mount_point == target).collect();
    for e in &stacked {
        if !ours(&table, e)? {
            return Err(VolumeError::ForeignMount {
                target: target.to_path_buf(),
                from: e.source.clone(),
            });
        }
    }
    for _ in &stacked {
        unmount_target(target)?;
    }
    target::remove_if_empty(target)?;
    Ok(stacked.len())
}

/// Records when the volume was published or unpublished. The mount is
/// done (or undone) by then, so a failure to record the time is logged,
/// not answered: the call itself succeeded.
fn note_use(pool: &Pool, id: &VolumeId, what: Use) {
    if let Err(e) = pool.mark(id.token(), what) {
        tracing::warn!(volume_id = %id, error = %e, "cannot record the time of this use");
    }
}

/// Unmounts the volume at a target, waiting up to two seconds while the
/// kernel says it is busy (EBUSY) before the CO hears of it. Two kinds of
/// short-lived users are expected: udev probes a raw block volume's loop
/// device after every change, through any node of it; and a process
/// forked (not yet exec'd) while someone held a file in the target keeps
/// a copy of that descriptor until it execs, which on a loaded node can
/// take a while (a driver killed between its `posix_spawn`'s clone and
/// exec leaves such a child; so does any program that spawns while it
/// writes into a volume). The first refusal is logged with the processes
/// using the target, and a refusal that outlasts the wait is answered
/// ABORTED naming them ([`VolumeError::TargetBusy`]), for the CO to retry.
fn unmount_target(target: &std::path::Path) -> Result<()> {
    const TRIES: u32 = 100;
    let mut tries = 0;
    loop {
        let e = match sys::mount::unmount(target) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if e.raw_os_error() != Some(nix::errno::Errno::EBUSY as i32) {
            return Err(VolumeError::io(
                format!("unmounting {}", target.display()),
                e,
            ));
        }
        tries += 1;
        if tries == TRIES {
            return Err(VolumeError::TargetBusy {
                target: target.to_path_buf(),
                users: sys::mount::users(target),
            });
        }
        if tries == 1 {
            let users: Vec<String> = sys::mount::users(target)
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::warn!(target = %target.display(), ?users, "target busy; unmount retried for up to 2 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// NodePublishVolume of a raw block volume: its loop device (attached now
/// if it is not) bound onto the target file. A device attached here for a
/// publication that then fails is released again.
fn publish_block(id: &VolumeId, req: &PublishVolume, pool: &Pool, target: &Path) -> Result<()> {
    let dev = pool.attach_block(id.token())?;
    let publish = || -> Result<()> {
        let mut mounts = MountTable::default();
        let file = match target::inspect_file(target, &dev, &mut mounts)? {
            Inspection::Shows { .. } => return Ok(()),
            Inspection::Missing => TargetFile::create(target)?,
            Inspection::Empty => TargetFile::existing(target),
        };
        if req.single_writer
            && let Some(at) = sys::mountinfo::binds_of(mounts.get()?, &dev)
                .into_iter()
                .find(|m| m != target)
        {
            return Err(VolumeError::SingleWriter { id: id.clone(), at });
        }
        file.bind(&dev)?;
        note_use(pool, id, Use::Published);
        tracing::info!(volume_id = %id, target = %target.display(), device = %dev.display(), "block volume published");
        Ok(())
    };
    publish().inspect_err(|_| {
        if let Ok(table) = target::read_mounts() {
            let _ = pool.release_block(id.token(), &table);
        }
    })
}

/// NodeGetVolumeStats of a raw block volume published at `path`: its size
/// (and what its sparse file holds on the pool's disk).
fn block_stats(
    id: &VolumeId,
    pool: &Pool,
    path: &std::path::Path,
    path_ident: (u64, u64),
) -> Result<Stats> {
    let not_here = || VolumeError::NotPublishedAt {
        id: id.clone(),
        path: path.to_path_buf(),
    };
    let dev = pool.block_device(id.token())?.ok_or_else(not_here)?;
    if target::identity(&dev)? != path_ident {
        return Err(not_here());
    }
    Ok(Stats {
        usage: pool.block_usage(id.token())?,
        abnormal: None,
    })
}

/// The directory a volume is bind-mounted from, made available (an image
/// volume's filesystem mounted): NOT_FOUND for no such volume,
/// FAILED_PRECONDITION for a volume whose directory went missing.
fn available_source(id: &VolumeId, pool: &Pool) -> Result<PathBuf> {
    let has_record = pool.record(id.token())?.is_some();
    let data = pool.volume_path(id.token());
    match std::fs::symlink_metadata(&data) {
        Ok(m) if m.is_dir() => Ok(pool.make_available(id.token())?),
        Ok(_) => Err(VolumeError::NotADirectory {
            id: id.clone(),
            path: data,
        }),
        Err(_) if has_record => Err(VolumeError::DirectoryMissing {
            id: id.clone(),
            path: data,
        }),
        Err(_) => Err(VolumeError::Missing(id.clone())),
    }
}
