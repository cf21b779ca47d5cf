//! ListVolumes: a paging token this driver did not issue is ABORTED (the
//! spec: the CO lists again from the start); a negative page size is
//! INVALID_ARGUMENT. A token naming a volume that has since gone is one
//! this driver issues (the next volume's id), so it still pages.

use csi_proto as csi;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::Fixture;

fn row(name: &str, max_entries: i32, token: &str, code: Code, parts: &[&str]) -> Case {
    Case::new(
        format!("list: {name}"),
        Req::List(csi::ListVolumesRequest {
            max_entries,
            starting_token: token.into(),
        }),
        code,
        parts,
    )
}

pub fn cases(_: &Fixture) -> Vec<Case> {
    let mut t: Vec<Case> = [
        "garbage",
        "hdd:../x",
        "../x:y",
        "hdd:/etc",
        "zzz:",
        ":",
        "hdd:a\0",
        "hdd:.alpha.meta",
    ]
    .iter()
    .map(|token| {
        row(
            &format!("token {token:?}"),
            1,
            token,
            Aborted,
            &["starting_token"],
        )
    })
    .collect();
    t.extend([
        row("max_entries -1", -1, "", InvalidArgument, &["max_entries"]),
        row(
            "max_entries i32::MIN",
            i32::MIN,
            "",
            InvalidArgument,
            &["max_entries"],
        ),
        row("max_entries i32::MAX", i32::MAX, "", Ok, &[]),
        row("token of a volume that is gone", 1, "hdd:gone", Ok, &[]),
    ]);
    t
}
