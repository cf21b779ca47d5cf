//! NodePublishVolume: malformed ids, targets and capabilities; ids that
//! cannot name a volume; and targets that must not be mounted on:
//! symlinks (to the canary, to volumes, to a pool, to `/etc`), paths in a
//! pool, files, non-empty directories, other mounts.

use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::fixture::{FORGED_IDS, Fixture, block, cap, mount, mount_flags, publish, s};

fn row(name: &str, r: csi::NodePublishVolumeRequest, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("publish: {name}"), Req::Publish(r), code, parts)
}

/// Publishing `alpha` at `target`.
fn at(f: &Fixture, name: &str, target: &str, code: Code, parts: &[&str]) -> Case {
    row(
        &format!("target {name}"),
        publish(&f.alpha, target),
        code,
        parts,
    )
}

/// Publishing `alpha` at a free target with this capability.
fn with_cap(f: &Fixture, name: &str, c: csi::VolumeCapability, parts: &[&str]) -> Case {
    let r = csi::NodePublishVolumeRequest {
        volume_capability: Some(c),
        ..publish(&f.alpha, &f.free)
    };
    row(name, r, InvalidArgument, parts)
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    [malformed(f), unknown_volumes(f), refused_targets(f)].concat()
}

/// Fields that are missing or cannot be right.
fn malformed(f: &Fixture) -> Vec<Case> {
    let targets = s(&f.targets);
    vec![
        row(
            "empty id",
            publish("", &f.free),
            InvalidArgument,
            &["volume_id"],
        ),
        row(
            "2000-byte id",
            publish(&f.long_id, &f.free),
            InvalidArgument,
            &["volume_id"],
        ),
        at(f, "empty", "", InvalidArgument, &["target_path"]),
        at(
            f,
            "relative",
            "targets/x",
            InvalidArgument,
            &["target_path", "absolute"],
        ),
        at(
            f,
            "with dot-dot",
            &format!("{targets}/../../etc"),
            InvalidArgument,
            &["target_path", ".."],
        ),
        at(
            f,
            "with dot",
            &format!("{targets}/./x"),
            InvalidArgument,
            &["target_path"],
        ),
        at(
            f,
            "with NUL",
            &format!("{targets}/a\0b"),
            InvalidArgument,
            &["target_path", "NUL"],
        ),
        at(f, "root", "/", InvalidArgument, &["target_path", "root"]),
        at(
            f,
            "root, twice",
            "//",
            InvalidArgument,
            &["target_path", "root"],
        ),
        at(
            f,
            "of 8 KiB",
            &f.long_path,
            InvalidArgument,
            &["target_path", "too long"],
        ),
        row(
            "no capability",
            csi::NodePublishVolumeRequest {
                volume_capability: None,
                ..publish(&f.alpha, &f.free)
            },
            InvalidArgument,
            &["volume_capability"],
        ),
        with_cap(
            f,
            "multi-node",
            cap(Mode::MultiNodeMultiWriter as i32, mount()),
            &["MULTI_NODE"],
        ),
        with_cap(f, "block", cap(1, block()), &["block"]),
        with_cap(f, "no access type", cap(1, None), &["access_type"]),
        with_cap(
            f,
            "no access mode",
            csi::VolumeCapability {
                access_mode: None,
                access_type: mount(),
            },
            &["access_mode"],
        ),
        with_cap(f, "unknown mode", cap(12, mount()), &["12"]),
        with_cap(
            f,
            "mount flag suid",
            cap(1, mount_flags(&["suid"])),
            &["suid"],
        ),
        with_cap(
            f,
            "mount flag exec",
            cap(1, mount_flags(&["ro", "exec"])),
            &["exec"],
        ),
        with_cap(
            f,
            "mount flag remount",
            cap(1, mount_flags(&["remount,ro"])),
            &["remount"],
        ),
    ]
}

/// Ids that cannot name a volume of this driver.
fn unknown_volumes(f: &Fixture) -> Vec<Case> {
    let mut t = vec![row(
        "unknown volume",
        publish("hdd:nope", &f.free),
        NotFound,
        &["hdd:nope"],
    )];
    for id in FORGED_IDS.iter().filter(|id| !id.contains('\0')) {
        t.push(row(
            &format!("forged {id:?}"),
            publish(id, &f.free),
            NotFound,
            &["volume", "not exist"],
        ));
    }
    t
}

/// Targets that must not be mounted on.
fn refused_targets(f: &Fixture) -> Vec<Case> {
    vec![
        at(
            f,
            "symlink to canary dir",
            &f.to_canary,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "symlink to empty canary dir",
            &f.to_canary_empty,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "symlink to /etc",
            &f.to_etc,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "symlink to its own volume",
            &f.to_volume,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "symlink to another volume",
            &f.to_other_volume,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "symlink to a pool",
            &f.to_pool,
            InvalidArgument,
            &["symlink"],
        ),
        at(
            f,
            "whose parent is a symlink into a pool",
            &f.via_pool,
            InvalidArgument,
            &["pool", "hdd"],
        ),
        at(
            f,
            "inside a pool",
            &s(&f.hdd.join("new-target")),
            InvalidArgument,
            &["pool", "hdd"],
        ),
        at(
            f,
            "another volume's directory",
            &s(&f.ssd.join("beta")),
            InvalidArgument,
            &["pool", "ssd"],
        ),
        at(
            f,
            "its own volume's directory",
            &s(&f.hdd.join("alpha")),
            InvalidArgument,
            &["pool", "hdd"],
        ),
        at(
            f,
            "the pool itself",
            &s(&f.hdd),
            InvalidArgument,
            &["pool", "hdd"],
        ),
        at(
            f,
            "above the pools",
            &s(&f.root.join("pools")),
            InvalidArgument,
            &["pool"],
        ),
        at(
            f,
            "a regular file",
            &s(&f.file_target),
            InvalidArgument,
            &["not a directory"],
        ),
        at(
            f,
            "a non-empty dir",
            &s(&f.nonempty),
            FailedPrecondition,
            &["not empty"],
        ),
        at(
            f,
            "the canary dir itself",
            &s(&f.canary.join("etc")),
            FailedPrecondition,
            &["not empty"],
        ),
        at(
            f,
            "a foreign mount",
            &s(&f.foreign),
            FailedPrecondition,
            &["mount"],
        ),
        at(
            f,
            "another volume's target",
            &s(&f.busy),
            FailedPrecondition,
            &["mount"],
        ),
        at(
            f,
            "with a missing parent",
            &s(&f.targets.join("no/such/dir")),
            NotFound,
            &["parent", "target_path"],
        ),
        at(
            f,
            "below a regular file",
            &s(&f.file_target.join("x")),
            NotFound,
            &["parent", "target_path"],
        ),
        row(
            "same target, now read-only",
            csi::NodePublishVolumeRequest {
                readonly: true,
                ..publish(&f.beta, &s(&f.busy))
            },
            AlreadyExists,
            &["busy", "read-write"],
        ),
    ]
}
