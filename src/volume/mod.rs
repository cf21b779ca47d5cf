//! The volume logic: plain Rust, no gRPC, callable from tests directly.
//!
//! [`Volumes`] holds the pools and the per-volume locks. Each CSI call is
//! one method that reads top to bottom the same way: check what the
//! request asks against this node (which pool, which topology), take the
//! volume's lock, let the [`pool::Pool`] do the storage work, and describe
//! the result. The controller's calls are in `controller`, the node's in
//! `node`; the rules they apply live beside them:
//! - `pool`: one pool's directory, backend, records, listing index and
//!   promises, behind its methods;
//! - `record`: what is remembered about a volume;
//! - `capacity`: sizes and what a pool can still promise;
//! - `target`: publish targets from the CO, inspected as hostile paths;
//! - `id`: volume ids and the on-disk names derived from them;
//! - `inflight`: one call at a time per volume.
//!
//! All of it blocks; the gRPC layer calls it from `spawn_blocking`.

pub mod capacity;
mod controller;
pub mod id;
pub mod inflight;
mod node;
pub mod pool;
pub mod record;
mod target;

use std::collections::BTreeMap;

use crate::config::PoolConfig;
use crate::error::{Error, Result};
use id::VolumeId;
use inflight::InFlight;
use pool::Pool;
use record::Record;

pub use capacity::Capacity;
pub use controller::Expanded;
pub use node::Stats;

/// NOT_FOUND for a volume id that names no volume (the spec's answer).
fn not_found(id: &VolumeId) -> Error {
    Error::NotFound(format!("volume {:?} does not exist", id.to_string()))
}

/// Topology key that pins a volume to the node holding it.
pub const TOPOLOGY_KEY: &str = "topology.hostpath-csi.dev/node";

/// A volume as reported to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Volume id.
    pub id: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Volume context handed back at publish time.
    pub context: BTreeMap<String, String>,
}

/// The driver's volumes across all pools.
#[derive(Debug)]
pub struct Volumes {
    pools: Vec<Pool>,
    node_id: String,
    inflight: InFlight,
}

impl Volumes {
    /// Opens the configured pools: creates and checks their directories.
    /// Cleaning up leftovers of interrupted calls is left to
    /// [`Volumes::sweep`], which can run once the driver serves.
    pub fn open(configs: &[PoolConfig], node_id: &str) -> Result<Self> {
        let pools = configs.iter().map(Pool::open).collect::<Result<Vec<_>>>()?;
        for (i, a) in pools.iter().enumerate() {
            for b in &pools[i + 1..] {
                if a.overlaps(b.dir()) {
                    return Err(Error::FailedPrecondition(format!(
                        "pools {} and {} resolve to overlapping directories {} and {}",
                        a.name(),
                        b.name(),
                        a.dir().display(),
                        b.dir().display()
                    )));
                }
            }
        }
        // Said once per start rather than on every CreateVolume: with a
        // size on every claim, a warning per call would bury the log.
        for p in pools.iter().filter(|p| !p.enforces_size()) {
            tracing::warn!(
                pool = %p.name(),
                dir = %p.dir().display(),
                "pool of kind dir does not enforce sizes: a volume can grow beyond its capacity \
                 until the disk is full (its volume context says sizeEnforced=false)"
            );
        }
        Ok(Volumes {
            pools,
            node_id: node_id.to_string(),
            inflight: InFlight::default(),
        })
    }

    /// Removes leftovers of interrupted calls that no record refers to,
    /// skipping any volume a call is working on right now (that call owns
    /// its leftovers). Returns how many were removed.
    pub fn sweep(&self) -> Result<usize> {
        let mut n = 0;
        for pool in &self.pools {
            for (token, path) in pool.leftovers()? {
                let Ok(_guard) = self.inflight.claim(&token) else {
                    continue;
                };
                // Removed under the lock: the call that held it may have
                // finished with this very file.
                if pool.remove_leftover(&path)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// The topology segment of this node.
    pub fn topology(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())])
    }

    /// Whether a topology segment is satisfied by this node.
    fn on_this_node(&self, segment: &BTreeMap<String, String>) -> bool {
        let ours = self.topology();
        segment.iter().all(|(k, v)| ours.get(k) == Some(v))
    }

    fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name() == name)
    }

    /// The pool named by the `pool` parameter; without one, the only pool or
    /// the pool called `default`.
    fn select_pool(&self, parameters: &BTreeMap<String, String>) -> Result<&Pool> {
        let known = || {
            self.pools
                .iter()
                .map(Pool::name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match parameters.get("pool") {
            Some(name) => self.pool(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown pool {name:?} in parameter \"pool\"; this node has: {}",
                    known()
                ))
            }),
            None if self.pools.len() == 1 => Ok(&self.pools[0]),
            None => self.pool("default").ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "parameter \"pool\" is required on this node; it has: {}",
                    known()
                ))
            }),
        }
    }

    /// The pool a volume id names, or NOT_FOUND.
    fn pool_of(&self, id: &VolumeId) -> Result<&Pool> {
        self.pool(id.pool()).ok_or_else(|| {
            Error::NotFound(format!(
                "volume {:?} does not exist: no pool {:?} on this node",
                id.to_string(),
                id.pool()
            ))
        })
    }

    /// A volume as the CO sees it: its id, capacity and volume context.
    fn describe(&self, id: &VolumeId, pool: &Pool, record: &Record) -> Volume {
        let mut context = BTreeMap::from([
            ("pool".to_string(), pool.name().to_string()),
            ("kind".to_string(), record.kind.as_str().to_string()),
            ("sizeEnforced".to_string(), pool.enforces_size().to_string()),
        ]);
        if let Some(ns) = record.parameters.get("csi.storage.k8s.io/pvc/namespace") {
            context.insert("pvcNamespace".into(), ns.clone());
        }
        if let Some(n) = record.parameters.get("csi.storage.k8s.io/pvc/name") {
            context.insert("pvcName".into(), n.clone());
        }
        Volume {
            id: id.to_string(),
            capacity_bytes: record.capacity_bytes,
            context,
        }
    }
}
