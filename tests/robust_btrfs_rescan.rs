//! Crash safety of the qgroup rescan the driver starts itself.
//!
//! A btrfs pool in full qgroup mode, with volumes, whose accounting the
//! kernel marks inconsistent (and stops updating, so a volume takes more
//! than its size). The real binary is started on it: it must start a
//! rescan and report the pool as unable to keep promises. It is then
//! killed with SIGKILL again and again while the rescan runs (some kills
//! while it is still opening the pool), and once the node "crashes" too:
//! the volume's mount goes and the filesystem is unmounted in the middle
//! of the rescan, then mounted again. Every restarted driver must still
//! report the pool (the rescan is the kernel's, not the driver's; nothing
//! about it lives in the driver) and must not start a second rescan.
//! When the rescan has completed, what a user relies on must hold: usage
//! matches what is on disk, writes past the size fail, expansion works,
//! new volumes can be made and are limited, and nothing was leaked or
//! lost (subvolumes, records, qgroups).
//!
//! Tunables: `HOSTPATH_CSI_RESCAN_KILLS` (default 6), and
//! `HOSTPATH_CSI_CRASH_SEED` for the kill timing.

mod btrfs_support;
mod common;
mod robust_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use btrfs_support::BtrfsFs;
use common::{create_request, publish_request, write_file};
use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::node_client::NodeClient;
use robust_support::{Driver, PoolSpec, Rng, Workdir, connect_once, env_u64, have};
use tonic::Code;

const MIB: i64 = 1 << 20;

async fn controller(socket: &Path) -> ControllerClient<tonic::transport::Channel> {
    ControllerClient::new(connect_once(socket).await.unwrap())
}

async fn node(socket: &Path) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(connect_once(socket).await.unwrap())
}

async fn create(socket: &Path, name: &str, bytes: i64) -> Result<csi::Volume, tonic::Status> {
    controller(socket)
        .await
        .create_volume(create_request(name, "bt", bytes))
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

async fn publish(socket: &Path, id: &str, target: &Path) {
    node(socket)
        .await
        .node_publish_volume(publish_request(id, target, false))
        .await
        .unwrap();
}

/// (used bytes, total bytes, abnormal condition's message).
async fn stats(socket: &Path, id: &str, target: &Path) -> (i64, i64, Option<String>) {
    let r = node(socket)
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let c = r.volume_condition.unwrap();
    (
        r.usage[0].used,
        r.usage[0].total,
        c.abnormal.then_some(c.message),
    )
}

async fn available(socket: &Path) -> i64 {
    controller(socket)
        .await
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![common::mount_cap(
                csi::volume_capability::access_mode::Mode::SingleNodeWriter,
            )],
            parameters: [("pool".to_string(), "bt".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

fn edquot(r: Result<(), (u64, std::io::Error)>) -> u64 {
    let (written, e) = r.expect_err("a write past the volume's size succeeded");
    assert_eq!(
        e.raw_os_error(),
        Some(nix::errno::Errno::EDQUOT as i32),
        "{e}"
    );
    written
}

/// What the pool must say while the rescan runs; `false` if the rescan
/// ended before the answers were all in (they may then be right to
/// differ, and are not judged).
async fn reports_the_rescan(socket: &Path, fs: &BtrfsFs, pool: &Path, a: &str, t: &Path) -> bool {
    let cap = available(socket).await;
    let refused = create(socket, "pvc-x", 8 * MIB).await;
    let (_, _, abnormal) = stats(socket, a, t).await;
    if !fs.rescan_running() {
        return false;
    }
    assert_eq!(cap, 0, "capacity promised during the rescan");
    let e = refused.expect_err("a volume was created during the rescan");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("inconsistent"), "{e:?}");
    assert!(
        !pool.join("pvc-x").exists(),
        "the refused create left a subvolume"
    );
    let abnormal = abnormal.expect("the volume's condition is normal during the rescan");
    assert!(
        abnormal.contains("inconsistent") && abnormal.contains("rescan"),
        "{abnormal}"
    );
    true
}

fn names(dir: &Path, f: impl Fn(&str) -> Option<String>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| f(&e.unwrap().file_name().to_string_lossy()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescan_the_driver_started_survives_sigkill_and_a_node_crash() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    if !have("btrfs") || !have("mkfs.btrfs") {
        common::skip("btrfs-progs is not installed");
        return;
    }
    let kills = env_u64("HOSTPATH_CSI_RESCAN_KILLS", 6);
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 0x5eed_0011);
    let mut rng = Rng::new(seed);
    eprintln!("rescan crash test: {kills} kills, seed {seed:#x}");

    // Dropped in reverse: drivers first, then the filesystem, then the rest.
    let work = Workdir::new("hostpath-csi-rescan");
    let root = work.path().to_path_buf();
    std::fs::create_dir_all(root.join("targets")).unwrap();
    // Where `PoolSpec::btrfs("bt")` expects its filesystem.
    let fs = BtrfsFs::new(&root.join("fs").join("bt"), 1 << 30);
    fs.enable_qgroups();
    let pools = [PoolSpec::btrfs("bt")];
    let pool: PathBuf = pools[0].dir_in(&root);
    let target = root.join("targets").join("a");

    let mut driver = Driver::start(&root, &pools).await;
    let a = create(&driver.socket, "pvc-a", 16 * MIB).await.unwrap();
    create(&driver.socket, "pvc-b", 16 * MIB).await.unwrap();
    write_file(&pool.join("pvc-a/data"), 8 << 20).unwrap();
    driver.kill();
    // A rescan of seconds, so kills can land inside it (6,000 files and
    // 100 snapshots took from 3 to 8 s here, depending on the load: too
    // short on a quiet machine).
    fs.ballast(10_000, 150);
    fs.make_inconsistent();
    // The kernel no longer holds the limit: 8 + 32 MiB in a 16 MiB volume.
    write_file(&pool.join("pvc-a/over"), 32 << 20)
        .expect("the kernel enforced the limit; this test no longer shows the failure");

    let started = std::time::Instant::now();
    let (mut killed_during, mut checked_during, mut crashed) = (0, 0, false);
    for round in 0..kills {
        let mut driver = Driver::spawn(&root, &pools);
        if round < 2 {
            // Killed while it may still be opening the pool: before,
            // while or after it starts the rescan.
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        } else {
            driver.wait_ready(Duration::from_secs(30)).await;
            if !fs.rescan_running() {
                break;
            }
            publish(&driver.socket, &a.volume_id, &target).await;
            if reports_the_rescan(&driver.socket, &fs, &pool, &a.volume_id, &target).await {
                checked_during += 1;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        }
        let running = fs.rescan_running();
        driver.kill();
        if running {
            killed_during += 1;
        }
        if round == 2 && fs.rescan_running() {
            // The node goes down: its mounts go, the filesystem is
            // unmounted mid-rescan. The next mount resumes the rescan.
            let _ = nix::mount::umount(&target);
            fs.remount();
            assert!(
                fs.rescan_running() && fs.inconsistent(),
                "the rescan did not resume after the filesystem was mounted again"
            );
            crashed = true;
        }
    }
    eprintln!(
        "{killed_during} kills during the rescan, {checked_during} checks during it, node crash: {crashed}"
    );
    assert!(
        killed_during >= 3 && checked_during >= 1 && crashed,
        "the rescan was too quick for the test: {killed_during} kills and {checked_during} \
         checks during it, crash {crashed}"
    );

    // A driver that sees the rescan through.
    let driver = Driver::start(&root, &pools).await;
    fs.wait_for_rescan();
    eprintln!(
        "the rescan ended {:?} after the first driver started",
        started.elapsed()
    );
    assert!(!fs.inconsistent(), "still inconsistent after the rescan");
    // The test never started a rescan and the kernel does not start one
    // at mount, so the one that ran was a driver's; the restarted drivers
    // found it running and started no other. (The first may have been
    // killed between starting it and saying so.)
    let log = std::fs::read_to_string(&driver.log).unwrap();
    assert!(
        log.matches("started a qgroup rescan").count() <= 1,
        "more than one rescan started; log:\n{log}"
    );
    assert!(!log.contains("starting a rescan failed"), "{log}");

    // Usage is what is on disk: 40 MiB in the 16 MiB volume, and no more
    // can be written until it is below its size.
    publish(&driver.socket, &a.volume_id, &target).await;
    let (used, total, abnormal) = stats(&driver.socket, &a.volume_id, &target).await;
    assert_eq!(abnormal, None);
    assert_eq!(total, 16 * MIB);
    assert!((used - 40 * MIB).abs() < MIB, "used {used}");
    edquot(write_file(&target.join("more"), 1 << 20));
    std::fs::remove_file(target.join("over")).unwrap();
    let _ = std::fs::remove_file(target.join("more"));
    let written = edquot(write_file(&target.join("more"), 16 << 20));
    assert!(
        written <= 8 << 20,
        "{written} bytes written next to 8 MiB in 16 MiB"
    );
    let (used, _, _) = stats(&driver.socket, &a.volume_id, &target).await;
    assert!(used <= 16 * MIB && used > 14 * MIB, "used {used}");

    // Expansion and new volumes work, with limits.
    let r = controller(&driver.socket)
        .await
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: a.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 48 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 48 * MIB);
    write_file(&target.join("after-expand"), 24 << 20).unwrap();
    assert!(available(&driver.socket).await > 0);
    let c = create(&driver.socket, "pvc-c", 8 * MIB).await.unwrap();
    edquot(write_file(&pool.join("pvc-c/f"), 16 << 20));

    // Nothing leaked or lost.
    let vols: BTreeSet<String> = ["pvc-a", "pvc-b", "pvc-c"].map(String::from).into();
    assert_eq!(
        names(&pool, |n| (!n.starts_with('.')).then(|| n.to_string())),
        vols
    );
    assert_eq!(
        names(&pool, |n| n
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".meta"))
            .map(String::from)),
        vols
    );
    let in_pool: BTreeSet<String> = fs
        .qgroups()
        .into_iter()
        .filter_map(|(_, path)| path.strip_prefix("pool/").map(String::from))
        .collect();
    assert_eq!(in_pool, vols, "qgroups of the pool's subvolumes");

    node(&driver.socket)
        .await
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: a.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    let mut ctrl = controller(&driver.socket).await;
    for id in [&a.volume_id, &c.volume_id, &"bt:pvc-b".to_string()] {
        ctrl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("deleting {id}: {e:?}"));
    }
    assert!(names(&pool, |n| Some(n.to_string())).is_empty());
}

/// The quota mode of each btrfs pool is in the driver's log when the pool
/// opens: simple quotas on a filesystem without quotas (on a kernel that
/// has them), full qgroups kept on one that has them already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_names_each_pools_quota_mode() {
    if !common::root_or_skip("it makes a loop-mounted btrfs filesystem") {
        return;
    }
    if !have("btrfs") || !have("mkfs.btrfs") {
        common::skip("btrfs-progs is not installed");
        return;
    }
    let work = Workdir::new("hostpath-csi-quota-mode");
    let root = work.path().to_path_buf();
    let fresh = BtrfsFs::new(&root.join("fs").join("fresh"), 256 << 20);
    let admin = BtrfsFs::new(&root.join("fs").join("admin"), 256 << 20);
    admin.enable_qgroups();
    let pools = [PoolSpec::btrfs("fresh"), PoolSpec::btrfs("admin")];
    let mut driver = Driver::spawn_logging(&root, &pools, "info");
    driver.wait_ready(Duration::from_secs(30)).await;
    // Without the colours the human format puts around field names.
    let log = strip_ansi(&std::fs::read_to_string(&driver.log).unwrap());
    let line = |pool: &str| {
        log.lines()
            .find(|l| l.contains("quota_mode=") && l.contains(&format!("/fs/{pool}/pool")))
            .unwrap_or_else(|| panic!("no quota mode for pool {pool} in the log:\n{log}"))
            .to_string()
    };
    let want = if btrfs_support::kernel_has_simple_quotas() {
        "quota_mode=simple"
    } else {
        "quota_mode=qgroup"
    };
    assert!(line("fresh").contains(want), "{}", line("fresh"));
    assert!(
        line("admin").contains("quota_mode=qgroup"),
        "{}",
        line("admin")
    );
    assert_eq!(
        fresh.mode(),
        if want.ends_with("simple") {
            "squota"
        } else {
            "qgroup"
        }
    );
    assert_eq!(admin.mode(), "qgroup");
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
