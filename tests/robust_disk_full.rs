//! Disk full: a pool on a small tmpfs is filled (with bytes, or with
//! inodes); CreateVolume must then answer RESOURCE_EXHAUSTED and leave
//! nothing behind in the pool, the driver must keep serving, and once space
//! is freed creating volumes must work again.

mod common;
mod robust_support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{Harness, create_request, entries};
use csi_proto as csi;
use hostpath_csi::config::PoolConfig;
use tonic::Code;

const KIB: i64 = 1 << 10;
const MIB: i64 = 1 << 20;

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(options),
        )
        .expect("mounting a tmpfs (tests run as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A harness with pool `small` on a tmpfs mounted with `options` and pool
/// `big` on the ordinary disk.
async fn harness(options: &str) -> (Harness, Tmpfs) {
    let root = tempfile::Builder::new()
        .prefix("hostpath-csi-full")
        .tempdir()
        .unwrap();
    let fs = Tmpfs::mount(&root.path().join("small"), options);
    let pools = vec![
        PoolConfig::dir("small", root.path().join("small/pool")),
        PoolConfig::dir("big", root.path().join("pools/big")),
    ];
    (Harness::with_pool_configs(root, pools).await, fs)
}

async fn create(h: &Harness, name: &str, pool: &str, bytes: i64) -> Result<String, tonic::Status> {
    h.controller()
        .create_volume(create_request(name, pool, bytes))
        .await
        .map(|r| r.into_inner().volume.unwrap().volume_id)
}

async fn delete(h: &Harness, id: &str) {
    h.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("deleting {id}: {e:?}"));
}

async fn assert_serving(h: &Harness) {
    let ready = h
        .identity()
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(ready, Some(true));
    h.controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap();
}

/// Refused as out of space, with a message naming the pool.
fn assert_exhausted(res: Result<String, tonic::Status>, what: &str) {
    let e = res.expect_err(what);
    assert_eq!(e.code(), Code::ResourceExhausted, "{what}: {e:?}");
    assert!(
        e.message().contains("small") || e.message().contains("space"),
        "{what}: message does not say which pool or why: {}",
        e.message()
    );
}

#[tokio::test]
async fn a_full_pool_refuses_new_volumes_cleanly_and_recovers() {
    if !common::root_or_skip("the pool is a small tmpfs the test mounts") {
        return;
    }
    let (h, _fs) = harness("size=2m").await;
    let pool = h.pool_dir("small");

    // A volume whose pod fills the disk.
    let first = create(&h, "first", "small", 64 * KIB).await.unwrap();
    let target = h.target("first");
    h.publish(&first, &target, false).await.unwrap();
    let mut f = std::fs::File::create(target.join("fill")).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0usize;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += chunk.len(),
            Err(e) => break e,
        }
        assert!(written < 64 << 20, "tmpfs never filled up");
    };
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::ENOSPC as i32),
        "{err}"
    );
    drop(f);
    let before = entries(&pool);

    // New volumes, of any size, are refused and leave nothing behind.
    for (name, bytes) in [("second", MIB), ("tiny", 1), ("page", 4 * KIB)] {
        assert_exhausted(create(&h, name, "small", bytes).await, name);
    }
    let mut limited = create_request("limited", "small", 0);
    limited.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 512 * KIB,
    });
    assert_exhausted(
        h.controller()
            .create_volume(limited)
            .await
            .map(|_| String::new()),
        "limited",
    );
    assert_eq!(entries(&pool), before, "a refused create left something");

    // The driver keeps serving: other pools, capacity, stats of the full
    // volume.
    assert_serving(&h).await;
    let other = create(&h, "elsewhere", "big", MIB).await.unwrap();
    let cap = h
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            parameters: [("pool".to_string(), "small".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        cap.available_capacity < 64 * KIB,
        "{}",
        cap.available_capacity
    );
    let stats = h
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: first.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage[0].used >= written as i64 / 2, "{stats:?}");

    // Deleting works on a full disk and frees the space; then creating
    // works again.
    h.unpublish(&first, &target).await.unwrap();
    delete(&h, &first).await;
    let second = create(&h, "second", "small", MIB).await.unwrap();
    let t2 = h.target("second");
    h.publish(&second, &t2, false).await.unwrap();
    std::fs::write(t2.join("data"), b"fits again").unwrap();
    h.unpublish(&second, &t2).await.unwrap();
    delete(&h, &second).await;
    delete(&h, &other).await;
    assert!(entries(&pool).is_empty(), "{:?}", entries(&pool));
    assert_serving(&h).await;
}

#[tokio::test]
async fn a_pool_out_of_inodes_refuses_new_volumes_and_leaves_nothing() {
    if !common::root_or_skip("the pool is a small tmpfs the test mounts") {
        return;
    }
    let (h, fs) = harness("size=2m,nr_inodes=48").await;
    let pool = h.pool_dir("small");
    // Use up every inode, outside the pool directory.
    let fill = fs.0.join("fill");
    std::fs::create_dir(&fill).unwrap();
    let mut files = Vec::new();
    loop {
        let p = fill.join(files.len().to_string());
        match std::fs::File::create(&p) {
            Ok(_) => files.push(p),
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(nix::errno::Errno::ENOSPC as i32),
                    "{e}"
                );
                break;
            }
        }
        assert!(files.len() < 10_000, "inodes never ran out");
    }
    let before = entries(&pool);
    assert_exhausted(create(&h, "v1", "small", MIB).await, "no inode at all");
    assert_eq!(entries(&pool), before, "a refused create left something");
    assert_serving(&h).await;

    // One inode free: enough for the volume's directory but not for its
    // record. The create must fail as a whole, not leave half a volume.
    std::fs::remove_file(files.pop().unwrap()).unwrap();
    assert_exhausted(create(&h, "v2", "small", MIB).await, "one inode free");
    assert_eq!(
        entries(&pool),
        before,
        "a create that ran out of inodes half-way left something"
    );
    assert_serving(&h).await;

    // Room again: the same name works.
    for f in files.drain(..8) {
        std::fs::remove_file(f).unwrap();
    }
    let v2 = create(&h, "v2", "small", MIB).await.unwrap();
    assert_eq!(
        entries(&pool),
        BTreeSet::from(["v2".to_string(), ".v2.meta".to_string()])
    );
    delete(&h, &v2).await;
    assert!(entries(&pool).is_empty(), "{:?}", entries(&pool));
    assert_serving(&h).await;
}
