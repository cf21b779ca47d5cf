//! Node behaviour with real bind mounts, checked against the filesystem
//! and `/proc/self/mountinfo`. Needs root.

mod common;

use std::io::ErrorKind;

use common::{Harness, mounts_at, publish_request};
use csi_proto as csi;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn publish_bind_mounts_the_volume_and_unpublish_removes_it() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let v = h.create("pub", "hdd", MIB).await;
    let target = h.target("pod-a");
    h.publish(&v.volume_id, &target, false).await.unwrap();

    let m = mounts_at(&target);
    assert_eq!(m.len(), 1, "exactly one mount at the target");
    assert!(m[0].root.ends_with("pools/hdd/pub"), "{:?}", m[0].root);
    std::fs::write(target.join("written-by-pod"), b"x").unwrap();
    assert!(h.pool_dir("hdd").join("pub/written-by-pod").exists());

    // Publishing again with the same arguments changes nothing.
    h.publish(&v.volume_id, &target, false).await.unwrap();
    assert_eq!(mounts_at(&target).len(), 1);
    // The same target read-only is incompatible.
    assert_eq!(
        h.publish(&v.volume_id, &target, true)
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );

    h.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists(), "target directory removed");
    assert!(
        h.pool_dir("hdd").join("pub/written-by-pod").exists(),
        "data kept"
    );
    // Unpublishing again is fine.
    h.unpublish(&v.volume_id, &target).await.unwrap();
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let v = h.create("ro", "hdd", MIB).await;
    std::fs::write(h.pool_dir("hdd").join("ro/seed"), b"seed").unwrap();
    let target = h.target("reader");
    h.publish(&v.volume_id, &target, true).await.unwrap();
    assert!(mounts_at(&target)[0].read_only());
    assert_eq!(std::fs::read(target.join("seed")).unwrap(), b"seed");
    let err = std::fs::write(target.join("nope"), b"x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "{err}"
    );
    // The read-write path in the pool is unaffected.
    std::fs::write(h.pool_dir("hdd").join("ro/ok"), b"x").unwrap();
    h.publish(&v.volume_id, &target, true).await.unwrap();
    h.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(!target.exists());

    // Mount flags from the capability are applied too.
    let mut req = publish_request(&v.volume_id, &target, false);
    if let Some(csi::volume_capability::AccessType::Mount(m)) =
        req.volume_capability.as_mut().unwrap().access_type.as_mut()
    {
        m.mount_flags = vec!["ro".into(), "noexec".into()];
    }
    h.node().node_publish_volume(req).await.unwrap();
    let m = &mounts_at(&target)[0];
    assert!(
        m.read_only() && m.options.contains("noexec"),
        "{}",
        m.options
    );
    h.unpublish(&v.volume_id, &target).await.unwrap();
}

#[tokio::test]
async fn one_volume_at_several_targets_and_a_busy_target_refused() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let a = h.create("a", "hdd", MIB).await;
    let b = h.create("b", "ssd", MIB).await;
    let (t1, t2) = (h.target("t1"), h.target("t2"));
    h.publish(&a.volume_id, &t1, false).await.unwrap();
    h.publish(&a.volume_id, &t2, false).await.unwrap();
    std::fs::write(t1.join("shared"), b"1").unwrap();
    assert!(t2.join("shared").exists());

    // Another volume cannot be stacked on an occupied target.
    let e = h.publish(&b.volume_id, &t1, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(mounts_at(&t1).len(), 1);

    // A volume still published cannot be deleted.
    let e = h
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: a.volume_id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(h.pool_dir("hdd").join("a/shared").exists());

    h.unpublish(&a.volume_id, &t1).await.unwrap();
    assert!(
        t2.join("shared").exists(),
        "the other publication is untouched"
    );
    h.unpublish(&a.volume_id, &t2).await.unwrap();
}

#[tokio::test]
async fn hostile_targets_are_refused_and_nothing_outside_is_touched() {
    let h = Harness::start().await;
    let v = h.create("victim", "hdd", MIB).await;
    // Canonical, as the mount table shows it, or the "nothing mounted on
    // the canary" checks below could never fail.
    let canary = std::fs::canonicalize(h.root.path())
        .unwrap()
        .join("etc-canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("passwd"), b"root:x:0:0").unwrap();

    // A symlink to somewhere else as the target.
    let link = h.target("link-to-etc");
    std::os::unix::fs::symlink(&canary, &link).unwrap();
    let e = h.publish(&v.volume_id, &link, false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(mounts_at(&canary).is_empty());
    let e = h.unpublish(&v.volume_id, &link).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());

    // Targets inside a pool, or above one.
    let inside = h.pool_dir("ssd").join("sneaky");
    let e = h.publish(&v.volume_id, &inside, false).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(!inside.exists());
    let e = h
        .publish(&v.volume_id, &h.root.path().join("pools"), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Through a symlinked parent into a pool.
    let sneaky_parent = h.target("parent-link");
    std::os::unix::fs::symlink(h.pool_dir("ssd"), &sneaky_parent).unwrap();
    let e = h
        .publish(&v.volume_id, &sneaky_parent.join("x"), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A non-empty directory is not mounted over.
    let e = h.publish(&v.volume_id, &canary, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(mounts_at(&canary).is_empty());

    // Paths with `..` or relative paths.
    for bad in ["relative/target", "/tmp/../etc", ""] {
        let mut c = h.node();
        let e = c
            .node_publish_volume(publish_request(
                &v.volume_id,
                std::path::Path::new(bad),
                false,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    assert_eq!(std::fs::read(canary.join("passwd")).unwrap(), b"root:x:0:0");
}

#[tokio::test]
async fn unpublish_never_unmounts_what_is_not_ours() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let v = h.create("mine", "hdd", MIB).await;
    let foreign = h.target("foreign");
    std::fs::create_dir(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let e = h.unpublish(&v.volume_id, &foreign).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(mounts_at(&foreign).len(), 1, "the tmpfs is still mounted");
}

#[tokio::test]
async fn hostile_ids_name_nothing() {
    let h = Harness::start().await;
    std::fs::write(h.root.path().join("pools/secret"), b"s").unwrap();
    for id in [
        "hdd:..",
        "hdd:../secret",
        "../pools:secret",
        "hdd:/etc",
        "hdd:.",
        "nvme:x",
        "hdd:a/b",
    ] {
        let target = h.target("t");
        let e = h.publish(id, &target, false).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}: {e:?}");
        assert!(!target.exists());
        h.controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }
    assert!(h.root.path().join("pools/secret").exists());
    assert!(h.pool_dir("hdd").exists());
}

#[tokio::test]
async fn a_static_directory_made_by_an_administrator_can_be_published() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let admin = h.pool_dir("hdd").join("static-data");
    std::fs::create_dir(&admin).unwrap();
    std::fs::write(admin.join("index.html"), b"hi").unwrap();
    let target = h.target("web");
    h.publish("hdd:static-data", &target, false).await.unwrap();
    assert_eq!(std::fs::read(target.join("index.html")).unwrap(), b"hi");
    h.unpublish("hdd:static-data", &target).await.unwrap();
    assert!(admin.join("index.html").exists());
}

#[tokio::test]
async fn stats_report_the_volumes_own_usage_and_missing_directories() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let v = h.create("measured", "hdd", 64 * MIB).await;
    let other = h.create("other", "hdd", 64 * MIB).await;
    let target = h.target("stats");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    std::fs::write(target.join("blob"), vec![7u8; 3 << 20]).unwrap();
    std::fs::create_dir(target.join("d")).unwrap();
    std::fs::write(target.join("d/small"), b"x").unwrap();
    // Data in a neighbouring volume must not count.
    std::fs::write(h.pool_dir("hdd").join("other/big"), vec![1u8; 5 << 20]).unwrap();

    let stats = |id: &str, path: &std::path::Path| {
        let mut c = h.node();
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string_lossy().into_owned(),
            staging_target_path: String::new(),
        };
        async move { c.node_get_volume_stats(req).await.map(|r| r.into_inner()) }
    };
    let s = stats(&v.volume_id, &target).await.unwrap();
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    let inodes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert!(
        bytes.used >= 3 << 20 && bytes.used < 4 << 20,
        "used {}",
        bytes.used
    );
    assert_eq!(inodes.used, 4, "root, blob, d, d/small");
    assert!(!s.volume_condition.unwrap().abnormal);

    assert_eq!(
        stats(&v.volume_id, &h.target("nowhere"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        stats("hdd:missing", &target).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        stats(&other.volume_id, &target).await.unwrap_err().code(),
        Code::NotFound
    );

    h.unpublish(&v.volume_id, &target).await.unwrap();
    // The directory disappears behind the driver's back.
    std::fs::remove_dir_all(h.pool_dir("hdd").join("measured")).unwrap();
    let probe_path = h.target("still-there");
    std::fs::create_dir(&probe_path).unwrap();
    let s = stats(&v.volume_id, &probe_path).await.unwrap();
    let cond = s.volume_condition.unwrap();
    assert!(
        cond.abnormal && cond.message.contains("missing"),
        "{cond:?}"
    );
    assert_eq!(
        std::fs::metadata(h.pool_dir("hdd").join("measured"))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

/// Unmounts (lazily, below first) what the propagation test mounted,
/// even when it fails.
struct SharedTree(std::path::PathBuf);

impl Drop for SharedTree {
    fn drop(&mut self) {
        for m in ["host", "kubelet"] {
            let p = self.0.join(m);
            common::unmount_below(&p);
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// In the node plugin's container the target lies under the kubelet's
/// directory, mounted with `mountPropagation: Bidirectional`: the bind
/// the driver makes there is copied into the host's namespace, and the
/// host's copy is the one the pod gets. That copy must carry the publish
/// flags. Here a shared tmpfs plays the kubelet directory and a bind of it
/// (a peer, as the host's side of the container's mount is) plays the
/// host: the flags must hold on both sides. (A remount after the bind
/// changed only the driver's side: the Kubernetes storage e2e suite found
/// a pod's volume `rw` where `ro,noexec` was asked.)
#[tokio::test]
async fn publish_flags_hold_on_every_propagated_copy() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    use nix::mount::{MsFlags, mount};
    let h = Harness::start().await;
    let v = h.create("prop", "hdd", MIB).await;
    std::fs::write(h.pool_dir("hdd").join("prop/seed"), b"seed").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tree = SharedTree(dir.path().to_path_buf());
    let (kubelet, host) = (tree.0.join("kubelet"), tree.0.join("host"));
    std::fs::create_dir(&kubelet).unwrap();
    std::fs::create_dir(&host).unwrap();
    mount(
        Some("tmpfs"),
        &kubelet,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    mount(
        None::<&str>,
        &kubelet,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    // A bind of a shared mount joins its peer group: what is mounted
    // below one appears below the other.
    mount(
        Some(&kubelet),
        &host,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();

    for (readonly, flags) in [(true, vec![]), (false, vec!["ro", "noexec", "nosuid"])] {
        let target = kubelet.join("pods/p/volumes/mount");
        std::fs::create_dir_all(&target).unwrap();
        let host_side = host.join("pods/p/volumes/mount");
        let mut req = publish_request(&v.volume_id, &target, readonly);
        if let Some(csi::volume_capability::AccessType::Mount(m)) =
            req.volume_capability.as_mut().unwrap().access_type.as_mut()
        {
            m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
        }
        h.node().node_publish_volume(req).await.unwrap();
        for side in [&target, &host_side] {
            let m = mounts_at(side);
            assert_eq!(m.len(), 1, "{}: {m:?}", side.display());
            assert!(m[0].read_only(), "{}: {}", side.display(), m[0].options);
            for f in flags.iter().filter(|f| **f != "ro") {
                let opts = &m[0].options;
                assert!(opts.contains(f), "{}: {opts} lacks {f}", side.display());
            }
            assert_eq!(std::fs::read(side.join("seed")).unwrap(), b"seed");
            let err = std::fs::write(side.join("written"), b"x").unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(nix::errno::Errno::EROFS as i32),
                "{}: {err}",
                side.display()
            );
        }
        h.unpublish(&v.volume_id, &target).await.unwrap();
        assert!(mounts_at(&host_side).is_empty(), "the host's copy stays");
    }
    assert!(!h.pool_dir("hdd").join("prop/written").exists());
}
