//! CreateVolumeGroupSnapshot, DeleteVolumeGroupSnapshot and
//! GetVolumeGroupSnapshot with missing fields, ids forged to point outside
//! a pool, repeated volumes, volumes of two pools and of a pool kind that
//! cannot freeze: each gets the code the spec asks for, and nothing is
//! made or removed (the fixture's pools are dir pools, which refuse group
//! snapshots).

use csi_proto as csi;
use tonic::Code::{self, FailedPrecondition, InvalidArgument, NotFound, Ok};

use crate::case::{Case, Req};
use crate::fixture::{FORGED_IDS, Fixture};

fn row(name: &str, request: Req, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("group snapshots: {name}"), request, code, parts)
}

fn create(name: &str, sources: &[&str]) -> Req {
    Req::CreateGroup(csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn delete(id: &str, members: &[&str]) -> Req {
    Req::DeleteGroup(csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn get(id: &str, members: &[&str]) -> Req {
    Req::GetGroup(csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let long = "n".repeat(1025);
    let mut rows = vec![
        row(
            "create without a name",
            create("", &[&f.alpha]),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create with a name too long",
            create(&long, &[&f.alpha]),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create without volumes",
            create("g", &[]),
            InvalidArgument,
            &["source_volume_ids"],
        ),
        row(
            "create with an empty volume id",
            create("g", &[&f.alpha, ""]),
            InvalidArgument,
            &["source_volume_ids"],
        ),
        row(
            "create with a volume twice",
            create("g", &[&f.alpha, &f.alpha]),
            InvalidArgument,
            &["twice", &f.alpha],
        ),
        row(
            "create of a volume that does not exist",
            create("g", &["hdd:nope"]),
            NotFound,
            &["hdd:nope"],
        ),
        row(
            "create across two pools",
            create("g", &[&f.alpha, &f.beta]),
            FailedPrecondition,
            &["hdd", "ssd", "one pool"],
        ),
        row(
            "create on a dir pool",
            create("g", &[&f.alpha]),
            FailedPrecondition,
            &["dir", "btrfs or image"],
        ),
        row(
            "get without an id",
            get("", &[]),
            InvalidArgument,
            &["group_snapshot_id"],
        ),
        row(
            "delete without an id",
            delete("", &[]),
            InvalidArgument,
            &["group_snapshot_id"],
        ),
        row(
            "get of a group that does not exist",
            get("hdd@@g@01234567", &["hdd@s@01234567"]),
            NotFound,
            &["hdd@@g@01234567"],
        ),
        row(
            "delete of a group that does not exist",
            delete("hdd@@g@01234567", &["hdd@s@01234567"]),
            Ok,
            &[],
        ),
        row(
            "get with a snapshot id for a group id",
            get("hdd@g@01234567", &[]),
            NotFound,
            &["hdd@g@01234567"],
        ),
    ];
    for id in FORGED_IDS {
        rows.push(row(
            &format!("create of forged {id:?}"),
            create("g", &[id]),
            NotFound,
            &[],
        ));
        rows.push(row(
            &format!("get of forged {id:?}"),
            get(id, &[]),
            NotFound,
            &[],
        ));
        rows.push(row(
            &format!("delete of forged {id:?}"),
            delete(id, &[id]),
            Ok,
            &[],
        ));
    }
    rows
}
