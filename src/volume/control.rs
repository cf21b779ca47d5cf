//! Controller-side operations: create, delete, list, capacity, validation,
//! expansion (both halves: the node's is here too, next to the controller's,
//! because they share the size policy).
//!
//! # Capacity policy
//!
//! A volume's size is decided once, at CreateVolume: the request's
//! `required_bytes` (or the pool's default size, within `limit_bytes`),
//! raised to the pool's minimum and rounded up to the backend's
//! granularity. Sizes outside the pool's limits answer OUT_OF_RANGE; sizes
//! the pool cannot promise answer RESOURCE_EXHAUSTED before anything is
//! made.
//!
//! What a pool can promise depends on its overcommit policy:
//! - `none` (dir pools): a volume fits if the filesystem has its size free
//!   now; nothing is reserved, because nothing enforces it anyway.
//! - a ratio `r` (btrfs and image pools, `1.0` by default): the pool's
//!   usable space is what is free plus what its volumes already hold, and
//!   the sum of all promises may reach `r` times that. With `r = 1` this is
//!   "free space minus what existing volumes were promised but have not
//!   written yet": every promised byte can really be written.
//!
//! Promises are kept per pool in memory ([`Promises`]), built from the
//! records on first use and changed on create, delete and expand, so no
//! call reads every record. A create or expand reserves its bytes under the
//! pool's lock before making storage and gives them back if it fails, so
//! two concurrent creates cannot both take the last free bytes.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::id::{VolumeId, token_for_name};
use super::pool::{Pool, Record};
use super::{Volume, Volumes};
use crate::config::{Overcommit, PoolConfig};
use crate::error::{Error, Result};
use crate::sys;
use crate::validate::{Capability, CapacityRange};

/// Size given to a volume whose request names none.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// A pool's size limits and promise policy, from its configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizePolicy {
    /// Smallest volume (0: none beyond the backend's own minimum).
    pub min: u64,
    /// Largest volume, if limited.
    pub max: Option<u64>,
    /// Size of a volume whose request names none.
    pub default: u64,
    /// How much may be promised.
    pub overcommit: Overcommit,
}

impl SizePolicy {
    /// The policy a pool's configuration sets.
    pub fn from_config(p: &PoolConfig) -> Self {
        SizePolicy {
            min: p.min_volume_size.map_or(0, |b| b.0),
            max: p.max_volume_size.map(|b| b.0),
            default: p.default_volume_size.map_or(DEFAULT_VOLUME_SIZE, |b| b.0),
            overcommit: p.overcommit(),
        }
    }
}

impl Default for SizePolicy {
    fn default() -> Self {
        SizePolicy {
            min: 0,
            max: None,
            default: DEFAULT_VOLUME_SIZE,
            overcommit: Overcommit::None,
        }
    }
}

/// The capacity promised to each volume of a pool (by token), including
/// creates and expansions in progress.
#[derive(Debug, Default)]
pub struct Promises {
    // A std mutex: held only for in-memory changes and the few statfs and
    // qgroup reads that decide whether a reservation fits, never across an
    // await. `None` until first use, when it is built from the records.
    by_token: Mutex<Option<HashMap<String, u64>>>,
}

/// Bytes reserved for a create or expand in progress; given back when
/// dropped unless [`Reservation::commit`] was called.
#[must_use]
struct Reservation<'a> {
    pool: &'a Pool,
    token: String,
    previous: Option<u64>,
    committed: bool,
}

impl Reservation<'_> {
    fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut guard = self
            .pool
            .promises
            .by_token
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(map) = guard.as_mut() {
            match self.previous {
                Some(p) => map.insert(self.token.clone(), p),
                None => map.remove(&self.token),
            };
        }
    }
}

/// Locks a pool's promises, building them from the records on first use.
fn promises(pool: &Pool) -> Result<MutexGuard<'_, Option<HashMap<String, u64>>>> {
    let mut guard = pool
        .promises
        .by_token
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let mut map = HashMap::new();
        for token in pool.tokens()? {
            if let Some(rec) = pool.read_record(&token)? {
                map.insert(token, rec.capacity_bytes);
            }
        }
        *guard = Some(map);
    }
    Ok(guard)
}

/// Space figures of a pool, and what it can still promise.
#[derive(Debug, Clone, Copy)]
struct Room {
    /// Size of the pool's filesystem.
    total: u64,
    /// Bytes free on it.
    free: u64,
    /// What can still be promised under the policy.
    promisable: u64,
}

/// Measures a pool with its promises locked; `except` leaves one volume's
/// promise out (an expansion's own).
fn room(pool: &Pool, map: &HashMap<String, u64>, except: Option<&str>) -> Result<Room> {
    let space = pool.backend.space(&pool.dir)?;
    let (total, free) = (space.total_bytes, space.available_bytes);
    let promisable = match pool.policy.overcommit {
        Overcommit::None => free,
        Overcommit::Ratio(r) => {
            let tokens: Vec<&str> = map.keys().map(String::as_str).collect();
            let used = pool.backend.used_by(&pool.dir, &tokens)?;
            let promised: u64 = map
                .iter()
                .filter(|(t, _)| Some(t.as_str()) != except)
                .map(|(_, c)| *c)
                .sum();
            let usable = free.saturating_add(used) as f64 * r;
            (usable as u64).saturating_sub(promised)
        }
    };
    Ok(Room {
        total,
        free,
        promisable,
    })
}

/// OUT_OF_RANGE when `capacity` is above the pool's maximum volume size or
/// larger than its whole filesystem (CSI: "unsupported capacity_range").
fn check_ceiling(pool: &Pool, capacity: u64) -> Result<()> {
    if let Some(max) = pool.policy.max
        && capacity > max
    {
        return Err(Error::OutOfRange(format!(
            "{capacity} bytes requested, but volumes of pool {} are at most {max} bytes",
            pool.name
        )));
    }
    let total = pool.backend.space(&pool.dir)?.total_bytes;
    if capacity > total {
        return Err(Error::OutOfRange(format!(
            "{capacity} bytes requested, but pool {} is on a filesystem of {total} bytes",
            pool.name
        )));
    }
    Ok(())
}

/// The result of ControllerExpandVolume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expanded {
    /// The volume's capacity now.
    pub capacity_bytes: u64,
    /// Whether NodeExpandVolume must follow.
    pub node_expansion_required: bool,
}

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

/// What GetCapacity answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Bytes that can still be promised to new volumes.
    pub available: u64,
    /// Largest single volume that can be created now.
    pub maximum_volume_size: u64,
    /// Smallest volume the pool makes (0: no minimum).
    pub minimum_volume_size: u64,
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
        if !pool.backend.enforces_size() && (req.capacity.required > 0 || req.capacity.limit > 0) {
            tracing::warn!(
                volume_id = %id,
                capacity,
                pool = %pool.name,
                "pool of kind dir does not enforce sizes: the volume can grow beyond its capacity \
                 until the disk is full (volume context sizeEnforced=false)"
            );
        }
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
            .write_record(&id.token, &record)
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

    /// The size of a new volume: the request within the pool's limits
    /// (OUT_OF_RANGE when they cannot be met).
    fn decide_capacity(&self, pool: &Pool, range: CapacityRange) -> Result<u64> {
        let policy = &pool.policy;
        let requested = match (range.required, range.limit) {
            (0, 0) => policy.default,
            (0, limit) => policy.default.min(limit),
            (required, _) => required,
        };
        let floor = policy.min.max(pool.backend.min_volume_size());
        let capacity = round_up(requested.max(floor), pool.backend.granularity());
        if range.limit != 0 && capacity > range.limit {
            return Err(Error::OutOfRange(format!(
                "limit_bytes {} is below {capacity} bytes, the smallest volume pool {} makes \
                 (minimum size {floor} bytes, sizes rounded to {} bytes)",
                range.limit,
                pool.name,
                pool.backend.granularity()
            )));
        }
        check_ceiling(pool, capacity)?;
        Ok(capacity)
    }

    /// Reserves `capacity` bytes for volume `token` (replacing its promise
    /// of `previous` bytes, for an expansion), or RESOURCE_EXHAUSTED.
    fn reserve<'p>(
        &self,
        pool: &'p Pool,
        token: &str,
        capacity: u64,
        previous: Option<u64>,
    ) -> Result<Reservation<'p>> {
        let mut guard = promises(pool)?;
        let map = guard.as_mut().expect("built by promises()");
        let room = room(pool, map, Some(token))?;
        let fits = match pool.policy.overcommit {
            // Nothing is reserved: only the growth must fit on the disk now.
            Overcommit::None => capacity.saturating_sub(previous.unwrap_or(0)) <= room.free,
            Overcommit::Ratio(_) => capacity <= room.promisable,
        };
        if !fits {
            return Err(Error::ResourceExhausted(format!(
                "pool {} cannot promise {capacity} bytes{}: {} bytes can still be promised \
                 ({} free of {} on its filesystem, overcommit {})",
                pool.name,
                if previous.is_some() {
                    " to this volume"
                } else {
                    ""
                },
                room.promisable,
                room.free,
                room.total,
                match pool.policy.overcommit {
                    Overcommit::None => "none".to_string(),
                    Overcommit::Ratio(r) => r.to_string(),
                }
            )));
        }
        map.insert(token.to_string(), capacity);
        Ok(Reservation {
            pool,
            token: token.to_string(),
            previous,
            committed: false,
        })
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

    /// GetCapacity for the pool the parameters select: what can still be
    /// promised under the pool's policy, and the largest and smallest
    /// volume it would make now.
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
        let room = {
            let guard = promises(pool)?;
            room(pool, guard.as_ref().expect("built by promises()"), None)?
        };
        let mut largest = room.promisable.min(room.total);
        if let Some(max) = pool.policy.max {
            largest = largest.min(max);
        }
        let granularity = pool.backend.granularity();
        largest -= largest % granularity;
        let smallest = round_up(
            pool.policy.min.max(pool.backend.min_volume_size()),
            granularity,
        );
        if largest < smallest {
            largest = 0;
        }
        Ok(Capacity {
            available: room.promisable,
            maximum_volume_size: largest,
            minimum_volume_size: smallest,
        })
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

    /// The token a CreateVolume name maps to (for tests and tools).
    pub fn token_for(name: &str) -> String {
        token_for_name(name)
    }
}

/// `n` rounded up to a multiple of `unit` (saturating).
fn round_up(n: u64, unit: u64) -> u64 {
    if unit <= 1 {
        return n;
    }
    n.div_ceil(unit).saturating_mul(unit)
}
