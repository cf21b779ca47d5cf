//! The mode and owner of a volume's root directory, chosen by the
//! StorageClass (`directoryPerms`, `uid`, `gid`), on every pool kind with
//! real filesystems (needs root, and setpriv to write as other users;
//! btrfs-progs for btrfs, e2fsprogs and xfsprogs for image pools). What a
//! pod would notice: the root it is given (stat through the published
//! target), and whether a process of its uid and gid can write there; by
//! default anyone can (0777 root), with a stricter class only the owner
//! and the group. Restores and clones get their class's root, and the
//! data inside keeps its own owners. A repeated CreateVolume with the
//! same parameters is the same volume, with other ones ALREADY_EXISTS;
//! a root changed after publishing (the kubelet's fsGroup, a pod's chmod)
//! is never reset by a retry or a restart.

mod common;
mod pools;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{Harness, assert_refused, create_request};
use csi_proto as csi;
use hostpath_csi::config::{Filesystem, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

/// The class every strict volume of these tests is made in.
const STRICT: &[(&str, &str)] = &[("directoryPerms", "0770"), ("uid", "1000"), ("gid", "2000")];

/// A driver with one pool `p` of `kind` under a fresh root that users
/// other than root can traverse (to reach the targets).
async fn harness(kind: &str) -> Option<(Harness, Cleanup, i64)> {
    if !common::root_or_skip("volumes are made on real filesystems and written as other users")
        || !have("setpriv")
    {
        return None;
    }
    let (root, cleanup) = root();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (config, size) = match kind {
        "dir" => (
            PoolConfig::of_kind("p", root.path().join("pools/p"), PoolKind::Dir),
            16 * MIB,
        ),
        "btrfs" => {
            if !have("mkfs.btrfs") {
                return None;
            }
            let fs = loop_fs(root.path(), "btrfs", "btrfs", 1 << 30);
            (
                PoolConfig::of_kind("p", fs.join("pool"), PoolKind::Btrfs),
                16 * MIB,
            )
        }
        "ext4" | "xfs" => {
            if !have(&format!("mkfs.{kind}")) {
                return None;
            }
            let (fs, size) = match kind {
                "xfs" => (Filesystem::Xfs, 300 * MIB),
                _ => (Filesystem::Ext4, 16 * MIB),
            };
            let config = PoolConfig {
                filesystem: Some(fs),
                ..PoolConfig::of_kind("p", root.path().join("pools/p"), PoolKind::Image)
            };
            (config, size)
        }
        _ => unreachable!(),
    };
    Some((
        Harness::with_pool_configs(root, vec![config]).await,
        cleanup,
        size,
    ))
}

/// A CreateVolume of `name` in pool `p` with these StorageClass
/// parameters besides the pool.
fn in_class(name: &str, size: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut r = create_request(name, "p", size);
    r.parameters
        .extend(params.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    r
}

fn with_source(
    mut r: csi::CreateVolumeRequest,
    source: csi::volume_content_source::Type,
) -> csi::CreateVolumeRequest {
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    r
}

/// The refusal of a CreateVolume that must fail.
async fn refused(h: &Harness, r: csi::CreateVolumeRequest) -> tonic::Status {
    h.controller().create_volume(r).await.unwrap_err()
}

/// Mode bits (with setgid and sticky), owner and group of `path`.
fn root_of(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// Whether a process of `uid`:`gid` (no other groups) can create a file in
/// `dir`; a refusal must be for permissions, nothing else.
fn can_write(dir: &Path, uid: u32, gid: u32) -> bool {
    // A fresh name each time: copies of a volume hold the files written
    // into it before.
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = dir.join(format!("by-{uid}-{gid}-{n}"));
    let out = std::process::Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_string(),
            "--".to_string(),
            "sh".to_string(),
            "-c".to_string(),
            "echo x > \"$1\"".to_string(),
            "sh".to_string(),
        ])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        assert_eq!(std::fs::metadata(&file).unwrap().uid(), uid);
        return true;
    }
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(!file.exists(), "{}", file.display());
    false
}

async fn scenario(kind: &str) {
    let Some((mut h, _cleanup, size)) = harness(kind).await else {
        return;
    };
    let targets = h.target("x").parent().unwrap().to_path_buf();
    let t = |n: &str| targets.join(n);

    // The default: 0777 root, anyone writes.
    let open = h.create_volume(in_class("open", size, &[])).await;
    h.publish(&open.volume_id, &t("open"), false).await.unwrap();
    assert_eq!(root_of(&t("open")), (0o777, 0, 0));
    assert!(can_write(&t("open"), 4321, 4321));

    // A strict class: the owner and the group write, others do not.
    let strict = h.create_volume(in_class("strict", size, STRICT)).await;
    h.publish(&strict.volume_id, &t("strict"), false)
        .await
        .unwrap();
    assert_eq!(root_of(&t("strict")), (0o770, 1000, 2000));
    assert!(can_write(&t("strict"), 1000, 1000));
    assert!(can_write(&t("strict"), 3000, 2000));
    assert!(!can_write(&t("strict"), 3000, 3000));

    // Idempotent with the same parameters; other ones are another volume.
    let again = h.create_volume(in_class("strict", size, STRICT)).await;
    assert_eq!(again.volume_id, strict.volume_id);
    for other in [
        &[("directoryPerms", "0750"), ("uid", "1000"), ("gid", "2000")][..],
        &[("directoryPerms", "0770"), ("uid", "1001"), ("gid", "2000")],
        &[("directoryPerms", "770"), ("uid", "1000")],
        &[],
    ] {
        let e = refused(&h, in_class("strict", size, other)).await;
        assert_refused(&e, Code::AlreadyExists, "mode 0770, owner 1000:2000");
    }

    // After publishing, the root is the pod's: the kubelet's fsGroup
    // change (group, setgid, group rwx) survives a retried CreateVolume
    // and a restart.
    nix::unistd::chown(&t("strict"), None, Some(5000.into())).unwrap();
    std::fs::set_permissions(t("strict"), std::fs::Permissions::from_mode(0o2770)).unwrap();
    h.create_volume(in_class("strict", size, STRICT)).await;
    h.restart().await;
    h.create_volume(in_class("strict", size, STRICT)).await;
    assert_eq!(root_of(&t("strict")), (0o2770, 1000, 5000));

    // Never published, the root is still the driver's to finish: one
    // left wrong (a create killed between making the storage and setting
    // its root) is set by the retry.
    let fresh = h.create_volume(in_class("fresh", size, STRICT)).await;
    let fresh_root = h.pool_dir("p").join("fresh");
    assert_eq!(root_of(&fresh_root), (0o770, 1000, 2000));
    nix::unistd::chown(&fresh_root, Some(0.into()), Some(0.into())).unwrap();
    std::fs::set_permissions(&fresh_root, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(
        h.create_volume(in_class("fresh", size, STRICT)).await,
        fresh
    );
    assert_eq!(root_of(&fresh_root), (0o770, 1000, 2000));

    // Data with owners of its own, then a snapshot of it.
    std::fs::write(t("strict").join("data"), b"kept").unwrap();
    nix::unistd::chown(
        &t("strict").join("data"),
        Some(1234.into()),
        Some(5678.into()),
    )
    .unwrap();
    let snap = h
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: strict.volume_id.clone(),
            name: "snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();

    // A restore and a clone take their own class's root, not the
    // source's; the files inside keep theirs.
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let made = [
        (
            "restored",
            &[("directoryPerms", "0700"), ("uid", "1000"), ("gid", "1000")][..],
            Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            }),
            (0o700, 1000, 1000),
        ),
        (
            "cloned",
            &[][..],
            Type::Volume(VolumeSource {
                volume_id: strict.volume_id.clone(),
            }),
            (0o777, 0, 0),
        ),
    ];
    let mut copies = Vec::new();
    for (name, params, source, want) in made {
        let v = h
            .create_volume(with_source(in_class(name, size, params), source.clone()))
            .await;
        h.publish(&v.volume_id, &t(name), false).await.unwrap();
        assert_eq!(root_of(&t(name)), want, "{name}");
        let data = t(name).join("data");
        assert_eq!(std::fs::read(&data).unwrap(), b"kept");
        let m = std::fs::metadata(&data).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "{name}");
        // Idempotent, and ALREADY_EXISTS with another root.
        let same = h
            .create_volume(with_source(in_class(name, size, params), source.clone()))
            .await;
        assert_eq!(same.volume_id, v.volume_id);
        let e = refused(&h, with_source(in_class(name, size, STRICT), source)).await;
        assert_refused(
            &e,
            Code::AlreadyExists,
            "already exists with its root directory",
        );
        copies.push((v, name));
    }
    assert!(can_write(&t("restored"), 1000, 1000));
    assert!(!can_write(&t("restored"), 3000, 2000));
    assert!(can_write(&t("cloned"), 3000, 3000));

    // Everything goes away again.
    h.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id,
            ..Default::default()
        })
        .await
        .unwrap();
    copies.push((open, "open"));
    copies.push((strict, "strict"));
    for (v, name) in &copies {
        h.unpublish(&v.volume_id, &t(name)).await.unwrap();
    }
    for v in copies.iter().map(|(v, _)| v).chain([&fresh]) {
        h.controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(common::mounts_below(&h.pool_dir("p")).is_empty());
}

#[tokio::test]
async fn dir_volume_roots() {
    scenario("dir").await;
}

#[tokio::test]
async fn btrfs_volume_roots() {
    scenario("btrfs").await;
}

#[tokio::test]
async fn ext4_image_volume_roots() {
    scenario("ext4").await;
}

#[tokio::test]
async fn xfs_image_volume_roots() {
    scenario("xfs").await;
}

/// A raw block volume has no root directory: a class that sets one is
/// refused for it, with the reason, and nothing is made.
#[tokio::test]
async fn block_volumes_refuse_root_parameters() {
    let Some((h, _cleanup, size)) = harness("dir").await else {
        return;
    };
    let mut r = in_class("blk", size, &[("uid", "1000")]);
    r.volume_capabilities[0].access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    let before = listing(&h.pool_dir("p"));
    assert_refused(
        &refused(&h, r).await,
        Code::InvalidArgument,
        "raw block volume",
    );
    assert_eq!(listing(&h.pool_dir("p")), before);
}
