//! GroupController requests: CreateVolumeGroupSnapshot, and the group
//! snapshot id with its member list that Delete and Get carry.

use std::collections::{BTreeMap, BTreeSet};

use csi_proto as csi;

use super::fields::{parameters, parse_volume_id, required, volume_name};
use super::{RequestError, Result};
use crate::volume::group_snapshot::GroupId;
use crate::volume::id::VolumeId;

/// A checked CreateVolumeGroupSnapshot.
#[derive(Debug, Clone)]
pub(crate) struct CreateGroupSnapshot {
    /// The CO-chosen name, the key for idempotency.
    pub(crate) name: String,
    /// The volumes to snapshot together: at least one, none twice, in the
    /// request's order.
    pub(crate) sources: Vec<VolumeId>,
    /// The VolumeGroupSnapshotClass's parameters (and what the snapshotter
    /// adds); part of what makes a retry the same request.
    pub(crate) parameters: BTreeMap<String, String>,
}

/// CreateVolumeGroupSnapshot: a name and the volumes (an id that cannot
/// name a volume of this driver is NOT_FOUND, a repeated one
/// INVALID_ARGUMENT).
pub(crate) fn create_group_snapshot(
    r: &csi::CreateVolumeGroupSnapshotRequest,
) -> Result<CreateGroupSnapshot> {
    let name = volume_name(&r.name)?.to_string();
    if r.source_volume_ids.is_empty() {
        return Err(RequestError::Missing("source_volume_ids"));
    }
    let mut seen = BTreeSet::new();
    let mut sources = Vec::with_capacity(r.source_volume_ids.len());
    for id in &r.source_volume_ids {
        let v = parse_volume_id(required(id, "source_volume_ids")?)?;
        if !seen.insert(v.clone()) {
            return Err(RequestError::DuplicateSource(id.clone()));
        }
        sources.push(v);
    }
    Ok(CreateGroupSnapshot {
        name,
        sources,
        parameters: parameters(&r.parameters),
    })
}

/// A group snapshot as Delete and Get name it.
#[derive(Debug, Clone)]
pub(crate) struct GroupRef {
    /// The id as sent.
    raw: String,
    /// The group; `None` when the id cannot name one of this driver's.
    pub(crate) id: Option<GroupId>,
    /// The member snapshot ids the CO believes the group has; empty when it
    /// did not say (csi-sanity does not), otherwise checked against the
    /// group's members.
    pub(crate) snapshot_ids: BTreeSet<String>,
}

/// The `group_snapshot_id` (required) and `snapshot_ids` of a Delete or
/// Get request.
pub(crate) fn group_ref(group_snapshot_id: &str, snapshot_ids: &[String]) -> Result<GroupRef> {
    let id = required(group_snapshot_id, "group_snapshot_id")?;
    Ok(GroupRef {
        raw: id.to_string(),
        id: GroupId::parse(id),
        snapshot_ids: snapshot_ids.iter().cloned().collect(),
    })
}

impl GroupRef {
    /// The group, or NOT_FOUND (GetVolumeGroupSnapshot).
    pub(crate) fn existing(self) -> Result<(GroupId, BTreeSet<String>)> {
        match self.id {
            Some(id) => Ok((id, self.snapshot_ids)),
            None => Err(RequestError::UnknownGroupSnapshot(self.raw)),
        }
    }
}
