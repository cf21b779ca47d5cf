//! `image` pools on real filesystems (needs root, losetup, e2fsprogs and
//! xfsprogs): sizes enforced by a loop-mounted ext4/xfs image per volume,
//! online expansion, stats, capacity, and recovery from interrupted calls
//! without leaking loop devices or mounts.

mod common;
mod pools;

use common::{Harness, create_request};
use hostpath_csi::config::{ByteSize, Filesystem, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

fn image_pool(root: &std::path::Path, name: &str, fs: Filesystem) -> PoolConfig {
    PoolConfig {
        filesystem: Some(fs),
        ..PoolConfig::of_kind(name, root.join("pools").join(name), PoolKind::Image)
    }
}

/// Write past the size fails; after expansion the same write succeeds;
/// stats follow what was written.
async fn enforce_and_expand(fs: Filesystem, size: i64, grown: i64) {
    let (root, _cleanup) = root();
    let pool = image_pool(root.path(), "img", fs);
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    let before = loops_below(h.root.path());

    let v = h.create("pvc-a", "img", size).await;
    assert_eq!(v.capacity_bytes, size);
    assert_eq!(v.volume_context["sizeEnforced"], "true");
    assert_eq!(v.volume_context["kind"], "image");
    let dir = h.pool_dir("img");
    assert!(dir.join(".pvc-a.img").is_file());
    assert_eq!(loops_below(h.root.path()).len(), before.len() + 1);

    let target = h.target("t1");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    let (used0, _, total0, _) = stats(&h, &v.volume_id, &target).await;
    // The filesystem's own overhead comes out of the image: a few % for
    // ext4; for xfs at its 300 MiB minimum, the 64 MiB log that recent
    // xfsprogs insist on leaves about 79% (see the README's pool table).
    let floor = if fs == Filesystem::Xfs {
        size * 3 / 4
    } else {
        size * 8 / 10
    };
    assert!(total0 <= size && total0 > floor, "total {total0} of {size}");

    // More than the volume holds: ENOSPC part-way.
    let big = (size + size / 2) as u64;
    let (written, err) = write_file(&target.join("big"), big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_enospc()), "{err}");
    assert!(written < size as u64);
    std::fs::remove_file(target.join("big")).unwrap();

    // Expand online: controller grows the image, node grows the fs.
    let r = expand(&h, &v.volume_id, grown).await.unwrap();
    assert_eq!(r.capacity_bytes, grown);
    assert!(r.node_expansion_required);
    let grows_online = fs != Filesystem::Ext4 || has_cap_sys_resource();
    if grows_online {
        let c = node_expand(&h, &v.volume_id, &target, grown).await.unwrap();
        assert_eq!(c, grown);
    } else {
        // The kernel grows a mounted ext4 only for CAP_SYS_RESOURCE (this
        // test machine's root lacks it; a privileged node plugin has it):
        // the driver says so instead of failing obscurely. Only the checks
        // of the grown filesystem below are left out; the xfs variant
        // covers online growth on this machine.
        let e = node_expand(&h, &v.volume_id, &target, grown)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
        eprintln!("ext4 online growth not checked: no CAP_SYS_RESOURCE on this machine");
    }
    // Asking again for less or the same is a no-op with the current size.
    assert_eq!(
        expand(&h, &v.volume_id, size).await.unwrap().capacity_bytes,
        grown
    );

    if grows_online {
        write_file(&target.join("big"), big).unwrap();
        let (used, avail, total, inodes) = stats(&h, &v.volume_id, &target).await;
        assert!(total > size && total <= grown, "total {total}");
        let grew = used - used0;
        // Within the file's own metadata: 2 MiB, plus 1% for xfs's extent
        // and allocation-group bookkeeping on a file of hundreds of MiB.
        assert!(
            (grew - big as i64).abs() < 2 * MIB + big as i64 / 100,
            "used grew by {grew}, wrote {big}"
        );
        assert!(avail < total - big as i64 + MIB, "avail {avail}");
        assert!(inodes >= 2, "inodes {inodes}");
    }

    // The record holds the new size: a restart reports it.
    let mut h = h;
    h.restart().await;
    let listed = h
        .controller()
        .list_volumes(csi_proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        grown
    );

    // Published volumes cannot be deleted; once unpublished everything goes,
    // loop device included.
    let e = delete(&h, &v.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    h.unpublish(&v.volume_id, &target).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
    delete(&h, &v.volume_id).await.unwrap();
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    assert_eq!(loops_below(h.root.path()), before);
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    eff & (1 << 24) != 0
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

#[tokio::test]
async fn ext4_image_enforces_size_expands_online_and_reports_usage() {
    if !common::root_or_skip("image volumes are loop-mounted filesystems") {
        return;
    }
    enforce_and_expand(Filesystem::Ext4, 32 * MIB, 64 * MIB).await;
}

#[tokio::test]
async fn xfs_image_enforces_size_expands_online_and_reports_usage() {
    if !common::root_or_skip("image volumes are loop-mounted filesystems") {
        return;
    }
    if !have("mkfs.xfs") {
        common::skip("mkfs.xfs (xfsprogs) is not installed");
        return;
    }
    // Grown well past 1.5x the size: the write of 1.5x must fit beside
    // xfs's 64 MiB log.
    enforce_and_expand(Filesystem::Xfs, 300 * MIB, 640 * MIB).await;
}

#[tokio::test]
async fn image_capacity_tracks_promises_and_a_full_pool_leaves_no_trace() {
    if !common::root_or_skip("image volumes are loop-mounted filesystems") {
        return;
    }
    let (root, _cleanup) = root();
    // The pool lives on its own 256 MiB filesystem.
    let fs = loop_fs(root.path(), "disk", "ext4", 256 << 20);
    let pool = PoolConfig {
        max_volume_size: Some(ByteSize(150 << 20)),
        ..PoolConfig::of_kind("img", fs.join("pool"), PoolKind::Image)
    };
    let h = Harness::with_pool_configs(root, vec![pool]).await;
    let dir = h.pool_dir("img");

    let (a0, max0, min0) = capacity(&h, "img").await;
    assert!(a0 > 200 * MIB && a0 < 256 * MIB, "{a0}");
    assert_eq!(max0, 150 * MIB);
    assert_eq!(min0, 16 * MIB);

    let v1 = h.create("v1", "img", 100 * MIB).await;
    let (a1, max1, _) = capacity(&h, "img").await;
    // Sparse images take almost nothing yet, but their size is promised.
    assert!((a0 - a1 - 100 * MIB).abs() < 4 * MIB, "{a0} -> {a1}");
    assert_eq!(max1, (a1 - a1 % 4096).min(150 * MIB));

    let v2 = h.create("v2", "img", 100 * MIB).await;
    let (a2, _, _) = capacity(&h, "img").await;
    assert!(a2 < a1 - 96 * MIB, "{a1} -> {a2}");

    // 100 MiB more cannot be promised: RESOURCE_EXHAUSTED, and nothing new
    // in the pool directory or among the loop devices.
    let files = listing(&dir);
    let loops = loops_below(h.root.path());
    let e = h
        .controller()
        .create_volume(create_request("v3", "img", 100 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(listing(&dir), files);
    assert_eq!(loops_below(h.root.path()), loops);
    // Nor can v1 grow by that much.
    let e = expand(&h, &v1.volume_id, 200 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = expand(&h, &v1.volume_id, 150 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(capacity(&h, "img").await.0, a2);

    // Above the pool's maximum: OUT_OF_RANGE.
    let e = h
        .controller()
        .create_volume(create_request("v4", "img", 151 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Deleting gives the promise back.
    delete(&h, &v2.volume_id).await.unwrap();
    let (a3, _, _) = capacity(&h, "img").await;
    assert!((a3 - a1).abs() < 4 * MIB, "{a1} vs {a3}");
    h.create("v3", "img", 100 * MIB).await;
    delete(&h, &v1.volume_id).await.unwrap();
    let (a4, _, _) = capacity(&h, "img").await;
    assert!((a4 - a3).abs() < 4 * MIB, "{a3} vs {a4}");
}

#[tokio::test]
async fn interrupted_image_calls_are_finished_by_their_retry() {
    if !common::root_or_skip("image volumes are loop-mounted filesystems") {
        return;
    }
    let (root, _cleanup) = root();
    let pool = image_pool(root.path(), "img", Filesystem::Ext4);
    let mut h = Harness::with_pool_configs(root, vec![pool]).await;
    let dir = h.pool_dir("img");
    let base = loops_below(h.root.path());

    // A create killed during mkfs left a scratch image; one killed after
    // losetup (before mount) left an attached loop device on a complete
    // image and an empty mount point.
    std::fs::write(dir.join(".half.img.new"), b"garbage").unwrap();
    let img = dir.join(".att.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    sh("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
    std::fs::create_dir(dir.join("att")).unwrap();
    sh("losetup", &["--find", img.to_str().unwrap()]);
    assert_eq!(loops_below(h.root.path()).len(), base.len() + 1);

    let half = h.create("half", "img", 16 * MIB).await;
    assert!(!dir.join(".half.img.new").exists());
    let att = h.create("att", "img", 16 * MIB).await;
    // The retry reused the attached device instead of adding another.
    assert_eq!(loops_below(h.root.path()).len(), base.len() + 2);
    let t = h.target("att");
    h.publish(&att.volume_id, &t, false).await.unwrap();
    write_file(&t.join("f"), 1 << 20).unwrap();
    h.unpublish(&att.volume_id, &t).await.unwrap();

    // A scratch image nobody retries is swept at startup.
    std::fs::write(dir.join(".orphan.img.new"), b"x").unwrap();
    h.restart().await;
    for _ in 0..100 {
        if !dir.join(".orphan.img.new").exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!dir.join(".orphan.img.new").exists());

    // After a reboot nothing is mounted: publishing mounts the image again,
    // with the data still there.
    common::unmount_below(&dir);
    let t2 = h.target("att2");
    h.publish(&att.volume_id, &t2, false).await.unwrap();
    assert_eq!(std::fs::metadata(t2.join("f")).unwrap().len(), 1 << 20);
    h.unpublish(&att.volume_id, &t2).await.unwrap();

    // A delete killed after unmounting (image and record still there) is
    // finished by the retry; so is one killed after losetup left a device.
    sh("umount", &[dir.join("att").to_str().unwrap()]);
    sh(
        "losetup",
        &["--find", dir.join(".att.img").to_str().unwrap()],
    );
    delete(&h, &att.volume_id).await.unwrap();
    delete(&h, &half.volume_id).await.unwrap();
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    assert_eq!(loops_below(h.root.path()), base);

    // Someone else's data at a volume's path is never taken over.
    std::fs::create_dir(dir.join("taken")).unwrap();
    std::fs::write(dir.join("taken/file"), b"mine").unwrap();
    let e = h
        .controller()
        .create_volume(create_request("taken", "img", 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(listing(&dir), ["taken"]);
}
