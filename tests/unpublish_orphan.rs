//! NodeUnpublishVolume for a volume whose pool was removed from the
//! configuration while it was still published: the kubelet retries a
//! failed unpublish forever, so it must succeed when the target holds our
//! bind (told from the mount table), and still refuse a foreign mount.
//! Raw block volumes and image volumes also give back what they hold on
//! the node (loop devices, the image's mount) once no target shows them.
//! Real bind mounts and loop devices; needs root.

mod common;
mod pools;

use std::path::Path;

use common::{
    Harness, assert_refused, create_block, have, loops_below, mounts_at, publish_block, run,
    unmount_below,
};
use hostpath_csi::config::{Filesystem, PoolConfig, PoolKind};
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn unpublish_succeeds_after_the_pool_left_the_config_and_foreign_mounts_stay() {
    if !common::root_or_skip("unpublishing takes off real bind mounts") {
        return;
    }
    let mut h = Harness::start().await;
    let v = h.create("orphan", "ssd", MIB).await;
    let target = h.target("pod-a");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    assert_eq!(mounts_at(&target).len(), 1);

    // A foreign bind whose source is a directory with the volume's name
    // but no record of ours beside it.
    let foreign_src = h.root.path().join("elsewhere/orphan");
    std::fs::create_dir_all(&foreign_src).unwrap();
    let foreign = h.target("pod-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    run(
        "mount",
        &[
            "--bind",
            foreign_src.to_str().unwrap(),
            foreign.to_str().unwrap(),
        ],
    );

    // The pool "ssd" leaves the configuration; the driver restarts.
    h.pools.retain(|p| p.name != "ssd");
    h.restart().await;

    let refused = h.unpublish(&v.volume_id, &foreign).await;
    let code = refused.as_ref().map_err(|s| s.code()).err();
    assert_eq!(mounts_at(&foreign).len(), 1, "foreign mount left alone");
    assert_eq!(code, Some(Code::FailedPrecondition), "{refused:?}");

    h.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(mounts_at(&target).is_empty(), "our bind is gone");
    assert!(!target.exists(), "target directory removed");
    // Again (the kubelet retries): still success.
    h.unpublish(&v.volume_id, &target).await.unwrap();

    unmount_below(h.root.path());
}

/// Publishes raw block volume `id` at `target`.
async fn publish_block_at(h: &Harness, id: &str, target: &Path) {
    h.node()
        .node_publish_volume(publish_block(id, target))
        .await
        .unwrap_or_else(|e| panic!("publish {id} at {}: {e}", target.display()));
}

/// The same for a raw block volume (real loop devices): the bind of its
/// device node is taken off each target, and the device is detached once
/// no target shows it, also when the last unpublish was killed after its
/// unmount (the retry finds the device from its file). A foreign device
/// whose file is named like the volume but has no record beside it is
/// refused and stays attached and bound. The volume's file and record stay.
#[tokio::test]
async fn block_volume_unpublish_after_the_pool_left_detaches_only_its_device() {
    if !common::root_or_skip("block volumes need loop devices and bind mounts") || !have("losetup")
    {
        return;
    }
    let (root, _cleanup) = pools::root();
    let configs = ["hdd", "ssd"].map(|p| PoolConfig::dir(p, root.path().join("pools").join(p)));
    let mut h = Harness::with_pool_configs(root, configs.to_vec()).await;
    let pool = h.pool_dir("ssd");
    let v = h.create_volume(create_block("blk", "ssd", MIB)).await;
    let killed = h
        .create_volume(create_block("blk-killed", "ssd", MIB))
        .await;
    let (a, b, c) = (h.target("pod-a"), h.target("pod-b"), h.target("pod-c"));
    publish_block_at(&h, &v.volume_id, &a).await;
    publish_block_at(&h, &v.volume_id, &b).await;
    publish_block_at(&h, &killed.volume_id, &c).await;
    assert_eq!(loops_below(&pool).len(), 2);

    let elsewhere = h.root.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::File::create(elsewhere.join("blk"))
        .unwrap()
        .set_len(MIB as u64)
        .unwrap();
    let foreign_dev = run(
        "losetup",
        &["--find", "--show", elsewhere.join("blk").to_str().unwrap()],
    );
    let foreign = h.target("pod-foreign");
    std::fs::File::create(&foreign).unwrap();
    run(
        "mount",
        &["--bind", foreign_dev.trim(), foreign.to_str().unwrap()],
    );

    h.pools.retain(|p| p.name != "ssd");
    h.restart().await;

    let refused = h.unpublish(&v.volume_id, &foreign).await.unwrap_err();
    assert_refused(
        &refused,
        Code::FailedPrecondition,
        "not a volume of this driver",
    );
    assert_eq!(mounts_at(&foreign).len(), 1, "foreign bind left alone");
    assert_eq!(
        loops_below(&elsewhere).len(),
        1,
        "foreign device left alone"
    );

    h.unpublish(&v.volume_id, &a).await.unwrap();
    assert!(
        mounts_at(&a).is_empty() && !a.exists(),
        "bind and target file gone"
    );
    let left: Vec<_> = loops_below(&pool).into_iter().map(|(_, f)| f).collect();
    assert!(
        left.contains(&pool.join("blk")),
        "pod-b still shows it: {left:?}"
    );
    h.unpublish(&v.volume_id, &b).await.unwrap();
    assert!(mounts_at(&b).is_empty() && !b.exists());
    let left: Vec<_> = loops_below(&pool).into_iter().map(|(_, f)| f).collect();
    assert_eq!(left, vec![pool.join("blk-killed")], "blk's device detached");
    h.unpublish(&v.volume_id, &b).await.unwrap();

    // An unpublish killed after it unbound and removed the target: the
    // kubelet's retry finds no target, and the device still goes.
    run("umount", &[c.to_str().unwrap()]);
    std::fs::remove_file(&c).unwrap();
    h.unpublish(&killed.volume_id, &c).await.unwrap();
    assert!(loops_below(&pool).is_empty());

    assert!(pool.join("blk").is_file() && pool.join(".blk.meta").is_file());
    assert_eq!(mounts_at(&foreign).len(), 1);
    assert_eq!(loops_below(&elsewhere).len(), 1);
}

/// An image volume (ext4 loop-mounted at `<pool>/<token>`) of a pool that
/// left the configuration: its binds are taken off, and once no target
/// shows it the image is unmounted and its loop device freed, which no
/// configured pool would do before DeleteVolume. The image stays.
#[tokio::test]
async fn image_volume_unpublish_after_the_pool_left_unmounts_the_image() {
    if !common::root_or_skip("image volumes need loop mounts")
        || !have("losetup")
        || !have("mkfs.ext4")
    {
        return;
    }
    let (root, _cleanup) = pools::root();
    let configs = vec![
        PoolConfig::dir("hdd", root.path().join("pools/hdd")),
        PoolConfig {
            filesystem: Some(Filesystem::Ext4),
            ..PoolConfig::of_kind("img", root.path().join("pools/img"), PoolKind::Image)
        },
    ];
    let mut h = Harness::with_pool_configs(root, configs).await;
    let pool = h.pool_dir("img");
    let v = h.create("pic", "img", 16 * MIB).await;
    let (a, b) = (h.target("pod-a"), h.target("pod-b"));
    h.publish(&v.volume_id, &a, false).await.unwrap();
    h.publish(&v.volume_id, &b, false).await.unwrap();
    std::fs::write(a.join("data"), b"kept").unwrap();

    h.pools.retain(|p| p.name != "img");
    h.restart().await;

    h.unpublish(&v.volume_id, &a).await.unwrap();
    assert!(mounts_at(&a).is_empty() && !a.exists());
    assert_eq!(
        mounts_at(&pool.join("pic")).len(),
        1,
        "pod-b still shows it"
    );
    assert_eq!(std::fs::read(b.join("data")).unwrap(), b"kept");
    h.unpublish(&v.volume_id, &b).await.unwrap();
    assert!(mounts_at(&b).is_empty() && !b.exists());
    assert!(mounts_at(&pool.join("pic")).is_empty(), "image unmounted");
    assert!(loops_below(&pool).is_empty(), "its loop device freed");
    assert!(pool.join(".pic.img").is_file() && pool.join(".pic.meta").is_file());
    h.unpublish(&v.volume_id, &b).await.unwrap();
}
