//! CreateSnapshot, DeleteSnapshot, ListSnapshots and GetSnapshot with ids
//! forged to point outside a pool, missing fields, foreign paging tokens:
//! each gets the code the spec asks for, and nothing is made or removed.

use csi_proto as csi;
use tonic::Code::{self, Aborted, InvalidArgument, NotFound, Ok};

use crate::case::{Case, Req};
use crate::fixture::Fixture;

fn row(name: &str, request: Req, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("snapshots: {name}"), request, code, parts)
}

fn create(name: &str, source: &str) -> Req {
    Req::CreateSnapshot(csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    })
}

fn delete(id: &str) -> Req {
    Req::DeleteSnapshot(csi::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    })
}

fn list(token: &str, snapshot: &str, source: &str, max: i32) -> Req {
    Req::ListSnapshots(csi::ListSnapshotsRequest {
        max_entries: max,
        starting_token: token.into(),
        source_volume_id: source.into(),
        snapshot_id: snapshot.into(),
        ..Default::default()
    })
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let long = "n".repeat(1025);
    vec![
        row(
            "create without a name",
            create("", &f.alpha),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create without a source",
            create("s", ""),
            InvalidArgument,
            &["source_volume_id"],
        ),
        row(
            "create with a name too long",
            create(&long, &f.alpha),
            InvalidArgument,
            &["name"],
        ),
        row(
            "create with a NUL in the name",
            create("a\0b", &f.alpha),
            InvalidArgument,
            &["NUL"],
        ),
        row(
            "create of a source naming a path outside the pool",
            create("s", "hdd:/etc"),
            NotFound,
            &["hdd:/etc", "does not exist"],
        ),
        row(
            "create of a source with ..",
            create("s", "hdd:.."),
            NotFound,
            &["does not exist"],
        ),
        row(
            "create of a source in an unknown pool",
            create("s", "nopool:alpha"),
            NotFound,
            &["nopool"],
        ),
        row(
            "create of an unknown source",
            create("s", "hdd:ghost"),
            NotFound,
            &["hdd:ghost"],
        ),
        row(
            "delete without an id",
            delete(""),
            InvalidArgument,
            &["snapshot_id"],
        ),
        row(
            "delete of an id with a path succeeds, touching nothing",
            delete("../x"),
            Ok,
            &[],
        ),
        row(
            "delete of a forged id succeeds, touching nothing",
            delete("hdd@..@00000000"),
            Ok,
            &[],
        ),
        row(
            "delete of an id of another node succeeds, touching nothing",
            delete("hdd@alpha@00000000"),
            Ok,
            &[],
        ),
        row(
            "list with a foreign paging token",
            list("garbage", "", "", 0),
            Aborted,
            &["garbage"],
        ),
        row(
            "list with a negative max_entries",
            list("", "", "", -1),
            InvalidArgument,
            &["max_entries"],
        ),
        row(
            "list of a forged snapshot id lists nothing",
            list("", "../../etc", "", 0),
            Ok,
            &[],
        ),
        row(
            "list of a forged source id lists nothing",
            list("", "", "hdd:../../etc", 0),
            Ok,
            &[],
        ),
        row(
            "get of a forged id",
            Req::GetSnapshot(csi::GetSnapshotRequest {
                snapshot_id: "hdd@../x@00000000".into(),
                ..Default::default()
            }),
            NotFound,
            &["does not exist"],
        ),
        row(
            "get without an id",
            Req::GetSnapshot(csi::GetSnapshotRequest::default()),
            InvalidArgument,
            &["snapshot_id"],
        ),
    ]
}
