//! NodeUnpublishVolume: malformed ids and targets, ids that cannot name a
//! volume, and targets that are not this volume's mount: symlinks, paths
//! in a pool, someone else's mount. A target where nothing was ever
//! published is success (the spec: already unpublished).

use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{Fixture, s};

fn row(name: &str, id: &str, target: &str, code: Code, parts: &[&str]) -> Case {
    Case::new(
        format!("unpublish: {name}"),
        Req::Unpublish(id.into(), target.into()),
        code,
        parts,
    )
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let (a, targets, busy) = (f.alpha.as_str(), s(&f.targets), s(&f.busy));
    let mut t = vec![
        row("empty id", "", &f.free, InvalidArgument, &["volume_id"]),
        row(
            "2000-byte id",
            &f.long_id,
            &f.free,
            InvalidArgument,
            &["volume_id"],
        ),
        row("empty target", a, "", InvalidArgument, &["target_path"]),
        row(
            "relative target",
            a,
            "x/y",
            InvalidArgument,
            &["target_path"],
        ),
        row(
            "dot-dot target",
            a,
            &format!("{targets}/../canary"),
            InvalidArgument,
            &["target_path", ".."],
        ),
        row(
            "NUL in target",
            a,
            &format!("{targets}/a\0b"),
            InvalidArgument,
            &["target_path", "NUL"],
        ),
        row(
            "root target",
            a,
            "/",
            InvalidArgument,
            &["target_path", "root"],
        ),
        row(
            "symlink to canary",
            a,
            &f.to_canary,
            InvalidArgument,
            &["symlink"],
        ),
        row(
            "symlink to a volume",
            a,
            &f.to_volume,
            InvalidArgument,
            &["symlink"],
        ),
        row(
            "symlink to /etc",
            a,
            &f.to_etc,
            InvalidArgument,
            &["symlink"],
        ),
        row(
            "inside a pool",
            a,
            &s(&f.hdd.join("alpha")),
            InvalidArgument,
            &["pool"],
        ),
        row(
            "a foreign mount",
            a,
            &s(&f.foreign),
            FailedPrecondition,
            &["not a volume of this driver"],
        ),
        row("a target that never existed", a, &f.free, Ok, &[]),
        row(
            "a target below a regular file",
            a,
            &s(&f.file_target.join("x")),
            Ok,
            &[],
        ),
    ];
    for id in ["hdd:../../etc", "../x:y", "hdd:/etc", "nvme:beta"] {
        t.push(row(
            &format!("forged {id:?}"),
            id,
            &busy,
            NotFound,
            &["does not exist"],
        ));
    }
    t
}
