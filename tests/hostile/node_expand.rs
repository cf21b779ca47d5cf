//! NodeExpandVolume acts only on a path where the volume is published (the
//! spec: NOT_FOUND when the volume is not at `volume_path`), as
//! NodeGetVolumeStats does: a canary directory, the volume's directory in
//! its pool, or an empty directory is not the volume.

use csi_proto as csi;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{Fixture, node_expand, s};

fn row(name: &str, request: Req, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("node expand: {name}"), request, code, parts)
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let (a, b, busy, targets) = (f.alpha.as_str(), f.beta.as_str(), s(&f.busy), s(&f.targets));
    let mut t = vec![
        row(
            "empty id",
            node_expand("", &busy),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "2000-byte id",
            node_expand(&f.long_id, &busy),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "empty path",
            node_expand(b, ""),
            InvalidArgument,
            &["volume_path"],
        ),
        row(
            "relative path",
            node_expand(b, "busy"),
            NotFound,
            &["volume_path"],
        ),
        row(
            "dot-dot path",
            node_expand(b, &format!("{targets}/../canary")),
            NotFound,
            &["volume_path"],
        ),
        row(
            "negative size",
            Req::NodeExpand(csi::NodeExpandVolumeRequest {
                volume_id: b.into(),
                volume_path: busy.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
            InvalidArgument,
            &["required_bytes"],
        ),
        row(
            "a canary directory",
            node_expand(a, &s(&f.canary.join("etc"))),
            NotFound,
            &["volume_path"],
        ),
        row(
            "a volume's directory in its pool",
            node_expand(a, &s(&f.hdd.join("alpha"))),
            NotFound,
            &["volume_path"],
        ),
        row(
            "an empty target",
            node_expand(a, &s(&f.never_published)),
            NotFound,
            &["volume_path"],
        ),
        row(
            "another volume's target",
            node_expand(a, &busy),
            NotFound,
            &["volume_path"],
        ),
        row(
            "unknown volume",
            node_expand("hdd:nope", &busy),
            NotFound,
            &["hdd:nope"],
        ),
    ];
    for id in ["hdd:../../etc", "hdd:/etc", "../x:y"] {
        t.push(row(
            &format!("forged {id:?}"),
            node_expand(id, &busy),
            NotFound,
            &["does not exist"],
        ));
    }
    t
}
