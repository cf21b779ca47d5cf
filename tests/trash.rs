//! Archive on delete: a StorageClass with `onDelete: archive` has
//! DeleteVolume move the volume's data into the pool's trash
//! (`<pool>/.trash/<token>@<created>/data`), where it stays, intact and
//! counted against the pool's capacity, until its `archiveRetention` runs
//! out and the driver's sweep removes it. The crash cases are in
//! `robust_crash_trash.rs`.
//!
//! The image test needs root and e2fsprogs (a loop-mounted ext4 of its own,
//! so the capacity figures do not move with the host disk).

mod common;
mod robust_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Harness, create_request};
use csi_proto as csi;
use hostpath_csi::config::{PoolConfig, PoolKind};
use hostpath_csi::volume::{TrashMeta, Volumes};
use robust_support::{LoopFs, Workdir, have, loops_below, make_canary, tree_digest};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn archive_request(
    name: &str,
    pool: &str,
    bytes: i64,
    retention: &str,
) -> csi::CreateVolumeRequest {
    let mut r = create_request(name, pool, bytes);
    r.parameters.insert("onDelete".into(), "archive".into());
    r.parameters
        .insert("archiveRetention".into(), retention.into());
    r
}

async fn delete(h: &Harness, id: &str) -> Result<(), tonic::Status> {
    h.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The trash entries of a pool: (entry directory, its meta).
fn trash_entries(pool: &Path) -> Vec<(PathBuf, TrashMeta)> {
    let Ok(rd) = std::fs::read_dir(pool.join(".trash")) else {
        return Vec::new();
    };
    // An entry without meta is one the sweep is removing right now.
    let mut out: Vec<_> = rd
        .flatten()
        .filter_map(|e| {
            let meta = std::fs::read(e.path().join("meta")).ok()?;
            Some((e.path(), serde_json::from_slice(&meta).unwrap()))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

async fn capacity(h: &Harness, pool: &str) -> i64 {
    h.controller()
        .get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("pool".into(), pool.into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bad_delete_parameters_are_refused_at_create() {
    let h = Harness::with_pools(&[("hdd", PoolKind::Dir)]).await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("onDelete", "Archive")], "onDelete"),
        (
            &[("onDelete", "archive"), ("archiveRetention", "soon")],
            "archiveRetention",
        ),
        (
            &[("onDelete", "archive"), ("archiveRetention", "-1h")],
            "archiveRetention",
        ),
        (&[("archiveRetention", "1h")], "archiveRetention"),
    ];
    for (params, named) in cases {
        let mut r = create_request("pvc-bad", "hdd", MIB);
        for (k, v) in *params {
            r.parameters.insert(k.to_string(), v.to_string());
        }
        let e = h.controller().create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{params:?}: {e:?}");
        assert!(e.message().contains(named), "{params:?}: {}", e.message());
    }
    let left: Vec<_> = std::fs::read_dir(h.pool_dir("hdd"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "a refused create left {left:?}");
}

#[tokio::test]
async fn archived_dir_volumes_keep_their_data_until_their_retention() {
    let mut h = Harness::with_pools(&[("hdd", PoolKind::Dir)]).await;
    let pool = h.pool_dir("hdd");
    let mut c = h.controller();
    let keep = c
        .create_volume(archive_request("pvc-keep", "hdd", MIB, "1h"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let short = c
        .create_volume(archive_request("pvc-short", "hdd", MIB, "2s"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let plain = h.create("pvc-plain", "hdd", MIB).await;
    for t in ["pvc-keep", "pvc-short", "pvc-plain"] {
        make_canary(&pool.join(t));
    }
    let digest = tree_digest(&pool.join("pvc-keep"), &[]);

    // Published: refused like any delete, and nothing moves.
    let target = h.target("t");
    h.publish(&keep.volume_id, &target, false).await.unwrap();
    let e = delete(&h, &keep.volume_id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(trash_entries(&pool).is_empty());
    h.unpublish(&keep.volume_id, &target).await.unwrap();

    for v in [&keep, &short, &plain] {
        delete(&h, &v.volume_id).await.unwrap();
    }
    // Idempotent: a second delete finds nothing to do and moves nothing.
    delete(&h, &keep.volume_id).await.unwrap();
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(listed.is_empty(), "{listed:?}");
    let mut left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, [".trash"], "only the trash stays in the pool");

    let entries = trash_entries(&pool);
    let tokens: Vec<&str> = entries.iter().map(|(_, m)| m.token.as_str()).collect();
    assert_eq!(tokens, ["pvc-keep", "pvc-short"], "plain delete removes");
    let (keep_entry, meta) = &entries[0];
    assert_eq!(tree_digest(&keep_entry.join("data"), &[]), digest);
    assert_eq!(meta.record.name, "pvc-keep");
    assert_eq!(meta.expires_unix - meta.archived_unix, 3600);

    // The sweep removes the short one after its 2 s, and only it.
    wait_until("pvc-short purged", Duration::from_secs(30), || {
        trash_entries(&pool).len() == 1
    })
    .await;
    assert_eq!(trash_entries(&pool)[0].1.token, "pvc-keep");

    // A restart keeps it; what the trash holds is reported per pool (the
    // driver stopped: a pool is opened by one holder at a time).
    h.restart().await;
    assert_eq!(trash_entries(&pool).len(), 1);
    drop(c);
    h.shutdown().await;
    // The server lets go of its pools once its last connection closes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let volumes = loop {
        match Volumes::open(&h.pools, "n1") {
            Ok(v) => break v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the stopped driver's pool lock: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let usage = volumes.trash_usage().unwrap();
    drop(volumes);
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].pool.as_str(), usage[0].entries), ("hdd", 1));
    assert!(usage[0].bytes >= 4096, "{usage:?}");

    // An entry the driver cannot read is never removed.
    let odd = pool.join(".trash/pvc-odd@1");
    std::fs::create_dir(&odd).unwrap();
    std::fs::write(odd.join("meta"), b"{ not json").unwrap();
    std::fs::write(odd.join("data"), b"someone's").unwrap();
    h.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(std::fs::read(odd.join("data")).unwrap(), b"someone's");
}

fn root_with(tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
            "this test needs root (loop devices, mounts)"
        );
        eprintln!("skipped: needs root (loop devices, mounts)");
        return false;
    }
    for t in tools {
        if !have(t) {
            eprintln!("skipped: {t} is not installed");
            return false;
        }
    }
    true
}

#[tokio::test]
async fn archived_images_are_detached_and_count_against_capacity_until_purged() {
    if !root_with(&["mkfs.ext4", "losetup"]) {
        return;
    }
    let work = Workdir::new("hpc-trash-img-");
    let fs = LoopFs::new(work.path(), "img", "ext4", 2 << 30);
    let pool_dir = fs.mount.join("pool");
    let root = tempfile::Builder::new()
        .prefix("hpc-trash-h")
        .tempdir()
        .unwrap();
    let pools = vec![PoolConfig::of_kind(
        "img",
        pool_dir.clone(),
        PoolKind::Image,
    )];
    let h = Harness::with_pool_configs(root, pools).await;
    let v = h
        .controller()
        .create_volume(archive_request("pvc-img", "img", 256 * MIB, "4s"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let data = vec![0x5au8; 64 * MIB as usize];
    std::fs::write(pool_dir.join("pvc-img/blob"), &data).unwrap();
    let cap_volume = capacity(&h, "img").await;

    delete(&h, &v.volume_id).await.unwrap();
    let entries = trash_entries(&pool_dir);
    assert_eq!(entries.len(), 1);
    let image = entries[0].0.join("data");
    assert!(image.is_file(), "the image file itself is archived");
    assert!(!pool_dir.join("pvc-img").exists());
    assert!(!pool_dir.join(".pvc-img.img").exists());
    assert!(
        loops_below(&pool_dir).is_empty(),
        "{:?}",
        loops_below(&pool_dir)
    );
    // The promise went with the volume; the 64 MiB it wrote did not.
    let cap_trash = capacity(&h, "img").await;
    assert!(cap_trash > cap_volume, "{cap_trash} <= {cap_volume}");

    wait_until("the image purged", Duration::from_secs(30), || {
        trash_entries(&pool_dir).is_empty()
    })
    .await;
    let cap_empty = capacity(&h, "img").await;
    assert!(
        cap_empty >= cap_trash + 60 * MIB,
        "purging 64 MiB of trash gave back only {} bytes",
        cap_empty - cap_trash
    );
    drop(h);
}
