//! The capacity policy: how big a volume gets, whether a pool can promise
//! it, and what GetCapacity answers. It reads a [`Pool`]'s settings and
//! room; the pool knows nothing of it.
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
//! The pool keeps its volumes' promises in memory, built from the records
//! on first use and changed on create, delete and expand, so no call reads
//! every record. A create or expand reserves its bytes with the promises
//! locked ([`Pool::reserve`]) before making storage and gives them back if
//! it fails, so two concurrent creates cannot both take the last free
//! bytes.

use std::fmt::Display;

use super::pool::{Pool, PoolError, Reservation, Room};
use crate::config::Overcommit;
use crate::validate::CapacityRange;

/// Why a size cannot be given or promised.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// The smallest volume the pool makes is above the request's
    /// `limit_bytes`.
    #[error(
        "limit_bytes {limit} is below {capacity} bytes, the smallest volume pool {pool} makes \
         (minimum size {floor} bytes, sizes rounded to {granularity} bytes)"
    )]
    BelowSmallest {
        /// The request's limit.
        limit: u64,
        /// The smallest size the pool would make.
        capacity: u64,
        /// The pool.
        pool: String,
        /// The pool's minimum before rounding.
        floor: u64,
        /// The size granularity.
        granularity: u64,
    },
    /// An expansion whose `limit_bytes` is below what the volume has:
    /// volumes never shrink.
    #[error(
        "volume {id} already has {current} bytes, more than limit_bytes {limit}; \
         volumes cannot shrink"
    )]
    WouldShrink {
        /// The volume.
        id: String,
        /// Its size now.
        current: u64,
        /// The request's limit.
        limit: u64,
    },
    /// An expansion's size, rounded to the granularity, exceeds its
    /// `limit_bytes`.
    #[error("{capacity} bytes (rounded to {granularity} bytes) exceed limit_bytes {limit}")]
    RoundedAboveLimit {
        /// The rounded size.
        capacity: u64,
        /// The size granularity.
        granularity: u64,
        /// The request's limit.
        limit: u64,
    },
    /// Above the pool's `max_volume_size`.
    #[error("{capacity} bytes requested, but volumes of pool {pool} are at most {max} bytes")]
    AboveMaximum {
        /// The size asked for.
        capacity: u64,
        /// The pool.
        pool: String,
        /// Its maximum volume size.
        max: u64,
    },
    /// Larger than the pool's whole filesystem.
    #[error("{capacity} bytes requested, but pool {pool} is on a filesystem of {total} bytes")]
    AboveFilesystem {
        /// The size asked for.
        capacity: u64,
        /// The pool.
        pool: String,
        /// The size of its filesystem.
        total: u64,
    },
    /// More than the pool can promise now.
    #[error(
        "pool {pool} cannot promise {capacity} bytes{}: {promisable} bytes can still be promised \
         ({free} free of {total} on its filesystem, overcommit {overcommit})",
        if *.expansion { " to this volume" } else { "" }
    )]
    CannotPromise {
        /// The pool.
        pool: String,
        /// The size asked for.
        capacity: u64,
        /// Whether an existing volume asked to grow.
        expansion: bool,
        /// What can still be promised.
        promisable: u64,
        /// Free bytes on the pool's filesystem.
        free: u64,
        /// Size of the pool's filesystem.
        total: u64,
        /// The pool's overcommit setting (`none` or the ratio).
        overcommit: String,
    },
    /// The pool's size limits cannot be trusted now, so it promises
    /// nothing (the provisioner then lets the scheduler pick another node).
    #[error("pool {pool} cannot promise {capacity} bytes now: {why}")]
    Unreliable {
        /// The pool.
        pool: String,
        /// The size asked for.
        capacity: u64,
        /// Why, and how it is being repaired.
        why: String,
    },
    /// Measuring the pool failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

type Result<T, E = CapacityError> = std::result::Result<T, E>;

/// What GetCapacity answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// Bytes that can still be promised to new volumes.
    pub(crate) available: u64,
    /// Largest single volume that can be created now.
    pub(crate) maximum_volume_size: u64,
    /// Smallest volume the pool makes (0: no minimum).
    pub(crate) minimum_volume_size: u64,
}

/// The size of a new volume: the request within the pool's limits
/// (OUT_OF_RANGE when they cannot be met).
pub(crate) fn decide(pool: &Pool, range: CapacityRange) -> Result<u64> {
    let limits = pool.limits();
    let requested = match (range.required, range.limit) {
        (0, 0) => limits.default,
        (0, limit) => limits.default.min(limit),
        (required, _) => required,
    };
    let floor = smallest_allowed(pool);
    let capacity = round_up(requested.max(floor), pool.granularity());
    if range.limit != 0 && capacity > range.limit {
        return Err(CapacityError::BelowSmallest {
            limit: range.limit,
            capacity,
            pool: pool.name().to_string(),
            floor,
            granularity: pool.granularity(),
        });
    }
    check_ceiling(pool, capacity)?;
    Ok(capacity)
}

/// The size volume `id` of `current` bytes grows to for ControllerExpandVolume,
/// or `None` when it is already that large (CSI spec: success with the
/// current capacity; volumes never shrink). OUT_OF_RANGE when the range or
/// the pool's maximum forbid it.
pub(crate) fn decide_growth(
    pool: &Pool,
    id: impl Display,
    current: u64,
    range: CapacityRange,
) -> Result<Option<u64>> {
    let wanted = range.required.max(1);
    if current >= wanted {
        if range.limit != 0 && current > range.limit {
            return Err(CapacityError::WouldShrink {
                id: id.to_string(),
                current,
                limit: range.limit,
            });
        }
        return Ok(None);
    }
    let capacity = round_up(wanted, pool.granularity());
    if range.limit != 0 && capacity > range.limit {
        return Err(CapacityError::RoundedAboveLimit {
            capacity,
            granularity: pool.granularity(),
            limit: range.limit,
        });
    }
    check_ceiling(pool, capacity)?;
    Ok(Some(capacity))
}

/// Reserves `capacity` bytes for volume `token` (replacing its promise of
/// `previous` bytes, for an expansion): OUT_OF_RANGE if it exceeds the
/// pool's filesystem, RESOURCE_EXHAUSTED if it cannot be promised.
pub(crate) fn reserve<'p>(
    pool: &'p Pool,
    token: &str,
    capacity: u64,
    previous: Option<u64>,
) -> Result<Reservation<'p>> {
    let overcommit = pool.limits().overcommit;
    pool.reserve(token, capacity, previous, |room: &Room| {
        if let Some(why) = &room.unreliable {
            return Err(CapacityError::Unreliable {
                pool: pool.name().to_string(),
                capacity,
                why: why.clone(),
            });
        }
        if capacity > room.total {
            return Err(CapacityError::AboveFilesystem {
                capacity,
                pool: pool.name().to_string(),
                total: room.total,
            });
        }
        let fits = match overcommit {
            // Nothing is reserved: only the growth must fit on the disk now.
            Overcommit::None => capacity.saturating_sub(previous.unwrap_or(0)) <= room.free,
            Overcommit::Ratio(_) => capacity <= room.promisable,
        };
        if fits {
            return Ok(());
        }
        Err(CapacityError::CannotPromise {
            pool: pool.name().to_string(),
            capacity,
            expansion: previous.is_some(),
            promisable: room.promisable,
            free: room.free,
            total: room.total,
            overcommit: match overcommit {
                Overcommit::None => "none".to_string(),
                Overcommit::Ratio(r) => r.to_string(),
            },
        })
    })
}

/// GetCapacity for a pool: what can still be promised under its policy,
/// and the largest and smallest volume it would make now.
pub(crate) fn report(pool: &Pool) -> Result<Capacity> {
    let room = pool.room()?;
    let mut largest = room.promisable.min(room.total);
    if let Some(max) = pool.limits().max {
        largest = largest.min(max);
    }
    let granularity = pool.granularity();
    largest -= largest % granularity;
    let smallest = round_up(smallest_allowed(pool), granularity);
    if largest < smallest {
        largest = 0;
    }
    Ok(Capacity {
        available: room.promisable,
        maximum_volume_size: largest,
        minimum_volume_size: smallest,
    })
}

/// The pool's minimum size or the kind's, whichever is larger.
fn smallest_allowed(pool: &Pool) -> u64 {
    pool.limits().min.max(pool.kind_min_volume_size())
}

/// OUT_OF_RANGE when `capacity` is above the pool's maximum volume size
/// (CSI: "unsupported capacity_range"). Larger than the whole filesystem
/// is OUT_OF_RANGE too; [`reserve`] checks that, with the one `statfs` it
/// makes anyway.
fn check_ceiling(pool: &Pool, capacity: u64) -> Result<()> {
    if let Some(max) = pool.limits().max
        && capacity > max
    {
        return Err(CapacityError::AboveMaximum {
            capacity,
            pool: pool.name().to_string(),
            max,
        });
    }
    Ok(())
}

/// `n` rounded up to a multiple of `unit` (saturating).
fn round_up(n: u64, unit: u64) -> u64 {
    if unit <= 1 {
        return n;
    }
    n.div_ceil(unit).saturating_mul(unit)
}
