//! `btrfs` pools on a real, loop-mounted btrfs (needs root and
//! btrfs-progs): a subvolume per volume with a qgroup limit, writes past it
//! failing with EDQUOT, online expansion, stats from the qgroup, capacity
//! accounting, and recovery from interrupted calls; in both quota modes
//! (simple quotas, which the driver turns on, and full qgroups, which it
//! keeps), also after 1,000 create/delete cycles; and a pool whose qgroup
//! accounting the kernel marks inconsistent.

mod btrfs_support;
mod common;
mod pools;

use std::path::Path;
use std::time::Instant;

use btrfs_support::{BtrfsFs, kernel_has_simple_quotas};
use common::{Harness, create_request};
use csi_proto as csi;
use hostpath_csi::config::{PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

/// How the test's filesystem comes to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quotas {
    /// Quotas off: the driver turns them on, in simple mode on this kernel.
    Fresh,
    /// Full qgroup accounting turned on before the driver sees the pool,
    /// as an administrator would: the driver keeps it (the fallback mode).
    Qgroup,
}

/// A harness with one btrfs pool `bt` on a fresh loop-mounted btrfs of
/// `bytes`, or `None` (test skipped) without btrfs-progs.
/// The cleanup guard comes first so that, bound as `(_cleanup, fs, h)`, the
/// harness (declared later) is dropped first: the server stops before the
/// filesystem under it is unmounted.
async fn btrfs_harness(bytes: u64, quotas: Quotas) -> Option<(Cleanup, BtrfsFs, Harness)> {
    if !have("btrfs") || !have("mkfs.btrfs") {
        common::skip("btrfs-progs is not installed");
        return None;
    }
    let (root, cleanup) = root();
    let fs = BtrfsFs::new(&root.path().join("btrfs"), bytes);
    if quotas == Quotas::Qgroup {
        fs.enable_qgroups();
    }
    let pool = PoolConfig::of_kind("bt", fs.mnt.join("pool"), PoolKind::Btrfs);
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    Some((cleanup, fs, h))
}

/// The mode the driver must end up with on this kernel.
fn expected_mode(quotas: Quotas) -> &'static str {
    match quotas {
        Quotas::Fresh if kernel_has_simple_quotas() => "squota",
        _ => "qgroup",
    }
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

/// NodeGetVolumeStats: (bytes used, total, abnormal condition's message).
async fn condition(h: &Harness, id: &str, path: &Path) -> (i64, i64, Option<String>) {
    let r = h
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = r.volume_condition.unwrap();
    (
        r.usage[0].used,
        r.usage[0].total,
        c.abnormal.then_some(c.message),
    )
}

/// What a user of a btrfs volume relies on: writes past the size fail
/// with EDQUOT, expansion lifts the limit online, stats report the
/// volume's own usage and its size.
async fn limits_hold(h: &Harness, name: &str) {
    let v = h.create(name, "bt", 16 * MIB).await;
    assert_eq!(v.capacity_bytes, 16 * MIB);
    assert_eq!(v.volume_context["sizeEnforced"], "true");
    assert_eq!(v.volume_context["kind"], "btrfs");
    assert!(subvolumes(h).contains(name), "{}", subvolumes(h));

    let target = h.target(&format!("t-{name}"));
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (written, err) = write_file(&target.join("big"), 24 << 20).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EDQUOT as i32),
        "{err}"
    );
    assert!(written <= 16 << 20, "{written}");
    std::fs::remove_file(target.join("big")).unwrap();

    let r = expand(h, &v.volume_id, 40 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, 40 * MIB);
    assert!(!r.node_expansion_required);
    assert_eq!(
        node_expand(h, &v.volume_id, &target, 40 * MIB)
            .await
            .unwrap(),
        40 * MIB
    );
    write_file(&target.join("big"), 24 << 20).unwrap();
    std::fs::create_dir(target.join("d")).unwrap();
    std::fs::write(target.join("d/small"), b"hello").unwrap();

    let (used, avail, total, inodes) = stats(h, &v.volume_id, &target).await;
    assert_eq!(total, 40 * MIB);
    assert!((used - 24 * MIB).abs() < MIB, "used {used}");
    assert_eq!(avail, total - used);
    assert_eq!(inodes, 4, "root, big, d, d/small");
    let (_, _, abnormal) = condition(h, &v.volume_id, &target).await;
    assert_eq!(abnormal, None);
    // Past the new size: EDQUOT again.
    let (_, err) = write_file(&target.join("more"), 24 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EDQUOT as i32));

    // Shrinking is never done: a smaller request answers the current size.
    assert_eq!(
        expand(h, &v.volume_id, 8 * MIB)
            .await
            .unwrap()
            .capacity_bytes,
        40 * MIB
    );

    let e = delete(h, &v.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(h, &v.volume_id).await.unwrap();
    delete(h, &v.volume_id).await.unwrap();
    assert!(!subvolumes(h).contains(name), "{}", subvolumes(h));
}

#[tokio::test]
async fn simple_quotas_limit_writes_expansion_lifts_them_and_stats_follow() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, fs, h)) = btrfs_harness(512 << 20, Quotas::Fresh).await else {
        return;
    };
    assert_eq!(fs.mode(), expected_mode(Quotas::Fresh));
    limits_hold(&h, "pvc-q").await;
    assert!(listing(&h.pool_dir("bt")).is_empty());
}

#[tokio::test]
async fn qgroups_limit_writes_expansion_lifts_them_and_stats_follow() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, fs, h)) = btrfs_harness(512 << 20, Quotas::Qgroup).await else {
        return;
    };
    assert_eq!(
        fs.mode(),
        "qgroup",
        "the driver must keep the mode it found"
    );
    limits_hold(&h, "pvc-q").await;
    assert!(listing(&h.pool_dir("bt")).is_empty());
}

/// Create, write into and delete a volume `cycles` times
/// (`HOSTPATH_CSI_BTRFS_CYCLES`, default 1000), then check what a user
/// relies on still holds: the kernel's accounting is consistent, no qgroup
/// is left behind, the pool promises what it did before, and a new
/// volume's limit, expansion and usage are right.
async fn limits_hold_after_cycles(quotas: Quotas) {
    let cycles: usize = std::env::var("HOSTPATH_CSI_BTRFS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let Some((_cleanup, fs, h)) = btrfs_harness(512 << 20, quotas).await else {
        return;
    };
    assert_eq!(fs.mode(), expected_mode(quotas));
    let dir = h.pool_dir("bt");
    let (a0, _, _) = capacity(&h, "bt").await;
    let started = Instant::now();
    for i in 0..cycles {
        let name = format!("c{i}");
        let v = h.create(&name, "bt", 4 * MIB).await;
        write_file(&dir.join(&name).join("f"), 256 << 10).unwrap();
        delete(&h, &v.volume_id).await.unwrap();
        if (i + 1) % 100 == 0 {
            assert!(!fs.inconsistent(), "inconsistent after {} cycles", i + 1);
            let (a, _, _) = capacity(&h, "bt").await;
            assert!(a > 0, "the pool stopped promising after {} cycles", i + 1);
        }
    }
    eprintln!(
        "{cycles} create/write/delete cycles ({}) in {:?}",
        fs.mode(),
        started.elapsed()
    );
    sh("btrfs", &["subvolume", "sync", fs.mnt.to_str().unwrap()]);
    assert!(!fs.inconsistent());
    assert!(!fs.rescan_running());
    assert_eq!(fs.qgroups(), vec![], "qgroups left behind");
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    let (a1, _, _) = capacity(&h, "bt").await;
    assert!(
        (a0 - a1).abs() < 16 * MIB,
        "promisable {a0} before, {a1} after"
    );
    limits_hold(&h, "after").await;
}

#[tokio::test]
async fn simple_quotas_hold_after_1000_create_delete_cycles() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    limits_hold_after_cycles(Quotas::Fresh).await;
}

#[tokio::test]
async fn qgroups_hold_after_1000_create_delete_cycles() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    limits_hold_after_cycles(Quotas::Qgroup).await;
}

/// The failure the simple quotas avoid: full qgroup accounting that the
/// kernel marks inconsistent (and stops updating), under a pool with a
/// volume. The pool must say so (volumes abnormal with the reason,
/// nothing promised, creates refused with the reason), repair it with a
/// rescan of its own, and come back with limits and usage right.
#[tokio::test]
async fn an_inconsistent_qgroup_pool_promises_nothing_until_its_rescan_repairs_it() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, fs, mut h)) = btrfs_harness(1 << 30, Quotas::Qgroup).await else {
        return;
    };
    let dir = h.pool_dir("bt");
    let v = h.create("pvc-a", "bt", 16 * MIB).await;
    // A rescan of seconds, so the state during it can be looked at.
    fs.ballast(2000, 100);

    h.shutdown().await;
    fs.make_inconsistent();
    // What the kernel does now, with no driver watching: the volume's
    // limit no longer holds.
    write_file(&dir.join("pvc-a/over"), 32 << 20)
        .expect("the kernel enforced the limit; this test no longer shows the failure");

    h.restart().await;
    // The driver found it at start and started a rescan; it is running.
    assert!(fs.rescan_running(), "the driver started no rescan");
    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (_, _, abnormal) = condition(&h, &v.volume_id, &target).await;
    let abnormal = abnormal.expect("the volume's condition is normal during the rescan");
    assert!(
        abnormal.contains("pool bt") && abnormal.contains("inconsistent"),
        "{abnormal}"
    );
    assert!(abnormal.contains("not enforced"), "{abnormal}");
    assert_eq!(
        capacity(&h, "bt").await.0,
        0,
        "capacity promised during the rescan"
    );
    assert_eq!(capacity(&h, "bt").await.1, 0);
    let e = h
        .controller()
        .create_volume(create_request("pvc-b", "bt", 8 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("inconsistent"), "{e:?}");
    assert!(!dir.join("pvc-b").exists());
    let e = expand(&h, &v.volume_id, 32 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    fs.wait_for_rescan();
    assert!(!fs.inconsistent());
    // Usage is counted again: what was written while nothing counted is
    // there, over the size, and no more can be written.
    let (used, total, abnormal) = condition(&h, &v.volume_id, &target).await;
    assert_eq!(abnormal, None);
    assert_eq!(total, 16 * MIB);
    assert!((used - 32 * MIB).abs() < MIB, "used {used}");
    let (_, err) = write_file(&target.join("more"), MIB as u64).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EDQUOT as i32));
    std::fs::remove_file(target.join("over")).unwrap();
    // (Over its limit, the volume may refuse even to create the file.)
    let _ = std::fs::remove_file(target.join("more"));
    let (written, err) = write_file(&target.join("more"), 24 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EDQUOT as i32));
    assert!(written <= 16 << 20, "{written}");
    assert!(capacity(&h, "bt").await.0 > 0);
    h.unpublish(&v.volume_id, &target).await.unwrap();
    limits_hold(&h, "pvc-b").await;
}

#[tokio::test]
async fn btrfs_capacity_falls_with_promises_and_a_full_pool_leaves_no_trace() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, _fs, h)) = btrfs_harness(512 << 20, Quotas::Fresh).await else {
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
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, _fs, mut h)) = btrfs_harness(512 << 20, Quotas::Fresh).await else {
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
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    if !have("btrfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = PoolConfig::of_kind("bt", dir.path().join("p"), PoolKind::Btrfs);
    let e = hostpath_csi::volume::Volumes::open(&[pool], "n1").unwrap_err();
    assert!(e.to_string().contains("not on btrfs"), "{e}");
}

/// Quotas turned off under a running driver drop every volume's limit.
/// The pool says so at once; a restarted driver turns quotas on again
/// (full qgroups, which count the data already there) and sets each
/// volume's limit from its record.
#[tokio::test]
async fn quotas_turned_off_are_reported_and_a_restart_restores_every_limit() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    let Some((_cleanup, fs, mut h)) = btrfs_harness(512 << 20, Quotas::Fresh).await else {
        return;
    };
    let dir = h.pool_dir("bt");
    let v = h.create("pvc-a", "bt", 16 * MIB).await;
    let w = h.create("pvc-b", "bt", 8 * MIB).await;
    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    write_file(&target.join("data"), 8 << 20).unwrap();

    sh("btrfs", &["quota", "disable", fs.mnt.to_str().unwrap()]);
    let (_, _, abnormal) = condition(&h, &v.volume_id, &target).await;
    let abnormal = abnormal.expect("normal condition with quotas off");
    assert!(abnormal.contains("quotas are off"), "{abnormal}");
    assert_eq!(capacity(&h, "bt").await.0, 0);
    let e = h
        .controller()
        .create_volume(create_request("pvc-c", "bt", 8 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("quotas are off"), "{e:?}");
    // Nothing holds the volume to its size now.
    write_file(&target.join("over"), 16 << 20).unwrap();
    std::fs::remove_file(target.join("over")).unwrap();

    h.restart().await;
    assert_eq!(
        fs.mode(),
        "qgroup",
        "simple quotas would not count the data there"
    );
    fs.wait_for_rescan();
    let limits: Vec<(String, String)> = fs.qgroups();
    assert_eq!(limits.len(), 2, "{limits:?}");
    for (name, bytes) in [("pvc-a", 16 * MIB), ("pvc-b", 8 * MIB)] {
        let out = sh(
            "btrfs",
            &[
                "qgroup",
                "show",
                "--raw",
                "-r",
                "-f",
                dir.join(name).to_str().unwrap(),
            ],
        );
        let limit = out
            .lines()
            .find(|l| l.starts_with("0/"))
            .and_then(|l| l.split_whitespace().nth(3))
            .unwrap();
        assert_eq!(limit, bytes.to_string(), "limit of {name}");
    }
    let (used, total, abnormal) = condition(&h, &v.volume_id, &target).await;
    assert_eq!(abnormal, None);
    assert_eq!(total, 16 * MIB);
    assert!((used - 8 * MIB).abs() < MIB, "used {used}");
    let (written, err) = write_file(&target.join("more"), 16 << 20).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::EDQUOT as i32));
    assert!(written <= 8 << 20, "{written}");
    assert!(capacity(&h, "bt").await.0 > 0);
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
    delete(&h, &w.volume_id).await.unwrap();
}
