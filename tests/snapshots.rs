//! Snapshots, volumes restored from them, and clones, on every pool kind,
//! with real filesystems (needs root; btrfs-progs for btrfs, e2fsprogs and
//! xfsprogs for image pools): the data a user wrote is what a restore or a
//! clone holds, snapshots are independent of their volume and survive a
//! restart, sizes are enforced, and deleting everything leaves the pool as
//! it was, with no mount or loop device behind.

mod common;
mod pools;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Harness, create_request};
use csi_proto as csi;
use hostpath_csi::config::{Filesystem, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

/// A pool of `kind` named `p` under a fresh root: btrfs on a loop-mounted
/// filesystem of its own, the others in a plain directory.
async fn harness(kind: &str) -> Option<(Harness, Cleanup, i64)> {
    if !common::root_or_skip("snapshots of image and btrfs pools need loop mounts") {
        return None;
    }
    let (root, cleanup) = root();
    let (config, size) = match kind {
        "dir" => (
            PoolConfig::of_kind("p", root.path().join("pools/p"), PoolKind::Dir),
            16 * MIB,
        ),
        "btrfs" => {
            let fs = loop_fs(root.path(), "btrfs", "btrfs", 1 << 30);
            (
                PoolConfig::of_kind("p", fs.join("pool"), PoolKind::Btrfs),
                16 * MIB,
            )
        }
        "ext4" | "xfs" => {
            let fs = if kind == "xfs" {
                Filesystem::Xfs
            } else {
                Filesystem::Ext4
            };
            let size = if kind == "xfs" { 300 * MIB } else { 16 * MIB };
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

fn snapshot_request(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn snapshot(h: &Harness, name: &str, source: &str) -> Result<csi::Snapshot, tonic::Status> {
    h.controller()
        .create_snapshot(snapshot_request(name, source))
        .await
        .map(|r| r.into_inner().snapshot.unwrap())
}

fn from_snapshot(name: &str, bytes: i64, limit: i64, id: &str) -> csi::CreateVolumeRequest {
    let mut r = create_request(name, "p", bytes);
    r.capacity_range.as_mut().unwrap().limit_bytes = limit;
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    });
    r
}

fn clone_of(name: &str, bytes: i64, limit: i64, id: &str) -> csi::CreateVolumeRequest {
    let mut r = create_request(name, "p", bytes);
    r.capacity_range.as_mut().unwrap().limit_bytes = limit;
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: id.into(),
            },
        )),
    });
    r
}

async fn create(h: &Harness, r: csi::CreateVolumeRequest) -> Result<csi::Volume, tonic::Status> {
    h.controller()
        .create_volume(r)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

async fn list(h: &Harness, source: &str) -> Vec<csi::Snapshot> {
    h.controller()
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: source.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .collect()
}

/// What the user writes: a file of a known pattern and a private one in a
/// subdirectory.
fn write_data(dir: &Path, seed: u8) {
    let bytes: Vec<u8> = (0..(1 << 20))
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(dir.join("data"), &bytes).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/secret"), [seed; 100]).unwrap();
    std::fs::set_permissions(
        dir.join("sub/secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    nix::unistd::chown(
        &dir.join("sub/secret"),
        Some(1234.into()),
        Some(5678.into()),
    )
    .unwrap();
}

fn check_data(dir: &Path, seed: u8) {
    let bytes = std::fs::read(dir.join("data")).unwrap();
    assert_eq!(bytes.len(), 1 << 20);
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u8).wrapping_mul(31).wrapping_add(seed)),
        "data in {} is not what was written with seed {seed}",
        dir.display()
    );
    assert_eq!(std::fs::read(dir.join("sub/secret")).unwrap(), [seed; 100]);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir.join("sub/secret")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o600, 1234, 5678));
}

async fn scenario(kind: &str) {
    let Some((mut h, _cleanup, size)) = harness(kind).await else {
        return;
    };
    let loops_before = loops_below(h.root.path()).len();
    let pool = h.pool_dir("p");
    let targets = h.target("x").parent().unwrap().to_path_buf();
    let t = |n: &str| targets.join(n);

    let src = h.create("src", "p", size).await;
    h.publish(&src.volume_id, &t("src"), false).await.unwrap();
    write_data(&t("src"), 1);

    // A snapshot, idempotent by name; the name with another source is taken.
    let snap = snapshot(&h, "snap1", &src.volume_id).await.unwrap();
    assert!(snap.ready_to_use && snap.size_bytes > 0, "{snap:?}");
    assert_eq!(snap.source_volume_id, src.volume_id);
    assert!(snap.creation_time.is_some());
    let again = snapshot(&h, "snap1", &src.volume_id).await.unwrap();
    assert_eq!(again, snap);
    let other = h.create("other", "p", size).await;
    let e = snapshot(&h, "snap1", &other.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    if kind == "ext4" || kind == "xfs" {
        assert_eq!(
            snap.size_bytes, size,
            "an image snapshot's size is its filesystem's"
        );
    }

    // The volume changes after the snapshot.
    write_data(&t("src"), 2);

    // Restored: the data at the time of the snapshot, in a volume of its own.
    let restored = create(&h, from_snapshot("restored", size, 0, &snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, size);
    assert!(matches!(
        restored.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
        Some(csi::volume_content_source::Type::Snapshot(s)) if s.snapshot_id == snap.snapshot_id
    ));
    h.publish(&restored.volume_id, &t("restored"), false)
        .await
        .unwrap();
    check_data(&t("restored"), 1);
    // Idempotent, and another source for the name is ALREADY_EXISTS.
    let same = create(&h, from_snapshot("restored", size, 0, &snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(same.volume_id, restored.volume_id);
    let e = create(&h, clone_of("restored", size, 0, &src.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // A clone: the volume as it is now.
    let clone = create(&h, clone_of("clone", size, 0, &src.volume_id))
        .await
        .unwrap();
    h.publish(&clone.volume_id, &t("clone"), false)
        .await
        .unwrap();
    check_data(&t("clone"), 2);
    // Writes to the clone do not reach its source, nor the reverse.
    std::fs::write(t("clone").join("only-in-clone"), b"x").unwrap();
    std::fs::write(t("src").join("only-in-src"), b"x").unwrap();
    assert!(!t("src").join("only-in-clone").exists());
    assert!(!t("clone").join("only-in-src").exists());

    // Smaller than the source: OUT_OF_RANGE; larger: fine, and enforced.
    let e = create(&h, clone_of("small-clone", 0, size / 2, &src.volume_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = create(
        &h,
        from_snapshot("small", 0, snap.size_bytes / 2, &snap.snapshot_id),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let bigger = create(&h, from_snapshot("bigger", 2 * size, 0, &snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(bigger.capacity_bytes, 2 * size);
    h.publish(&bigger.volume_id, &t("bigger"), false)
        .await
        .unwrap();
    check_data(&t("bigger"), 1);
    if kind != "dir" {
        // More than the old size fits now; more than the new one does not.
        write_file(
            &t("bigger").join("more"),
            (size + size / 4) as u64 - (2 << 20),
        )
        .unwrap();
        assert!(write_file(&t("bigger").join("too-much"), 2 * size as u64).is_err());
    }

    // Snapshots survive a restart and are listed by volume and by id.
    h.restart().await;
    assert_eq!(list(&h, &src.volume_id).await, vec![snap.clone()]);
    assert!(list(&h, &other.volume_id).await.is_empty());
    let got = h
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got, snap);

    // The source volume goes; its snapshot stays restorable.
    h.unpublish(&src.volume_id, &t("src")).await.unwrap();
    delete(&h, &src.volume_id).await.unwrap();
    let after = create(&h, from_snapshot("after", size, 0, &snap.snapshot_id))
        .await
        .unwrap();
    h.publish(&after.volume_id, &t("after"), false)
        .await
        .unwrap();
    check_data(&t("after"), 1);

    // Everything deleted: the pool is as it was, nothing mounted or attached.
    h.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(list(&h, "").await.is_empty());
    let e = create(&h, from_snapshot("gone", size, 0, &snap.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    for (v, target) in [
        (&restored, "restored"),
        (&clone, "clone"),
        (&bigger, "bigger"),
        (&after, "after"),
    ] {
        h.unpublish(&v.volume_id, &t(target)).await.unwrap();
        delete(&h, &v.volume_id).await.unwrap();
    }
    delete(&h, &other.volume_id).await.unwrap();
    let left: Vec<String> = listing(&pool)
        .into_iter()
        .filter(|n| n != ".snapshots")
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    assert!(listing(&pool.join(".snapshots")).is_empty());
    assert!(common::mounts_below(&pool).is_empty());
    assert_eq!(loops_below(h.root.path()).len(), loops_before);
}

#[tokio::test]
async fn dir_snapshots_restores_and_clones() {
    scenario("dir").await;
}

#[tokio::test]
async fn btrfs_snapshots_restores_and_clones() {
    if common::have("btrfs") {
        scenario("btrfs").await;
    } else {
        common::skip("btrfs-progs is not installed");
    }
}

#[tokio::test]
async fn ext4_image_snapshots_restores_and_clones() {
    scenario("ext4").await;
}

#[tokio::test]
async fn xfs_image_snapshots_restores_and_clones() {
    if common::have("mkfs.xfs") {
        scenario("xfs").await;
    } else {
        common::skip("xfsprogs is not installed");
    }
}
