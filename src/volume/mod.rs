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
//! - `inflight`: one call at a time per volume;
//! - `inventory`: what the pools hold, read without changing anything
//!   (`hostpath-csi volumes`, metrics, the orphan report);
//! - `ephemeral`: CSI inline ephemeral volumes, made and removed by the
//!   node's publish calls, and the sweep of those nobody will unpublish;
//! - `snapshot`: snapshots, and volumes made from a snapshot or a volume;
//! - `group_snapshot`: snapshots of several volumes at one point in time;
//! - `health`: what is wrong with a volume or a pool now (CSI 1.13's
//!   volume and storage health, and NodeGetVolumeStats' condition);
//! - `trash`: archived volumes across pools (the sweep, what they hold).
//!
//! All of it blocks; the gRPC layer calls it from `spawn_blocking`.

mod capacity;
mod controller;
mod ephemeral;
pub mod group_snapshot;
pub(crate) mod health;
pub mod id;
mod inflight;
pub mod inventory;
mod node;
mod pool;
pub mod record;
pub mod snapshot;
mod target;
mod trash;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

use crate::config::PoolConfig;
use crate::sys;
use id::VolumeId;
use inflight::InFlight;
use pool::Pool;
use record::{Access, Record};

pub use capacity::CapacityError;
pub use inflight::LockError;
pub(crate) use pool::now_unix;
pub use pool::{OnDelete, OnDeleteError, PoolError, TrashMeta, parse_duration};
pub use target::TargetError;
pub(crate) use trash::SWEEP_EVERY;
pub use trash::TrashUsage;

/// Why a call on the volumes failed, by cause.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The `pool` parameter names a pool this node does not have.
    #[error("unknown pool {name:?} in parameter \"pool\"; this node has: {known}")]
    UnknownPool {
        /// The name asked for.
        name: String,
        /// This node's pools, comma-separated.
        known: String,
    },
    /// No `pool` parameter, and no single or `default` pool to fall back on.
    #[error("parameter \"pool\" is required on this node; it has: {known}")]
    PoolRequired {
        /// This node's pools, comma-separated.
        known: String,
    },
    /// Two configured pools resolve to nested directories.
    #[error(
        "pools {a} and {b} resolve to overlapping directories {} and {}",
        a_dir.display(),
        b_dir.display()
    )]
    OverlappingPools {
        /// One pool.
        a: String,
        /// Its directory.
        a_dir: PathBuf,
        /// The other.
        b: String,
        /// Its directory.
        b_dir: PathBuf,
    },
    /// The request's topology does not include this node.
    #[error(
        "volumes of this driver live on node {node}, which none of the required topology segments allows"
    )]
    OtherNode {
        /// This node.
        node: String,
    },
    /// CreateSnapshot's `accessibility_requirements` do not include this
    /// node, the only place its snapshots are usable from.
    #[error(
        "snapshots of this driver are copies on the node of their volume, {node}, and usable only \
         there (a volume made from one is made on that node); none of the required topology \
         segments (accessibility_requirements.requisite) allows it; nothing was made"
    )]
    SnapshotOtherNode {
        /// This node.
        node: String,
    },
    /// The volume id names a pool this node does not have.
    #[error("volume {:?} does not exist: no pool {:?} on this node", .0.to_string(), .0.pool())]
    NoSuchPool(VolumeId),
    /// No volume (with a record) by that id.
    #[error("volume {:?} does not exist", .0.to_string())]
    NotFound(VolumeId),
    /// Neither a record nor a directory by that id (the node calls, which
    /// also serve static volumes).
    #[error("volume {0} does not exist")]
    Missing(VolumeId),
    /// A volume of that name already lives in another pool.
    #[error(
        "a volume named {name:?} already exists in pool {pool}, not in the requested pool {requested}"
    )]
    NameInOtherPool {
        /// The CreateVolume name.
        name: String,
        /// Where it lives.
        pool: String,
        /// The pool asked for.
        requested: String,
    },
    /// The volume's token belongs to a record of another name.
    #[error("volume {id} belongs to another name ({other:?})")]
    OtherName {
        /// The volume.
        id: VolumeId,
        /// The name its record holds.
        other: String,
    },
    /// The volume exists with a size outside the requested range.
    #[error("volume {name:?} already exists with {capacity} bytes, outside the requested range")]
    OtherSize {
        /// The CreateVolume name.
        name: String,
        /// Its size.
        capacity: u64,
    },
    /// The volume exists with the other access type (filesystem or raw
    /// block).
    #[error(
        "volume {name:?} already exists as a {} volume",
        if *.access == Access::Block { "raw block" } else { "filesystem" }
    )]
    OtherAccess {
        /// The CreateVolume name.
        name: String,
        /// Its access type.
        access: Access,
    },
    /// The volume exists with another root directory mode or owner.
    #[error("volume {name:?} already exists with its root directory at {root}")]
    OtherRoot {
        /// The CreateVolume name.
        name: String,
        /// Its root's mode and owner.
        root: record::RootAccess,
    },
    /// A publication with the other access type than the volume has.
    #[error(
        "volume {id} is {}; publish it with {} access",
        if *.access == Access::Block { "a raw block volume, not a filesystem" }
        else { "a filesystem volume, not a raw block device" },
        if *.access == Access::Block { "block" } else { "mount" }
    )]
    WrongAccess {
        /// The volume.
        id: VolumeId,
        /// Its access type.
        access: Access,
    },
    /// A volume from a source of the other access type (a raw block
    /// volume from a filesystem volume or its snapshot, or the reverse).
    #[error(
        "{from} holds {}; make a {} volume from it",
        if *.access == Access::Block { "a raw block volume's data" } else { "a filesystem" },
        if *.access == Access::Block { "raw block" } else { "filesystem (mount)" }
    )]
    SourceAccess {
        /// The source.
        from: String,
        /// The source's access type.
        access: Access,
    },
    /// DeleteVolume of a volume that is still bind-mounted.
    #[error("volume {id} is still mounted at {}; unpublish it first", at.display())]
    StillMounted {
        /// The volume.
        id: VolumeId,
        /// One of its mounts.
        at: PathBuf,
    },
    /// The volume's kind cannot grow.
    #[error("volume {id} is of kind {}, which cannot be expanded", kind.as_str())]
    NotExpandable {
        /// The volume.
        id: VolumeId,
        /// Its kind.
        kind: crate::config::PoolKind,
    },
    /// The volume's path is not a directory.
    #[error("volume {id}: {} is not a directory", path.display())]
    NotADirectory {
        /// The volume.
        id: VolumeId,
        /// Its path.
        path: PathBuf,
    },
    /// A volume with a record whose directory is gone.
    #[error("volume {id}: its directory {} is missing", path.display())]
    DirectoryMissing {
        /// The volume.
        id: VolumeId,
        /// Its path.
        path: PathBuf,
    },
    /// The publish target's parent directory does not exist.
    #[error("the parent directory of target_path {} does not exist", .0.display())]
    NoTargetParent(PathBuf),
    /// The same volume is published there already, with the other
    /// read-only setting.
    #[error(
        "volume {id} is already published at {} {}",
        target.display(),
        if *.read_only { "read-only" } else { "read-write" }
    )]
    PublishedOtherwise {
        /// The volume.
        id: VolumeId,
        /// The target.
        target: PathBuf,
        /// Whether the existing mount is read-only.
        read_only: bool,
    },
    /// A SINGLE_NODE_SINGLE_WRITER volume is published elsewhere already.
    #[error(
        "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
        at.display()
    )]
    SingleWriter {
        /// The volume.
        id: VolumeId,
        /// Where it is published.
        at: PathBuf,
    },
    /// The target holds a mount that is not one of this driver's volumes.
    #[error(
        "{} is mounted from {from}, which is not a volume of this driver; refusing to unmount it",
        target.display()
    )]
    ForeignMount {
        /// The target.
        target: PathBuf,
        /// The mount's source.
        from: String,
    },
    /// The `volume_path` does not exist.
    #[error("volume_path {} does not exist", .0.display())]
    NoVolumePath(PathBuf),
    /// The volume is not what `volume_path` shows (NodeGetVolumeStats).
    #[error("volume {id} is not published at {}", path.display())]
    NotPublishedAt {
        /// The volume.
        id: VolumeId,
        /// The path asked about.
        path: PathBuf,
    },
    /// The volume is not what `volume_path` shows (NodeExpandVolume).
    #[error("volume {id} is not published at volume_path {}", path.display())]
    NotAtVolumePath {
        /// The volume.
        id: VolumeId,
        /// The path asked about.
        path: PathBuf,
    },
    /// No snapshot by that id on this node.
    #[error("snapshot {0:?} does not exist")]
    SnapshotNotFound(String),
    /// A snapshot of that name exists with another source volume.
    #[error("a snapshot named {name:?} already exists, of volume {from}")]
    SnapshotNameTaken {
        /// The CreateSnapshot name.
        name: String,
        /// The volume it was taken of.
        from: String,
    },
    /// The snapshot to make a volume from lives on another node.
    #[error(
        "{from} lives on another node than {node}: a volume made from it can only be made \
         where it is (the claim goes back to the scheduler; give the pod the snapshot's node)"
    )]
    SourceOnOtherNode {
        /// The snapshot.
        from: String,
        /// This node.
        node: String,
    },
    /// The volume to clone is not on this node. A volume id names no node,
    /// so this node cannot tell another node's volume from one that is
    /// gone; in Kubernetes the source claim is protected from deletion
    /// while it is cloned, so it is another node's.
    #[error(
        "volume {from} is not on node {node}: a clone can only be made on its source's node \
         (the claim goes back to the scheduler; give the pod the source's node)"
    )]
    SourceVolumeNotHere {
        /// The source volume.
        from: VolumeId,
        /// This node.
        node: String,
    },
    /// The source of a new volume is in another pool than the one asked for.
    #[error(
        "{from} is in pool {pool}, and volumes are made from it only in that pool, not in \
         {requested}; use a StorageClass with parameter pool: {pool}"
    )]
    SourceInOtherPool {
        /// The source.
        from: String,
        /// Its pool.
        pool: String,
        /// The pool asked for.
        requested: String,
    },
    /// A volume made from a source cannot be as small as the request's
    /// `limit_bytes`.
    #[error("limit_bytes {limit} is below {need} bytes, the size of {from}")]
    SmallerThanSource {
        /// The source.
        from: String,
        /// The least a volume made from it needs.
        need: u64,
        /// The request's limit.
        limit: u64,
    },
    /// The volume exists, made from another source (or none).
    #[error(
        "volume {name:?} already exists, made from {}",
        from.as_deref().unwrap_or("no source")
    )]
    OtherSource {
        /// The CreateVolume name.
        name: String,
        /// What it was made from.
        from: Option<String>,
    },
    /// A group snapshot of volumes in several pools.
    #[error(
        "the volumes are in pools {pools}; a group snapshot takes volumes of one pool, which \
         can be snapshotted at one point in time together"
    )]
    GroupAcrossPools {
        /// The pools, comma-separated.
        pools: String,
    },
    /// A raw block volume in a group snapshot: its device cannot be frozen.
    #[error(
        "volume {0} is a raw block volume, which cannot be frozen with the others; group \
         snapshots take filesystem volumes"
    )]
    GroupBlockMember(VolumeId),
    /// A group snapshot of that name exists with other volumes or
    /// parameters.
    #[error(
        "a group snapshot named {name:?} already exists, of volumes {sources}{}",
        if *.other_parameters { " with other parameters" } else { "" }
    )]
    GroupNameTaken {
        /// The CreateVolumeGroupSnapshot name.
        name: String,
        /// Its volumes, comma-separated.
        sources: String,
        /// Whether the parameters differ too.
        other_parameters: bool,
    },
    /// No group snapshot by that id on this node.
    #[error("group snapshot {0:?} does not exist")]
    GroupSnapshotNotFound(String),
    /// `snapshot_ids` are not the group's members.
    #[error("snapshot_ids do not match group snapshot {id}, whose snapshots are: {members}")]
    GroupMembersMismatch {
        /// The group snapshot.
        id: String,
        /// Its member snapshot ids, comma-separated.
        members: String,
    },
    /// An inline ephemeral volume asked of a pool not opened to them.
    #[error(
        "pool {pool} does not serve inline ephemeral volumes: any pod author can ask for one, \
         so a pool serves them only when its configuration says `ephemeral = true`{}",
        if .offered.is_empty() { String::new() } else { format!(" (on this node: {})", .offered) }
    )]
    EphemeralNotOffered {
        /// The pool asked for.
        pool: String,
        /// The pools that serve them, comma-separated.
        offered: String,
    },
    /// An inline ephemeral volume larger than its pool allows.
    #[error(
        "volume attribute size asks for {size} bytes, but inline ephemeral volumes of pool {pool} \
         are at most {max} bytes (max_ephemeral_volume_size)"
    )]
    EphemeralTooLarge {
        /// The pool.
        pool: String,
        /// The size asked for.
        size: u64,
        /// The pool's limit.
        max: u64,
    },
    /// The id of an inline ephemeral volume names a persistent volume.
    #[error(
        "volume id {name:?} names a persistent volume of this driver in pool {pool} (made by \
         CreateVolume), not an inline ephemeral volume"
    )]
    NotEphemeral {
        /// The id (the volume's name).
        name: String,
        /// Its pool.
        pool: String,
    },
    /// CreateVolume of a name an inline ephemeral volume has.
    #[error("an inline ephemeral volume of a pod already has the name {0:?}")]
    EphemeralName(String),
    /// NodeUnpublishVolume of an id that is neither this driver's nor an
    /// inline ephemeral volume's, at a target that holds a mount.
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    /// A file operation or syscall failed.
    #[error("{context}: {source}")]
    Io {
        /// What the call was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Another call on the volume is in flight.
    #[error(transparent)]
    Busy(#[from] LockError),
    /// The kernel refused to unmount a target because processes still use
    /// it (EBUSY), even after waiting for them.
    #[error(
        "target {} is busy: {}; the unmount is retried when the call is",
        target.display(),
        describe_users(users)
    )]
    TargetBusy {
        /// The target.
        target: PathBuf,
        /// Who used it when the last attempt was refused (may be empty:
        /// gone by then, or in another mount namespace).
        users: Vec<sys::mount::MountUser>,
    },
    /// The pool's records or storage failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The size cannot be given or promised.
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    /// The path from the CO cannot be used.
    #[error(transparent)]
    Target(#[from] TargetError),
}

/// The users of a busy target, for [`VolumeError::TargetBusy`].
fn describe_users(users: &[sys::mount::MountUser]) -> String {
    if users.is_empty() {
        return "no process was found using it (it may have just let go, or live in another \
                mount namespace)"
            .to_string();
    }
    let list: Vec<String> = users.iter().map(ToString::to_string).collect();
    format!("used by {}", list.join("; "))
}

impl VolumeError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        VolumeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Results of the volume logic.
pub(crate) type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Topology key that pins a volume to the node holding it.
pub(crate) const TOPOLOGY_KEY: &str = "topology.hostpath-csi.dev/node";

/// A volume as reported to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Volume {
    /// Volume id.
    pub(crate) id: String,
    /// Capacity in bytes.
    pub(crate) capacity_bytes: u64,
    /// Volume context handed back at publish time.
    pub(crate) context: BTreeMap<String, String>,
    /// What it was made from: a snapshot or volume id, and whether it is a
    /// snapshot.
    pub(crate) source: Option<(bool, String)>,
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
        let pools = configs
            .iter()
            .map(Pool::open)
            .collect::<Result<Vec<_>, _>>()?;
        for (i, a) in pools.iter().enumerate() {
            for b in &pools[i + 1..] {
                if a.overlaps(b.dir()) {
                    return Err(VolumeError::OverlappingPools {
                        a: a.name().to_string(),
                        a_dir: a.dir().to_path_buf(),
                        b: b.name().to_string(),
                        b_dir: b.dir().to_path_buf(),
                    });
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
    pub(crate) fn sweep(&self) -> Result<usize> {
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
            // Loop devices of block volumes that no target shows: left by
            // a publish killed before it bound the device, or by an
            // unpublish killed before it released it.
            for (token, dev) in pool.attached_blocks() {
                let Ok(_guard) = self.inflight.claim(&token) else {
                    continue;
                };
                let table = sys::mountinfo::read()
                    .map_err(|e| VolumeError::io("reading the mount table", e))?;
                if pool.release_block_device(&token, &dev, &table) {
                    tracing::info!(pool = %pool.name(), volume = %token, device = %dev.display(), "released the loop device of a block volume that no target shows");
                    n += 1;
                }
            }
        }
        Ok(n + self.sweep_snapshots()? + self.sweep_ephemeral()?)
    }

    /// The topology segment of this node.
    pub(crate) fn topology(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())])
    }

    /// Whether `requisite` (topology segments of which one must hold; none:
    /// any place) allows this node.
    fn allows_this_node(&self, requisite: &[BTreeMap<String, String>]) -> bool {
        requisite.is_empty() || requisite.iter().any(|s| self.on_this_node(s))
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
            Some(name) => self.pool(name).ok_or_else(|| VolumeError::UnknownPool {
                name: name.clone(),
                known: known(),
            }),
            None if self.pools.len() == 1 => Ok(&self.pools[0]),
            None => self
                .pool("default")
                .ok_or_else(|| VolumeError::PoolRequired { known: known() }),
        }
    }

    /// The pool a volume id names, or NOT_FOUND.
    fn pool_of(&self, id: &VolumeId) -> Result<&Pool> {
        self.pool(id.pool())
            .ok_or_else(|| VolumeError::NoSuchPool(id.clone()))
    }

    /// A volume as the CO sees it: its id, capacity and volume context.
    fn describe(&self, id: &VolumeId, pool: &Pool, record: &Record) -> Volume {
        // A block volume's size is enforced by its loop device, whatever
        // the pool's kind.
        let enforced = pool.enforces_size() || record.access == Access::Block;
        let mut context = BTreeMap::from([
            ("pool".to_string(), pool.name().to_string()),
            ("kind".to_string(), record.kind.as_str().to_string()),
            ("sizeEnforced".to_string(), enforced.to_string()),
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
            source: record.content_source.as_deref().and_then(|s| {
                let (what, id) = s.split_once(' ')?;
                Some((what == "snapshot", id.to_string()))
            }),
        }
    }
}
