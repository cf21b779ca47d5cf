//! CSI inline ephemeral volumes, with real mounts on every pool kind
//! (needs root; mkfs.btrfs for the btrfs pool, e2fsprogs and losetup for
//! the image pool). Requests are shaped as the kubelet sends them: the
//! volume id `csi-<sha256 of pod uid and volume name>`, the volume context
//! with `csi.storage.k8s.io/ephemeral: "true"`, the pod's name, namespace
//! and uid, and the pod spec's attributes `pool` and `size`; the target
//! `<pod dir>/volumes/kubernetes.io~csi/<volume>/mount`, whose parent the
//! kubelet makes. What a pod would notice: the volume is there, empty, of
//! its size (enforced where the pool kind enforces sizes), counted in the
//! pool's capacity, and gone with the pod; a pool not opened to inline
//! volumes, or a size above its limit, is refused with the reason.

mod common;
mod pools;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{Harness, mounts_at};
use csi_proto as csi;
use hostpath_csi::config::{ByteSize, PoolConfig, PoolKind};
use hostpath_csi::volume::inventory::{InventoryOptions, Origin, inventory};
use pools::*;
use sha2::{Digest, Sha256};
use tonic::Code;

/// The largest inline volume the test pools allow.
const MAX: u64 = 64 << 20;

/// The volume id the kubelet makes for volume `volume` of pod `pod_uid`.
fn kubelet_id(pod_uid: &str, volume: &str) -> String {
    format!(
        "csi-{}",
        hex::encode(Sha256::digest(format!("{pod_uid}{volume}")))
    )
}

/// A pod with one inline volume, as the kubelet lays it out under the
/// harness's targets.
struct Pod {
    uid: String,
    id: String,
    /// `<pod dir>/volumes/kubernetes.io~csi/scratch`, made (the kubelet
    /// makes it before it publishes).
    dir: PathBuf,
    /// `<dir>/mount`, the target.
    target: PathBuf,
}

impl Pod {
    fn new(h: &Harness, name: &str) -> Self {
        let uid = format!("{name}-0000-4000-8000-000000000001");
        let dir = h
            .target(&format!("pods/{uid}"))
            .join("volumes/kubernetes.io~csi/scratch");
        std::fs::create_dir_all(&dir).unwrap();
        Pod {
            id: kubelet_id(&uid, "scratch"),
            target: dir.join("mount"),
            dir,
            uid,
        }
    }

    /// The kubelet's NodePublishVolume with these attributes.
    fn publish(&self, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
        let mut context: HashMap<String, String> = attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in [
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "web"),
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/pod.uid", &self.uid),
            ("csi.storage.k8s.io/serviceAccount.name", "default"),
        ] {
            context.insert(k.into(), v.into());
        }
        csi::NodePublishVolumeRequest {
            volume_context: context,
            ..common::publish_request(&self.id, &self.target, false)
        }
    }

    /// The kubelet's NodeUnpublishVolume, then its removal of the volume's
    /// directory (as after a successful TearDown).
    async fn delete(&self, h: &Harness) {
        h.unpublish(&self.id, &self.target).await.unwrap();
        assert!(!self.target.exists(), "the target is removed");
        std::fs::remove_dir(&self.dir).unwrap();
    }
}

/// `pool` opened to inline volumes up to [`MAX`].
fn opened(mut p: PoolConfig) -> PoolConfig {
    p.ephemeral = true;
    p.max_ephemeral_volume_size = Some(ByteSize(MAX));
    p
}

/// Pools of every kind under `root`, opened to inline volumes (image and
/// btrfs pools on small filesystems of their own, so what they can promise
/// does not move with the host disk's other users), and a dir pool
/// `closed` that is not.
fn all_kinds(root: &Path) -> Vec<PoolConfig> {
    let images = loop_fs(root, "ext4", "ext4", 1 << 30);
    let mut pools = vec![
        opened(PoolConfig::of_kind(
            "d",
            root.join("pools/d"),
            PoolKind::Dir,
        )),
        opened(PoolConfig::of_kind(
            "i",
            images.join("pool"),
            PoolKind::Image,
        )),
        PoolConfig::dir("closed", root.join("pools/closed")),
    ];
    if have("mkfs.btrfs") {
        let fs = loop_fs(root, "btrfs", "btrfs", 512 << 20);
        pools.push(opened(PoolConfig::of_kind(
            "b",
            fs.join("pool"),
            PoolKind::Btrfs,
        )));
    } else {
        eprintln!("btrfs pool left out: mkfs.btrfs is not installed");
    }
    pools
}

fn tools() -> bool {
    if !common::root_or_skip("inline volumes are bind-mounted, image and btrfs pools loop-mounted")
    {
        return false;
    }
    have("losetup") && have("mkfs.ext4")
}

async fn publish(h: &Harness, r: csi::NodePublishVolumeRequest) -> Result<(), tonic::Status> {
    h.node().node_publish_volume(r).await.map(|_| ())
}

/// The record of volume `token` in the pool at `dir`, as JSON.
fn record(dir: &Path, token: &str) -> Option<serde_json::Value> {
    let bytes = std::fs::read(dir.join(format!(".{token}.meta"))).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// On every pool kind: publication makes an empty volume of the asked size
/// in the asked pool and binds it (its promise counted in the pool's
/// capacity), a repeat changes nothing, the size is enforced where the
/// kind enforces sizes, NodeGetVolumeStats answers for the kubelet's id,
/// `hostpath-csi volumes` lists it as ephemeral with its pod, and
/// unpublication removes the volume and gives its promise back.
#[tokio::test]
async fn inline_volume_life_on_every_kind() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pools = all_kinds(root.path());
    let names: Vec<String> = pools
        .iter()
        .filter(|p| p.ephemeral)
        .map(|p| p.name.clone())
        .collect();
    let h = Harness::with_pool_configs(root, pools).await;
    for pool in &names {
        let enforced = pool != "d";
        let pod = Pod::new(&h, pool);
        let before = capacity(&h, pool).await.0;
        publish(&h, pod.publish(&[("pool", pool), ("size", "16Mi")]))
            .await
            .unwrap_or_else(|e| panic!("pool {pool}: {e:?}"));

        // Bound at the target, from the pool, empty but for what the
        // filesystem brings.
        let m = mounts_at(&pod.target);
        assert_eq!(m.len(), 1, "pool {pool}: one mount at the target");
        let data = h.pool_dir(pool).join(&pod.id);
        let files: Vec<String> = listing(&pod.target)
            .into_iter()
            .filter(|f| f != "lost+found")
            .collect();
        assert!(
            files.is_empty(),
            "pool {pool}: a new volume is empty: {files:?}"
        );
        std::fs::write(pod.target.join("written-by-pod"), b"x").unwrap();
        assert!(data.join("written-by-pod").exists(), "pool {pool}");

        // Recorded as ephemeral, with its pod and attributes.
        let rec = record(&h.pool_dir(pool), &pod.id).expect("a record");
        assert_eq!(rec["name"], pod.id.as_str());
        assert_eq!(rec["capacity_bytes"], 16 << 20, "pool {pool}: {rec}");
        assert_eq!(rec["ephemeral"]["target"], pod.target.to_str().unwrap());
        assert_eq!(rec["parameters"]["csi.storage.k8s.io/pod.name"], "web");
        assert_eq!(rec["parameters"]["size"], "16Mi");
        let inv = inventory(&h.pools, InventoryOptions::default()).unwrap();
        let v = inv
            .iter()
            .flat_map(|p| &p.volumes)
            .find(|v| v.name.as_deref() == Some(pod.id.as_str()))
            .expect("listed");
        assert_eq!(v.origin, Origin::Ephemeral);
        assert_eq!(v.pod.as_deref(), Some("shop/web"));
        assert_eq!(v.published_at, vec![pod.target.clone()]);

        // Its promise is counted where the pool counts promises (less
        // the little the new volume holds already, which counts as space
        // the pool can use: see README, "What a pool can promise").
        let during = capacity(&h, pool).await.0;
        if enforced {
            assert!(
                before - during > 15 * MIB,
                "pool {pool}: {before} -> {during}"
            );
        }

        // The kubelet's retry changes nothing.
        publish(&h, pod.publish(&[("pool", pool), ("size", "16Mi")]))
            .await
            .unwrap();
        assert_eq!(mounts_at(&pod.target).len(), 1);
        assert!(pod.target.join("written-by-pod").exists());

        let (_, total, used, _) = stats(&h, &pod.id, &pod.target).await;
        assert!(used > 0, "pool {pool}: used {used}");
        if enforced {
            assert!(total <= 16 * MIB, "pool {pool}: total {total}");
            let e = write_file(&pod.target.join("big"), 32 << 20).unwrap_err();
            let errno = e.1.raw_os_error();
            assert!(
                matches!(errno, Some(28) | Some(122)),
                "pool {pool}: writes past the size fail with ENOSPC or EDQUOT: {e:?}"
            );
            std::fs::remove_file(pod.target.join("big")).unwrap();
        }

        pod.delete(&h).await;
        assert!(!data.exists(), "pool {pool}: the volume is removed");
        assert!(
            record(&h.pool_dir(pool), &pod.id).is_none(),
            "pool {pool}: its record too"
        );
        assert!(
            loops_below(&h.pool_dir(pool)).is_empty(),
            "pool {pool}: no loop device left"
        );
        if enforced {
            let after = capacity(&h, pool).await.0;
            assert!(
                after - during > 15 * MIB,
                "pool {pool}: promise given back: {during} -> {after}"
            );
        }
        // The kubelet's retry of the unpublish is success.
        h.unpublish(&pod.id, &pod.target).await.unwrap();
    }
}

/// Attributes decide the size and pool; what the pool does not allow is
/// refused with the reason, and leaves nothing behind.
#[tokio::test]
async fn attributes_and_refusals() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pools = all_kinds(root.path());
    let h = Harness::with_pool_configs(root, pools).await;

    // No size: the pool's default size, capped at its inline maximum.
    let pod = Pod::new(&h, "nosize");
    publish(&h, pod.publish(&[("pool", "i")])).await.unwrap();
    let rec = record(&h.pool_dir("i"), &pod.id).unwrap();
    assert_eq!(rec["capacity_bytes"], MAX, "{rec}");
    pod.delete(&h).await;

    let refused = |code: Code, words: &'static [&'static str]| {
        move |r: Result<(), tonic::Status>| {
            let e = r.expect_err("refused");
            assert_eq!(e.code(), code, "{e:?}");
            for w in words {
                assert!(e.message().contains(w), "{w:?} not in {:?}", e.message());
            }
        }
    };
    let pod = Pod::new(&h, "refused");
    refused(
        Code::InvalidArgument,
        &["closed", "ephemeral = true", "d, i"],
    )(publish(&h, pod.publish(&[("pool", "closed"), ("size", "1Mi")])).await);
    refused(
        Code::InvalidArgument,
        &["67108865", "67108864", "max_ephemeral_volume_size"],
    )(publish(&h, pod.publish(&[("pool", "d"), ("size", "67108865")])).await);
    refused(Code::InvalidArgument, &["size", "lots"])(
        publish(&h, pod.publish(&[("pool", "d"), ("size", "lots")])).await,
    );
    // More than the pool has free now (its filesystem is 16 GiB, sparse,
    // on the host's disk: image pools promise images' full size).
    if have("mkfs.btrfs") {
        let small = Pod::new(&h, "small");
        publish(&h, small.publish(&[("pool", "b"), ("size", "48Mi")]))
            .await
            .unwrap();
        let mut big = Vec::new();
        let mut exhausted = None;
        for i in 0..20 {
            let p = Pod::new(&h, &format!("big{i}"));
            match publish(&h, p.publish(&[("pool", "b"), ("size", "60Mi")])).await {
                Ok(()) => big.push(p),
                Err(e) => {
                    exhausted = Some((p, e));
                    break;
                }
            }
        }
        let (p, e) = exhausted.expect("a 512 MiB btrfs pool runs out of promises");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("cannot promise"), "{e:?}");
        assert!(!p.target.exists(), "nothing made at the target");
        assert!(record(&h.pool_dir("b"), &p.id).is_none(), "no record");
        assert!(!h.pool_dir("b").join(&p.id).exists(), "no subvolume");
        for p in big.iter().chain([&small]) {
            p.delete(&h).await;
        }
    }
    // Nothing left by the refusals.
    for pool in ["d", "i", "closed"] {
        let left: Vec<String> = listing(&h.pool_dir(pool))
            .into_iter()
            .filter(|n| n.contains("csi-"))
            .collect();
        assert!(left.is_empty(), "pool {pool}: {left:?}");
    }
}

/// One name, two kinds of volume: CreateVolume of an inline volume's name
/// is ALREADY_EXISTS, an inline publication of a persistent volume's name
/// too; DeleteVolume under a `<pool>:<name>` id does not remove an inline
/// volume (its pod's unpublish does).
#[tokio::test]
async fn persistent_and_inline_names_do_not_mix() {
    if !common::root_or_skip("inline volumes are bind-mounted") {
        return;
    }
    let (root, _cleanup) = root();
    let pools = vec![opened(PoolConfig::dir("d", root.path().join("pools/d")))];
    let h = Harness::with_pool_configs(root, pools).await;
    let pod = Pod::new(&h, "mix");
    publish(&h, pod.publish(&[("pool", "d"), ("size", "1Mi")]))
        .await
        .unwrap();
    let e = h
        .controller()
        .create_volume(common::create_request(&pod.id, "d", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("inline ephemeral"), "{e:?}");
    h.unpublish(&pod.id, &pod.target).await.unwrap_or_default();
    publish(&h, pod.publish(&[("pool", "d"), ("size", "1Mi")]))
        .await
        .unwrap();
    delete(&h, &format!("d:{}", pod.id)).await.unwrap();
    assert!(h.pool_dir("d").join(&pod.id).exists(), "kept");
    pod.delete(&h).await;

    let claim = h.create("pvc-1", "d", 1 << 20).await;
    let other = Pod::new(&h, "other");
    let mut r = other.publish(&[("pool", "d")]);
    r.volume_id = "pvc-1".into();
    let e = publish(&h, r).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("persistent"), "{e:?}");
    assert!(record(&h.pool_dir("d"), "pvc-1").is_some());
    delete(&h, &claim.volume_id).await.unwrap();
}

/// The startup sweep: an inline volume that no mount shows is removed
/// once its target and the target's parent are gone (its pod was deleted
/// and nobody will unpublish it), and kept while they are there (after a
/// node reboot the kubelet publishes it again, and the pod finds its
/// data).
#[tokio::test]
async fn sweep_removes_only_forgotten_inline_volumes() {
    if !tools() {
        return;
    }
    let (root, _cleanup) = root();
    let pools = all_kinds(root.path());
    let mut h = Harness::with_pool_configs(root, pools).await;
    let rebooted = Pod::new(&h, "rebooted");
    let forgotten = Pod::new(&h, "forgotten");
    for (pod, pool) in [(&rebooted, "i"), (&forgotten, "i")] {
        publish(&h, pod.publish(&[("pool", pool), ("size", "8Mi")]))
            .await
            .unwrap();
        std::fs::write(pod.target.join("data"), pod.uid.as_bytes()).unwrap();
    }
    h.shutdown().await;
    // A reboot: every mount is gone, the image volumes' too.
    for pod in [&rebooted, &forgotten] {
        common::run("umount", &[&pod.target]);
    }
    common::run("umount", &[h.pool_dir("i").join(&rebooted.id)]);
    common::run("umount", &[h.pool_dir("i").join(&forgotten.id)]);
    // The forgotten pod's directory went while the node was down.
    std::fs::remove_dir_all(forgotten.dir.parent().unwrap()).unwrap();
    h.restart().await;

    // Swept (right after the pools open): the forgotten one is gone, the
    // other one is kept.
    let pool = h.pool_dir("i");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while record(&pool, &forgotten.id).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the forgotten volume was never swept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!pool.join(&forgotten.id).exists());
    assert!(!pool.join(format!(".{}.img", forgotten.id)).exists());
    assert!(
        record(&pool, &rebooted.id).is_some(),
        "the rebooted one kept"
    );
    publish(&h, rebooted.publish(&[("pool", "i"), ("size", "8Mi")]))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(rebooted.target.join("data")).unwrap(),
        rebooted.uid.as_bytes(),
        "its data is back at the target"
    );
    rebooted.delete(&h).await;
    assert!(loops_below(&pool).is_empty());
}

/// The attributes `directoryPerms`, `uid` and `gid` give the volume's root
/// directory its mode and owner, as a StorageClass's parameters do.
#[tokio::test]
async fn root_mode_and_owner_from_attributes() {
    if !common::root_or_skip("inline volumes are bind-mounted, owned by another user") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let (root, _cleanup) = root();
    let pools = vec![opened(PoolConfig::dir("d", root.path().join("pools/d")))];
    let h = Harness::with_pool_configs(root, pools).await;
    let pod = Pod::new(&h, "owned");
    publish(
        &h,
        pod.publish(&[
            ("pool", "d"),
            ("directoryPerms", "0750"),
            ("uid", "1000"),
            ("gid", "2000"),
        ]),
    )
    .await
    .unwrap();
    let m = std::fs::metadata(&pod.target).unwrap();
    assert_eq!(
        (m.mode() & 0o7777, m.uid(), m.gid()),
        (0o750, 1000, 2000),
        "the pod sees the root as asked"
    );
    pod.delete(&h).await;
}
