//! Volume sizes and what a pool can still promise: the size policy, the
//! in-memory promises, reservations, and GetCapacity.
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
use std::sync::{Mutex, MutexGuard};

use super::Volumes;
use super::pool::Pool;
use crate::config::{Overcommit, PoolConfig};
use crate::error::{Error, Result};
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
pub(super) struct Reservation<'a> {
    pool: &'a Pool,
    token: String,
    previous: Option<u64>,
    committed: bool,
}

impl Reservation<'_> {
    pub(super) fn commit(mut self) {
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
/// Only a ratio policy counts promises; with `none` nothing reads them, so
/// the first create on a big `dir` pool does not read every record.
pub(super) fn promises(pool: &Pool) -> Result<MutexGuard<'_, Option<HashMap<String, u64>>>> {
    let mut guard = pool
        .promises
        .by_token
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let mut map = HashMap::new();
        if let Overcommit::Ratio(_) = pool.policy.overcommit {
            // The listing index already holds the tokens: one scan of the
            // pool directory serves both.
            for token in pool.page(std::ops::Bound::Unbounded, usize::MAX)? {
                if let Some(rec) = pool.read_record(&token)? {
                    map.insert(token, rec.capacity_bytes);
                }
            }
        }
        *guard = Some(map);
    }
    Ok(guard)
}

/// Space figures of a pool, and what it can still promise.
#[derive(Debug, Clone, Copy)]
pub(super) struct Room {
    /// Size of the pool's filesystem.
    total: u64,
    /// Bytes free on it.
    free: u64,
    /// What can still be promised under the policy.
    promisable: u64,
}

/// Measures a pool with its promises locked; `except` leaves one volume's
/// promise out (an expansion's own).
pub(super) fn room(pool: &Pool, map: &HashMap<String, u64>, except: Option<&str>) -> Result<Room> {
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

/// OUT_OF_RANGE when `capacity` is above the pool's maximum volume size
/// (CSI: "unsupported capacity_range"). Larger than the whole filesystem
/// is OUT_OF_RANGE too; [`Volumes::reserve`] checks that, with the one
/// `statfs` it makes anyway.
pub(super) fn check_ceiling(pool: &Pool, capacity: u64) -> Result<()> {
    if let Some(max) = pool.policy.max
        && capacity > max
    {
        return Err(Error::OutOfRange(format!(
            "{capacity} bytes requested, but volumes of pool {} are at most {max} bytes",
            pool.name
        )));
    }
    Ok(())
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
    /// The size of a new volume: the request within the pool's limits
    /// (OUT_OF_RANGE when they cannot be met).
    pub(super) fn decide_capacity(&self, pool: &Pool, range: CapacityRange) -> Result<u64> {
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
    /// of `previous` bytes, for an expansion): OUT_OF_RANGE if it exceeds
    /// the pool's filesystem, RESOURCE_EXHAUSTED if it cannot be promised.
    pub(super) fn reserve<'p>(
        &self,
        pool: &'p Pool,
        token: &str,
        capacity: u64,
        previous: Option<u64>,
    ) -> Result<Reservation<'p>> {
        let mut guard = promises(pool)?;
        let map = guard.as_mut().expect("built by promises()");
        let room = room(pool, map, Some(token))?;
        if capacity > room.total {
            return Err(Error::OutOfRange(format!(
                "{capacity} bytes requested, but pool {} is on a filesystem of {} bytes",
                pool.name, room.total
            )));
        }
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
}

/// `n` rounded up to a multiple of `unit` (saturating).
pub(super) fn round_up(n: u64, unit: u64) -> u64 {
    if unit <= 1 {
        return n;
    }
    n.div_ceil(unit).saturating_mul(unit)
}
