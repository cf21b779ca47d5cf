//! CreateVolume: names, capabilities, sizes, pools, what is not offered,
//! and names that already exist. Names that look like paths are valid
//! names: they succeed and get a hashed directory in the pool, which the
//! check after the table expects.

use std::collections::HashMap;

use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code::{self, *};

use crate::case::{Case, Req};
use crate::common::mount_cap;
use crate::fixture::{Fixture, MIB, block, cap, create, mount, mount_flags};

fn row(name: &str, r: csi::CreateVolumeRequest, code: Code, parts: &[&str]) -> Case {
    Case::new(format!("create: {name}"), Req::Create(r), code, parts)
}

/// `create(name, "hdd")` asking for these capabilities.
fn with_caps(caps: Vec<csi::VolumeCapability>) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_capabilities: caps,
        ..create("caps", "hdd")
    }
}

/// `create(name, "hdd")` asking for this range.
fn sized(name: &str, required_bytes: i64, limit_bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes,
            limit_bytes,
        }),
        ..create(name, "hdd")
    }
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    [
        names(f),
        capabilities(),
        sizes(),
        pools(),
        not_offered(f),
        existing_names(),
        root_parameters(),
        odd_valid_names(),
    ]
    .concat()
}

fn names(f: &Fixture) -> Vec<Case> {
    vec![
        row("empty name", create("", "hdd"), InvalidArgument, &["name"]),
        row(
            "2000-byte name",
            create(&f.long_name, "hdd"),
            InvalidArgument,
            &["name", "2000"],
        ),
        row(
            "1025-byte name",
            create(&"n".repeat(1025), "hdd"),
            InvalidArgument,
            &["name", "1025", "1024"],
        ),
        row(
            "NUL in name",
            create("a\0b", "hdd"),
            InvalidArgument,
            &["name", "NUL"],
        ),
    ]
}

fn capabilities() -> Vec<Case> {
    let sw = |access| cap(Mode::SingleNodeWriter as i32, access);
    vec![
        row(
            "no capabilities",
            with_caps(vec![]),
            InvalidArgument,
            &["volume_capabilities"],
        ),
        row(
            "MULTI_NODE_READER_ONLY",
            with_caps(vec![cap(Mode::MultiNodeReaderOnly as i32, mount())]),
            InvalidArgument,
            &["MULTI_NODE"],
        ),
        row(
            "MULTI_NODE_SINGLE_WRITER",
            with_caps(vec![cap(Mode::MultiNodeSingleWriter as i32, mount())]),
            InvalidArgument,
            &["MULTI_NODE"],
        ),
        row(
            "MULTI_NODE_MULTI_WRITER",
            with_caps(vec![cap(Mode::MultiNodeMultiWriter as i32, mount())]),
            InvalidArgument,
            &["MULTI_NODE"],
        ),
        row(
            "mount and block",
            with_caps(vec![sw(mount()), sw(block())]),
            InvalidArgument,
            &["both mount and block"],
        ),
        row(
            "no access type",
            with_caps(vec![sw(None)]),
            InvalidArgument,
            &["access_type"],
        ),
        row(
            "UNKNOWN mode",
            with_caps(vec![cap(0, mount())]),
            InvalidArgument,
            &["access mode", "0"],
        ),
        row(
            "mode 99",
            with_caps(vec![cap(99, mount())]),
            InvalidArgument,
            &["access mode", "99"],
        ),
        row(
            "negative mode",
            with_caps(vec![cap(-5, mount())]),
            InvalidArgument,
            &["access mode", "-5"],
        ),
        row(
            "no access mode",
            with_caps(vec![csi::VolumeCapability {
                access_mode: None,
                access_type: mount(),
            }]),
            InvalidArgument,
            &["access_mode"],
        ),
        row(
            "one good, one multi-node",
            with_caps(vec![
                mount_cap(Mode::SingleNodeWriter),
                cap(Mode::MultiNodeMultiWriter as i32, mount()),
            ]),
            InvalidArgument,
            &["MULTI_NODE"],
        ),
        row(
            "one good, one without access type",
            with_caps(vec![mount_cap(Mode::SingleNodeWriter), sw(None)]),
            InvalidArgument,
            &["access_type"],
        ),
        row(
            "mount flag exec=evil",
            with_caps(vec![sw(mount_flags(&["exec=evil"]))]),
            InvalidArgument,
            &["exec=evil"],
        ),
        row(
            "mount flag remount",
            with_caps(vec![sw(mount_flags(&["ro,remount"]))]),
            InvalidArgument,
            &["remount"],
        ),
        row(
            "mount flag exec",
            with_caps(vec![sw(mount_flags(&["exec"]))]),
            InvalidArgument,
            &["\"exec\"", "supported"],
        ),
        row(
            "mount flag suid",
            with_caps(vec![sw(mount_flags(&["nodev", "suid"]))]),
            InvalidArgument,
            &["suid"],
        ),
    ]
}

fn sizes() -> Vec<Case> {
    vec![
        row(
            "negative required",
            sized("sizes", -1, 0),
            InvalidArgument,
            &["required_bytes"],
        ),
        row(
            "negative limit",
            sized("sizes", 0, -1),
            InvalidArgument,
            &["limit_bytes"],
        ),
        row(
            "i64::MIN",
            sized("sizes", i64::MIN, i64::MIN),
            InvalidArgument,
            &["capacity_range"],
        ),
        row(
            "required > limit",
            sized("sizes", 2 * MIB, MIB),
            InvalidArgument,
            &["exceeds", "limit_bytes"],
        ),
        row(
            "i64::MAX",
            sized("sizes", i64::MAX, 0),
            OutOfRange,
            &["9223372036854775807", "hdd"],
        ),
        row(
            "i64::MAX both",
            sized("sizes", i64::MAX, i64::MAX),
            OutOfRange,
            &["9223372036854775807"],
        ),
        row(
            "limit i64::MAX, nothing required",
            sized("sizes", 0, i64::MAX),
            Ok,
            &[],
        ),
    ]
}

fn pools() -> Vec<Case> {
    vec![
        row(
            "pool \"nvme\"",
            create("pooled", "nvme"),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "pool \"\"",
            create("pooled", ""),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "pool \"../hdd\"",
            create("pooled", "../hdd"),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "pool \"hdd/../ssd\"",
            create("pooled", "hdd/../ssd"),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "pool \"HDD\"",
            create("pooled", "HDD"),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "pool \"hdd\\0\"",
            create("pooled", "hdd\0"),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ),
        row(
            "no pool with two pools",
            csi::CreateVolumeRequest {
                parameters: HashMap::new(),
                ..create("nopool", "hdd")
            },
            InvalidArgument,
            &["pool"],
        ),
    ]
}

/// Content sources, mutable parameters, topology this node is not in.
fn not_offered(f: &Fixture) -> Vec<Case> {
    let snapshot_source = csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "s".into(),
            },
        )),
    };
    let volume_source = |id: &str| csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.to_string(),
            },
        )),
    };
    let other_node = csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([("topology.hostpath-csi.dev/node".into(), "other".into())]),
        }],
        preferred: vec![],
    };
    vec![
        row(
            "content source: a snapshot id naming no snapshot of ours",
            csi::CreateVolumeRequest {
                volume_content_source: Some(snapshot_source),
                ..create("snap", "hdd")
            },
            NotFound,
            &["snapshot", "\"s\"", "does not exist"],
        ),
        row(
            "content source: a volume id naming a path outside the pool",
            csi::CreateVolumeRequest {
                volume_content_source: Some(volume_source("hdd:../../etc")),
                ..create("clone", "hdd")
            },
            NotFound,
            &["hdd:../../etc", "does not exist"],
        ),
        // A node-local driver: a source this node does not hold may be
        // another node's; the answer hands the claim back to the scheduler.
        row(
            "content source: a snapshot of another node",
            csi::CreateVolumeRequest {
                volume_content_source: Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource {
                            snapshot_id: "hdd@elsewhere@00000000".into(),
                        },
                    )),
                }),
                ..create("restore-elsewhere", "hdd")
            },
            ResourceExhausted,
            &[
                "hdd@elsewhere@00000000",
                "lives on another node",
                "give the pod",
            ],
        ),
        row(
            "content source: a volume of this pool that this node does not hold",
            csi::CreateVolumeRequest {
                volume_content_source: Some(volume_source("hdd:pvc-elsewhere")),
                ..create("clone-elsewhere", "hdd")
            },
            ResourceExhausted,
            &["hdd:pvc-elsewhere", "not on node", "give the pod"],
        ),
        row(
            "content source: a volume of another pool",
            csi::CreateVolumeRequest {
                volume_content_source: Some(volume_source(&f.alpha)),
                ..create("clone-ssd", "ssd")
            },
            InvalidArgument,
            &["pool hdd", "ssd"],
        ),
        row(
            "content source: neither snapshot nor volume",
            csi::CreateVolumeRequest {
                volume_content_source: Some(csi::VolumeContentSource { r#type: None }),
                ..create("nosource", "hdd")
            },
            InvalidArgument,
            &["volume_content_source"],
        ),
        row(
            "mutable parameters",
            csi::CreateVolumeRequest {
                mutable_parameters: HashMap::from([("iops".into(), "1".into())]),
                ..create("mutable", "hdd")
            },
            InvalidArgument,
            &["mutable_parameters"],
        ),
        row(
            "topology of another node",
            csi::CreateVolumeRequest {
                accessibility_requirements: Some(other_node),
                ..create("elsewhere", "hdd")
            },
            ResourceExhausted,
            &["node"],
        ),
    ]
}

/// `alpha` exists in pool hdd with 1 MiB.
fn existing_names() -> Vec<Case> {
    vec![
        row(
            "existing name, other pool",
            create("alpha", "ssd"),
            AlreadyExists,
            &["alpha", "hdd"],
        ),
        row(
            "existing name, other size",
            sized("alpha", 2 * MIB, 0),
            AlreadyExists,
            &["alpha", "bytes"],
        ),
        row(
            "existing name, multi-node",
            csi::CreateVolumeRequest {
                volume_capabilities: vec![cap(Mode::MultiNodeMultiWriter as i32, mount())],
                ..create("alpha", "hdd")
            },
            InvalidArgument,
            &["MULTI_NODE"],
        ),
    ]
}

/// `create(name, "hdd")` in a StorageClass with these parameters.
fn in_class(name: &str, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut r = create(name, "hdd");
    r.parameters
        .extend(params.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    r
}

/// The root directory's mode and owner (`directoryPerms`, `uid`, `gid`):
/// values that cannot be used, and the existing `alpha` (made with the
/// defaults) asked for with another root.
fn root_parameters() -> Vec<Case> {
    let perms = |v: &str, parts: &[&str]| {
        row(
            &format!("directoryPerms {v:?}"),
            in_class("rooted", &[("directoryPerms", v)]),
            InvalidArgument,
            parts,
        )
    };
    let id = |k: &str, v: &str| {
        row(
            &format!("{k} {v:?}"),
            in_class("rooted", &[(k, v)]),
            InvalidArgument,
            &[k, &format!("{v:?}"), "number"],
        )
    };
    vec![
        perms("0o770", &["directoryPerms", "\"0o770\"", "octal"]),
        perms("0789", &["directoryPerms", "\"0789\"", "octal"]),
        perms("17777", &["directoryPerms", "\"17777\"", "octal"]),
        perms("", &["directoryPerms", "octal"]),
        perms("rwxr-x---", &["directoryPerms", "octal"]),
        perms("0x1ff", &["directoryPerms", "octal"]),
        perms("-770", &["directoryPerms", "octal"]),
        perms("4770", &["directoryPerms", "setuid"]),
        id("uid", "postgres"),
        id("uid", "-1"),
        id("uid", "4294967295"),
        id("uid", "+1000"),
        id("gid", "1e3"),
        id("gid", "99999999999999999999"),
        id("gid", ""),
        row(
            "uid for a raw block volume",
            csi::CreateVolumeRequest {
                volume_capabilities: vec![cap(Mode::SingleNodeWriter as i32, block())],
                ..in_class("rooted-block", &[("uid", "1000")])
            },
            InvalidArgument,
            &["uid", "raw block volume"],
        ),
        row(
            "existing name, other root mode",
            in_class("alpha", &[("directoryPerms", "0700")]),
            AlreadyExists,
            &["alpha", "mode 0777, owner 0:0"],
        ),
    ]
}

/// Names that look like paths, or are as long as a name may be, are
/// valid: they get a hashed, harmless directory in the pool.
fn odd_valid_names() -> Vec<Case> {
    let mut t: Vec<Case> = ["..", "../../etc", "/etc", ".alpha.meta", "alpha/../beta"]
        .iter()
        .map(|name| {
            row(
                &format!("path-like name {name:?}"),
                create(name, "hdd"),
                Ok,
                &[],
            )
        })
        .collect();
    t.push(row(
        "1024-byte name",
        create(&"n".repeat(1024), "hdd"),
        Ok,
        &[],
    ));
    t
}
