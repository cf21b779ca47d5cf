//! What the pools hold, read without changing anything: the listing behind
//! `hostpath-csi volumes`, the metrics, and the orphan report.
//!
//! Every entry of a pool directory that does not start with a dot is
//! listed (dot names are the driver's own bookkeeping: records, markers,
//! scratch files), so a file, a symlink or a directory nobody recorded is
//! shown for what it is rather than skipped. A record whose storage is
//! missing is listed too, with the problem.
//!
//! Read-only means: no directory is created, no pool is prepared (btrfs
//! quotas are not turned on, no rescan is started), no image is mounted,
//! no record is written, no lock is taken. It works the same whether the
//! driver runs or not. Because it takes no locks, a volume being created
//! at that moment can show as an unrecorded directory, and one being
//! deleted can be missing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::id::valid_token;
use super::pool::{Pool, PoolError};
use super::record::{self, Use};
use super::{Result, VolumeError, Volumes};
use crate::config::{PoolConfig, PoolKind};
use crate::sys;

/// Who made a pool entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The driver (CreateVolume): it has a record, and DeleteVolume may
    /// remove it.
    Driver,
    /// The driver, for a pod's inline ephemeral volume (NodePublishVolume):
    /// it has a record; the pod's NodeUnpublishVolume removes it (or the
    /// startup sweep, once the pod's directory is gone). No
    /// PersistentVolume ever names it, and nothing else may remove it.
    Ephemeral,
    /// A directory without a record: an administrator's static volume (or
    /// the storage of a CreateVolume killed before it was acknowledged,
    /// which its retry reuses). The driver publishes it but never deletes
    /// it.
    Static,
    /// Something that cannot be a volume (a file, a symlink, a name no
    /// volume id can carry): never published, never deleted.
    Foreign,
}

impl Origin {
    /// Whether the driver made it (it has a record): a claim's volume or
    /// an inline ephemeral one.
    pub fn has_record(self) -> bool {
        matches!(self, Origin::Driver | Origin::Ephemeral)
    }

    /// The word used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Driver => "driver",
            Origin::Ephemeral => "ephemeral",
            Origin::Static => "static",
            Origin::Foreign => "foreign",
        }
    }
}

/// One entry of a pool, as `hostpath-csi volumes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    /// The volume id (`<pool>:<token>`); for a foreign entry, the pool and
    /// the entry's name, which no request can name.
    pub id: String,
    /// The pool's name.
    pub pool: String,
    /// The pool's kind.
    pub kind: PoolKind,
    /// Where the volume's data (or the entry) is.
    pub path: PathBuf,
    /// Who made it.
    pub origin: Origin,
    /// The CreateVolume name (driver volumes).
    pub name: Option<String>,
    /// The claim's namespace, from the create metadata.
    pub claim_namespace: Option<String>,
    /// The claim's name, from the create metadata.
    pub claim_name: Option<String>,
    /// The PersistentVolume's name, from the create metadata.
    pub pv_name: Option<String>,
    /// The pod (`namespace/name`) an inline ephemeral volume was made for,
    /// when the kubelet passed it.
    pub pod: Option<String>,
    /// The size promised to the CO (driver volumes).
    pub capacity_bytes: Option<u64>,
    /// Whether writes beyond the size fail.
    pub size_enforced: bool,
    /// Bytes the volume holds now, if measured (see
    /// [`InventoryOptions::measure`]) and measurable.
    pub used_bytes: Option<u64>,
    /// When the driver made it, seconds since the epoch.
    pub created_unix: Option<u64>,
    /// The last successful NodePublishVolume, seconds since the epoch
    /// (driver volumes; none for volumes made before this was recorded).
    pub last_published_unix: Option<u64>,
    /// The last NodeUnpublishVolume that took a mount off.
    pub last_unpublished_unix: Option<u64>,
    /// Where it is bind-mounted now, from the mount table.
    pub published_at: Vec<PathBuf>,
    /// What is wrong with it, if anything (storage missing, a corrupt
    /// record, not a directory, ...).
    pub problem: Option<String>,
}

/// What to read besides the records and the mount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InventoryOptions {
    /// Measure each volume's used bytes: a walk of a dir volume's tree, one
    /// `btrfs qgroup show` per btrfs pool, a stat per image volume.
    pub measure: bool,
}

impl Default for InventoryOptions {
    fn default() -> Self {
        InventoryOptions { measure: true }
    }
}

/// One pool's entries, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolInventory {
    /// The pool's name.
    pub name: String,
    /// Its kind.
    pub kind: PoolKind,
    /// Its directory, as configured.
    pub path: PathBuf,
    /// Why the pool could not be read (missing directory, say); its
    /// volumes are then empty.
    pub problem: Option<String>,
    /// Its entries, ordered by id.
    pub volumes: Vec<VolumeInfo>,
}

/// Reads every configured pool without opening it: for `hostpath-csi
/// volumes` and the orphan report, whether or not the driver runs. A pool
/// that cannot be read is listed with its problem; only a failure to read
/// the mount table is an error.
pub fn inventory(configs: &[PoolConfig], opts: InventoryOptions) -> Result<Vec<PoolInventory>> {
    let table = mount_table()?;
    Ok(configs
        .iter()
        .map(|c| match Pool::inspect(c) {
            Ok(pool) => pool_inventory(&pool, &table, opts),
            Err(e) => PoolInventory {
                name: c.name.clone(),
                kind: c.kind,
                path: c.path.clone(),
                problem: Some(e.to_string()),
                volumes: Vec::new(),
            },
        })
        .collect())
}

impl Volumes {
    /// [`inventory`] of the driver's open pools (for the metrics).
    pub fn inventory(&self, opts: InventoryOptions) -> Result<Vec<PoolInventory>> {
        let table = mount_table()?;
        Ok(self
            .pools
            .iter()
            .map(|p| pool_inventory(p, &table, opts))
            .collect())
    }
}

impl Volumes {
    /// Size and free bytes of each pool's filesystem (one statfs each), by
    /// pool name; `None` for a pool whose filesystem cannot be asked.
    pub fn space(&self) -> std::collections::HashMap<String, Option<(u64, u64)>> {
        self.pools
            .iter()
            .map(|p| (p.name().to_string(), p.fs_space().ok()))
            .collect()
    }
}

fn mount_table() -> Result<Vec<sys::mountinfo::MountEntry>> {
    sys::mountinfo::read().map_err(|e| VolumeError::io("reading the mount table", e))
}

fn pool_inventory(
    pool: &Pool,
    table: &[sys::mountinfo::MountEntry],
    opts: InventoryOptions,
) -> PoolInventory {
    let mut out = PoolInventory {
        name: pool.name().to_string(),
        kind: pool.kind(),
        path: pool.dir().to_path_buf(),
        problem: None,
        volumes: Vec::new(),
    };
    match entries(pool, table) {
        Ok(mut volumes) => {
            if opts.measure {
                measure(pool, &mut volumes);
            }
            volumes.sort_by(|a, b| a.id.cmp(&b.id));
            out.volumes = volumes;
        }
        Err(e) => out.problem = Some(e.to_string()),
    }
    out
}

/// Seconds since the epoch.
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The pool's entries, unmeasured.
fn entries(pool: &Pool, table: &[sys::mountinfo::MountEntry]) -> Result<Vec<VolumeInfo>> {
    let listing = |e| PoolError::io(format!("listing pool {}", pool.name()), e);
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    for entry in std::fs::read_dir(pool.dir()).map_err(listing)? {
        names.push(entry.map_err(listing)?.file_name());
    }
    let mut out = Vec::new();
    let visible: std::collections::BTreeSet<&str> = names
        .iter()
        .filter_map(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .collect();
    // Records first: every driver volume, also one whose storage is gone.
    for name in &names {
        let Some(token) = name.to_str().and_then(record::token_of) else {
            continue;
        };
        if !valid_token(token) {
            continue;
        }
        out.push(driver_volume(pool, token, visible.contains(token), table));
    }
    let recorded: std::collections::HashSet<String> = out
        .iter()
        .map(|v: &VolumeInfo| {
            v.path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for name in &names {
        let shown = name.to_string_lossy();
        if shown.starts_with('.') || recorded.contains(shown.as_ref()) {
            continue;
        }
        out.push(unrecorded(pool, name, table));
    }
    Ok(out)
}

/// A blank entry of `pool` at `path`.
fn blank(pool: &Pool, id: String, path: PathBuf, origin: Origin) -> VolumeInfo {
    VolumeInfo {
        id,
        pool: pool.name().to_string(),
        kind: pool.kind(),
        path,
        origin,
        name: None,
        claim_namespace: None,
        claim_name: None,
        pv_name: None,
        pod: None,
        capacity_bytes: None,
        size_enforced: false,
        used_bytes: None,
        created_unix: None,
        last_published_unix: None,
        last_unpublished_unix: None,
        published_at: Vec::new(),
        problem: None,
    }
}

fn driver_volume(
    pool: &Pool,
    token: &str,
    has_storage: bool,
    table: &[sys::mountinfo::MountEntry],
) -> VolumeInfo {
    let path = pool.volume_path(token);
    let mut v = blank(
        pool,
        format!("{}:{token}", pool.name()),
        path.clone(),
        Origin::Driver,
    );
    v.size_enforced = pool.enforces_size();
    match pool.record(token) {
        Ok(Some(rec)) => {
            if let Some((ns, claim)) = rec.claim() {
                v.claim_namespace = Some(ns.to_string());
                v.claim_name = Some(claim.to_string());
            }
            v.pv_name = rec.pv_name().map(str::to_string);
            if rec.ephemeral.is_some() {
                v.origin = Origin::Ephemeral;
                v.pod = rec.pod().map(|(ns, n)| format!("{ns}/{n}"));
            }
            v.capacity_bytes = Some(rec.capacity_bytes);
            v.created_unix = (rec.created_unix > 0).then_some(rec.created_unix);
            v.name = Some(rec.name);
        }
        // Deleted since the directory was listed.
        Ok(None) => v.problem = Some("its record vanished while listing".into()),
        Err(e) => v.problem = Some(e.to_string()),
    }
    v.last_published_unix = pool.last(token, Use::Published).map(unix);
    v.last_unpublished_unix = pool.last(token, Use::Unpublished).map(unix);
    if has_storage {
        v.published_at = sys::mountinfo::binds_of(table, &path);
    } else if v.problem.is_none() {
        v.problem = Some(format!("its storage {} is missing", path.display()));
    }
    v
}

fn unrecorded(
    pool: &Pool,
    name: &std::ffi::OsStr,
    table: &[sys::mountinfo::MountEntry],
) -> VolumeInfo {
    let path = pool.dir().join(name);
    let shown = name.to_string_lossy();
    let id = format!("{}:{shown}", pool.name());
    let meta = std::fs::symlink_metadata(&path);
    let token_ok = name.to_str().is_some_and(valid_token);
    match meta {
        Ok(m) if m.is_dir() && token_ok => {
            let mut v = blank(pool, id, path.clone(), Origin::Static);
            v.published_at = sys::mountinfo::binds_of(table, &path);
            v
        }
        Ok(m) => {
            let mut v = blank(pool, id, path, Origin::Foreign);
            v.problem = Some(if m.is_dir() {
                "a directory whose name no volume id can carry".to_string()
            } else {
                format!("{}, not a directory", file_type(&m))
            });
            v
        }
        Err(e) => {
            let mut v = blank(pool, id, path, Origin::Foreign);
            v.problem = Some(format!("cannot inspect it: {e}"));
            v
        }
    }
}

fn file_type(m: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_symlink() {
        "a symlink"
    } else if t.is_file() {
        "a file"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else {
        "something"
    }
}

/// Fills in used bytes: driver volumes as their kind measures them, static
/// directories by walking them; foreign entries are not measured.
fn measure(pool: &Pool, volumes: &mut [VolumeInfo]) {
    let tokens: Vec<String> = volumes
        .iter()
        .filter(|v| v.origin.has_record() && v.problem.is_none())
        .filter_map(|v| Some(v.path.file_name()?.to_str()?.to_string()))
        .collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let held: BTreeMap<String, u64> = match pool.held(&refs) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(pool = %pool.name(), error = %e, "cannot measure the volumes");
            BTreeMap::new()
        }
    };
    for v in volumes.iter_mut() {
        match v.origin {
            Origin::Driver | Origin::Ephemeral => {
                let token = v.path.file_name().and_then(|t| t.to_str()).unwrap_or("");
                v.used_bytes = held.get(token).copied();
            }
            Origin::Static => v.used_bytes = sys::fs::usage(&v.path).ok().map(|u| u.bytes),
            Origin::Foreign => {}
        }
    }
}
