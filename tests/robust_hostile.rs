//! Hostile input: a table of bad requests across every CSI call, each with
//! the status code the CSI spec asks for and a check that the message is a
//! sentence a person can act on (it names the offending field or value).
//! Afterwards nothing outside the pools and targets may have changed, and
//! nothing may be mounted on the canary directories that symlinked targets
//! pointed at.
//!
//! Runs against the in-process server (the test harness).

mod common;
mod robust_support;

use std::collections::HashMap;
use std::path::Path;

use common::{Harness, mount_cap};
use csi_proto as csi;
use csi_proto::volume_capability::AccessType as Pa;
use csi_proto::volume_capability::access_mode::Mode;
use robust_support::{make_canary, mounts_below, tree_digest};
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

/// One request of the table.
#[derive(Debug, Clone)]
enum Req {
    Create(csi::CreateVolumeRequest),
    Delete(String),
    Validate(csi::ValidateVolumeCapabilitiesRequest),
    List(csi::ListVolumesRequest),
    Capacity(csi::GetCapacityRequest),
    CtrlPublish(csi::ControllerPublishVolumeRequest),
    CtrlUnpublish(csi::ControllerUnpublishVolumeRequest),
    CtrlExpand(csi::ControllerExpandVolumeRequest),
    CtrlGetVolume(csi::ControllerGetVolumeRequest),
    CtrlModify(csi::ControllerModifyVolumeRequest),
    CreateSnapshot(csi::CreateSnapshotRequest),
    DeleteSnapshot(csi::DeleteSnapshotRequest),
    ListSnapshots(csi::ListSnapshotsRequest),
    NodeStage(csi::NodeStageVolumeRequest),
    NodeUnstage(csi::NodeUnstageVolumeRequest),
    Publish(csi::NodePublishVolumeRequest),
    Unpublish(String, String),
    Stats(String, String),
    NodeExpand(csi::NodeExpandVolumeRequest),
    /// Hand-encoded bytes sent to a method: for what prost would never
    /// encode itself, like invalid UTF-8 in a string field.
    Raw(&'static str, Vec<u8>),
}

/// One row: what is sent, what must come back, and the words the message
/// must contain (all of them). `Code::Ok` rows are hostile requests the
/// spec answers with success (deleting an unknown id, say).
struct Case {
    label: String,
    req: Req,
    code: Code,
    mentions: Vec<String>,
}

fn case(label: impl Into<String>, req: Req, code: Code, mentions: &[&str]) -> Case {
    Case {
        label: label.into(),
        req,
        code,
        mentions: mentions.iter().map(|s| s.to_string()).collect(),
    }
}

async fn exec(ch: Channel, req: Req) -> Result<(), tonic::Status> {
    use csi::controller_client::ControllerClient as C;
    use csi::node_client::NodeClient as N;
    let (mut c, mut n) = (C::new(ch.clone()), N::new(ch.clone()));
    match req {
        Req::Create(r) => c.create_volume(r).await.map(drop),
        Req::Delete(id) => c
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        Req::Validate(r) => c.validate_volume_capabilities(r).await.and_then(|r| {
            // A refused capability is answered in the body, not as an error.
            let r = r.into_inner();
            match r.confirmed {
                Some(_) => Ok(()),
                None => Err(tonic::Status::new(Code::Ok, r.message)),
            }
        }),
        Req::List(r) => c.list_volumes(r).await.map(drop),
        Req::Capacity(r) => c.get_capacity(r).await.map(drop),
        Req::CtrlPublish(r) => c.controller_publish_volume(r).await.map(drop),
        Req::CtrlUnpublish(r) => c.controller_unpublish_volume(r).await.map(drop),
        Req::CtrlExpand(r) => c.controller_expand_volume(r).await.map(drop),
        Req::CtrlGetVolume(r) => c.controller_get_volume(r).await.map(drop),
        Req::CtrlModify(r) => c.controller_modify_volume(r).await.map(drop),
        Req::CreateSnapshot(r) => c.create_snapshot(r).await.map(drop),
        Req::DeleteSnapshot(r) => c.delete_snapshot(r).await.map(drop),
        Req::ListSnapshots(r) => c.list_snapshots(r).await.map(drop),
        Req::NodeStage(r) => n.node_stage_volume(r).await.map(drop),
        Req::NodeUnstage(r) => n.node_unstage_volume(r).await.map(drop),
        Req::Publish(r) => n.node_publish_volume(r).await.map(drop),
        Req::Unpublish(volume_id, target_path) => n
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id,
                target_path,
            })
            .await
            .map(drop),
        Req::Stats(volume_id, volume_path) => n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id,
                volume_path,
                staging_target_path: String::new(),
            })
            .await
            .map(drop),
        Req::NodeExpand(r) => n.node_expand_volume(r).await.map(drop),
        Req::Raw(method, bytes) => raw_call(ch, method, bytes).await,
    }
}

/// Sends `bytes` as the body of a unary call to `method` and ignores the
/// answer's body.
async fn raw_call(ch: Channel, method: &'static str, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(RawBytes(bytes)),
        PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::<RawBytes, Empty>::default(),
    )
    .await
    .map(drop)
}

/// A message that encodes as exactly the bytes it holds.
#[derive(Debug, Clone, Default)]
struct RawBytes(Vec<u8>);

impl prost::Message for RawBytes {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Any answer, its fields skipped.
#[derive(Debug, Clone, Default)]
struct Empty;

impl prost::Message for Empty {
    fn encode_raw(&self, _buf: &mut impl prost::bytes::BufMut) {}
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        0
    }
    fn clear(&mut self) {}
}

/// Field `tag` as length-delimited raw bytes.
fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::bytes::encode(tag, &bytes.to_vec(), &mut out);
    out
}

/// A message field holding another message.
fn message_field(tag: u32, m: &impl prost::Message) -> Vec<u8> {
    field(tag, &m.encode_to_vec())
}

fn cap(mode: i32, access: Option<Pa>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode }),
        access_type: access,
    }
}

fn mount() -> Option<Pa> {
    Some(Pa::Mount(Default::default()))
}

fn mount_flags(flags: &[&str]) -> Option<Pa> {
    Some(Pa::Mount(csi::volume_capability::MountVolume {
        mount_flags: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }))
}

fn block() -> Option<Pa> {
    Some(Pa::Block(Default::default()))
}

fn create(name: &str, pool: &str) -> csi::CreateVolumeRequest {
    common::create_request(name, pool, MIB)
}

fn publish(id: &str, target: &str) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

fn validate(id: &str, caps: Vec<csi::VolumeCapability>) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

fn capacity(params: &[(&str, &str)], caps: Vec<csi::VolumeCapability>) -> csi::GetCapacityRequest {
    csi::GetCapacityRequest {
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Ids forged to point outside a pool, or at the driver's own files.
const FORGED_IDS: &[&str] = &[
    "hdd:../../etc",
    "../x:y",
    "hdd:/etc",
    "hdd:..",
    "hdd:.",
    "hdd:.alpha.meta",
    "hdd:alpha/../../..",
    "hdd:a/b",
    "hdd:alpha\u{0}",
    ":alpha",
    "hdd:",
    "nvme:alpha",
    "HDD:alpha",
    "hdd:alpha:beta",
    "/etc/passwd",
    "hdd:%2e%2e",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_hostile_requests_is_refused_with_the_right_codes() {
    let h = Harness::start().await;
    let root = std::fs::canonicalize(h.root.path()).unwrap();
    let hdd = h.pool_dir("hdd");
    let ssd = h.pool_dir("ssd");
    let targets = h.target("x").parent().unwrap().to_path_buf();

    // Volumes the hostile calls might try to reach.
    let alpha = h.create("alpha", "hdd", MIB).await.volume_id;
    let beta = h.create("beta", "ssd", MIB).await.volume_id;
    std::fs::write(hdd.join("alpha/data"), b"alpha's data").unwrap();
    let busy = targets.join("busy");
    h.publish(&beta, &busy, false).await.unwrap();

    // The canary tree, and targets that lead to it, to other volumes and
    // into the pools.
    let canary = root.join("canary");
    make_canary(&canary);
    let link = |name: &str, to: &Path| {
        let p = targets.join(name);
        std::os::unix::fs::symlink(to, &p).unwrap();
        s(&p)
    };
    let to_canary = link("to-canary", &canary.join("etc"));
    let to_canary_empty = {
        std::fs::create_dir(canary.join("empty")).unwrap();
        link("to-canary-empty", &canary.join("empty"))
    };
    let to_volume = link("to-volume", &hdd.join("alpha"));
    let to_other_volume = link("to-other-volume", &ssd.join("beta"));
    let to_pool = link("to-pool", &hdd);
    let _dir_link = link("into-pool", &hdd);
    let via_pool = s(&targets.join("into-pool").join("newdir"));
    let to_etc = link("to-etc", Path::new("/etc"));
    let file_target = targets.join("a-file");
    std::fs::write(&file_target, b"not a dir").unwrap();
    let nonempty = targets.join("nonempty");
    std::fs::create_dir(&nonempty).unwrap();
    std::fs::write(nonempty.join("keep"), b"keep").unwrap();
    let foreign = targets.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mounting a tmpfs (tests run as root)");
    std::fs::write(foreign.join("theirs"), b"theirs").unwrap();
    let digest_before = tree_digest(&root, &["pools", "targets", "csi.sock"]);
    let pools_before: Vec<_> = [&hdd, &ssd].iter().map(|p| tree_digest(p, &[])).collect();

    let free = s(&targets.join("free"));
    let long = "n".repeat(2000);
    let long_id = format!("hdd:{}", "x".repeat(2000));
    let long_path = format!("/{}", "d/".repeat(2100));
    let mut t: Vec<Case> = Vec::new();
    use Code::*;

    // --- CreateVolume -----------------------------------------------------
    let mut r = create("", "hdd");
    t.push(case(
        "create: empty name",
        Req::Create(r.clone()),
        InvalidArgument,
        &["name"],
    ));
    r.name = long.clone();
    t.push(case(
        "create: 2000-byte name",
        Req::Create(r.clone()),
        InvalidArgument,
        &["name", "2000"],
    ));
    r.name = "a\0b".into();
    t.push(case(
        "create: NUL in name",
        Req::Create(r.clone()),
        InvalidArgument,
        &["name", "NUL"],
    ));
    for (label, caps, mentions) in [
        ("no capabilities", vec![], &["volume_capabilities"][..]),
        (
            "MULTI_NODE_READER_ONLY",
            vec![cap(Mode::MultiNodeReaderOnly as i32, mount())],
            &["MULTI_NODE"][..],
        ),
        (
            "MULTI_NODE_SINGLE_WRITER",
            vec![cap(Mode::MultiNodeSingleWriter as i32, mount())],
            &["MULTI_NODE"][..],
        ),
        (
            "MULTI_NODE_MULTI_WRITER",
            vec![cap(Mode::MultiNodeMultiWriter as i32, mount())],
            &["MULTI_NODE"][..],
        ),
        (
            "block",
            vec![cap(Mode::SingleNodeWriter as i32, block())],
            &["block"][..],
        ),
        (
            "no access type",
            vec![cap(Mode::SingleNodeWriter as i32, None)],
            &["access_type"][..],
        ),
        (
            "UNKNOWN mode",
            vec![cap(0, mount())],
            &["access mode", "0"][..],
        ),
        (
            "mode 99",
            vec![cap(99, mount())],
            &["access mode", "99"][..],
        ),
        (
            "negative mode",
            vec![cap(-5, mount())],
            &["access mode", "-5"][..],
        ),
        (
            "no access mode",
            vec![csi::VolumeCapability {
                access_mode: None,
                access_type: mount(),
            }],
            &["access_mode"][..],
        ),
        (
            "one good, one multi-node",
            vec![
                mount_cap(Mode::SingleNodeWriter),
                cap(Mode::MultiNodeMultiWriter as i32, mount()),
            ],
            &["MULTI_NODE"][..],
        ),
        (
            "mount flag exec=evil",
            vec![cap(1, mount_flags(&["exec=evil"]))],
            &["exec=evil"][..],
        ),
        (
            "mount flag remount",
            vec![cap(1, mount_flags(&["ro,remount"]))],
            &["remount"][..],
        ),
    ] {
        let mut r = create("caps", "hdd");
        r.volume_capabilities = caps;
        t.push(case(
            format!("create: {label}"),
            Req::Create(r),
            InvalidArgument,
            mentions,
        ));
    }
    for (label, req, lim, code, mentions) in [
        (
            "negative required",
            -1,
            0,
            InvalidArgument,
            &["required_bytes"][..],
        ),
        (
            "negative limit",
            0,
            -1,
            InvalidArgument,
            &["limit_bytes"][..],
        ),
        (
            "i64::MIN",
            i64::MIN,
            i64::MIN,
            InvalidArgument,
            &["capacity_range"][..],
        ),
        (
            "required > limit",
            2 * MIB,
            MIB,
            InvalidArgument,
            &["exceeds", "limit_bytes"][..],
        ),
        (
            "i64::MAX",
            i64::MAX,
            0,
            OutOfRange,
            &["9223372036854775807", "hdd"][..],
        ),
        (
            "i64::MAX both",
            i64::MAX,
            i64::MAX,
            OutOfRange,
            &["9223372036854775807"][..],
        ),
    ] {
        let mut r = create("sizes", "hdd");
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        });
        t.push(case(
            format!("create: {label}"),
            Req::Create(r),
            code,
            mentions,
        ));
    }
    for pool in ["nvme", "", "../hdd", "hdd/../ssd", "HDD", "hdd\0"] {
        t.push(case(
            format!("create: pool {pool:?}"),
            Req::Create(create("pooled", pool)),
            InvalidArgument,
            &["pool", "hdd", "ssd"],
        ));
    }
    let mut r = create("nopool", "hdd");
    r.parameters.clear();
    t.push(case(
        "create: no pool with two pools",
        Req::Create(r),
        InvalidArgument,
        &["pool"],
    ));
    let mut r = create("snap", "hdd");
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "s".into(),
            },
        )),
    });
    t.push(case(
        "create: content source",
        Req::Create(r),
        InvalidArgument,
        &["volume_content_source"],
    ));
    let mut r = create("mutable", "hdd");
    r.mutable_parameters = HashMap::from([("iops".into(), "1".into())]);
    t.push(case(
        "create: mutable parameters",
        Req::Create(r),
        InvalidArgument,
        &["mutable_parameters"],
    ));
    let mut r = create("elsewhere", "hdd");
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([("topology.hostpath-csi.dev/node".into(), "other".into())]),
        }],
        preferred: vec![],
    });
    t.push(case(
        "create: topology of another node",
        Req::Create(r),
        ResourceExhausted,
        &["node"],
    ));
    t.push(case(
        "create: existing name, other pool",
        Req::Create(create("alpha", "ssd")),
        AlreadyExists,
        &["alpha", "hdd"],
    ));
    let mut r = create("alpha", "hdd");
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: 0,
    });
    t.push(case(
        "create: existing name, other size",
        Req::Create(r),
        AlreadyExists,
        &["alpha", "bytes"],
    ));
    // Names that look like paths are valid names: they get a hashed,
    // harmless directory in the pool (checked after the table).
    for name in ["..", "../../etc", "/etc", ".alpha.meta", "alpha/../beta"] {
        t.push(case(
            format!("create: path-like name {name:?}"),
            Req::Create(create(name, "hdd")),
            Ok,
            &[],
        ));
    }

    // --- DeleteVolume: unknown ids are success (spec), never a removal ---
    t.push(case(
        "delete: empty id",
        Req::Delete(String::new()),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "delete: 2000-byte id",
        Req::Delete(long_id.clone()),
        InvalidArgument,
        &["volume_id"],
    ));
    for id in FORGED_IDS {
        t.push(case(
            format!("delete: forged {id:?}"),
            Req::Delete(id.to_string()),
            Ok,
            &[],
        ));
    }
    t.push(case(
        "delete: published volume",
        Req::Delete(beta.clone()),
        FailedPrecondition,
        &["beta", "busy", "unpublish"],
    ));

    // --- ValidateVolumeCapabilities ---------------------------------------
    t.push(case(
        "validate: empty id",
        Req::Validate(validate("", vec![mount_cap(Mode::SingleNodeWriter)])),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "validate: no caps",
        Req::Validate(validate(&alpha, vec![])),
        InvalidArgument,
        &["volume_capabilities"],
    ));
    t.push(case(
        "validate: unknown mode",
        Req::Validate(validate(&alpha, vec![cap(42, mount())])),
        InvalidArgument,
        &["42"],
    ));
    t.push(case(
        "validate: no access type",
        Req::Validate(validate(&alpha, vec![cap(1, None)])),
        InvalidArgument,
        &["access_type"],
    ));
    // Refusals of capabilities come back unconfirmed with a reason (as Ok).
    t.push(case(
        "validate: multi-node is declined",
        Req::Validate(validate(&alpha, vec![cap(5, mount())])),
        Ok,
        &["MULTI_NODE"],
    ));
    t.push(case(
        "validate: block is declined",
        Req::Validate(validate(&alpha, vec![cap(1, block())])),
        Ok,
        &["block"],
    ));
    for id in [
        "hdd:../../etc",
        "../x:y",
        "hdd:/etc",
        "hdd:..",
        "nvme:alpha",
        "hdd:nope",
    ] {
        t.push(case(
            format!("validate: forged {id:?}"),
            Req::Validate(validate(id, vec![mount_cap(Mode::SingleNodeWriter)])),
            NotFound,
            &[id, "does not exist"],
        ));
    }

    // --- ListVolumes -------------------------------------------------------
    for token in [
        "garbage", "hdd:../x", "../x:y", "hdd:/etc", "zzz:", ":", "hdd:a\0",
    ] {
        t.push(case(
            format!("list: token {token:?}"),
            Req::List(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.into(),
            }),
            Aborted,
            &["starting_token"],
        ));
    }
    for max in [-1, i32::MIN] {
        t.push(case(
            format!("list: max_entries {max}"),
            Req::List(csi::ListVolumesRequest {
                max_entries: max,
                starting_token: String::new(),
            }),
            InvalidArgument,
            &["max_entries"],
        ));
    }

    // --- GetCapacity -------------------------------------------------------
    t.push(case(
        "capacity: unknown pool",
        Req::Capacity(capacity(&[("pool", "nvme")], vec![])),
        InvalidArgument,
        &["nvme", "pool"],
    ));
    t.push(case(
        "capacity: pool ..",
        Req::Capacity(capacity(&[("pool", "..")], vec![])),
        InvalidArgument,
        &["pool"],
    ));
    t.push(case(
        "capacity: unknown mode",
        Req::Capacity(capacity(&[("pool", "hdd")], vec![cap(77, mount())])),
        InvalidArgument,
        &["77"],
    ));
    t.push(case(
        "capacity: no access type",
        Req::Capacity(capacity(&[("pool", "hdd")], vec![cap(1, None)])),
        InvalidArgument,
        &["access_type"],
    ));

    // --- Calls this driver does not offer: UNIMPLEMENTED ------------------
    let unimpl = [
        (
            "ControllerPublishVolume",
            Req::CtrlPublish(csi::ControllerPublishVolumeRequest {
                volume_id: alpha.clone(),
                node_id: "n".into(),
                ..Default::default()
            }),
        ),
        (
            "ControllerUnpublishVolume",
            Req::CtrlUnpublish(csi::ControllerUnpublishVolumeRequest {
                volume_id: "hdd:../../etc".into(),
                ..Default::default()
            }),
        ),
        (
            "ControllerExpandVolume",
            Req::CtrlExpand(csi::ControllerExpandVolumeRequest {
                volume_id: alpha.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: i64::MAX,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        ),
        (
            "ControllerGetVolume",
            Req::CtrlGetVolume(csi::ControllerGetVolumeRequest {
                volume_id: "hdd:..".into(),
            }),
        ),
        (
            "ControllerModifyVolume",
            Req::CtrlModify(csi::ControllerModifyVolumeRequest {
                volume_id: alpha.clone(),
                ..Default::default()
            }),
        ),
        (
            "CreateSnapshot",
            Req::CreateSnapshot(csi::CreateSnapshotRequest {
                source_volume_id: "hdd:/etc".into(),
                name: "s".into(),
                ..Default::default()
            }),
        ),
        (
            "DeleteSnapshot",
            Req::DeleteSnapshot(csi::DeleteSnapshotRequest {
                snapshot_id: "../x".into(),
                ..Default::default()
            }),
        ),
        (
            "ListSnapshots",
            Req::ListSnapshots(csi::ListSnapshotsRequest {
                starting_token: "garbage".into(),
                ..Default::default()
            }),
        ),
        (
            "NodeStageVolume",
            Req::NodeStage(csi::NodeStageVolumeRequest {
                volume_id: alpha.clone(),
                staging_target_path: to_canary.clone(),
                ..Default::default()
            }),
        ),
        (
            "NodeUnstageVolume",
            Req::NodeUnstage(csi::NodeUnstageVolumeRequest {
                volume_id: alpha.clone(),
                staging_target_path: s(&canary),
            }),
        ),
    ];
    for (label, req) in unimpl {
        t.push(case(
            format!("{label}: not offered"),
            req,
            Unimplemented,
            &[],
        ));
    }

    // --- NodeExpandVolume (wrong paths: see also the test below) ----------
    let node_expand = |id: &str, path: &str| {
        Req::NodeExpand(csi::NodeExpandVolumeRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string(),
            ..Default::default()
        })
    };
    t.push(case(
        "node expand: empty id",
        node_expand("", &s(&busy)),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "node expand: empty path",
        node_expand(&beta, ""),
        InvalidArgument,
        &["volume_path"],
    ));
    t.push(case(
        "node expand: relative path",
        node_expand(&beta, "busy"),
        NotFound,
        &["volume_path"],
    ));
    t.push(case(
        "node expand: dot-dot path",
        node_expand(&beta, &format!("{}/../canary", s(&targets))),
        NotFound,
        &["volume_path"],
    ));
    for id in ["hdd:../../etc", "hdd:/etc", "../x:y"] {
        t.push(case(
            format!("node expand: forged {id:?}"),
            node_expand(id, &s(&busy)),
            NotFound,
            &["does not exist"],
        ));
    }

    // --- NodePublishVolume -------------------------------------------------
    t.push(case(
        "publish: empty id",
        Req::Publish(publish("", &free)),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "publish: 2000-byte id",
        Req::Publish(publish(&long_id, &free)),
        InvalidArgument,
        &["volume_id"],
    ));
    for (label, target, mentions) in [
        ("empty target", String::new(), &["target_path"][..]),
        (
            "relative target",
            "targets/x".to_string(),
            &["target_path", "absolute"][..],
        ),
        (
            "dot-dot target",
            format!("{}/../../etc", s(&targets)),
            &["target_path", ".."][..],
        ),
        (
            "dot target",
            format!("{}/./x", s(&targets)),
            &["target_path"][..],
        ),
        (
            "NUL in target",
            format!("{}/a\0b", s(&targets)),
            &["target_path", "NUL"][..],
        ),
        ("root target", "/".to_string(), &["target_path", "root"][..]),
        (
            "8 KiB target",
            long_path.clone(),
            &["target_path", "too long"][..],
        ),
    ] {
        t.push(case(
            format!("publish: {label}"),
            Req::Publish(publish(&alpha, &target)),
            InvalidArgument,
            mentions,
        ));
    }
    let mut r = publish(&alpha, &free);
    r.volume_capability = None;
    t.push(case(
        "publish: no capability",
        Req::Publish(r),
        InvalidArgument,
        &["volume_capability"],
    ));
    for (label, c, mentions) in [
        (
            "multi-node",
            cap(Mode::MultiNodeMultiWriter as i32, mount()),
            &["MULTI_NODE"][..],
        ),
        ("block", cap(1, block()), &["block"][..]),
        ("no access type", cap(1, None), &["access_type"][..]),
        ("unknown mode", cap(12, mount()), &["12"][..]),
        (
            "mount flag suid",
            cap(1, mount_flags(&["suid"])),
            &["suid"][..],
        ),
    ] {
        let mut r = publish(&alpha, &free);
        r.volume_capability = Some(c);
        t.push(case(
            format!("publish: {label}"),
            Req::Publish(r),
            InvalidArgument,
            mentions,
        ));
    }
    for id in FORGED_IDS.iter().filter(|id| !id.contains('\0')) {
        t.push(case(
            format!("publish: forged {id:?}"),
            Req::Publish(publish(id, &free)),
            NotFound,
            &["volume", "not exist"],
        ));
    }
    t.push(case(
        "publish: unknown volume",
        Req::Publish(publish("hdd:nope", &free)),
        NotFound,
        &["hdd:nope"],
    ));
    for (label, target, code, mentions) in [
        (
            "symlink to canary dir",
            to_canary.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "symlink to empty canary dir",
            to_canary_empty.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "symlink to /etc",
            to_etc.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "symlink to its own volume",
            to_volume.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "symlink to another volume",
            to_other_volume.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "symlink to a pool",
            to_pool.clone(),
            InvalidArgument,
            &["symlink"][..],
        ),
        (
            "parent is a symlink into a pool",
            via_pool.clone(),
            InvalidArgument,
            &["pool", "hdd"][..],
        ),
        (
            "inside a pool",
            s(&hdd.join("new-target")),
            InvalidArgument,
            &["pool", "hdd"][..],
        ),
        (
            "another volume's directory",
            s(&ssd.join("beta")),
            InvalidArgument,
            &["pool", "ssd"][..],
        ),
        (
            "the pool itself",
            s(&hdd),
            InvalidArgument,
            &["pool", "hdd"][..],
        ),
        (
            "above the pools",
            s(&root.join("pools")),
            InvalidArgument,
            &["pool"][..],
        ),
        (
            "a regular file",
            s(&file_target),
            InvalidArgument,
            &["not a directory"][..],
        ),
        (
            "a non-empty dir",
            s(&nonempty),
            FailedPrecondition,
            &["not empty"][..],
        ),
        (
            "the canary dir itself",
            s(&canary.join("etc")),
            FailedPrecondition,
            &["not empty"][..],
        ),
        (
            "a foreign mount",
            s(&foreign),
            FailedPrecondition,
            &["mount"][..],
        ),
        (
            "another volume's target",
            s(&busy),
            FailedPrecondition,
            &["mount"][..],
        ),
        (
            "missing parent",
            s(&targets.join("no/such/dir")),
            NotFound,
            &["parent", "target_path"][..],
        ),
    ] {
        t.push(case(
            format!("publish: target {label}"),
            Req::Publish(publish(&alpha, &target)),
            code,
            mentions,
        ));
    }
    let mut r = publish(&beta, &s(&busy));
    r.readonly = true;
    t.push(case(
        "publish: same target, now read-only",
        Req::Publish(r),
        AlreadyExists,
        &["busy", "read-write"],
    ));

    // --- NodeUnpublishVolume ----------------------------------------------
    t.push(case(
        "unpublish: empty id",
        Req::Unpublish(String::new(), free.clone()),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "unpublish: empty target",
        Req::Unpublish(alpha.clone(), String::new()),
        InvalidArgument,
        &["target_path"],
    ));
    t.push(case(
        "unpublish: relative target",
        Req::Unpublish(alpha.clone(), "x/y".into()),
        InvalidArgument,
        &["target_path"],
    ));
    t.push(case(
        "unpublish: dot-dot target",
        Req::Unpublish(alpha.clone(), format!("{}/../canary", s(&targets))),
        InvalidArgument,
        &["target_path", ".."],
    ));
    for id in ["hdd:../../etc", "../x:y", "hdd:/etc", "nvme:beta"] {
        t.push(case(
            format!("unpublish: forged {id:?}"),
            Req::Unpublish(id.into(), s(&busy)),
            NotFound,
            &["does not exist"],
        ));
    }
    t.push(case(
        "unpublish: symlink to canary",
        Req::Unpublish(alpha.clone(), to_canary.clone()),
        InvalidArgument,
        &["symlink"],
    ));
    t.push(case(
        "unpublish: symlink to a volume",
        Req::Unpublish(alpha.clone(), to_volume.clone()),
        InvalidArgument,
        &["symlink"],
    ));
    t.push(case(
        "unpublish: inside a pool",
        Req::Unpublish(alpha.clone(), s(&hdd.join("alpha"))),
        InvalidArgument,
        &["pool"],
    ));
    t.push(case(
        "unpublish: a foreign mount",
        Req::Unpublish(alpha.clone(), s(&foreign)),
        FailedPrecondition,
        &["not a volume of this driver"],
    ));

    // --- NodeGetVolumeStats -----------------------------------------------
    t.push(case(
        "stats: empty id",
        Req::Stats(String::new(), s(&busy)),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "stats: empty path",
        Req::Stats(beta.clone(), String::new()),
        InvalidArgument,
        &["volume_path"],
    ));
    for (label, path) in [
        ("relative path", "busy".to_string()),
        ("dot-dot path", format!("{}/../pools/ssd/beta", s(&targets))),
        ("not where published", s(&canary.join("etc"))),
        ("missing path", s(&targets.join("nothing-here"))),
    ] {
        // The message names the field or, failing that, the path itself.
        let mention = if label == "not where published" {
            path.clone()
        } else {
            "volume_path".to_string()
        };
        t.push(case(
            format!("stats: {label}"),
            Req::Stats(beta.clone(), path),
            NotFound,
            &[mention.as_str()],
        ));
    }
    for id in ["hdd:../../etc", "hdd:/etc", "../x:y"] {
        t.push(case(
            format!("stats: forged {id:?}"),
            Req::Stats(id.into(), s(&busy)),
            NotFound,
            &["does not exist"],
        ));
    }
    t.push(case(
        "stats: another volume's target",
        Req::Stats(alpha.clone(), s(&busy)),
        NotFound,
        &["not published"],
    ));

    let bad_requests = t.iter().filter(|c| c.code != Ok).count();
    assert!(bad_requests >= 100, "only {bad_requests} bad requests");
    let failures = run_table(&h, &t).await;
    eprintln!(
        "hostile table: {} cases ({bad_requests} bad requests), {} failed",
        t.len(),
        failures.len()
    );

    // --- Nothing outside the pools and targets changed ---------------------
    // The driver still serves, its volumes are intact, the canary is.
    h.identity().probe(csi::ProbeRequest {}).await.unwrap();
    assert_eq!(
        std::fs::read(hdd.join("alpha/data")).unwrap(),
        b"alpha's data"
    );
    assert_eq!(
        tree_digest(&root, &["pools", "targets", "csi.sock"]),
        digest_before,
        "the canary tree changed"
    );
    assert!(
        mounts_below(&canary).is_empty(),
        "something was mounted on the canary"
    );
    assert!(common::mounts_at(Path::new("/etc")).is_empty());
    assert_eq!(std::fs::read(nonempty.join("keep")).unwrap(), b"keep");
    assert_eq!(
        std::fs::read(foreign.join("theirs")).unwrap(),
        b"theirs",
        "a foreign mount was touched"
    );
    assert_eq!(std::fs::read(&file_target).unwrap(), b"not a dir");
    // The only new entries in the pools are the hashed volumes made for
    // path-like names; ssd is untouched.
    assert_eq!(tree_digest(&ssd, &[]), pools_before[1], "pool ssd changed");
    for e in std::fs::read_dir(&hdd).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let plain = name.trim_start_matches('.').trim_end_matches(".meta");
        assert!(
            plain == "alpha" || plain.starts_with("sha256-"),
            "unexpected entry {name:?} in pool hdd"
        );
    }
    h.unpublish(&beta, &busy).await.unwrap();
    let _ = nix::mount::umount2(&foreign, nix::mount::MntFlags::MNT_DETACH);
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        t.len(),
        failures.join("\n")
    );
}

/// Runs every case and returns a line per case that did not go as the
/// table says.
async fn run_table(h: &Harness, table: &[Case]) -> Vec<String> {
    let ch = csi_proto::connect(&h.socket).await.unwrap();
    let mut failures = Vec::new();
    for c in table {
        let res = exec(ch.clone(), c.req.clone()).await;
        let (code, msg) = match &res {
            Ok(()) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        if code != c.code {
            failures.push(format!(
                "{}: expected {:?}, got {code:?}: {msg}",
                c.label, c.code
            ));
            continue;
        }
        if code != Code::Ok && code != Code::Unimplemented && msg.trim().is_empty() {
            failures.push(format!("{}: empty message", c.label));
        }
        let missing: Vec<&String> = c
            .mentions
            .iter()
            .filter(|m| !msg.contains(m.as_str()))
            .collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: message {msg:?} does not mention {missing:?}",
                c.label
            ));
        }
    }
    failures
}

/// Requests that cannot be decoded (invalid UTF-8 in a string field, wrong
/// wire types, truncated messages) are malformed arguments: the CSI answer
/// is INVALID_ARGUMENT, naming the field. INTERNAL would tell the CO the
/// plugin is broken, and it would retry the same bytes forever.
#[tokio::test]
async fn undecodable_requests_are_invalid_arguments() {
    let h = Harness::start().await;
    let alpha = h.create("alpha", "hdd", MIB).await.volume_id;
    let mut t: Vec<Case> = Vec::new();
    use Code::*;
    // --- Bytes no client library would send -------------------------------
    let good_cap = message_field(3, &mount_cap(Mode::SingleNodeWriter));
    let pool_hdd = {
        let mut m = Vec::new();
        prost::encoding::hash_map::encode(
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            prost::encoding::string::encode,
            prost::encoding::string::encoded_len,
            4,
            &HashMap::from([("pool".to_string(), "hdd".to_string())]),
            &mut m,
        );
        m
    };
    let raw_create = |name: &[u8]| [field(1, name), good_cap.clone(), pool_hdd.clone()].concat();
    t.push(case(
        "raw create: non-UTF-8 name",
        Req::Raw("/csi.v1.Controller/CreateVolume", raw_create(b"\xff\xfe..")),
        InvalidArgument,
        &["name"],
    ));
    t.push(case(
        "raw create: overlong UTF-8 '/'",
        Req::Raw("/csi.v1.Controller/CreateVolume", raw_create(b"\xc0\xaf")),
        InvalidArgument,
        &["name"],
    ));
    t.push(case(
        "raw create: surrogate",
        Req::Raw(
            "/csi.v1.Controller/CreateVolume",
            raw_create(b"\xed\xa0\x80"),
        ),
        InvalidArgument,
        &["name"],
    ));
    t.push(case(
        "raw delete: non-UTF-8 id",
        Req::Raw("/csi.v1.Controller/DeleteVolume", field(1, b"hdd:\xff")),
        InvalidArgument,
        &["volume_id"],
    ));
    t.push(case(
        "raw publish: non-UTF-8 target",
        Req::Raw(
            "/csi.v1.Node/NodePublishVolume",
            [
                field(1, alpha.as_bytes()),
                field(4, b"/tmp/\xff\xfe"),
                message_field(5, &mount_cap(Mode::SingleNodeWriter)),
            ]
            .concat(),
        ),
        InvalidArgument,
        &["target_path"],
    ));
    t.push(case(
        "raw list: non-UTF-8 token",
        Req::Raw("/csi.v1.Controller/ListVolumes", field(2, b"\x80")),
        InvalidArgument,
        &["starting_token"],
    ));
    t.push(case(
        "raw list: wrong wire type",
        Req::Raw("/csi.v1.Controller/ListVolumes", field(1, b"abc")),
        InvalidArgument,
        &["max_entries"],
    ));
    t.push(case(
        "raw create: truncated",
        Req::Raw("/csi.v1.Controller/CreateVolume", vec![0x0a, 0x10, b'a']),
        InvalidArgument,
        &["name"],
    ));
    t.push(case(
        "raw create: varint where a message belongs",
        Req::Raw(
            "/csi.v1.Controller/CreateVolume",
            vec![0x10; 1].into_iter().chain([0xff; 11]).collect(),
        ),
        InvalidArgument,
        &["capacity_range"],
    ));
    t.push(case(
        "raw: unknown method",
        Req::Raw("/csi.v1.Controller/FormatDisk", vec![]),
        Unimplemented,
        &[],
    ));

    let failures = run_table(&h, &t).await;
    // Whatever it answers, the driver keeps serving and made nothing.
    h.identity().probe(csi::ProbeRequest {}).await.unwrap();
    let entries: Vec<_> = std::fs::read_dir(h.pool_dir("hdd"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        t.len(),
        failures.join("\n")
    );
}

/// NodeExpandVolume must act only on a path where the volume is published
/// (CSI spec: NOT_FOUND when the volume is not at volume_path), as
/// NodeGetVolumeStats does; a canary directory is not the volume.
#[tokio::test]
async fn node_expand_refuses_a_path_that_is_not_the_volume() {
    let h = Harness::start().await;
    let root = std::fs::canonicalize(h.root.path()).unwrap();
    let alpha = h.create("alpha", "hdd", MIB).await.volume_id;
    let canary = root.join("canary");
    make_canary(&canary);
    let before = tree_digest(&canary, &[]);
    let mut t = Vec::new();
    for (label, path) in [
        ("a canary directory", canary.join("etc")),
        (
            "a volume's directory in its pool",
            h.pool_dir("hdd").join("alpha"),
        ),
        ("an empty target", h.target("never-published")),
    ] {
        if !path.exists() {
            std::fs::create_dir_all(&path).unwrap();
        }
        t.push(case(
            format!("node expand: {label}"),
            Req::NodeExpand(csi::NodeExpandVolumeRequest {
                volume_id: alpha.clone(),
                volume_path: s(&path),
                ..Default::default()
            }),
            Code::NotFound,
            &["volume_path"],
        ));
    }
    let failures = run_table(&h, &t).await;
    assert_eq!(tree_digest(&canary, &[]), before, "the canary changed");
    assert!(mounts_below(&canary).is_empty());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
