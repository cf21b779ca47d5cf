//! `btrfs` pools on a real, loop-mounted btrfs (needs root and
//! btrfs-progs): a subvolume per volume with a qgroup limit, writes past it
//! failing with EDQUOT, online expansion, stats from the qgroup, capacity
//! accounting, and recovery from interrupted calls.

mod common;
mod pools;

use common::{Harness, create_request};
use hostpath_csi::config::{PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

/// A harness with one btrfs pool `bt` on a fresh loop-mounted btrfs of
/// `bytes`, or `None` (test skipped) without btrfs-progs.
/// The cleanup guard comes first so that, bound as `(_cleanup, h)`, the
/// harness (declared later) is dropped first: the server stops before the
/// filesystem under it is unmounted.
async fn btrfs_harness(bytes: u64) -> Option<(Cleanup, Harness)> {
    if !have("btrfs") || !have("mkfs.btrfs") {
        eprintln!("skipped: btrfs-progs is not installed");
        return None;
    }
    let (root, cleanup) = root();
    let fs = loop_fs(root.path(), "btrfs", "btrfs", bytes);
    let pool = PoolConfig::of_kind("bt", fs.join("pool"), PoolKind::Btrfs);
    Some((cleanup, Harness::with_pool_configs(root, vec![pool]).await))
}

fn subvolumes(h: &Harness) -> String {
    sh(
        "btrfs",
        &[
            "subvolume",
            "list",
            "-o",
            h.pool_dir("bt").to_str().unwrap(),
        ],
    )
}

#[tokio::test]
async fn btrfs_quota_limits_writes_expansion_lifts_it_and_stats_follow() {
    let Some((_cleanup, h)) = btrfs_harness(512 << 20).await else {
        return;
    };
    let v = h.create("pvc-q", "bt", 16 * MIB).await;
    assert_eq!(v.capacity_bytes, 16 * MIB);
    assert_eq!(v.volume_context["sizeEnforced"], "true");
    assert_eq!(v.volume_context["kind"], "btrfs");
    assert!(subvolumes(&h).contains("pvc-q"), "{}", subvolumes(&h));

    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (written, err) = write_file(&target.join("big"), 24 << 20).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EDQUOT as i32),
        "{err}"
    );
    assert!(written <= 16 << 20, "{written}");
    std::fs::remove_file(target.join("big")).unwrap();

    let r = expand(&h, &v.volume_id, 40 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, 40 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(
        node_expand(&h, &v.volume_id, &target, 40 * MIB)
            .await
            .unwrap(),
        40 * MIB
    );
    write_file(&target.join("big"), 24 << 20).unwrap();
    std::fs::create_dir(target.join("d")).unwrap();
    std::fs::write(target.join("d/small"), b"hello").unwrap();

    let (used, avail, total, inodes) = stats(&h, &v.volume_id, &target).await;
    assert_eq!(total, 40 * MIB);
    assert!((used - 24 * MIB).abs() < MIB, "used {used}");
    assert_eq!(avail, total - used);
    assert_eq!(inodes, 4, "root, big, d, d/small");

    // Shrinking is never done: a smaller request answers the current size.
    assert_eq!(
        expand(&h, &v.volume_id, 8 * MIB)
            .await
            .unwrap()
            .capacity_bytes,
        40 * MIB
    );

    let e = delete(&h, &v.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
    assert!(!subvolumes(&h).contains("pvc-q"), "{}", subvolumes(&h));
    assert!(listing(&h.pool_dir("bt")).is_empty());
}

#[tokio::test]
async fn btrfs_capacity_falls_with_promises_and_a_full_pool_leaves_no_trace() {
    let Some((_cleanup, h)) = btrfs_harness(512 << 20).await else {
        return;
    };
    let dir = h.pool_dir("bt");
    let (a0, max0, min0) = capacity(&h, "bt").await;
    assert!(a0 > 300 * MIB && a0 <= 512 * MIB, "{a0}");
    assert_eq!(max0, a0);
    assert_eq!(min0, MIB);

    let v1 = h.create("v1", "bt", 100 * MIB).await;
    let (a1, _, _) = capacity(&h, "bt").await;
    assert!((a0 - a1 - 100 * MIB).abs() < 2 * MIB, "{a0} -> {a1}");

    // Writing into a volume spends its promise, it does not shrink what
    // is left to promise.
    let t = h.target("t");
    h.publish(&v1.volume_id, &t, false).await.unwrap();
    write_file(&t.join("f"), 50 << 20).unwrap();
    stats(&h, &v1.volume_id, &t).await;
    let (a1w, _, _) = capacity(&h, "bt").await;
    assert!((a1w - a1).abs() < 8 * MIB, "{a1} -> {a1w} after writing");

    let files = listing(&dir);
    let subs = subvolumes(&h);
    let e = h
        .controller()
        .create_volume(create_request("huge", "bt", a1w + 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(listing(&dir), files);
    assert_eq!(subvolumes(&h), subs);

    h.unpublish(&v1.volume_id, &t).await.unwrap();
    delete(&h, &v1.volume_id).await.unwrap();
    let (a2, _, _) = capacity(&h, "bt").await;
    assert!(a2 > a1w + 90 * MIB, "{a1w} -> {a2} after delete");
}

#[tokio::test]
async fn interrupted_btrfs_calls_are_finished_by_their_retry() {
    let Some((_cleanup, mut h)) = btrfs_harness(512 << 20).await else {
        return;
    };
    let dir = h.pool_dir("bt");
    // A create killed between `subvolume create` and `qgroup limit`.
    sh(
        "btrfs",
        &["subvolume", "create", dir.join("half").to_str().unwrap()],
    );
    let v = h.create("half", "bt", 8 * MIB).await;
    let t = h.target("t");
    h.publish(&v.volume_id, &t, false).await.unwrap();
    let (_, err) = write_file(&t.join("f"), 16 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EDQUOT as i32));
    h.unpublish(&v.volume_id, &t).await.unwrap();

    // A delete killed after the subvolume went but before the record did:
    // the retry finishes it, and the restarted driver agrees.
    sh(
        "btrfs",
        &["subvolume", "delete", dir.join("half").to_str().unwrap()],
    );
    h.restart().await;
    delete(&h, &v.volume_id).await.unwrap();
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));

    // A subvolume with someone's data is never taken over.
    sh(
        "btrfs",
        &["subvolume", "create", dir.join("theirs").to_str().unwrap()],
    );
    std::fs::write(dir.join("theirs/data"), b"x").unwrap();
    let e = h
        .controller()
        .create_volume(create_request("theirs", "bt", 8 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(dir.join("theirs/data").exists());
}

#[tokio::test]
async fn a_btrfs_pool_off_btrfs_is_refused_with_a_reason() {
    if !have("btrfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig::of_kind("bt", dir.path().join("p"), PoolKind::Btrfs);
    let e = hostpath_csi::volume::Volumes::open(&[pool], "n1").unwrap_err();
    assert!(e.to_string().contains("not on btrfs"), "{e}");
}
