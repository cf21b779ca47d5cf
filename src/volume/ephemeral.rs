//! CSI inline ephemeral volumes: a volume a pod's spec asks for inline
//! (`csi:` in `volumes`, volume context `csi.storage.k8s.io/ephemeral:
//! "true"`), made by NodePublishVolume and removed by NodeUnpublishVolume.
//! There is no CreateVolume: the kubelet names the volume
//! (`csi-<sha256 of pod uid and volume name>`) and the volume attributes
//! `pool` and `size` say where and how large. Once made it is a volume like
//! any other of its pool (storage of the pool's kind, size enforced where
//! the kind enforces it, its promise counted in the pool's capacity), with
//! a record that says it is ephemeral.
//!
//! A pool serves them only when its configuration opens it to them, up to
//! its `max_ephemeral_volume_size`: any pod author can write an inline
//! volume, past the StorageClasses and quotas that control claims.
//!
//! # Crash safety
//! Publication makes the volume under a marker (`.<token>.restoring`,
//! as a restore does: whatever sits at the volume's path is the driver's
//! own until the record is written), then its storage, then its record
//! (the commit point, as for CreateVolume), and then binds it;
//! unpublication unbinds, removes the target directory, then the volume
//! (storage, then record). A kill anywhere leaves one of: storage under a
//! marker without a record (removed by the retried publication, which
//! makes it again, by the unpublication, or by the startup sweep), a
//! volume not bound yet (the kubelet's retry binds it, or its unpublish
//! removes it), a target unbound but the volume still there (the retried
//! unpublish removes it: it finds the record and no bind), or nothing (the
//! retried unpublish finds no record and no mount: success).
//!
//! What nobody will unpublish any more is removed by the startup sweep:
//! an ephemeral volume that no mount shows and whose first target is gone
//! together with the target's parent directory. Why that is safe: the
//! kubelet keeps each pod volume's state in that parent directory
//! (`.../volumes/kubernetes.io~csi/<volume>/`, beside the `mount` target)
//! and rebuilds what it must unpublish from it after its own restart;
//! with the directory gone it will neither publish this volume there
//! again nor unpublish it. A volume that no mount shows but whose target
//! or its parent is still there is kept: after a node reboot every bind is
//! gone, and the kubelet publishes the same volume id again for a pod that
//! still runs, which must find its data.

use std::path::Path;

use super::capacity;
use super::id::{VolumeId, token_for_name};
use super::node::{bind_volume, take_off};
use super::pool::Pool;
use super::record::{Access, Ephemeral, Record};
use super::target;
use super::{Result, VolumeError, Volumes};
use crate::sys;
use crate::validate::{CapacityRange, EphemeralVolume, NodePath, PublishVolume};

impl Volumes {
    /// NodePublishVolume of an inline ephemeral volume: makes it in the
    /// pool its attributes name unless it exists, then binds it. A volume
    /// this call made is removed again if the bind fails: the kubelet
    /// does not unpublish what it never saw published.
    pub(super) fn publish_ephemeral(&self, e: &EphemeralVolume, req: &PublishVolume) -> Result<()> {
        let pool = self.select_pool(&e.parameters)?;
        let Some(max) = pool.limits().ephemeral else {
            return Err(VolumeError::EphemeralNotOffered {
                pool: pool.name().to_string(),
                offered: self
                    .pools
                    .iter()
                    .filter(|p| p.limits().ephemeral.is_some())
                    .map(Pool::name)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let size = e.size.unwrap_or(pool.limits().default.min(max));
        if size > max {
            return Err(VolumeError::EphemeralTooLarge {
                pool: pool.name().to_string(),
                size,
                max,
            });
        }
        let target = self.resolve_target(&req.target)?;
        let id = VolumeId::for_name(pool.name(), &e.name);
        let _guard = self.inflight.claim(id.token())?;
        self.check_name_elsewhere(&e.name, &id, pool)?;

        let made = match pool.record(id.token())? {
            Some(rec) => {
                check_existing(&id, pool, &rec, e, size)?;
                pool.ensure_storage(id.token(), &rec)?;
                false
            }
            None => {
                let range = CapacityRange {
                    required: size,
                    limit: 0,
                };
                let capacity = capacity::decide(pool, range)?;
                let reservation = capacity::reserve(pool, id.token(), capacity, None)?;
                let mut record = Record::new(&e.name, pool.kind(), capacity, e.parameters.clone());
                record.root = e.root;
                record.ephemeral = Some(Ephemeral {
                    target: target.clone(),
                });
                pool.create_marked(id.token(), &record)?;
                reservation.commit();
                tracing::info!(volume_id = %id, capacity, pool = %pool.name(), "inline ephemeral volume created");
                true
            }
        };
        bind_volume(&id, pool, &target, req).inspect_err(|_| {
            if made {
                remove(&id, pool);
            }
        })
    }

    /// NodeUnpublishVolume of an id that is not this driver's
    /// `<pool>:<name>`: an inline ephemeral volume's. Its binds at the
    /// target are taken off, and the volume removed once no mount shows
    /// it. Without such a volume, a target that holds no mount is success
    /// (an earlier unpublish finished); one that holds a mount is NOT_FOUND,
    /// and the mount stays.
    pub(super) fn unpublish_ephemeral(&self, name: &str, target: &NodePath) -> Result<()> {
        let token = token_for_name(name);
        let _guard = self.inflight.claim(&token)?;
        let found = self.ephemeral_pool(name, &token)?;
        let resolved = target::resolve(target, &self.pools)?;
        let Some(pool) = found else {
            // Storage made by a publication killed before its record.
            for pool in &self.pools {
                if pool.undo_restore(&token)? {
                    tracing::info!(pool = %pool.name(), volume = %token, "removed a half-made inline ephemeral volume");
                }
            }
            if let Some(t) = &resolved
                && target::exists_unfollowed(t)?
                && target::read_mounts()?.iter().any(|m| m.mount_point == *t)
            {
                return Err(VolumeError::NoSuchVolume(name.to_string()));
            }
            return Ok(());
        };
        let id = VolumeId::listed(pool.name(), &token);
        if let Some(t) = &resolved
            && target::exists_unfollowed(t)?
        {
            // Only binds of this very volume: the id names it.
            let data = pool.volume_path(&token);
            take_off(t, |table, m| {
                Ok(sys::mountinfo::binds_of(table, &data).contains(&m.mount_point))
            })?;
            tracing::info!(volume_id = %id, target = %t.display(), "inline ephemeral volume unpublished");
        }
        let table = target::read_mounts()?;
        if shown(pool, &token, &table) {
            // Published at another target too: removed with the last.
            return pool.unpublished(&token).map_err(Into::into);
        }
        pool.remove(&token, Access::Mount)?;
        tracing::info!(volume_id = %id, "inline ephemeral volume removed");
        Ok(())
    }

    /// The id of the inline ephemeral volume the CO calls `name`, if there
    /// is one.
    pub(super) fn ephemeral_id(&self, name: &str) -> Result<Option<VolumeId>> {
        let token = token_for_name(name);
        Ok(self
            .ephemeral_pool(name, &token)?
            .map(|pool| VolumeId::listed(pool.name(), &token)))
    }

    /// The pool that holds the inline ephemeral volume `name` (of token
    /// `token`), if one does.
    fn ephemeral_pool(&self, name: &str, token: &str) -> Result<Option<&Pool>> {
        for pool in &self.pools {
            if let Some(rec) = pool.record(token)?
                && rec.ephemeral.is_some()
                && rec.name == name
            {
                return Ok(Some(pool));
            }
        }
        Ok(None)
    }

    /// Removes the inline ephemeral volumes nobody will publish or
    /// unpublish any more (see the module's documentation for the rule
    /// and why it is safe); returns how many. Volumes a call holds now
    /// are skipped: that call decides.
    pub(super) fn sweep_ephemeral(&self) -> Result<usize> {
        let mut n = 0;
        for pool in &self.pools {
            for token in pool.page(std::ops::Bound::Unbounded, usize::MAX)? {
                let Ok(_guard) = self.inflight.claim(&token) else {
                    continue;
                };
                let Some(rec) = pool.record(&token)? else {
                    continue;
                };
                let Some(eph) = &rec.ephemeral else { continue };
                if !forgotten(&eph.target) {
                    continue;
                }
                let table = target::read_mounts()?;
                if shown(pool, &token, &table) {
                    continue;
                }
                pool.remove(&token, Access::Mount)?;
                tracing::warn!(
                    pool = %pool.name(),
                    volume = %token,
                    target = %eph.target.display(),
                    "removed an inline ephemeral volume that nothing will unpublish: its target \
                     and the target's parent directory are gone and no mount shows it"
                );
                n += 1;
            }
        }
        Ok(n)
    }
}

/// A repeated publication of an existing volume: it must be this inline
/// ephemeral volume, at least as large as asked.
fn check_existing(
    id: &VolumeId,
    pool: &Pool,
    rec: &Record,
    e: &EphemeralVolume,
    size: u64,
) -> Result<()> {
    if rec.ephemeral.is_none() || rec.name != e.name {
        return Err(VolumeError::NotEphemeral {
            name: e.name.clone(),
            pool: pool.name().to_string(),
        });
    }
    if rec.capacity_bytes < size {
        return Err(VolumeError::OtherSize {
            name: id.to_string(),
            capacity: rec.capacity_bytes,
        });
    }
    Ok(())
}

/// Whether any mount shows the volume's data (a bind of it anywhere).
fn shown(pool: &Pool, token: &str, table: &[sys::mountinfo::MountEntry]) -> bool {
    !sys::mountinfo::binds_of(table, &pool.volume_path(token)).is_empty()
}

/// Whether an ephemeral volume's target and the target's parent directory
/// are both gone (not merely unreadable).
fn forgotten(target: &Path) -> bool {
    let gone = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(_) => false,
        Err(e) => {
            e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::errno::Errno::ENOTDIR as i32)
        }
    };
    gone(target) && target.parent().is_none_or(gone)
}

/// Takes back a volume that this publication made and could not bind.
fn remove(id: &VolumeId, pool: &Pool) {
    match pool.remove(id.token(), Access::Mount) {
        Ok(()) => {
            tracing::info!(volume_id = %id, "inline ephemeral volume removed: it could not be published")
        }
        Err(e) => {
            tracing::warn!(volume_id = %id, error = %e, "cannot remove an inline ephemeral volume that could not be published")
        }
    }
}
