//! Expansion in distributed mode (`--expansion=node`): only the node that
//! holds a volume can grow it, while csi-resizer (leader-elected, on any
//! node) cannot reach that node's driver. The driver then advertises node
//! expansion only, so csi-resizer just records the new size in the PV (its
//! "trivial resizer"), and NodeExpandVolume on the volume's node does all
//! of the growth: the capacity promise, the image or the btrfs limit, the
//! record, the filesystem.
//!
//! Needs root, losetup and e2fsprogs/xfsprogs (image pools) and
//! btrfs-progs (btrfs pools); skipped with a note without them, failed
//! under `HOSTPATH_CSI_REQUIRE_TOOLS=1`.

mod common;
mod pools;

use common::Harness;
use csi_proto as csi;
use csi_proto::controller_service_capability::rpc::Type as CtrlCap;
use csi_proto::node_service_capability::rpc::Type as NodeCap;
use hostpath_csi::config::{ByteSize, Expansion, Filesystem, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

fn can_run(tools: &[&str]) -> bool {
    if !common::root_or_skip("loop devices and mounts") {
        return false;
    }
    let missing: Vec<_> = tools.iter().filter(|t| !common::have(t)).collect();
    if !missing.is_empty() {
        common::skip(&format!("{missing:?} not installed"));
        return false;
    }
    true
}

async fn node_harness(pools: Vec<PoolConfig>, root: tempfile::TempDir) -> Harness {
    Harness::with_config(root, pools, |c| c.expansion = Expansion::Node).await
}

#[tokio::test]
async fn node_mode_advertises_node_expansion_only_even_with_dir_pools() {
    // csi-resizer exits when a driver offers neither controller nor node
    // expansion; a node plugin whose pools are all dirs must still let it
    // start (its StorageClasses say allowVolumeExpansion: false).
    let root = tempfile::tempdir().unwrap();
    let pools = vec![PoolConfig::dir("hdd", root.path().join("hdd"))];
    let h = node_harness(pools, root).await;
    assert!(!h.controller_caps().await.contains(&CtrlCap::ExpandVolume));
    assert!(h.node_caps().await.contains(&NodeCap::ExpandVolume));

    let v = h.create("pvc-dir", "hdd", MIB).await;
    // ControllerExpandVolume is not offered in this mode: a CO that calls it
    // anyway learns where expansion happens.
    let e = expand(&h, &v.volume_id, 2 * MIB).await.unwrap_err();
    common::assert_refused(&e, Code::Unimplemented, "--expansion=node");
    // A dir volume cannot grow on the node either.
    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let e = node_expand(&h, &v.volume_id, &target, 2 * MIB)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    h.unpublish(&v.volume_id, &target).await.unwrap();
}

/// The kubelet's NodeExpandVolume after csi-resizer's trivial resize: the
/// volume grows on its node, promises follow, the pod's writes fit.
async fn grows_on_the_node(pool: PoolConfig, root: tempfile::TempDir, size: i64, grown: i64) {
    let name = pool.name.clone();
    let h = node_harness(vec![pool], root).await;
    assert!(!h.controller_caps().await.contains(&CtrlCap::ExpandVolume));
    assert!(h.node_caps().await.contains(&NodeCap::ExpandVolume));

    let v = h.create("pvc-grow", &name, size).await;
    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (_, avail_before, total_before, _) = stats(&h, &v.volume_id, &target).await;
    let (cap_before, _, _) = capacity(&h, &name).await;
    // More than the volume holds fails part-way.
    let (written, _) = write_file(&target.join("big"), (size + size / 2) as u64).unwrap_err();
    assert!(written < size as u64);
    std::fs::remove_file(target.join("big")).unwrap();

    let e = expand(&h, &v.volume_id, grown).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    // Not where the volume is published: NOT_FOUND, nothing grows.
    let elsewhere = h.target("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let e = node_expand(&h, &v.volume_id, &elsewhere, grown)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(capacity(&h, &name).await.0, cap_before);

    let c = node_expand(&h, &v.volume_id, &target, grown).await.unwrap();
    assert_eq!(c, grown);
    let (_, avail_after, total_after, _) = stats(&h, &v.volume_id, &target).await;
    assert!(
        total_after > total_before,
        "{total_before} -> {total_after}"
    );
    assert!(avail_after > avail_before + (grown - size) / 2);
    // The promise grew with the volume.
    let (cap_after, _, _) = capacity(&h, &name).await;
    assert!(
        cap_after <= cap_before - (grown - size),
        "{cap_before} -> {cap_after}"
    );
    // The pod can now write more than the old filesystem could hold.
    write_file(
        &target.join("big"),
        (total_before + (grown - size) / 2) as u64,
    )
    .unwrap();

    // The kubelet retries: the same size again is a no-op with the size.
    assert_eq!(
        node_expand(&h, &v.volume_id, &target, grown).await.unwrap(),
        grown
    );
    // No capacity range: nothing to grow, the current size.
    assert_eq!(
        node_expand(&h, &v.volume_id, &target, 0).await.unwrap(),
        grown
    );
    // Volumes never shrink: a smaller size is answered with the current one.
    assert_eq!(
        node_expand(&h, &v.volume_id, &target, size).await.unwrap(),
        grown
    );
    // The record survives a restart with the new size.
    let listed = h
        .controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        grown
    );

    // More than the pool can promise: RESOURCE_EXHAUSTED or OUT_OF_RANGE,
    // and the volume keeps its size.
    let e = node_expand(&h, &v.volume_id, &target, 1 << 50)
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    assert_eq!(stats(&h, &v.volume_id, &target).await.2, total_after);

    std::fs::remove_file(target.join("big")).unwrap();
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
}

/// An xfs image pool on an ext4 filesystem of its own, so what it can
/// promise does not move with whatever else writes to the test machine's
/// disk.
fn image_pool(root: &std::path::Path) -> PoolConfig {
    let disk = loop_fs(root, "disk", "ext4", 2 << 30);
    PoolConfig {
        filesystem: Some(Filesystem::Xfs),
        ..PoolConfig::of_kind("img", disk.join("img"), PoolKind::Image)
    }
}

#[tokio::test]
async fn image_volumes_grow_on_their_node() {
    if !can_run(&["losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs"]) {
        return;
    }
    // xfs: it grows mounted without CAP_SYS_RESOURCE, which this test
    // machine's root lacks (ext4 needs it; the pools_image tests say so).
    let (root, _cleanup) = root();
    let pool = image_pool(root.path());
    grows_on_the_node(pool, root, 300 * MIB, 400 * MIB).await;
}

#[tokio::test]
async fn btrfs_volumes_grow_on_their_node() {
    if !can_run(&["mkfs.btrfs", "btrfs"]) {
        return;
    }
    let (root, _cleanup) = root();
    let mnt = loop_fs(root.path(), "btrfs", "btrfs", 1 << 30);
    let pool = PoolConfig {
        max_volume_size: Some(ByteSize(512 << 20)),
        ..PoolConfig::of_kind("fast", mnt.join("vols"), PoolKind::Btrfs)
    };
    grows_on_the_node(pool, root, 16 * MIB, 48 * MIB).await;
}

#[tokio::test]
async fn an_expansion_killed_half_way_is_finished_by_the_retry() {
    if !can_run(&["losetup", "mkfs.ext4", "mkfs.xfs", "xfs_growfs"]) {
        return;
    }
    // The image file grown but the record not yet written (the driver was
    // killed in between): the kubelet's retry must finish it, and the pool
    // must promise the new size exactly once.
    let (root, _cleanup) = root();
    let pool = image_pool(root.path());
    let mut h = node_harness(vec![pool], root).await;
    let v = h.create("pvc-crash", "img", 300 * MIB).await;
    let target = h.target("t");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (cap0, _, _) = capacity(&h, "img").await;
    let image = h.pool_dir("img").join(".pvc-crash.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(400 * MIB as u64)
        .unwrap();
    h.restart().await;
    assert_eq!(
        node_expand(&h, &v.volume_id, &target, 400 * MIB)
            .await
            .unwrap(),
        400 * MIB
    );
    assert!(stats(&h, &v.volume_id, &target).await.2 > 300 * MIB);
    let (cap1, _, _) = capacity(&h, "img").await;
    assert!(
        cap1 <= cap0 - 100 * MIB && cap1 > cap0 - 200 * MIB,
        "promised once: {cap0} -> {cap1}"
    );
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
}
