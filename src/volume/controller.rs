//! The controller's calls: CreateVolume, DeleteVolume, ListVolumes,
//! ValidateVolumeCapabilities, GetCapacity and ControllerExpandVolume.
//! Each checks the request against this node, takes the volume's lock,
//! has the pool do the storage work, and describes the result.

use std::ops::Bound;

use super::capacity::{self, Capacity};
use super::id::VolumeId;
use super::pool::Pool;
use super::record::{Access, Record};
use super::{OnDelete, Result, Volume, VolumeError, Volumes};
use crate::sys;
use crate::validate::{CapacityRange, CreateVolume, ExpandVolume, GetCapacity, ListVolumes};

/// The result of ControllerExpandVolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expanded {
    /// The volume's capacity now.
    pub(crate) capacity_bytes: u64,
    /// Whether NodeExpandVolume must follow.
    pub(crate) node_expansion_required: bool,
}

impl Volumes {
    /// CreateVolume: idempotent by name.
    pub(crate) fn create(&self, req: &CreateVolume) -> Result<Volume> {
        let pool = self.select_pool(&req.parameters)?;
        if !self.allows_this_node(&req.requisite) {
            return Err(VolumeError::OtherNode {
                node: self.node_id.clone(),
            });
        }
        let id = VolumeId::for_name(pool.name(), &req.name);
        let _guard = self.inflight.claim(id.token())?;

        self.check_name_elsewhere(&req.name, &id, pool)?;
        let record = match pool.record(id.token())? {
            Some(rec) => existing(&id, pool, rec, req)?,
            None if req.source.is_some() => {
                let source = req.source.as_ref().expect("checked");
                self.create_from(req, source, pool, &id)?
            }
            None => {
                let capacity = capacity::decide(pool, req.capacity)?;
                let reservation = capacity::reserve(pool, id.token(), capacity, None)?;
                let mut record =
                    Record::new(&req.name, pool.kind(), capacity, req.parameters.clone());
                record.access = req.access;
                record.root = req.root;
                pool.create(id.token(), &record)?;
                reservation.commit();
                tracing::info!(volume_id = %id, capacity, pool = %pool.name(), access = ?req.access, "volume created");
                record
            }
        };
        Ok(self.describe(&id, pool, &record))
    }

    /// ALREADY_EXISTS if a volume of this name lives in another pool: a
    /// name is one volume, whichever pool a retry asks for.
    pub(super) fn check_name_elsewhere(
        &self,
        name: &str,
        id: &VolumeId,
        pool: &Pool,
    ) -> Result<()> {
        for other in self.pools.iter().filter(|p| p.name() != pool.name()) {
            if let Some(rec) = other.record(id.token())?
                && rec.name == name
            {
                return Err(VolumeError::NameInOtherPool {
                    name: name.to_string(),
                    pool: other.name().to_string(),
                    requested: pool.name().to_string(),
                });
            }
        }
        Ok(())
    }

    /// DeleteVolume: succeeds for volumes that do not exist; never removes a
    /// directory the driver has no record of. What happens to the data is
    /// the volume's StorageClass's choice (`onDelete`): removed, or moved
    /// to the pool's trash for its retention time.
    pub(crate) fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some(pool) = self.pool(id.pool()) else {
            return Ok(());
        };
        let _guard = self.inflight.claim(id.token())?;
        let Some(record) = pool.record(id.token())? else {
            return Ok(());
        };
        // An inline ephemeral volume is no volume of the controller's: its
        // pod's NodeUnpublishVolume removes it. A DeleteVolume naming it
        // (no CO sends one) finds no volume of its own, which succeeds.
        if record.ephemeral.is_some() {
            return Ok(());
        }
        let table =
            sys::mountinfo::read().map_err(|e| VolumeError::io("reading the mount table", e))?;
        // A block volume is shown through its loop device's node, a
        // filesystem volume through binds of its directory.
        let shown = match record.access {
            Access::Mount => pool.volume_path(id.token()),
            Access::Block => match pool.block_device(id.token())? {
                Some(dev) => dev,
                None => pool.volume_path(id.token()),
            },
        };
        let binds = sys::mountinfo::binds_of(&table, &shown);
        if let Some(at) = binds.first() {
            return Err(VolumeError::StillMounted {
                id: id.clone(),
                at: at.clone(),
            });
        }
        match OnDelete::of_record(&record) {
            OnDelete::Delete => {
                pool.remove(id.token(), record.access)?;
                tracing::info!(volume_id = %id, "volume deleted");
            }
            OnDelete::Archive { retention } => {
                pool.archive(id.token(), &record, retention)?;
                tracing::info!(
                    volume_id = %id,
                    retention_s = retention.as_secs(),
                    "volume archived to the pool's trash"
                );
            }
        }
        Ok(())
    }

    /// ValidateVolumeCapabilities' question to the volume layer: does the
    /// volume exist, and how is it accessed? Volumes with a record do, and
    /// so do static directories an administrator made in a pool (mount
    /// access); NOT_FOUND otherwise.
    pub(crate) fn check_exists(&self, id: &VolumeId) -> Result<Access> {
        let pool = self.pool_of(id)?;
        if let Some(rec) = pool.record(id.token())? {
            return Ok(rec.access);
        }
        match std::fs::symlink_metadata(pool.volume_path(id.token())) {
            Ok(m) if m.is_dir() => Ok(Access::Mount),
            _ => Err(VolumeError::NotFound(id.clone())),
        }
    }

    /// ListVolumes: volumes with records, ordered by id. The paging token
    /// is the id of the first volume of the next page, so it stays valid
    /// when volumes come and go between pages.
    pub(crate) fn list(&self, req: &ListVolumes) -> Result<(Vec<Volume>, String)> {
        let take = req.max_entries;
        // Ids sort as "<pool>:<token>": pools in the order of that prefix,
        // tokens in order within each pool.
        let mut pools: Vec<&Pool> = self.pools.iter().collect();
        pools.sort_by_key(|p| format!("{}:", p.name()));
        let mut out = Vec::new();
        let mut next = String::new();
        'pools: for pool in pools {
            let Some(mut from) = page_start(pool, req.start.as_ref()) else {
                continue;
            };
            loop {
                let want = take.saturating_sub(out.len()).saturating_add(1).min(1024);
                let tokens = pool.page(from.as_ref().map(String::as_str), want)?;
                let Some(last) = tokens.last() else { break };
                from = Bound::Excluded(last.clone());
                for token in &tokens {
                    let id = VolumeId::listed(pool.name(), token);
                    if out.len() == take {
                        next = id.to_string();
                        break 'pools;
                    }
                    // A volume deleted while listing is simply skipped.
                    if let Some(rec) = pool.record(token)? {
                        out.push(self.describe(&id, pool, &rec));
                    }
                }
            }
        }
        Ok((out, next))
    }

    /// GetCapacity for the pool the parameters select: what can still be
    /// promised under the pool's policy, and the largest and smallest
    /// volume it would make now; nothing for topology that is not this
    /// node or capabilities the driver cannot serve.
    pub(crate) fn capacity(&self, req: &GetCapacity) -> Result<Capacity> {
        let pool = self.select_pool(&req.parameters)?;
        if !req.servable || req.topology.as_ref().is_some_and(|t| !self.on_this_node(t)) {
            return Ok(Capacity::default());
        }
        Ok(capacity::report(pool)?)
    }

    /// ControllerExpandVolume: raises the volume's size to at least the
    /// range's `required_bytes`. A volume already that large is left as it
    /// is (CSI spec: success with the current capacity); shrinking is never
    /// done.
    pub(crate) fn expand(&self, req: &ExpandVolume) -> Result<Expanded> {
        let id = &req.id;
        let pool = self.pool_of(id)?;
        let _guard = self.inflight.claim(id.token())?;
        let mut rec = pool
            .record(id.token())?
            .ok_or_else(|| VolumeError::NotFound(id.clone()))?;
        if rec.kind != pool.kind() || !pool.kind().can_expand() {
            return Err(VolumeError::NotExpandable {
                id: id.clone(),
                kind: rec.kind,
            });
        }
        grow(id, pool, &mut rec, req.capacity)?;
        Ok(Expanded {
            capacity_bytes: rec.capacity_bytes,
            node_expansion_required: pool.needs_node_expand() || rec.access == Access::Block,
        })
    }
}

/// Where a listing that starts at volume `start` (none: at the beginning)
/// starts in `pool`; `None` when the pool sorts before it (ids sort as
/// `<pool>:<token>`, so the listing has passed it).
pub(super) fn page_start(pool: &Pool, start: Option<&VolumeId>) -> Option<Bound<String>> {
    let Some(s) = start else {
        return Some(Bound::Unbounded);
    };
    match format!("{}:", pool.name()).cmp(&format!("{}:", s.pool())) {
        std::cmp::Ordering::Less => None,
        std::cmp::Ordering::Equal => Some(Bound::Included(s.token().to_string())),
        std::cmp::Ordering::Greater => Some(Bound::Unbounded),
    }
}

/// Grows volume `id` (its lock held, its record `rec`) to at least the
/// range's `required_bytes`: decides the size, reserves it in the pool's
/// promises, grows the storage and records the size, the record last, so a
/// call killed half-way is finished by the retry (growing storage to the
/// size it already has is a no-op). A volume already that large is left
/// as it is; volumes never shrink.
pub(super) fn grow(
    id: &VolumeId,
    pool: &Pool,
    rec: &mut Record,
    range: CapacityRange,
) -> Result<()> {
    let from = rec.capacity_bytes;
    if let Some(to) = capacity::decide_growth(pool, id, from, range)? {
        let reservation = capacity::reserve(pool, id.token(), to, Some(from))?;
        pool.expand(id.token(), rec, to)?;
        reservation.commit();
        tracing::info!(volume_id = %id, from, to, "volume expanded");
    }
    Ok(())
}

/// A repeated CreateVolume for a name that already has a volume: the same
/// volume if the request is compatible, ALREADY_EXISTS if not.
fn existing(id: &VolumeId, pool: &Pool, rec: Record, req: &CreateVolume) -> Result<Record> {
    if rec.ephemeral.is_some() {
        return Err(VolumeError::EphemeralName(req.name.clone()));
    }
    if rec.name != req.name {
        return Err(VolumeError::OtherName {
            id: id.clone(),
            other: rec.name,
        });
    }
    if !req.capacity.contains(rec.capacity_bytes) {
        return Err(VolumeError::OtherSize {
            name: req.name.clone(),
            capacity: rec.capacity_bytes,
        });
    }
    if rec.access != req.access {
        return Err(VolumeError::OtherAccess {
            name: req.name.clone(),
            access: rec.access,
        });
    }
    let source = req.source.as_ref().map(ToString::to_string);
    if rec.content_source != source {
        return Err(VolumeError::OtherSource {
            name: req.name.clone(),
            from: rec.content_source,
        });
    }
    if rec.root != req.root {
        return Err(VolumeError::OtherRoot {
            name: req.name.clone(),
            root: rec.root,
        });
    }
    if rec.content_source.is_none() {
        pool.ensure_storage(id.token(), &rec)?;
        // Finishes an ensure_storage killed between making the storage
        // and setting its root (harmless when it was not); never once a
        // pod may have changed the root (fsGroup, chmod). A volume made
        // from a source has its root set before its record, under its
        // restore marker, so it needs no such repair.
        if pool.never_published(id.token()) {
            pool.set_root(id.token(), &rec)?;
        }
    }
    Ok(rec)
}
