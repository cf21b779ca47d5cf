//! Raw block volumes (`volumeMode: Block`) on real loop devices (needs root
//! and losetup; mkfs.btrfs for the btrfs pool): a sparse file per volume,
//! its loop device's node bound onto the target file. What a pod would
//! notice: the target is a block device of the volume's size holding what
//! was written, through any number of targets, after a driver restart and
//! after a reboot (devices and binds gone); writes past the end fail;
//! expansion grows the device; nothing is left attached once the volume is
//! unpublished or deleted, also when a device was left by a killed call.

mod common;
mod pools;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Harness, assert_refused, block_cap, create_block, publish_block};
use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use hostpath_csi::config::{PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

async fn publish(h: &Harness, id: &str, target: &Path) -> Result<(), tonic::Status> {
    h.node()
        .node_publish_volume(publish_block(id, target))
        .await
        .map(|_| ())
}

/// Writes `data` at `offset` of the device at `target`, flushed.
fn write_at(target: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(target)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()
}

fn read_at(target: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(target).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn device_size(target: &Path) -> u64 {
    std::fs::File::open(target)
        .unwrap()
        .seek(SeekFrom::End(0))
        .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn tools() -> bool {
    if !common::root_or_skip("loop devices and mounts") {
        return false;
    }
    if !have("losetup") {
        common::skip("losetup (util-linux) is not installed");
        return false;
    }
    true
}

/// Pools of every kind under `root` (btrfs on its own small filesystem).
fn all_kinds(root: &Path) -> Vec<PoolConfig> {
    let mut pools = vec![
        PoolConfig::of_kind("d", root.join("pools/d"), PoolKind::Dir),
        PoolConfig::of_kind("i", root.join("pools/i"), PoolKind::Image),
    ];
    if have("mkfs.btrfs") {
        let fs = loop_fs(root, "btrfs", "btrfs", 512 << 20);
        pools.push(PoolConfig::of_kind("b", fs.join("pool"), PoolKind::Btrfs));
    } else {
        eprintln!("btrfs pool left out: mkfs.btrfs is not installed");
    }
    pools
}

/// On every pool kind: the volume is a block device of its size at each
/// target, holds what was written, refuses writes past its end, reports
/// its size; one loop device serves all targets and goes with the last
/// unpublish; DeleteVolume refuses while published and removes the file.
#[tokio::test]
async fn block_volume_life_on_every_kind() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pools = all_kinds(root.path());
    let names: Vec<String> = pools.iter().map(|p| p.name.clone()).collect();
    let h = Harness::with_pool_configs(root, pools).await;
    for pool in &names {
        let size = 16 * MIB;
        let v = h
            .create_volume(create_block(&format!("blk-{pool}"), pool, size))
            .await;
        assert_eq!(v.capacity_bytes, size);
        assert_eq!(v.volume_context["sizeEnforced"], "true", "pool {pool}");
        let file = h.pool_dir(pool).join(format!("blk-{pool}"));
        assert!(file.is_file(), "{}", file.display());
        assert_eq!(std::fs::metadata(&file).unwrap().len(), size as u64);
        // Made, not yet published: no device.
        assert!(loops_below(&file).is_empty());

        let (t1, t2) = (
            h.target(&format!("{pool}-1")),
            h.target(&format!("{pool}-2")),
        );
        publish(&h, &v.volume_id, &t1).await.unwrap();
        publish(&h, &v.volume_id, &t1).await.unwrap(); // idempotent
        publish(&h, &v.volume_id, &t2).await.unwrap();
        assert!(
            std::fs::metadata(&t1)
                .unwrap()
                .file_type()
                .is_block_device()
        );
        assert_eq!(device_size(&t1), size as u64);
        assert_eq!(loops_below(&file).len(), 1, "one device for both targets");

        let data = pattern(7, 64 << 10);
        write_at(&t1, 5 << 20, &data).unwrap();
        assert_eq!(read_at(&t2, 5 << 20, data.len()), data);
        // Past the end: nothing can be written.
        let err = write_at(&t1, size as u64, b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28), "ENOSPC past the end: {err}");

        let r = h
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: t1.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.usage.len(), 1, "bytes only, no inodes: {r:?}");
        assert_eq!(r.usage[0].total, size);
        assert!(r.usage[0].used >= data.len() as i64, "{r:?}");

        let e = delete(&h, &v.volume_id).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

        h.unpublish(&v.volume_id, &t1).await.unwrap();
        assert!(!t1.exists(), "the target file is removed");
        assert_eq!(loops_below(&file).len(), 1, "still published at t2");
        h.unpublish(&v.volume_id, &t2).await.unwrap();
        h.unpublish(&v.volume_id, &t2).await.unwrap(); // idempotent
        assert!(
            loops_below(&file).is_empty(),
            "device released with the last target"
        );

        // Published again: the same data.
        publish(&h, &v.volume_id, &t1).await.unwrap();
        assert_eq!(read_at(&t1, 5 << 20, data.len()), data);
        h.unpublish(&v.volume_id, &t1).await.unwrap();

        delete(&h, &v.volume_id).await.unwrap();
        assert!(!file.exists());
        assert!(loops_below(h.root.path()).iter().all(|(_, f)| f != &file));
    }
}

/// Expansion grows the file (controller) and the device (node), online,
/// keeping the data.
#[tokio::test]
async fn block_volume_expands_online() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pool = PoolConfig::of_kind("i", root.path().join("pools/i"), PoolKind::Image);
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    let v = h.create_volume(create_block("grow", "i", 16 * MIB)).await;
    let t = h.target("t");
    publish(&h, &v.volume_id, &t).await.unwrap();
    let data = pattern(3, 4096);
    write_at(&t, 0, &data).unwrap();

    let r = expand(&h, &v.volume_id, 40 * MIB).await.unwrap();
    assert_eq!(r.capacity_bytes, 40 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        node_expand(&h, &v.volume_id, &t, 40 * MIB).await.unwrap(),
        40 * MIB
    );
    assert_eq!(device_size(&t), (40 * MIB) as u64);
    write_at(&t, (39 * MIB) as u64, &data).unwrap();
    assert_eq!(read_at(&t, 0, data.len()), data);
    h.unpublish(&v.volume_id, &t).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
}

/// A driver restart keeps the device (no second one); a reboot (every
/// device detached, every bind gone) loses nothing: the next publish
/// attaches again and the data is there. A device a killed call left
/// attached with nothing showing it is released by the sweep at startup.
#[tokio::test]
async fn block_volume_survives_restart_and_reboot_and_leaks_nothing() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pool = PoolConfig::of_kind("d", root.path().join("pools/d"), PoolKind::Dir);
    let mut h = Harness::with_pool_configs(root, vec![pool]).await;
    let v = h.create_volume(create_block("keep", "d", 8 * MIB)).await;
    let file = h.pool_dir("d").join("keep");
    let t = h.target("t");
    publish(&h, &v.volume_id, &t).await.unwrap();
    let data = pattern(9, 8192);
    write_at(&t, 4096, &data).unwrap();

    // Driver restart: the device stays, nothing doubles.
    h.restart().await;
    publish(&h, &v.volume_id, &t).await.unwrap();
    assert_eq!(loops_below(&file).len(), 1);
    assert_eq!(read_at(&t, 4096, data.len()), data);

    // Reboot: binds and devices are gone; the kubelet publishes again.
    h.shutdown().await;
    sh("umount", &[t.as_os_str()]);
    std::fs::remove_file(&t).unwrap();
    for (dev, _) in loops_below(&file) {
        sh("losetup", &["-d".as_ref(), dev.as_os_str()]);
    }
    h.restart().await;
    publish(&h, &v.volume_id, &t).await.unwrap();
    assert_eq!(read_at(&t, 4096, data.len()), data);
    h.unpublish(&v.volume_id, &t).await.unwrap();
    assert!(loops_below(&file).is_empty());

    // A publish killed after attaching, before binding: the device is
    // attached with no target. The restarted driver's sweep releases it.
    sh("losetup", &["--find".as_ref(), file.as_os_str()]);
    assert_eq!(loops_below(&file).len(), 1);
    h.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !loops_below(&file).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stray device was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    delete(&h, &v.volume_id).await.unwrap();
}

/// What the driver refuses, with the reason: mixing access types, mount
/// access to a block volume and the reverse, read-only block, a directory
/// as a block target; ValidateVolumeCapabilities answers by the volume's
/// type.
#[tokio::test]
async fn block_refusals_are_clear() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pool = PoolConfig::of_kind("d", root.path().join("pools/d"), PoolKind::Dir);
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    let mut c = h.controller();

    let mut mixed = create_block("mixed", "d", MIB);
    mixed
        .volume_capabilities
        .push(common::mount_cap(Mode::SingleNodeWriter));
    let e = c.create_volume(mixed).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "both mount and block");

    let b = h.create_volume(create_block("b", "d", MIB)).await;
    let m = h.create("m", "d", MIB).await;
    // The same name with the other access type is another volume.
    let e = c
        .create_volume(common::create_request("b", "d", MIB))
        .await
        .unwrap_err();
    assert_refused(&e, Code::AlreadyExists, "raw block");

    let t = h.target("t");
    let e = h.publish(&b.volume_id, &t, false).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "block access");
    let e = publish(&h, &m.volume_id, &t).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "mount access");
    let mut ro = publish_block(&b.volume_id, &t);
    ro.readonly = true;
    let e = h.node().node_publish_volume(ro).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "read-only");
    std::fs::create_dir(&t).unwrap();
    let e = publish(&h, &b.volume_id, &t).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "directory");
    assert!(t.is_dir(), "the CO's directory is left alone");
    std::fs::remove_dir(&t).unwrap();
    assert!(
        loops_below(h.root.path()).is_empty(),
        "failed publishes leave no device"
    );

    let validate = |id: &str, cap: csi::VolumeCapability| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: vec![cap],
        ..Default::default()
    };
    let ok = c
        .validate_volume_capabilities(validate(&b.volume_id, block_cap()))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = c
        .validate_volume_capabilities(validate(
            &b.volume_id,
            common::mount_cap(Mode::SingleNodeWriter),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("raw block"),
        "{no:?}"
    );
}

/// A snapshot of a block volume holds what was written before it; a
/// block volume restored from it (and a clone) holds the same, at the
/// size asked; a filesystem volume cannot be made from it.
#[tokio::test]
async fn block_snapshot_restore_and_clone_keep_the_data() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pool = PoolConfig::of_kind("d", root.path().join("pools/d"), PoolKind::Dir);
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    let mut c = h.controller();
    let v = h.create_volume(create_block("src", "d", 8 * MIB)).await;
    let t = h.target("src");
    publish(&h, &v.volume_id, &t).await.unwrap();
    let data = pattern(5, 65536);
    write_at(&t, MIB as u64, &data).unwrap();
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "snap".into(),
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.size_bytes, 8 * MIB);
    // Written after the snapshot: not in it.
    write_at(&t, MIB as u64, &pattern(6, 65536)).unwrap();

    let from = |name: &str, source: csi::volume_content_source::Type, bytes: i64| {
        let mut r = create_block(name, "d", bytes);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        r
    };
    let snap_src =
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        });
    let restored = h
        .create_volume(from("restored", snap_src.clone(), 16 * MIB))
        .await;
    let rt = h.target("restored");
    publish(&h, &restored.volume_id, &rt).await.unwrap();
    assert_eq!(device_size(&rt), (16 * MIB) as u64);
    assert_eq!(read_at(&rt, MIB as u64, data.len()), data);

    let clone = h
        .create_volume(from(
            "clone",
            csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            }),
            8 * MIB,
        ))
        .await;
    let ct = h.target("clone");
    publish(&h, &clone.volume_id, &ct).await.unwrap();
    assert_eq!(read_at(&ct, MIB as u64, 65536), pattern(6, 65536));

    let mut as_fs = common::create_request("fs", "d", 8 * MIB);
    as_fs.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(snap_src),
    });
    let e = c.create_volume(as_fs).await.unwrap_err();
    assert_refused(&e, Code::InvalidArgument, "raw block");

    for (id, t) in [
        (&v.volume_id, &t),
        (&restored.volume_id, &rt),
        (&clone.volume_id, &ct),
    ] {
        h.unpublish(id, t).await.unwrap();
    }
    assert!(loops_below(h.root.path()).is_empty());
}
