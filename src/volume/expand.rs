//! ControllerExpandVolume and NodeExpandVolume: growing a volume while it
//! is in use, within the pool's size policy.

use super::Volumes;
use super::capacity::{check_ceiling, round_up};
use crate::error::{Error, Result};
use crate::validate::CapacityRange;

/// The result of ControllerExpandVolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    /// The volume's capacity now.
    pub capacity_bytes: u64,
    /// Whether NodeExpandVolume must follow.
    pub node_expansion_required: bool,
}

impl Volumes {
    /// ControllerExpandVolume: raises the volume's size to at least
    /// `range.required`. A volume already that large is left as it is (CSI
    /// spec: success with the current capacity); shrinking is never done.
    pub fn expand(&self, raw_id: &str, range: CapacityRange) -> Result<Expanded> {
        let (id, pool) = self.locate(raw_id)?;
        if range.required == 0 && range.limit == 0 {
            return Err(Error::InvalidArgument(
                "capacity_range with required_bytes or limit_bytes is required".into(),
            ));
        }
        let _guard = self.inflight.claim(&id.token)?;
        let mut rec = pool
            .read_record(&id.token)?
            .ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist")))?;
        if rec.kind != pool.backend.kind() || !pool.backend.kind().can_expand() {
            return Err(Error::Unimplemented(format!(
                "volume {id} is of kind {}, which cannot be expanded",
                rec.kind.as_str()
            )));
        }
        let needs_node = pool.backend.needs_node_expand();
        let wanted = range.required.max(1);
        if rec.capacity_bytes >= wanted {
            if range.limit != 0 && rec.capacity_bytes > range.limit {
                return Err(Error::OutOfRange(format!(
                    "volume {id} already has {} bytes, more than limit_bytes {}; \
                     volumes cannot shrink",
                    rec.capacity_bytes, range.limit
                )));
            }
            return Ok(Expanded {
                capacity_bytes: rec.capacity_bytes,
                node_expansion_required: needs_node,
            });
        }
        let capacity = round_up(wanted, pool.backend.granularity());
        if range.limit != 0 && capacity > range.limit {
            return Err(Error::OutOfRange(format!(
                "{capacity} bytes (rounded to {} bytes) exceed limit_bytes {}",
                pool.backend.granularity(),
                range.limit
            )));
        }
        check_ceiling(pool, capacity)?;
        let reservation = self.reserve(pool, &id.token, capacity, Some(rec.capacity_bytes))?;
        pool.backend.expand(&pool.dir, &id.token, capacity)?;
        let from = rec.capacity_bytes;
        rec.capacity_bytes = capacity;
        pool.write_record(&id.token, &rec)?;
        pool.sync()?;
        reservation.commit();
        tracing::info!(volume_id = %id, from, to = capacity, "volume expanded");
        Ok(Expanded {
            capacity_bytes: capacity,
            node_expansion_required: needs_node,
        })
    }

    /// NodeExpandVolume: makes the space the controller added usable in
    /// the mounted volume (grows an image's filesystem). Idempotent.
    /// Returns the volume's capacity.
    pub fn node_expand(&self, raw_id: &str, volume_path: &std::path::Path) -> Result<u64> {
        let (id, pool) = self.locate(raw_id)?;
        let _guard = self.inflight.claim(&id.token)?;
        let rec = pool
            .read_record(&id.token)?
            .ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist")))?;
        // Only where the volume is published (CSI spec: NOT_FOUND when the
        // volume is not at volume_path), as for NodeGetVolumeStats.
        let not_here = || {
            Error::NotFound(format!(
                "volume {id} is not published at volume_path {}",
                volume_path.display()
            ))
        };
        let path = self
            .resolve_existing_parent(volume_path)
            .ok()
            .flatten()
            .ok_or_else(not_here)?;
        let source = pool.backend.publish_source(&pool.dir, &id.token)?;
        let here = crate::sys::fs::identity(&path).map_err(|_| not_here())?;
        let there = crate::sys::fs::identity(&source)
            .map_err(|e| Error::io(format!("inspecting {}", source.display()), e))?;
        if here != there || path == source {
            return Err(not_here());
        }
        pool.backend.node_expand(&pool.dir, &id.token)?;
        tracing::info!(volume_id = %id, capacity = rec.capacity_bytes, "volume expanded on the node");
        Ok(rec.capacity_bytes)
    }
}
