//! Group snapshots on real pools (needs root; btrfs-progs for btrfs,
//! e2fsprogs for image pools): several volumes snapshotted at one point in
//! time, each member restorable like any snapshot, idempotent by name,
//! durable across a restart, and gone with its group. What "one point in
//! time" means is checked with a writer that bumps a counter in the first
//! volume and then in the second: a group snapshot must never hold a
//! second counter ahead of the first. Image pools freeze both filesystems
//! for the copies, so they succeed while the writer runs; btrfs pools
//! cut the snapshots one by one and check that nothing was written in
//! between, so while it runs they either answer ABORTED (written at every
//! attempt) or succeed with counters that agree. Dir pools refuse.

mod common;
mod pools;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Harness, create_request};
use csi_proto as csi;
use hostpath_csi::config::{Filesystem, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

const SIZE: i64 = 16 * MIB;

/// Pools `p` of `kind` and `q` (dir) under a fresh root: btrfs on a
/// loop-mounted filesystem of its own, the others in a plain directory.
async fn harness(kind: &str) -> Option<(Harness, Cleanup)> {
    if !common::root_or_skip("group snapshots of image and btrfs pools need loop mounts") {
        return None;
    }
    let (root, cleanup) = root();
    let p = match kind {
        "dir" => PoolConfig::of_kind("p", root.path().join("pools/p"), PoolKind::Dir),
        "btrfs" => {
            let fs = loop_fs(root.path(), "btrfs", "btrfs", 1 << 30);
            PoolConfig::of_kind("p", fs.join("pool"), PoolKind::Btrfs)
        }
        "ext4" => PoolConfig {
            filesystem: Some(Filesystem::Ext4),
            ..PoolConfig::of_kind("p", root.path().join("pools/p"), PoolKind::Image)
        },
        _ => unreachable!(),
    };
    let q = PoolConfig::of_kind("q", root.path().join("pools/q"), PoolKind::Dir);
    Some((Harness::with_pool_configs(root, vec![p, q]).await, cleanup))
}

async fn group(
    h: &Harness,
    name: &str,
    sources: &[&str],
) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
    h.group_controller()
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: name.into(),
            source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().group_snapshot.unwrap())
}

async fn get_group(
    h: &Harness,
    id: &str,
    members: &[String],
) -> Result<csi::VolumeGroupSnapshot, tonic::Status> {
    h.group_controller()
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: members.to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().group_snapshot.unwrap())
}

async fn delete_group(h: &Harness, id: &str, members: &[String]) -> Result<(), tonic::Status> {
    h.group_controller()
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            snapshot_ids: members.to_vec(),
            ..Default::default()
        })
        .await
        .map(drop)
}

async fn list_snapshots(h: &Harness) -> Vec<csi::Snapshot> {
    h.controller()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .collect()
}

/// Restores snapshot `id` into a new volume `name`, publishes it at
/// `target` and returns the volume id.
async fn restore(h: &Harness, name: &str, id: &str, target: &Path) -> String {
    let mut r = create_request(name, "p", SIZE);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            },
        )),
    });
    let v = h
        .controller()
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    h.publish(&v.volume_id, target, false).await.unwrap();
    v.volume_id
}

/// The counter in `dir` (0 when there is none yet).
fn read_counter(dir: &Path) -> u64 {
    std::fs::read(dir.join("counter"))
        .ok()
        .and_then(|b| Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)))
        .unwrap_or(0)
}

/// Opens the counter file in `dir`: each bump is one 8-byte write at
/// offset 0 (no truncation, so no snapshot can catch it empty).
fn counter_file(dir: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("counter"))
        .unwrap()
}

/// Bumps `counter` in `a`, then in `b`, until stopped: at every moment
/// the counter in `b` is the one in `a` or one less, never more.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(a: PathBuf, b: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let mut n = read_counter(&a);
            let (fa, fb) = (counter_file(&a), counter_file(&b));
            while !s.load(Ordering::Relaxed) {
                n += 1;
                fa.write_all_at(&n.to_le_bytes(), 0).unwrap();
                fb.write_all_at(&n.to_le_bytes(), 0).unwrap();
            }
            n
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the writer; returns the last counter it wrote.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn scenario(kind: &str) {
    let Some((mut h, _cleanup)) = harness(kind).await else {
        return;
    };
    let loops_before = loops_below(h.root.path()).len();
    let targets = h.target("x").parent().unwrap().to_path_buf();
    let t = |n: &str| targets.join(n);
    let a = h.create("a", "p", SIZE).await.volume_id;
    let b = h.create("b", "p", SIZE).await.volume_id;
    h.publish(&a, &t("a"), false).await.unwrap();
    h.publish(&b, &t("b"), false).await.unwrap();
    std::fs::write(t("a").join("data"), b"a at the group snapshot").unwrap();
    std::fs::write(t("b").join("data"), b"b at the group snapshot").unwrap();

    // Taken while a writer runs: image pools freeze both volumes and
    // succeed; btrfs pools succeed if no write landed between the
    // snapshots at one of their attempts, and say so otherwise (ABORTED,
    // the CO retries).
    let writer = Writer::start(t("a"), t("b"));
    std::thread::sleep(std::time::Duration::from_millis(50));
    let taken = group(&h, "g", &[&a, &b]).await;
    let last = writer.stop();
    let g = match (kind, taken) {
        ("btrfs", Err(e)) => {
            eprintln!("btrfs group snapshot while writing: {e:?}");
            assert_eq!(e.code(), Code::Aborted, "{e:?}");
            assert!(e.message().contains("written while"), "{e:?}");
            assert!(
                list_snapshots(&h).await.is_empty(),
                "an aborted group leaves no snapshot"
            );
            group(&h, "g", &[&a, &b]).await.unwrap()
        }
        (_, taken) => taken.unwrap(),
    };
    assert!(last > 0, "the writer never wrote");
    assert_eq!(g.snapshots.len(), 2, "{g:?}");
    assert!(g.ready_to_use && g.creation_time.is_some(), "{g:?}");
    let sources: Vec<&str> = g
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.as_str())
        .collect();
    assert_eq!(sources, [a.as_str(), b.as_str()]);
    for s in &g.snapshots {
        assert_eq!(s.group_snapshot_id, g.group_snapshot_id, "{s:?}");
        assert!(s.ready_to_use && s.size_bytes > 0, "{s:?}");
        assert_eq!(s.creation_time, g.creation_time);
    }
    let members: Vec<String> = g.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();

    // Idempotent by name, the volumes in any order; the name with other
    // volumes is taken.
    assert_eq!(group(&h, "g", &[&b, &a]).await.unwrap(), g);
    let e = group(&h, "g", &[&a]).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // The volumes change afterwards.
    std::fs::write(t("a").join("data"), b"a later").unwrap();
    std::fs::write(t("b").join("data"), b"b later").unwrap();

    // Members are snapshots like any other: listed, and restorable.
    let listed = list_snapshots(&h).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|s| s.group_snapshot_id == g.group_snapshot_id)
    );
    let ra = restore(&h, "ra", &members[0], &t("ra")).await;
    let rb = restore(&h, "rb", &members[1], &t("rb")).await;
    assert_eq!(
        std::fs::read(t("ra").join("data")).unwrap(),
        b"a at the group snapshot"
    );
    assert_eq!(
        std::fs::read(t("rb").join("data")).unwrap(),
        b"b at the group snapshot"
    );
    // One point in time: the second counter is never ahead of the first.
    let (ca, cb) = (read_counter(&t("ra")), read_counter(&t("rb")));
    assert!(
        ca > 0,
        "the group snapshot holds none of the writer's counters"
    );
    assert!(
        cb == ca || cb + 1 == ca,
        "the group snapshot holds counter {ca} in the first volume and {cb} in the second"
    );
    eprintln!("group snapshot on {kind}: counters {ca} and {cb}, writer reached {last}");

    // Durable: the group and its members survive a restart.
    h.restart().await;
    assert_eq!(
        get_group(&h, &g.group_snapshot_id, &members).await.unwrap(),
        g
    );
    assert_eq!(get_group(&h, &g.group_snapshot_id, &[]).await.unwrap(), g);
    // A member list that is not the group's: INVALID_ARGUMENT.
    let e = get_group(&h, &g.group_snapshot_id, &members[..1])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = delete_group(&h, &g.group_snapshot_id, &members[..1])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // A member deleted on its own leaves the group; the group keeps the
    // other, and is still deleted by its whole member list.
    h.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: members[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rest = get_group(&h, &g.group_snapshot_id, &members).await.unwrap();
    let left: Vec<&str> = rest
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.as_str())
        .collect();
    assert_eq!(left, [members[1].as_str()]);
    assert_eq!(list_snapshots(&h).await.len(), 1);

    // Deleted with its members; the restored volumes keep their data.
    delete_group(&h, &g.group_snapshot_id, &members)
        .await
        .unwrap();
    delete_group(&h, &g.group_snapshot_id, &members)
        .await
        .unwrap();
    let e = get_group(&h, &g.group_snapshot_id, &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(list_snapshots(&h).await.is_empty());
    let snapshots_dir = h.pool_dir("p").join(".snapshots");
    assert_eq!(
        listing(&snapshots_dir),
        [".groups"],
        "only the empty group directory stays"
    );
    assert!(listing(&snapshots_dir.join(".groups")).is_empty());
    assert_eq!(
        std::fs::read(t("rb").join("data")).unwrap(),
        b"b at the group snapshot"
    );

    // Refused: volumes of two pools, raw block volumes.
    let d = h.create("d", "q", SIZE).await.volume_id;
    let e = group(&h, "two-pools", &[&a, &d]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut blk = create_request("blk", "p", SIZE);
    blk.volume_capabilities[0].access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    let blk = h
        .controller()
        .create_volume(blk)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let e = group(&h, "with-block", &[&a, &blk]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("raw block"), "{e:?}");
    assert!(list_snapshots(&h).await.is_empty());

    // Everything deleted: the pool is as it was, nothing mounted or
    // attached.
    for (v, n) in [(&a, "a"), (&b, "b"), (&ra, "ra"), (&rb, "rb")] {
        h.unpublish(v, &t(n)).await.unwrap();
    }
    for v in [&a, &b, &ra, &rb, &d, &blk] {
        h.controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let pool = h.pool_dir("p");
    let left: Vec<String> = listing(&pool)
        .into_iter()
        .filter(|n| n != ".snapshots")
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    assert!(common::mounts_below(&pool).is_empty());
    assert_eq!(loops_below(h.root.path()).len(), loops_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_group_snapshots() {
    if common::have("btrfs") {
        scenario("btrfs").await;
    } else {
        common::skip("btrfs-progs is not installed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_group_snapshots() {
    scenario("ext4").await;
}

/// A dir pool cannot freeze a directory: it refuses, and makes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_pools_refuse_group_snapshots() {
    let Some((h, _cleanup)) = harness("dir").await else {
        return;
    };
    let a = h.create("a", "p", SIZE).await.volume_id;
    let b = h.create("b", "p", SIZE).await.volume_id;
    let e = group(&h, "g", &[&a, &b]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("btrfs or image"), "{e:?}");
    assert!(!h.pool_dir("p").join(".snapshots").exists());
}
