//! The CSI 1.13 health calls (ControllerGetVolumeHealth,
//! ControllerListVolumeHealth, NodeGetVolumeHealth, NodeGetStorageHealth):
//! malformed and forged ids, foreign paging tokens, publish paths that are
//! symlinks to canaries, to `/etc`, into a pool, or another volume's
//! target. The health calls only look; the rows that succeed report what
//! they see in the answer's body, and the fixture's check afterwards makes
//! sure none of them touched anything.

use csi_proto as csi;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{FORGED_IDS, Fixture, s};

fn row(name: &str, request: Req, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("health: {name}"), request, code, parts)
}

fn ctrl(id: &str) -> Req {
    Req::CtrlHealth(csi::ControllerGetVolumeHealthRequest {
        volume_id: id.into(),
        ..Default::default()
    })
}

fn list(max_entries: i32, token: &str) -> Req {
    Req::ListHealth(csi::ControllerListVolumeHealthRequest {
        max_entries,
        starting_token: token.into(),
        ..Default::default()
    })
}

fn node(id: &str, at: &str) -> Req {
    Req::NodeHealth(csi::NodeGetVolumeHealthRequest {
        volume_id: id.into(),
        volume_publish_path: at.into(),
        ..Default::default()
    })
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    let (a, b, busy) = (f.alpha.as_str(), f.beta.as_str(), s(&f.busy));
    let mut t = vec![
        row(
            "controller: empty id",
            ctrl(""),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "controller: 2000-byte id",
            ctrl(&f.long_id),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "controller: unknown volume",
            ctrl("hdd:nothing"),
            NotFound,
            &["does not exist"],
        ),
        row("controller: healthy volume", ctrl(a), Ok, &[]),
        row(
            "list: negative max_entries",
            list(-1, ""),
            InvalidArgument,
            &["max_entries"],
        ),
        row("list: token of another pool", list(1, "zzz:a"), Ok, &[]),
        row("list: everything", list(0, ""), Ok, &[]),
        row(
            "node: empty id",
            node("", &busy),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "node: 2000-byte id",
            node(&f.long_id, &busy),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "node: unknown volume",
            node("hdd:nothing", ""),
            NotFound,
            &["does not exist"],
        ),
        row(
            "node: no inline volume of that id",
            node("csi-0123", ""),
            NotFound,
            &["does not exist"],
        ),
        row(
            "node: relative path",
            node(b, "busy"),
            InvalidArgument,
            &["volume_publish_path"],
        ),
        row(
            "node: dot-dot path",
            node(b, &format!("{}/../pools/ssd/beta", s(&f.targets))),
            InvalidArgument,
            &["volume_publish_path"],
        ),
        row(
            "node: NUL in path",
            node(b, &format!("{busy}\0")),
            InvalidArgument,
            &["volume_publish_path"],
        ),
        row(
            "node: 8 KiB path",
            node(b, &f.long_path),
            InvalidArgument,
            &["volume_publish_path"],
        ),
        row(
            "node: staging path",
            Req::NodeHealth(csi::NodeGetVolumeHealthRequest {
                volume_id: b.into(),
                staging_target_path: s(&f.targets.join("stage")),
                ..Default::default()
            }),
            InvalidArgument,
            &["staging_target_path", "does not stage"],
        ),
        row("node: where published", node(b, &busy), Ok, &[]),
        row("node: another volume's target", node(a, &busy), Ok, &[]),
        row(
            "node: symlink to the canary",
            node(b, &f.to_canary),
            Ok,
            &[],
        ),
        row("node: symlink to /etc", node(b, &f.to_etc), Ok, &[]),
        row("node: symlink into a pool", node(b, &f.to_pool), Ok, &[]),
        row("node: a foreign mount", node(b, &s(&f.foreign)), Ok, &[]),
        row(
            "node: never published",
            node(b, &s(&f.never_published)),
            Ok,
            &[],
        ),
        row(
            "storage",
            Req::StorageHealth(csi::NodeGetStorageHealthRequest {
                secrets: [("token".to_string(), "x".to_string())].into(),
            }),
            Ok,
            &[],
        ),
    ];
    for token in ["../x:y", "hdd:..", "/etc/passwd", "hdd:alpha/../../.."] {
        t.push(row(
            &format!("list: foreign token {token:?}"),
            list(0, token),
            Aborted,
            &["starting_token", "not issued"],
        ));
    }
    for id in FORGED_IDS {
        t.push(row(
            &format!("controller: forged {id:?}"),
            ctrl(id),
            NotFound,
            &[],
        ));
        t.push(row(
            &format!("node: forged {id:?}"),
            node(id, &busy),
            NotFound,
            &[],
        ));
    }
    t
}
