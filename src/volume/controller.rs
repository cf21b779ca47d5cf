//! The controller's calls: CreateVolume, DeleteVolume, ListVolumes,
//! ValidateVolumeCapabilities, GetCapacity and ControllerExpandVolume.
//! Each checks the request against this node, takes the volume's lock,
//! has the pool do the storage work, and describes the result.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::capacity::{self, Capacity};
use super::id::VolumeId;
use super::pool::Pool;
use super::record::Record;
use super::{Volume, Volumes};
use crate::error::{Error, Result};
use crate::sys;
use crate::validate::{Capability, CapacityRange};

/// A checked CreateVolume request.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// CO-chosen name; the key for idempotency.
    pub name: String,
    /// Size range.
    pub capacity: CapacityRange,
    /// Requested capabilities (at least one).
    pub capabilities: Vec<Capability>,
    /// StorageClass parameters plus what the provisioner adds.
    pub parameters: BTreeMap<String, String>,
    /// Topology segments of which the volume must be in one (empty: any).
    pub requisite: Vec<BTreeMap<String, String>>,
}

/// The result of ControllerExpandVolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    /// The volume's capacity now.
    pub capacity_bytes: u64,
    /// Whether NodeExpandVolume must follow.
    pub node_expansion_required: bool,
}

impl Volumes {
    /// CreateVolume: idempotent by name.
    pub fn create(&self, req: &CreateRequest) -> Result<Volume> {
        for c in &req.capabilities {
            if let Some(why) = c.unsupported_reason() {
                return Err(Error::InvalidArgument(why));
            }
        }
        let pool = self.select_pool(&req.parameters)?;
        if !req.requisite.is_empty() && !req.requisite.iter().any(|s| self.on_this_node(s)) {
            return Err(Error::ResourceExhausted(format!(
                "volumes of this driver live on node {}, which none of the required topology segments allows",
                self.node_id
            )));
        }
        let id = VolumeId::for_name(pool.name(), &req.name);
        let _guard = self.inflight.claim(&id.token)?;

        self.check_name_elsewhere(&req.name, &id, pool)?;
        let record = match pool.record(&id.token)? {
            Some(rec) => existing(&id, pool, rec, req)?,
            None => {
                let capacity = capacity::decide(pool, req.capacity)?;
                let reservation = capacity::reserve(pool, &id.token, capacity, None)?;
                let record = Record::new(&req.name, pool.kind(), capacity, req.parameters.clone());
                pool.create(&id.token, &record)?;
                reservation.commit();
                tracing::info!(volume_id = %id, capacity, pool = %pool.name(), "volume created");
                record
            }
        };
        Ok(self.describe(&id, pool, &record))
    }

    /// ALREADY_EXISTS if a volume of this name lives in another pool: a
    /// name is one volume, whichever pool a retry asks for.
    fn check_name_elsewhere(&self, name: &str, id: &VolumeId, pool: &Pool) -> Result<()> {
        for other in self.pools.iter().filter(|p| p.name() != pool.name()) {
            if let Some(rec) = other.record(&id.token)?
                && rec.name == name
            {
                return Err(Error::AlreadyExists(format!(
                    "a volume named {name:?} already exists in pool {}, not in the requested pool {}",
                    other.name(),
                    pool.name()
                )));
            }
        }
        Ok(())
    }

    /// DeleteVolume: succeeds for volumes that do not exist; never removes a
    /// directory the driver has no record of.
    pub fn delete(&self, raw_id: &str) -> Result<()> {
        let Ok((id, pool)) = self.locate(raw_id) else {
            return Ok(());
        };
        let _guard = self.inflight.claim(&id.token)?;
        if pool.record(&id.token)?.is_none() {
            return Ok(());
        }
        let table = sys::mountinfo::read().map_err(|e| Error::io("reading the mount table", e))?;
        let binds = sys::mountinfo::binds_of(&table, &pool.volume_path(&id.token));
        if let Some(at) = binds.first() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still mounted at {}; unpublish it first",
                at.display()
            )));
        }
        pool.remove(&id.token)?;
        tracing::info!(volume_id = %id, "volume deleted");
        Ok(())
    }

    /// Looks a volume up for ValidateVolumeCapabilities: volumes with a
    /// record, and static directories an administrator made in a pool;
    /// NOT_FOUND otherwise.
    fn check_exists(&self, raw_id: &str) -> Result<()> {
        let (id, pool) = self.locate(raw_id)?;
        if pool.record(&id.token)?.is_some() {
            return Ok(());
        }
        match std::fs::symlink_metadata(pool.volume_path(&id.token)) {
            Ok(m) if m.is_dir() => Ok(()),
            _ => Err(Error::NotFound(format!("volume {raw_id:?} does not exist"))),
        }
    }

    /// ValidateVolumeCapabilities: `Ok(None)` confirms, `Ok(Some(why))`
    /// declines with a reason.
    pub fn validate(&self, raw_id: &str, caps: &[Capability]) -> Result<Option<String>> {
        self.check_exists(raw_id)?;
        Ok(caps.iter().find_map(Capability::unsupported_reason))
    }

    /// ListVolumes: volumes with records, ordered by id. The paging token
    /// is the id of the first volume of the next page, so it stays valid
    /// when volumes come and go between pages.
    pub fn list(&self, starting_token: &str, max_entries: i32) -> Result<(Vec<Volume>, String)> {
        if max_entries < 0 {
            return Err(Error::InvalidArgument(
                "max_entries must not be negative".into(),
            ));
        }
        if !starting_token.is_empty() && VolumeId::parse(starting_token).is_none() {
            return Err(Error::Aborted(format!(
                "starting_token {starting_token:?} was not issued by this driver; list again from the start"
            )));
        }
        let take = if max_entries == 0 {
            usize::MAX
        } else {
            max_entries as usize
        };
        // Ids sort as "<pool>:<token>": pools in the order of that prefix,
        // tokens in order within each pool.
        let start = VolumeId::parse(starting_token);
        let mut pools: Vec<&Pool> = self.pools.iter().collect();
        pools.sort_by_key(|p| format!("{}:", p.name()));
        let mut out = Vec::new();
        let mut next = String::new();
        'pools: for pool in pools {
            let mut from = match &start {
                None => Bound::Unbounded,
                Some(s) => match format!("{}:", pool.name()).cmp(&format!("{}:", s.pool)) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => Bound::Included(s.token.clone()),
                    std::cmp::Ordering::Greater => Bound::Unbounded,
                },
            };
            loop {
                let want = take.saturating_sub(out.len()).saturating_add(1).min(1024);
                let tokens = pool.page(from.as_ref().map(String::as_str), want)?;
                let Some(last) = tokens.last() else { break };
                from = Bound::Excluded(last.clone());
                for token in &tokens {
                    let id = VolumeId {
                        pool: pool.name().to_string(),
                        token: token.clone(),
                    };
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
    pub fn capacity(
        &self,
        parameters: &BTreeMap<String, String>,
        caps: &[Capability],
        topology: Option<&BTreeMap<String, String>>,
    ) -> Result<Capacity> {
        let pool = self.select_pool(parameters)?;
        if topology.is_some_and(|t| !self.on_this_node(t))
            || caps.iter().any(|c| c.unsupported_reason().is_some())
        {
            return Ok(Capacity::default());
        }
        capacity::report(pool)
    }

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
            .record(&id.token)?
            .ok_or_else(|| Error::NotFound(format!("volume {raw_id:?} does not exist")))?;
        if rec.kind != pool.kind() || !pool.kind().can_expand() {
            return Err(Error::Unimplemented(format!(
                "volume {id} is of kind {}, which cannot be expanded",
                rec.kind.as_str()
            )));
        }
        let from = rec.capacity_bytes;
        if let Some(to) = capacity::decide_growth(pool, &id, from, range)? {
            let reservation = capacity::reserve(pool, &id.token, to, Some(from))?;
            pool.expand(&id.token, &mut rec, to)?;
            reservation.commit();
            tracing::info!(volume_id = %id, from, to, "volume expanded");
        }
        Ok(Expanded {
            capacity_bytes: rec.capacity_bytes,
            node_expansion_required: pool.needs_node_expand(),
        })
    }
}

/// A repeated CreateVolume for a name that already has a volume: the same
/// volume if the request is compatible, ALREADY_EXISTS if not.
fn existing(id: &VolumeId, pool: &Pool, rec: Record, req: &CreateRequest) -> Result<Record> {
    if rec.name != req.name {
        return Err(Error::AlreadyExists(format!(
            "volume {id} belongs to another name ({:?})",
            rec.name
        )));
    }
    if !req.capacity.contains(rec.capacity_bytes) {
        return Err(Error::AlreadyExists(format!(
            "volume {:?} already exists with {} bytes, outside the requested range",
            req.name, rec.capacity_bytes
        )));
    }
    pool.ensure_storage(&id.token, rec.capacity_bytes)?;
    Ok(rec)
}
