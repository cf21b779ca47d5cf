//! Volume and storage health (CSI 1.13: ControllerGetVolumeHealth,
//! ControllerListVolumeHealth, NodeGetVolumeHealth, NodeGetStorageHealth)
//! and NodeGetVolumeStats' condition, against real breakage: a volume
//! directory renamed away, an image volume's loop mount taken off with
//! umount, a published raw block volume's loop device detached with
//! losetup, a pool on a tmpfs remounted read-only, filled up, and
//! unmounted from under the driver. Each appears with its status and
//! reason in the node's and the controller's view, and clears once put
//! back. Then paging and the codes for bad requests. Needs root (tmpfs and
//! loop mounts, loop devices).

mod common;
mod pools;

use std::path::{Path, PathBuf};

use common::{Harness, assert_refused, create_block, publish_block};
use csi_proto as csi;
use csi_proto::VolumeHealthErrorType as V;
use hostpath_csi::config::{PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

/// (status, reason) of each problem, and all messages in one string.
type Seen = (Vec<(V, String)>, String);

fn seen(h: csi::VolumeHealth) -> Seen {
    let msgs = h
        .health_statuses
        .iter()
        .map(|e| e.message.clone())
        .collect::<Vec<_>>()
        .join(" | ");
    let entries = h
        .health_statuses
        .into_iter()
        .map(|e| (V::try_from(e.status).unwrap(), e.reason))
        .collect();
    (entries, msgs)
}

async fn controller_health(h: &Harness, id: &str) -> Seen {
    let r = h
        .controller()
        .controller_get_volume_health(csi::ControllerGetVolumeHealthRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ControllerGetVolumeHealth {id}: {e}"))
        .into_inner()
        .volume_health
        .unwrap();
    assert_eq!(r.volume_id, id);
    seen(r)
}

async fn node_health(h: &Harness, id: &str, at: Option<&Path>) -> Seen {
    let r = h
        .node()
        .node_get_volume_health(csi::NodeGetVolumeHealthRequest {
            volume_id: id.into(),
            volume_publish_path: at.map(|p| p.display().to_string()).unwrap_or_default(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("NodeGetVolumeHealth {id}: {e}"))
        .into_inner()
        .volume_health
        .unwrap();
    assert_eq!(r.volume_id, id);
    seen(r)
}

/// Both views of a volume (the node's with its publish path) show exactly
/// `want`, and the messages say `says`.
#[track_caller]
fn expect(views: &[&Seen], want: &[(V, &str)], says: &str) {
    let want: Vec<(V, String)> = want.iter().map(|(s, r)| (*s, r.to_string())).collect();
    for (entries, msgs) in views {
        assert_eq!(entries, &want, "{msgs}");
        assert!(msgs.contains(says), "{msgs:?} does not say {says:?}");
    }
}

async fn both(h: &Harness, id: &str, at: &Path) -> (Seen, Seen, Seen) {
    (
        controller_health(h, id).await,
        node_health(h, id, None).await,
        node_health(h, id, Some(at)).await,
    )
}

async fn list(h: &Harness, max: i32, token: &str) -> Result<(Vec<String>, String), tonic::Status> {
    let r = h
        .controller()
        .controller_list_volume_health(csi::ControllerListVolumeHealthRequest {
            max_entries: max,
            starting_token: token.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok((
        r.entries.into_iter().map(|e| e.volume_id).collect(),
        r.next_token,
    ))
}

async fn storage(h: &Harness) -> Vec<(i32, String, String)> {
    h.node()
        .node_get_storage_health(csi::NodeGetStorageHealthRequest::default())
        .await
        .unwrap()
        .into_inner()
        .backend_health
        .into_iter()
        .map(|b| (b.status, b.reason, b.message))
        .collect()
}

/// NodeGetVolumeStats' condition (the one the kubelet reads): abnormal
/// and its message.
async fn condition(h: &Harness, id: &str, at: &Path) -> (bool, String) {
    let c = h
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: at.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_condition
        .unwrap();
    (c.abnormal, c.message)
}

fn token(id: &str) -> &str {
    id.split_once(':').unwrap().1
}

/// The loop device that has `file` behind it.
fn device_of(file: &Path) -> PathBuf {
    let found: Vec<PathBuf> = common::loops_below(file.parent().unwrap())
        .into_iter()
        .filter(|(_, f)| f == file)
        .map(|(d, _)| d)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "loop devices of {}: {found:?}",
        file.display()
    );
    found[0].clone()
}

/// Detaches loop device `dev` (a bind of its node does not hold it) and
/// waits until the kernel has let go of its file.
fn detach(dev: &Path) {
    common::run("losetup", &["-d", dev.to_str().unwrap()]);
    let sys = format!(
        "/sys/block/{}/loop/backing_file",
        dev.file_name().unwrap().to_str().unwrap()
    );
    for _ in 0..100 {
        if !Path::new(&sys).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{} is still attached", dev.display());
}

/// A dir pool on a tmpfs of its own (`root/t`, pool dir `root/t/pool`),
/// an ext4 image pool and a dir pool for raw block volumes.
async fn harness() -> Option<(Harness, Cleanup, PathBuf)> {
    if !common::root_or_skip("tmpfs and loop mounts, loop devices") {
        return None;
    }
    let (root, cleanup) = root();
    let fs = root.path().join("t");
    std::fs::create_dir_all(&fs).unwrap();
    common::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=32m,nr_inodes=256",
            "tmpfs",
            fs.to_str().unwrap(),
        ],
    );
    let fs = std::fs::canonicalize(fs).unwrap();
    let pools = vec![
        PoolConfig::of_kind("d", fs.join("pool"), PoolKind::Dir),
        PoolConfig::of_kind("i", root.path().join("pools/i"), PoolKind::Image),
        PoolConfig::of_kind("b", root.path().join("pools/b"), PoolKind::Dir),
    ];
    Some((Harness::with_pool_configs(root, pools).await, cleanup, fs))
}

#[tokio::test]
async fn broken_volumes_show_in_both_views_and_clear_when_put_back() {
    let Some((h, _cleanup, _fs)) = harness().await else {
        return;
    };
    use csi::controller_service_capability::rpc::Type as C;
    use csi::node_service_capability::rpc::Type as N;
    let (ctrl, node) = (h.controller_caps().await, h.node_caps().await);
    assert!(ctrl.contains(&C::GetVolumeHealth) && ctrl.contains(&C::ListVolumeHealth));
    assert!(node.contains(&N::GetVolumeHealth) && node.contains(&N::GetStorageHealth));
    // Still offered: the kubelet asks for it before reading the condition.
    assert!(node.contains(&N::VolumeCondition));

    let dv = h.create("dv", "d", MIB).await.volume_id;
    let iv = h.create("iv", "i", 16 * MIB).await.volume_id;
    let bv = h
        .create_volume(create_block("bv", "b", MIB))
        .await
        .volume_id;
    let (td, ti, tb) = (h.target("td"), h.target("ti"), h.target("tb"));
    h.publish(&dv, &td, false).await.unwrap();
    h.publish(&iv, &ti, false).await.unwrap();
    h.node()
        .node_publish_volume(publish_block(&bv, &tb))
        .await
        .unwrap();

    // Healthy: no entry anywhere.
    for (id, at) in [(&dv, &td), (&iv, &ti), (&bv, &tb)] {
        let (c, n, p) = both(&h, id, at).await;
        expect(&[&c, &n, &p], &[], "");
    }
    assert_eq!(list(&h, 0, "").await.unwrap(), (vec![], String::new()));
    assert_eq!(storage(&h).await, vec![]);
    assert!(!condition(&h, &dv, &td).await.0);

    // A dir volume's directory renamed away (its pod keeps its bind).
    let dir = h.pool_dir("d").join("dv");
    let moved = h.pool_dir("d").join("dv-moved-away");
    std::fs::rename(&dir, &moved).unwrap();
    let (c, n, p) = both(&h, &dv, &td).await;
    expect(
        &[&c, &n, &p],
        &[(V::Inaccessible, "StorageMissing")],
        "is missing",
    );
    assert_eq!(list(&h, 0, "").await.unwrap().0, vec![dv.clone()]);
    let (abnormal, message) = condition(&h, &dv, &td).await;
    assert!(abnormal && message.contains("missing"), "{message}");
    // A file where the directory was.
    std::fs::write(&dir, b"not a volume").unwrap();
    expect(
        &[&controller_health(&h, &dv).await],
        &[(V::Inaccessible, "StorageNotADirectory")],
        "not a directory",
    );
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(&moved, &dir).unwrap();
    let (c, n, p) = both(&h, &dv, &td).await;
    expect(&[&c, &n, &p], &[], "");

    // An image volume's own loop mount taken off while its pod uses it.
    let mnt = h.pool_dir("i").join(token(&iv));
    let img = h.pool_dir("i").join(format!(".{}.img", token(&iv)));
    let dev = device_of(&img);
    common::run("umount", &[mnt.to_str().unwrap()]);
    assert_eq!(device_of(&img), dev, "the pod's bind keeps the device");
    let (c, n, p) = both(&h, &iv, &ti).await;
    expect(
        &[&c, &n, &p],
        &[(V::Degraded, "ImageNotMounted")],
        ti.to_str().unwrap(),
    );
    assert_eq!(list(&h, 0, "").await.unwrap().0, vec![iv.clone()]);
    // What the message promises: the next stats call mounts it again.
    condition(&h, &iv, &ti).await;
    assert_eq!(common::mounts_at(&mnt).len(), 1);
    assert_eq!(
        device_of(&img),
        dev,
        "mounted again through the same device"
    );
    let (c, n, p) = both(&h, &iv, &ti).await;
    expect(&[&c, &n, &p], &[], "");

    // A published block volume's loop device detached under its pod.
    let file = h.pool_dir("b").join(token(&bv));
    let dev = device_of(&file);
    detach(&dev);
    let (c, n, p) = both(&h, &bv, &tb).await;
    expect(
        &[&c, &n, &p],
        &[(V::Inaccessible, "BlockDeviceDetached")],
        "lead",
    );
    assert!(p.1.contains(tb.to_str().unwrap()), "{}", p.1);
    assert_eq!(list(&h, 0, "").await.unwrap().0, vec![bv.clone()]);
    // Put back: the same device attached to the file again.
    common::run("losetup", &[dev.to_str().unwrap(), file.to_str().unwrap()]);
    let (c, n, p) = both(&h, &bv, &tb).await;
    expect(&[&c, &n, &p], &[], "");
    // Published at a second target, unpublished there: its last
    // unpublication is now newer than its last publication, so without a
    // path the driver cannot tell it is still published at tb; at tb's
    // path the node sees the device detached.
    let tb2 = h.target("tb2");
    h.node()
        .node_publish_volume(publish_block(&bv, &tb2))
        .await
        .unwrap();
    h.unpublish(&bv, &tb2).await.unwrap();
    detach(&dev);
    let (e, msg) = node_health(&h, &bv, Some(&tb)).await;
    assert_eq!(
        e,
        vec![(V::Inaccessible, "BlockDeviceDetached".to_string())],
        "{msg}"
    );
    assert!(msg.contains("no file behind it"), "{msg}");
    common::run("losetup", &[dev.to_str().unwrap(), file.to_str().unwrap()]);
    expect(&[&node_health(&h, &bv, Some(&tb)).await], &[], "");

    // A publish path where the volume is not: nothing there, or another
    // volume's mount.
    let nowhere = h.target("never-published");
    let (e, _) = node_health(&h, &dv, Some(&nowhere)).await;
    assert_eq!(e, vec![(V::Inaccessible, "NotPublished".to_string())]);
    let (e, msg) = node_health(&h, &dv, Some(&ti)).await;
    assert_eq!(
        e,
        vec![(V::Inaccessible, "OtherVolumeAtTarget".to_string())],
        "{msg}"
    );
    let (e, msg) = node_health(&h, &bv, Some(&ti)).await;
    assert_eq!(
        e,
        vec![(V::Inaccessible, "OtherVolumeAtTarget".to_string())],
        "{msg}"
    );

    h.unpublish(&dv, &td).await.unwrap();
    h.unpublish(&iv, &ti).await.unwrap();
    h.unpublish(&bv, &tb).await.unwrap();
    assert_eq!(list(&h, 0, "").await.unwrap(), (vec![], String::new()));

    // An unpublished block volume's file renamed away, then a directory in
    // its place.
    let moved = h.pool_dir("b").join("bv-moved-away");
    std::fs::rename(&file, &moved).unwrap();
    let c = controller_health(&h, &bv).await;
    expect(&[&c], &[(V::Inaccessible, "StorageMissing")], "is missing");
    std::fs::create_dir(&file).unwrap();
    let c = controller_health(&h, &bv).await;
    expect(&[&c], &[(V::Inaccessible, "StorageNotAFile")], "not a file");
    std::fs::remove_dir(&file).unwrap();
    std::fs::rename(&moved, &file).unwrap();
    expect(&[&controller_health(&h, &bv).await], &[], "");
}

#[tokio::test]
async fn pool_problems_show_in_storage_and_volume_health() {
    let Some((h, _cleanup, fs)) = harness().await else {
        return;
    };
    let a = h.create("a", "d", MIB).await.volume_id;
    let b = h.create("b", "d", MIB).await.volume_id;
    let other = h.create("c", "b", MIB).await.volume_id;
    let at = h.target("ta");
    h.publish(&a, &at, false).await.unwrap();
    let (ro, rw) = ("remount,bind,ro", "remount,bind,rw");
    let fs_s = fs.to_str().unwrap();

    // Read-only: a bind remount of the tmpfs.
    common::run("mount", &["-o", ro, fs_s]);
    let s = storage(&h).await;
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(
        (s[0].0, s[0].1.as_str()),
        (
            csi::StorageHealthErrorType::StorageDegraded as i32,
            "PoolReadOnly"
        )
    );
    assert!(
        s[0].2.contains("pool d") && s[0].2.contains("read-only"),
        "{}",
        s[0].2
    );
    let (c, n, p) = both(&h, &a, &at).await;
    expect(&[&c, &n, &p], &[(V::Degraded, "PoolReadOnly")], "read-only");
    let (abnormal, message) = condition(&h, &a, &at).await;
    assert!(abnormal && message.contains("read-only"), "{message}");
    expect(&[&controller_health(&h, &other).await], &[], "");

    // Paging: both volumes of the pool, one per page; a foreign token and
    // a negative page size are refused.
    let (page, next) = list(&h, 1, "").await.unwrap();
    assert_eq!(page, vec![a.clone()]);
    assert_eq!(next, b);
    assert_eq!(
        list(&h, 1, &next).await.unwrap(),
        (vec![b.clone()], String::new())
    );
    assert_eq!(list(&h, 0, "").await.unwrap().0, vec![a.clone(), b.clone()]);
    assert_refused(
        &list(&h, 0, "not-a-token/..").await.unwrap_err(),
        Code::Aborted,
        "not issued",
    );
    assert_refused(
        &list(&h, -1, "").await.unwrap_err(),
        Code::InvalidArgument,
        "max_entries",
    );

    common::run("mount", &["-o", rw, fs_s]);
    assert_eq!(storage(&h).await, vec![]);
    expect(&[&controller_health(&h, &a).await], &[], "");

    // Full: a file takes every byte of the tmpfs.
    let filler = fs.join("filler");
    let _ = common::write_file(&filler, 64 << 20);
    let s = storage(&h).await;
    assert!(
        s.iter()
            .any(|b| b.1 == "PoolFull" && b.2.contains("no space")),
        "{s:?}"
    );
    let (c, n, p) = both(&h, &a, &at).await;
    expect(&[&c, &n, &p], &[(V::Degraded, "PoolFull")], "ENOSPC");
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(storage(&h).await, vec![]);

    // Out of inodes: empty files until the tmpfs has none left.
    let files = fs.join("files");
    std::fs::create_dir(&files).unwrap();
    let mut n = 0;
    while std::fs::File::create(files.join(n.to_string())).is_ok() {
        n += 1;
        assert!(n < 1000, "nr_inodes=256 did not hold");
    }
    let s = storage(&h).await;
    assert_eq!(
        s.iter().map(|b| b.1.as_str()).collect::<Vec<_>>(),
        vec!["PoolOutOfInodes"]
    );
    let (c, n, p) = both(&h, &a, &at).await;
    expect(
        &[&c, &n, &p],
        &[(V::Degraded, "PoolOutOfInodes")],
        "no inodes",
    );
    std::fs::remove_dir_all(&files).unwrap();
    assert_eq!(storage(&h).await, vec![]);

    // Unmounted from under the driver: its directory is gone, then another
    // directory takes its path; mounted back, all is well again.
    let keep = fs.parent().unwrap().join("kept");
    std::fs::create_dir(&keep).unwrap();
    common::run("mount", &["--bind", fs_s, keep.to_str().unwrap()]);
    common::run("umount", &["-l", fs_s]);
    let s = storage(&h).await;
    assert_eq!(
        s.iter().map(|b| (b.0, b.1.as_str())).collect::<Vec<_>>(),
        vec![(
            csi::StorageHealthErrorType::StorageUnreachable as i32,
            "PoolDirectoryMissing"
        )]
    );
    expect(
        &[&controller_health(&h, &b).await],
        &[(V::Inaccessible, "PoolDirectoryMissing")],
        "missing",
    );
    std::fs::create_dir(fs.join("pool")).unwrap();
    let s = storage(&h).await;
    assert_eq!(
        s.iter().map(|b| b.1.as_str()).collect::<Vec<_>>(),
        vec!["PoolNotMounted"]
    );
    assert!(s[0].2.contains("mount it back"), "{}", s[0].2);
    let (c, n, _) = both(&h, &b, &at).await;
    expect(
        &[&c, &n],
        &[(V::Inaccessible, "PoolNotMounted")],
        "no longer the directory",
    );
    assert_eq!(list(&h, 0, "").await.unwrap().0, vec![a.clone(), b.clone()]);
    std::fs::remove_dir(fs.join("pool")).unwrap();
    common::run("mount", &["--bind", keep.to_str().unwrap(), fs_s]);
    assert_eq!(storage(&h).await, vec![]);
    let (c, n, p) = both(&h, &a, &at).await;
    expect(&[&c, &n, &p], &[], "");
    h.unpublish(&a, &at).await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_spec_codes() {
    let Some((h, _cleanup, _fs)) = harness().await else {
        return;
    };
    let v = h.create("v", "d", MIB).await.volume_id;
    let ctrl = |id: &str| {
        let mut c = h.controller();
        let id = id.to_string();
        async move {
            c.controller_get_volume_health(csi::ControllerGetVolumeHealthRequest {
                volume_id: id,
                ..Default::default()
            })
            .await
            .unwrap_err()
        }
    };
    let node = |id: &str, at: &str, staging: &str| {
        let mut c = h.node();
        let req = csi::NodeGetVolumeHealthRequest {
            volume_id: id.into(),
            volume_publish_path: at.into(),
            staging_target_path: staging.into(),
        };
        async move { c.node_get_volume_health(req).await.unwrap_err() }
    };
    assert_refused(&ctrl("").await, Code::InvalidArgument, "volume_id");
    assert_refused(&ctrl("d:nothing").await, Code::NotFound, "does not exist");
    assert_refused(&ctrl("nopool:v").await, Code::NotFound, "no pool");
    assert_refused(&ctrl("../../etc").await, Code::NotFound, "does not exist");
    assert_refused(&node("", "", "").await, Code::InvalidArgument, "volume_id");
    assert_refused(
        &node("d:nothing", "", "").await,
        Code::NotFound,
        "does not exist",
    );
    assert_refused(
        &node(&v, "relative/path", "").await,
        Code::InvalidArgument,
        "volume_publish_path",
    );
    assert_refused(
        &node(&v, "", "/stage").await,
        Code::InvalidArgument,
        "does not stage",
    );
    // An id of neither kind names no inline volume either.
    assert_refused(
        &node("csi-0123", "", "").await,
        Code::NotFound,
        "does not exist",
    );
    // A static directory an administrator made is a volume too.
    std::fs::create_dir(h.pool_dir("d").join("static")).unwrap();
    expect(&[&controller_health(&h, "d:static").await], &[], "");
    // Also in an image pool, where it has no image.
    std::fs::create_dir(h.pool_dir("i").join("static")).unwrap();
    expect(&[&controller_health(&h, "i:static").await], &[], "");
}
