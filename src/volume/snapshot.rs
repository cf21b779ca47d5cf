//! Snapshots, and volumes made from a snapshot or another volume: the
//! calls CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot, and
//! the content source of CreateVolume.
//!
//! A snapshot lives in the pool of its source volume, on its node, and is
//! independent of it: a copy (dir, image) or a read-only subvolume (btrfs)
//! that outlives the volume. Its id is `<pool>@<token>@<node>`, where
//! `<node>` is a short hash of the node's id, so that a node asked to
//! restore a snapshot of another node can say so (RESOURCE_EXHAUSTED,
//! which makes the external-provisioner hand the claim back to the
//! scheduler) rather than claim it does not exist. A volume id names no
//! node, so a clone's source that this node does not hold is answered the
//! same way (see [`VolumeError::SourceVolumeNotHere`]).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::capacity;
use super::id::{MAX_POOL_LEN, VolumeId, valid_pool_name, valid_token};
use super::pool::Pool;
use super::record::{Access, Record};
use super::{Result, VolumeError, Volumes};
use crate::backend::Source;
use crate::config::PoolKind;
use crate::validate::{ContentSource, CreateSnapshot, CreateVolume, ListSnapshots};

/// Longest snapshot token: keeps snapshot ids within the 128 bytes the CSI
/// spec allows, with the pool and the node's hash.
pub const MAX_SNAPSHOT_TOKEN_LEN: usize = 128 - MAX_POOL_LEN - 2 - NODE_HASH_LEN;
/// Length of the node's hash in snapshot ids.
const NODE_HASH_LEN: usize = 8;

/// A parsed snapshot id: a valid pool name, a valid token and a node hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId {
    pool: String,
    token: String,
    node: String,
}

impl SnapshotId {
    /// Parses a snapshot id from a request; `None` when it cannot name a
    /// snapshot of this driver.
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.split('@');
        let (pool, token, node) = (parts.next()?, parts.next()?, parts.next()?);
        let ok = parts.next().is_none()
            && valid_pool_name(pool)
            && valid_token(token)
            && token.len() <= MAX_SNAPSHOT_TOKEN_LEN
            && node.len() == NODE_HASH_LEN
            && node
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then(|| SnapshotId {
            pool: pool.to_string(),
            token: token.to_string(),
            node: node.to_string(),
        })
    }

    fn new(pool: &str, token: &str, node_id: &str) -> Self {
        SnapshotId {
            pool: pool.to_string(),
            token: token.to_string(),
            node: node_hash(node_id),
        }
    }

    /// The pool the snapshot lives in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The snapshot's name inside the pool's snapshot directory.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The lock key of the snapshot (volume tokens never contain `@`).
    fn lock_key(&self) -> String {
        format!("@{}", self.token)
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}@{}", self.pool, self.token, self.node)
    }
}

/// The short hash of a node id that snapshot ids carry.
pub(crate) fn node_hash(node_id: &str) -> String {
    hex::encode(Sha256::digest(node_id.as_bytes()))[..NODE_HASH_LEN].to_string()
}

/// The token for a CreateSnapshot name: the name itself when it is a short
/// plain file name, a hash of it otherwise (as for volumes).
pub fn snapshot_token(name: &str) -> String {
    let t = super::id::token_for_name(name);
    if t.len() <= MAX_SNAPSHOT_TOKEN_LEN {
        return t;
    }
    super::id::token_for_name(&format!("/{name}"))
}

/// What the driver remembers about a snapshot (`.snapshots/.<token>.meta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The CreateSnapshot name.
    pub name: String,
    /// The id of the volume it was taken of.
    pub source_volume_id: String,
    /// Kind of the pool at creation.
    pub kind: PoolKind,
    /// The source volume's capacity when the snapshot was taken.
    pub source_capacity_bytes: u64,
    /// What the snapshot reports as its size: the least a volume made
    /// from it needs (dir, btrfs: the bytes of its data; image: the image's
    /// size).
    pub size_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Creation time, nanoseconds within the second.
    #[serde(default)]
    pub created_nanos: u32,
    /// The source volume's access type: a raw block volume's snapshot is
    /// a copy of its file, and restores only into a raw block volume.
    #[serde(default, skip_serializing_if = "Access::is_mount")]
    pub access: Access,
    /// The token of the group snapshot it was cut with, if any. Such a
    /// snapshot exists for the CO only once its group's record does: until
    /// then it is part of a group snapshot being made (or cut short, which
    /// the startup sweep removes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl SnapshotRecord {
    pub(crate) fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<SnapshotRecord> {
        serde_json::from_slice(bytes)
    }
}

/// A snapshot as reported to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// Snapshot id.
    pub(crate) id: String,
    /// The volume it was taken of.
    pub(crate) source_volume_id: String,
    /// Its size (see [`SnapshotRecord::size_bytes`]).
    pub(crate) size_bytes: u64,
    /// Creation time: seconds since the epoch and nanoseconds.
    pub(crate) created: (u64, u32),
    /// The id of the group snapshot it belongs to, if any.
    pub(crate) group_id: Option<String>,
    /// Where it is usable from: this node's topology segment. A snapshot
    /// is a copy on this node, and a volume made from it is made here.
    pub(crate) topology: BTreeMap<String, String>,
}

impl Volumes {
    pub(crate) fn snapshot_id(&self, pool: &str, token: &str) -> SnapshotId {
        SnapshotId::new(pool, token, &self.node_id)
    }

    pub(crate) fn describe_snapshot(
        &self,
        pool: &Pool,
        token: &str,
        rec: &SnapshotRecord,
    ) -> Snapshot {
        Snapshot {
            id: self.snapshot_id(pool.name(), token).to_string(),
            source_volume_id: rec.source_volume_id.clone(),
            size_bytes: rec.size_bytes,
            created: (rec.created_unix, rec.created_nanos),
            group_id: rec
                .group
                .as_ref()
                .map(|g| self.group_id(pool.name(), g).to_string()),
            topology: self.topology(),
        }
    }

    /// The snapshot's record if the CO may see it: not a member of a group
    /// snapshot whose record is not (or no longer) there.
    fn visible_record(&self, pool: &Pool, token: &str) -> Result<Option<SnapshotRecord>> {
        let Some(rec) = pool.snapshot_record(token)? else {
            return Ok(None);
        };
        if let Some(g) = &rec.group
            && pool.group_record(g)?.is_none()
        {
            return Ok(None);
        }
        Ok(Some(rec))
    }

    /// CreateSnapshot: idempotent by name; the same name with another
    /// source is ALREADY_EXISTS.
    pub(crate) fn create_snapshot(&self, req: &CreateSnapshot) -> Result<Snapshot> {
        let source = &req.source;
        // Before anything is looked up or made: a snapshot is usable only
        // on this node (CSI spec, CreateSnapshot errors: a valid
        // requirement that cannot be met is RESOURCE_EXHAUSTED).
        if !self.allows_this_node(&req.requisite) {
            return Err(VolumeError::SnapshotOtherNode {
                node: self.node_id.clone(),
            });
        }
        let pool = self.pool_of(source)?;
        let token = snapshot_token(&req.name);
        let id = self.snapshot_id(pool.name(), &token);
        let _snap = self.inflight.claim(&id.lock_key())?;
        for other in &self.pools {
            if let Some(rec) = other.snapshot_record(&token)? {
                if rec.name == req.name
                    && rec.source_volume_id == source.to_string()
                    && other.name() == pool.name()
                {
                    return Ok(self.describe_snapshot(pool, &token, &rec));
                }
                return Err(VolumeError::SnapshotNameTaken {
                    name: req.name.clone(),
                    from: rec.source_volume_id,
                });
            }
        }
        let _vol = self.inflight.claim(source.token())?;
        let vol = pool
            .record(source.token())?
            .ok_or_else(|| VolumeError::NotFound(source.clone()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut rec = SnapshotRecord {
            name: req.name.clone(),
            source_volume_id: source.to_string(),
            kind: vol.kind,
            source_capacity_bytes: vol.capacity_bytes,
            size_bytes: 0,
            created_unix: now.as_secs(),
            created_nanos: now.subsec_nanos(),
            access: vol.access,
            group: None,
        };
        pool.take_snapshot(&token, source.token(), &mut rec)?;
        tracing::info!(snapshot_id = %id, volume_id = %source, size = rec.size_bytes, "snapshot created");
        Ok(self.describe_snapshot(pool, &token, &rec))
    }

    /// DeleteSnapshot: succeeds for snapshots that do not exist.
    pub(crate) fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let Some(pool) = self.pool(id.pool()) else {
            return Ok(());
        };
        if id.node != node_hash(&self.node_id) {
            return Ok(());
        }
        let _guard = self.inflight.claim(&id.lock_key())?;
        if pool.snapshot_record(id.token())?.is_none() {
            return Ok(());
        }
        pool.remove_snapshot(id.token())?;
        tracing::info!(snapshot_id = %id, "snapshot deleted");
        Ok(())
    }

    /// GetSnapshot: the snapshot, or NOT_FOUND.
    pub(crate) fn get_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        self.find_snapshot(id)?
            .ok_or_else(|| VolumeError::SnapshotNotFound(id.to_string()))
    }

    fn find_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>> {
        let Some(pool) = self.pool(id.pool()) else {
            return Ok(None);
        };
        if id.node != node_hash(&self.node_id) {
            return Ok(None);
        }
        Ok(self
            .visible_record(pool, id.token())?
            .map(|rec| self.describe_snapshot(pool, id.token(), &rec)))
    }

    /// ListSnapshots: this node's snapshots ordered by id, optionally only
    /// one or those of one volume; paged like ListVolumes (the token is the
    /// id of the first snapshot of the next page).
    pub(crate) fn list_snapshots(&self, req: &ListSnapshots) -> Result<(Vec<Snapshot>, String)> {
        if req.matches_none {
            return Ok((Vec::new(), String::new()));
        }
        if let Some(id) = &req.snapshot {
            return Ok((self.find_snapshot(id)?.into_iter().collect(), String::new()));
        }
        let mut all = Vec::new();
        for pool in &self.pools {
            for token in pool.snapshot_tokens()? {
                let id = self.snapshot_id(pool.name(), &token).to_string();
                all.push((id, pool, token));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let from = req.start.as_ref().map(ToString::to_string);
        let mut out = Vec::new();
        let mut next = String::new();
        for (id, pool, token) in all {
            if from.as_ref().is_some_and(|f| &id < f) {
                continue;
            }
            // Deleted while listing, or part of a group snapshot being
            // made: skipped.
            let Some(rec) = self.visible_record(pool, &token)? else {
                continue;
            };
            if req
                .source_volume
                .as_ref()
                .is_some_and(|v| v != &rec.source_volume_id)
            {
                continue;
            }
            if out.len() == req.max_entries {
                next = id;
                break;
            }
            out.push(self.describe_snapshot(pool, &token, &rec));
        }
        Ok((out, next))
    }

    /// CreateVolume with a content source: a new volume holding a copy of
    /// a snapshot or of another volume, in the same pool, at least as large
    /// as what it copies.
    pub(crate) fn create_from(
        &self,
        req: &CreateVolume,
        source: &ContentSource,
        pool: &Pool,
        id: &VolumeId,
    ) -> Result<Record> {
        let (source_pool, key) = match source {
            ContentSource::Snapshot(s) => {
                if s.node != node_hash(&self.node_id) {
                    return Err(VolumeError::SourceOnOtherNode {
                        from: s.to_string(),
                        node: self.node_id.clone(),
                    });
                }
                (s.pool(), s.lock_key())
            }
            ContentSource::Volume(v) => (v.pool(), v.token().to_string()),
        };
        if source_pool != pool.name() {
            if self.pool(source_pool).is_none() {
                return Err(self.source_missing(source));
            }
            return Err(VolumeError::SourceInOtherPool {
                from: source.to_string(),
                pool: source_pool.to_string(),
                requested: pool.name().to_string(),
            });
        }
        let _source = self.inflight.claim(&key)?;
        let (need, access) = match source {
            ContentSource::Snapshot(s) => {
                let rec = pool
                    .snapshot_record(s.token())?
                    .ok_or_else(|| self.source_missing(source))?;
                (rec.size_bytes, rec.access)
            }
            ContentSource::Volume(v) => {
                let rec =
                    pool.record(v.token())?
                        .ok_or_else(|| VolumeError::SourceVolumeNotHere {
                            from: v.clone(),
                            node: self.node_id.clone(),
                        })?;
                (rec.capacity_bytes, rec.access)
            }
        };
        // A raw block volume's data is a device image, a filesystem
        // volume's a tree of files: neither can become the other.
        if access != req.access {
            return Err(VolumeError::SourceAccess {
                from: source.to_string(),
                access,
            });
        }
        if req.capacity.limit != 0 && req.capacity.limit < need {
            return Err(VolumeError::SmallerThanSource {
                from: source.to_string(),
                need,
                limit: req.capacity.limit,
            });
        }
        let mut range = req.capacity;
        range.required = range.required.max(need);
        let capacity = capacity::decide(pool, range)?;
        let reservation = capacity::reserve(pool, id.token(), capacity, None)?;
        let mut record = Record::new(&req.name, pool.kind(), capacity, req.parameters.clone());
        record.content_source = Some(source.to_string());
        record.access = req.access;
        record.root = req.root;
        let snapshot_path;
        let from = match source {
            ContentSource::Snapshot(s) => {
                snapshot_path = pool.snapshot_path(s.token());
                Source::Snapshot(&snapshot_path)
            }
            ContentSource::Volume(v) => Source::Volume(v.token()),
        };
        pool.create_from(id.token(), &record, from)?;
        reservation.commit();
        tracing::info!(volume_id = %id, capacity, source = %source, "volume created from a source");
        Ok(record)
    }

    fn source_missing(&self, source: &ContentSource) -> VolumeError {
        match source {
            ContentSource::Snapshot(s) => VolumeError::SnapshotNotFound(s.to_string()),
            ContentSource::Volume(v) => VolumeError::NotFound(v.clone()),
        }
    }

    /// Removes leftovers of interrupted snapshot and restore calls: data of
    /// snapshots without a record, half-made copies, volumes whose making
    /// from a source was cut short; skips whatever a call is working on.
    pub(crate) fn sweep_snapshots(&self) -> Result<usize> {
        let mut n = self.sweep_groups()?;
        for pool in &self.pools {
            for (token, path) in pool.snapshot_leftovers()? {
                let Ok(_guard) = self.inflight.claim(&format!("@{token}")) else {
                    continue;
                };
                if pool.remove_snapshot_leftover(&token, &path)? {
                    n += 1;
                }
            }
            for token in pool.restore_leftovers()? {
                let Ok(_guard) = self.inflight.claim(&token) else {
                    continue;
                };
                if pool.undo_restore(&token)? {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

impl std::fmt::Display for ContentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentSource::Snapshot(s) => write!(f, "snapshot {s}"),
            ContentSource::Volume(v) => write!(f, "volume {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_round_trip_and_stay_short() {
        let id = SnapshotId::new("ssd", "snapshot-1234", "node-a");
        assert_eq!(SnapshotId::parse(&id.to_string()), Some(id.clone()));
        let long = SnapshotId::new(
            &"p".repeat(MAX_POOL_LEN),
            &snapshot_token(&"x".repeat(128)),
            "n",
        );
        assert!(long.to_string().len() <= 128, "{long}");
        let t = snapshot_token(&"y".repeat(MAX_SNAPSHOT_TOKEN_LEN + 1));
        assert!(t.len() <= MAX_SNAPSHOT_TOKEN_LEN && valid_token(&t));
        for bad in [
            "",
            "a@b",
            "a@b@c",
            "a@b@0123456z",
            "A@b@01234567",
            "a@.b@01234567",
            "a:b",
            "a@b@01234567@x",
        ] {
            assert_eq!(SnapshotId::parse(bad), None, "{bad:?}");
        }
        assert_ne!(node_hash("a"), node_hash("b"));
    }
}
