//! DeleteVolume: ids that cannot name a volume are success (the spec: the
//! volume does not exist), never a removal; a published volume stays.

use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{FORGED_IDS, Fixture};

fn row(name: &str, id: &str, code: Code, parts: &[&str]) -> Case {
    Case::new(
        format!("delete: {name}"),
        Req::Delete(id.into()),
        code,
        parts,
    )
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let mut t = vec![
        row("empty id", "", InvalidArgument, &["volume_id"]),
        row(
            "2000-byte id",
            &f.long_id,
            InvalidArgument,
            &["volume_id", "2004"],
        ),
        row("unknown volume", "hdd:nope", Ok, &[]),
        row("unknown volume, twice", "hdd:nope", Ok, &[]),
        row(
            "published volume",
            &f.beta,
            FailedPrecondition,
            &["beta", "busy", "unpublish"],
        ),
    ];
    t.extend(
        FORGED_IDS
            .iter()
            .map(|id| row(&format!("forged {id:?}"), id, Ok, &[])),
    );
    t
}
