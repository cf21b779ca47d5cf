//! Group snapshots: several volumes of one pool snapshotted at one point
//! in time (CreateVolumeGroupSnapshot, DeleteVolumeGroupSnapshot,
//! GetVolumeGroupSnapshot).
//!
//! The CSI spec asks a group snapshot to be write-order consistent or to
//! fail: no write may reach one member after its snapshot and before
//! another's. How each kind keeps that promise is the backend's
//! (`Backend::snapshot_group`): image pools freeze every member's
//! filesystem for the copies; btrfs pools cut the snapshots one after the
//! other and check that nothing was written in between, cutting them again
//! if something was; dir pools refuse. A group takes volumes of one pool
//! (one filesystem, one way of freezing) and filesystem volumes only.
//!
//! Each member is an ordinary snapshot (`.snapshots/<token>` and its
//! record, see `pool/snapshots.rs`) whose record names its group; the
//! group's record (`.snapshots/.groups/.<token>.meta`) is the commit point.
//! Members are made first and the group record last, and a delete removes
//! the group record first: a member whose group has no record is part of
//! a call cut short, hidden from the CO and removed by the startup sweep.
//! So a kill -9 at any moment leaves a whole group or none.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::id::{VolumeId, token_for_name, valid_pool_name, valid_token};
use super::pool::Pool;
use super::record::Access;
use super::snapshot::{
    MAX_SNAPSHOT_TOKEN_LEN, Snapshot, SnapshotRecord, node_hash, snapshot_token,
};
use super::{Result, VolumeError, Volumes};
use crate::validate::CreateGroupSnapshot;

/// Longest group snapshot token: one less than a snapshot's, for the
/// second `@` that sets group ids apart.
const MAX_GROUP_TOKEN_LEN: usize = MAX_SNAPSHOT_TOKEN_LEN - 1;

/// A parsed group snapshot id, `<pool>@@<token>@<node hash>`: like a
/// snapshot id with an empty field after the pool, so neither kind of id
/// can be taken for the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupId {
    pool: String,
    token: String,
    node: String,
}

impl GroupId {
    /// Parses a group snapshot id from a request; `None` when it cannot
    /// name a group snapshot of this driver.
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.split('@');
        let (pool, empty, token, node) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let ok = parts.next().is_none()
            && empty.is_empty()
            && valid_pool_name(pool)
            && valid_token(token)
            && token.len() <= MAX_GROUP_TOKEN_LEN
            && node == node_hash_shape(node)?;
        ok.then(|| GroupId {
            pool: pool.to_string(),
            token: token.to_string(),
            node: node.to_string(),
        })
    }

    /// The pool the group lives in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The lock key of the group (`#` is in no volume or snapshot token).
    fn lock_key(&self) -> String {
        lock_key(&self.token)
    }
}

/// `node` if it has the shape of a node hash (lowercase hex of the right
/// length).
fn node_hash_shape(node: &str) -> Option<&str> {
    (node.len() == node_hash("").len()
        && node
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(node)
}

impl std::fmt::Display for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@@{}@{}", self.pool, self.token, self.node)
    }
}

fn lock_key(token: &str) -> String {
    format!("#{token}")
}

/// The token for a CreateVolumeGroupSnapshot name: the name when it is a
/// short plain file name, a hash of it otherwise.
pub fn group_token(name: &str) -> String {
    let t = token_for_name(name);
    if t.len() <= MAX_GROUP_TOKEN_LEN {
        return t;
    }
    token_for_name(&format!("/{name}"))
}

/// The token of the member snapshot of `volume` in group `name` (always a
/// hash: the name holds a `/`, which no CreateSnapshot token can).
fn member_token(name: &str, volume: &VolumeId) -> String {
    snapshot_token(&member_name(name, volume))
}

fn member_name(name: &str, volume: &VolumeId) -> String {
    format!("{name}/{volume}")
}

/// What the driver remembers about a group snapshot
/// (`.snapshots/.groups/.<token>.meta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The CreateVolumeGroupSnapshot name.
    pub name: String,
    /// The volumes, in the request's order.
    pub source_volume_ids: Vec<String>,
    /// The request's parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Tokens of the member snapshots, one per volume, in the same order.
    pub members: Vec<String>,
    /// When the group was cut: seconds since the epoch.
    pub created_unix: u64,
    /// And nanoseconds within the second.
    pub created_nanos: u32,
}

impl GroupRecord {
    pub(crate) fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }

    pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<GroupRecord> {
        serde_json::from_slice(bytes)
    }

    /// Whether a create with these volumes and parameters asks for this
    /// group (the volumes in any order).
    fn same_request(&self, sources: &[String], parameters: &BTreeMap<String, String>) -> bool {
        let mine: BTreeSet<&String> = self.source_volume_ids.iter().collect();
        let theirs: BTreeSet<&String> = sources.iter().collect();
        mine == theirs && &self.parameters == parameters
    }
}

/// One member of a group snapshot being made: its snapshot token, its
/// volume's token, and the record to write for it.
#[derive(Debug)]
pub(crate) struct Member {
    /// The member snapshot's token.
    pub(crate) token: String,
    /// The volume's token.
    pub(crate) volume: String,
    /// Its record (the size is filled in once it is cut).
    pub(crate) record: SnapshotRecord,
}

/// A group snapshot as reported to the CO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupSnapshot {
    /// Group snapshot id.
    pub(crate) id: String,
    /// Its member snapshots that exist (a member deleted on its own with
    /// DeleteSnapshot is gone from the group).
    pub(crate) snapshots: Vec<Snapshot>,
    /// When it was cut: seconds since the epoch and nanoseconds.
    pub(crate) created: (u64, u32),
}

impl Volumes {
    pub(crate) fn group_id(&self, pool: &str, token: &str) -> GroupId {
        GroupId {
            pool: pool.to_string(),
            token: token.to_string(),
            node: node_hash(&self.node_id),
        }
    }

    fn describe_group(&self, pool: &Pool, token: &str, rec: &GroupRecord) -> Result<GroupSnapshot> {
        let mut snapshots = Vec::with_capacity(rec.members.len());
        for m in &rec.members {
            if let Some(s) = pool.snapshot_record(m)? {
                snapshots.push(self.describe_snapshot(pool, m, &s));
            }
        }
        Ok(GroupSnapshot {
            id: self.group_id(pool.name(), token).to_string(),
            snapshots,
            created: (rec.created_unix, rec.created_nanos),
        })
    }

    /// The one pool all `sources` are in.
    fn group_pool(&self, sources: &[VolumeId]) -> Result<&Pool> {
        let pools: BTreeSet<&str> = sources.iter().map(VolumeId::pool).collect();
        if pools.len() > 1 {
            return Err(VolumeError::GroupAcrossPools {
                pools: pools.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        self.pool_of(&sources[0])
    }

    /// CreateVolumeGroupSnapshot: idempotent by name (the same volumes in
    /// any order, the same parameters); the same name otherwise is
    /// ALREADY_EXISTS.
    pub(crate) fn create_group_snapshot(&self, req: &CreateGroupSnapshot) -> Result<GroupSnapshot> {
        let pool = self.group_pool(&req.sources)?;
        let token = group_token(&req.name);
        let id = self.group_id(pool.name(), &token);
        let _group = self.inflight.claim(&id.lock_key())?;
        let sources: Vec<String> = req.sources.iter().map(ToString::to_string).collect();
        for other in &self.pools {
            if let Some(rec) = other.group_record(&token)? {
                if rec.name == req.name
                    && other.name() == pool.name()
                    && rec.same_request(&sources, &req.parameters)
                {
                    return self.describe_group(pool, &token, &rec);
                }
                return Err(VolumeError::GroupNameTaken {
                    name: req.name.clone(),
                    other_parameters: rec.parameters != req.parameters,
                    sources: rec.source_volume_ids.join(", "),
                });
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut guards = Vec::with_capacity(2 * req.sources.len());
        let mut members = Vec::with_capacity(req.sources.len());
        for v in &req.sources {
            guards.push(self.inflight.claim(v.token())?);
            let vol = pool
                .record(v.token())?
                .ok_or_else(|| VolumeError::NotFound(v.clone()))?;
            if vol.access == Access::Block {
                return Err(VolumeError::GroupBlockMember(v.clone()));
            }
            let m = member_token(&req.name, v);
            guards.push(self.inflight.claim(&format!("@{m}"))?);
            if let Some(old) = pool.snapshot_record(&m)? {
                // A member of this group from an attempt cut short (the
                // group has no record): made again. Anything else by that
                // token is someone's snapshot.
                if old.group.as_deref() != Some(token.as_str()) {
                    return Err(VolumeError::SnapshotNameTaken {
                        name: member_name(&req.name, v),
                        from: old.source_volume_id,
                    });
                }
                pool.remove_snapshot(&m)?;
            }
            members.push(Member {
                token: m,
                volume: v.token().to_string(),
                record: SnapshotRecord {
                    name: member_name(&req.name, v),
                    source_volume_id: v.to_string(),
                    kind: vol.kind,
                    source_capacity_bytes: vol.capacity_bytes,
                    size_bytes: 0,
                    created_unix: now.as_secs(),
                    created_nanos: now.subsec_nanos(),
                    access: vol.access,
                    group: Some(token.clone()),
                },
            });
        }
        let rec = GroupRecord {
            name: req.name.clone(),
            source_volume_ids: sources,
            parameters: req.parameters.clone(),
            members: members.iter().map(|m| m.token.clone()).collect(),
            created_unix: now.as_secs(),
            created_nanos: now.subsec_nanos(),
        };
        pool.take_group(&token, &rec, &mut members)?;
        tracing::info!(group_snapshot_id = %id, volumes = rec.members.len(), "group snapshot created");
        self.describe_group(pool, &token, &rec)
    }

    /// The group's record, with `snapshot_ids` (when given) checked
    /// against its members.
    fn group_with_members(
        &self,
        id: &GroupId,
        snapshot_ids: &BTreeSet<String>,
    ) -> Result<Option<(&Pool, GroupRecord)>> {
        let Some(pool) = self.pool(id.pool()) else {
            return Ok(None);
        };
        if id.node != node_hash(&self.node_id) {
            return Ok(None);
        }
        let Some(rec) = pool.group_record(&id.token)? else {
            return Ok(None);
        };
        let members: BTreeSet<String> = rec
            .members
            .iter()
            .map(|m| self.snapshot_id(pool.name(), m).to_string())
            .collect();
        if !snapshot_ids.is_empty() && snapshot_ids != &members {
            return Err(VolumeError::GroupMembersMismatch {
                id: id.to_string(),
                members: members.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(Some((pool, rec)))
    }

    /// DeleteVolumeGroupSnapshot: the group and its member snapshots;
    /// succeeds for groups that do not exist.
    pub(crate) fn delete_group_snapshot(
        &self,
        id: &GroupId,
        snapshot_ids: &BTreeSet<String>,
    ) -> Result<()> {
        let _group = self.inflight.claim(&id.lock_key())?;
        let Some((pool, rec)) = self.group_with_members(id, snapshot_ids)? else {
            return Ok(());
        };
        // Every member's lock before anything changes: a member being
        // restored from makes the call ABORTED, with the group intact.
        let _members = rec
            .members
            .iter()
            .map(|m| self.inflight.claim(&format!("@{m}")))
            .collect::<Result<Vec<_>, _>>()?;
        pool.remove_group(&id.token, &rec)?;
        tracing::info!(group_snapshot_id = %id, "group snapshot deleted");
        Ok(())
    }

    /// GetVolumeGroupSnapshot: the group, or NOT_FOUND.
    pub(crate) fn get_group_snapshot(
        &self,
        id: &GroupId,
        snapshot_ids: &BTreeSet<String>,
    ) -> Result<GroupSnapshot> {
        let (pool, rec) = self
            .group_with_members(id, snapshot_ids)?
            .ok_or_else(|| VolumeError::GroupSnapshotNotFound(id.to_string()))?;
        self.describe_group(pool, &id.token, &rec)
    }

    /// Removes the members of group snapshots that have no record (a
    /// create or delete cut short), skipping groups a call is working on.
    pub(crate) fn sweep_groups(&self) -> Result<usize> {
        let mut n = 0;
        for pool in &self.pools {
            for token in pool.snapshot_tokens()? {
                let Some(group) = pool.snapshot_record(&token)?.and_then(|r| r.group) else {
                    continue;
                };
                let (Ok(_g), Ok(_s)) = (
                    self.inflight.claim(&lock_key(&group)),
                    self.inflight.claim(&format!("@{token}")),
                ) else {
                    continue;
                };
                if pool.group_record(&group)?.is_none() && pool.snapshot_record(&token)?.is_some() {
                    pool.remove_snapshot(&token)?;
                    tracing::info!(pool = %pool.name(), snapshot = %token, "removed a snapshot of a group snapshot cut short");
                    n += 1;
                }
            }
            for (group, path) in pool.group_leftovers()? {
                let Ok(_g) = self.inflight.claim(&lock_key(&group)) else {
                    continue;
                };
                match std::fs::remove_file(&path) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(VolumeError::io(format!("removing {}", path.display()), e));
                    }
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::id::MAX_POOL_LEN;
    use super::*;

    #[test]
    fn group_ids_round_trip_and_are_never_snapshot_ids() {
        let id = GroupId {
            pool: "ssd".into(),
            token: "nightly".into(),
            node: node_hash("node-a"),
        };
        assert_eq!(GroupId::parse(&id.to_string()), Some(id.clone()));
        assert_eq!(
            super::super::snapshot::SnapshotId::parse(&id.to_string()),
            None
        );
        let long = GroupId {
            pool: "p".repeat(MAX_POOL_LEN),
            token: group_token(&"x".repeat(200)),
            node: node_hash("n"),
        };
        assert!(long.to_string().len() <= 128, "{long}");
        assert!(GroupId::parse(&long.to_string()).is_some());
        let snapshot = format!("ssd@nightly@{}", node_hash("node-a"));
        for bad in [
            "",
            snapshot.as_str(),
            "ssd@@nightly",
            "ssd@@nightly@0123456z",
            "ssd@x@nightly@01234567",
            "ssd@@.x@01234567",
            "ssd@@x@01234567@",
        ] {
            assert_eq!(GroupId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn members_have_their_own_tokens() {
        let a = VolumeId::parse("ssd:a").unwrap();
        let b = VolumeId::parse("ssd:b").unwrap();
        assert_ne!(member_token("g", &a), member_token("g", &b));
        assert_ne!(member_token("g", &a), member_token("h", &a));
        assert!(valid_token(&member_token("g", &a)));
        // No CreateSnapshot name maps to a member's token but the
        // member's own name.
        assert_ne!(member_token("g", &a), snapshot_token("g"));
    }

    #[test]
    fn a_retry_may_list_the_volumes_in_another_order() {
        let rec = GroupRecord {
            name: "g".into(),
            source_volume_ids: vec!["p:a".into(), "p:b".into()],
            parameters: BTreeMap::new(),
            members: vec![],
            created_unix: 0,
            created_nanos: 0,
        };
        let none = BTreeMap::new();
        assert!(rec.same_request(&["p:b".into(), "p:a".into()], &none));
        assert!(!rec.same_request(&["p:a".into()], &none));
        let other = BTreeMap::from([("k".to_string(), "v".to_string())]);
        assert!(!rec.same_request(&["p:a".into(), "p:b".into()], &other));
    }
}
