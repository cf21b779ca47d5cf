//! ValidateVolumeCapabilities: malformed capabilities are INVALID_ARGUMENT;
//! well-formed ones the driver cannot serve are declined in the answer
//! (rows with `Ok` and the reason); ids that cannot name a volume are
//! NOT_FOUND.

use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::common::mount_cap;
use crate::fixture::{Fixture, block, cap, mount, mount_flags, validate};

fn row(name: &str, id: &str, caps: Vec<csi::VolumeCapability>, code: Code, parts: &[&str]) -> Case {
    Case::new(
        format!("validate: {name}"),
        Req::Validate(validate(id, caps)),
        code,
        parts,
    )
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let good = || vec![mount_cap(Mode::SingleNodeWriter)];
    let a = f.alpha.as_str();
    let mut t = vec![
        row("empty id", "", good(), InvalidArgument, &["volume_id"]),
        row(
            "2000-byte id",
            &f.long_id,
            good(),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "no caps",
            a,
            vec![],
            InvalidArgument,
            &["volume_capabilities"],
        ),
        row(
            "unknown mode",
            a,
            vec![cap(42, mount())],
            InvalidArgument,
            &["42"],
        ),
        row(
            "no access type",
            a,
            vec![cap(1, None)],
            InvalidArgument,
            &["access_type"],
        ),
        row(
            "no access mode",
            a,
            vec![csi::VolumeCapability {
                access_mode: None,
                access_type: mount(),
            }],
            InvalidArgument,
            &["access_mode"],
        ),
        row(
            "mount flag suid",
            a,
            vec![cap(1, mount_flags(&["suid"]))],
            InvalidArgument,
            &["suid"],
        ),
        // Refusals come back unconfirmed, with a reason.
        row(
            "multi-node is declined",
            a,
            vec![cap(5, mount())],
            Ok,
            &["MULTI_NODE"],
        ),
        row(
            "block is declined",
            a,
            vec![cap(1, block())],
            Ok,
            &["block"],
        ),
        row(
            "one good, one multi-node is declined",
            a,
            vec![mount_cap(Mode::SingleNodeWriter), cap(3, mount())],
            Ok,
            &["MULTI_NODE"],
        ),
    ];
    for id in [
        "hdd:../../etc",
        "../x:y",
        "hdd:/etc",
        "hdd:..",
        "nvme:alpha",
        "hdd:nope",
        "hdd:.alpha.meta",
        "ssd:alpha",
    ] {
        t.push(row(
            &format!("forged {id:?}"),
            id,
            good(),
            NotFound,
            &[id, "does not exist"],
        ));
    }
    t
}
