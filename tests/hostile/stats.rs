//! NodeGetVolumeStats: malformed ids, and paths where the volume is not
//! published (NOT_FOUND, as the spec asks, naming the field or the path).

use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{Fixture, s};

fn row(name: &str, id: &str, path: &str, code: Code, parts: &[&str]) -> Case {
    Case::new(
        format!("stats: {name}"),
        Req::Stats(id.into(), path.into()),
        code,
        parts,
    )
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let (b, busy, targets) = (f.beta.as_str(), s(&f.busy), s(&f.targets));
    let not_published = s(&f.canary.join("etc"));
    let mut t = vec![
        row("empty id", "", &busy, InvalidArgument, &["volume_id"]),
        row(
            "2000-byte id",
            &f.long_id,
            &busy,
            InvalidArgument,
            &["volume_id"],
        ),
        row("empty path", b, "", InvalidArgument, &["volume_path"]),
        row("relative path", b, "busy", NotFound, &["volume_path"]),
        row(
            "dot-dot path",
            b,
            &format!("{targets}/../pools/ssd/beta"),
            NotFound,
            &["volume_path"],
        ),
        row(
            "NUL in path",
            b,
            &format!("{busy}\0"),
            NotFound,
            &["volume_path", "NUL"],
        ),
        row(
            "not where published",
            b,
            &not_published,
            NotFound,
            &[not_published.as_str()],
        ),
        row(
            "missing path",
            b,
            &s(&f.targets.join("nothing-here")),
            NotFound,
            &["volume_path"],
        ),
        // Refused as a path in a pool, as NodePublishVolume and
        // NodeUnpublishVolume refuse it (NodeExpandVolume answers NOT_FOUND).
        row(
            "its directory in the pool",
            b,
            &s(&f.ssd.join("beta")),
            InvalidArgument,
            &["pool ssd", "refusing"],
        ),
        row(
            "below a regular file",
            b,
            &s(&f.file_target.join("x")),
            NotFound,
            &["volume_path", "does not exist"],
        ),
        row(
            "another volume's target",
            &f.alpha,
            &busy,
            NotFound,
            &["not published"],
        ),
        row("unknown volume", "hdd:nope", &busy, NotFound, &["hdd:nope"]),
    ];
    for id in ["hdd:../../etc", "hdd:/etc", "../x:y"] {
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
