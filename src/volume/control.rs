//! Controller-side operations: create, delete, list, validation. How big
//! a volume may be and what a pool can still promise is in `capacity`;
//! expansion in `expand`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::{SystemTime, UNIX_EPOCH};

use super::capacity::promises;
use super::id::VolumeId;
use super::pool::{Pool, Record};
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
        let id = VolumeId::for_name(&pool.name, &req.name);
        let _guard = self.inflight.claim(&id.token)?;

        for other in self.pools.iter().filter(|p| p.name != pool.name) {
            if let Some(rec) = other.read_record(&id.token)?
                && rec.name == req.name
            {
                return Err(Error::AlreadyExists(format!(
                    "a volume named {:?} already exists in pool {}, not in the requested pool {}",
                    req.name, other.name, pool.name
                )));
            }
        }
        if let Some(rec) = pool.read_record(&id.token)? {
            return self.existing(&id, pool, rec, req);
        }

        let capacity = self.decide_capacity(pool, req.capacity)?;
        let reservation = self.reserve(pool, &id.token, capacity, None)?;
        pool.backend.create(&pool.dir, &id.token, capacity)?;
        let record = Record {
            name: req.name.clone(),
            kind: pool.backend.kind(),
            capacity_bytes: capacity,
            parameters: req.parameters.clone(),
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if let Err(e) = pool
            .create_record(&id.token, &record)
            .and_then(|()| pool.sync())
        {
            // Not acknowledged, so not a volume: take the storage back
            // rather than leave a directory no record explains.
            let _ = pool.remove_record(&id.token);
            if let Err(undo) = pool.backend.delete(&pool.dir, &id.token) {
                tracing::warn!(volume_id = %id, error = %undo, "cannot undo a failed create");
            }
            let _ = pool.sync();
            return Err(e);
        }
        reservation.commit();
        pool.index_insert(&id.token);
        tracing::info!(volume_id = %id, capacity, pool = %pool.name, "volume created");
        Ok(self.describe(&id, pool, &record))
    }

    /// A repeated CreateVolume for a name that already has a volume.
    fn existing(
        &self,
        id: &VolumeId,
        pool: &Pool,
        rec: Record,
        req: &CreateRequest,
    ) -> Result<Volume> {
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
        // The storage may be missing if the earlier call was killed between
        // writing the record and flushing; recreate it rather than hand out
        // a volume that cannot be published.
        if std::fs::symlink_metadata(pool.volume_path(&id.token)).is_err() {
            pool.backend
                .create(&pool.dir, &id.token, rec.capacity_bytes)?;
            pool.sync()?;
        }
        Ok(self.describe(id, pool, &rec))
    }

    /// Whether a topology segment is satisfied by this node.
    pub fn on_this_node(&self, segment: &BTreeMap<String, String>) -> bool {
        let ours = self.topology();
        segment.iter().all(|(k, v)| ours.get(k) == Some(v))
    }

    /// DeleteVolume: succeeds for volumes that do not exist; never removes a
    /// directory the driver has no record of.
    pub fn delete(&self, raw_id: &str) -> Result<()> {
        let Ok((id, pool)) = self.locate(raw_id) else {
            return Ok(());
        };
        let _guard = self.inflight.claim(&id.token)?;
        if pool.read_record(&id.token)?.is_none() {
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
        pool.backend.delete(&pool.dir, &id.token)?;
        pool.remove_record(&id.token)?;
        pool.index_remove(&id.token);
        pool.sync()?;
        if let Some(map) = promises(pool)?.as_mut() {
            map.remove(&id.token);
        }
        tracing::info!(volume_id = %id, "volume deleted");
        Ok(())
    }

    /// Looks a volume up for ValidateVolumeCapabilities and node calls:
    /// volumes with a record, and static directories an administrator made
    /// in a pool.
    pub fn get(&self, raw_id: &str) -> Result<Option<Volume>> {
        let (id, pool) = self.locate(raw_id)?;
        if let Some(rec) = pool.read_record(&id.token)? {
            return Ok(Some(self.describe(&id, pool, &rec)));
        }
        match std::fs::symlink_metadata(pool.volume_path(&id.token)) {
            Ok(m) if m.is_dir() => Ok(None),
            _ => Err(Error::NotFound(format!("volume {raw_id:?} does not exist"))),
        }
    }

    /// ValidateVolumeCapabilities: `Ok(None)` confirms, `Ok(Some(why))`
    /// declines with a reason.
    pub fn validate(&self, raw_id: &str, caps: &[Capability]) -> Result<Option<String>> {
        self.get(raw_id)?;
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
        pools.sort_by_key(|p| format!("{}:", p.name));
        let mut out = Vec::new();
        let mut next = String::new();
        'pools: for pool in pools {
            let mut from = match &start {
                None => Bound::Unbounded,
                Some(s) => match format!("{}:", pool.name).cmp(&format!("{}:", s.pool)) {
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
                        pool: pool.name.clone(),
                        token: token.clone(),
                    };
                    if out.len() == take {
                        next = id.to_string();
                        break 'pools;
                    }
                    // A volume deleted while listing is simply skipped.
                    if let Some(rec) = pool.read_record(token)? {
                        out.push(self.describe(&id, pool, &rec));
                    }
                }
            }
        }
        Ok((out, next))
    }
}
