//! Crash test: the real binary is killed with SIGKILL at random points
//! while several clients drive a mixed workload against it, then
//! restarted; every interrupted call is retried until it succeeds, as a CO
//! does. A model of what was acknowledged is checked against the pools,
//! ListVolumes and the data written through published targets.
//!
//! It runs per pool kind: `dir`, `btrfs` (on a loop-mounted btrfs the test
//! makes) and `image` (xfs images, which grow online). Where the driver
//! advertises expansion, the workload includes ControllerExpandVolume and
//! NodeExpandVolume (at once when the volume is published, else at its
//! next publication, as kubelet does). Half of the kills wait for a
//! create, delete or expansion to be under way, so every kind is killed
//! in the middle of each. The end state must hold exactly the
//! acknowledged volumes, each once (ListVolumes, record, subvolume or
//! image) with its data and capacity, and no half-made subvolume, image,
//! scratch file, loop device or mount; image volumes keep exactly their
//! own loop-mounted image at `<pool>/<token>`.
//!
//! Tunables (environment): `HOSTPATH_CSI_CRASH_ROUNDS` (kills per kind,
//! default 30 for dir and 12 for btrfs and image, which cost more per
//! call), `HOSTPATH_CSI_CRASH_SEED` (default fixed, printed), and
//! `HOSTPATH_CSI_CRASH_CLIENTS` (default 6). The pools are a parameter
//! ([`crash_test`]), so other pool kinds get the same test by adding a
//! `#[tokio::test]` with their [`PoolSpec`]s.
//!
//! # Layout
//! - `main.rs`: the tests, and the run that starts, kills and restarts the
//!   driver while the clients work ([`crash_test`]);
//! - `model.rs`: what the clients and the killer share, and the model of
//!   each volume a client works through ([`model::Slot`]);
//! - `workload.rs`: a client ([`workload::Client`]): the calls it makes,
//!   retried after every crash as a CO would;
//! - `checks.rs`: the end state against the model (pools, records,
//!   subvolumes, images, mounts, loop devices, quotas, data);
//! - `sweep.rs`: retried calls racing the startup sweep of leftovers;
//! - `busy.rs`: an unpublish while a process (such as a killed driver's
//!   child) still uses the target.

#[path = "../btrfs_support/mod.rs"]
mod btrfs_support;
mod busy;
mod checks;
#[path = "../common/mod.rs"]
mod common;
mod model;
#[path = "../robust_support/mod.rs"]
mod robust_support;
mod sweep;
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::controller_service_capability::rpc::Type as CtrlRpc;
use csi_proto::node_client::NodeClient;
use csi_proto::node_service_capability::rpc::Type as NodeRpc;
use hostpath_csi::config::PoolKind;

use crate::checks::*;
use crate::model::*;
use crate::robust_support::{
    Driver, LoopFs, PoolSpec, Rng, Workdir, env_u64, have, loops_below, make_canary, mounts_below,
    tree_digest,
};
use crate::sweep::*;
use crate::workload::*;

const MIB: i64 = 1 << 20;
/// Top-level entries of the work directory the driver may change.
/// (`fs` holds the test's own loop-mounted filesystems.)
const DRIVER_OWNED: &[&str] = &[
    "pools",
    "fs",
    "targets",
    "csi.sock",
    "driver.log",
    "pools.toml",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_pools_survive_sigkill_at_random_points() {
    if !common::root_or_skip(
        "the pools live on loop-mounted filesystems and volumes are published with bind mounts",
    ) {
        return;
    }
    crash_test(&[PoolSpec::dir("a"), PoolSpec::dir("b")], 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_pools_survive_sigkill_at_random_points() {
    if !common::root_or_skip(
        "the pools live on loop-mounted filesystems and volumes are published with bind mounts",
    ) {
        return;
    }
    if !have("btrfs") || !have("mkfs.btrfs") {
        common::skip("btrfs-progs is not installed");
        return;
    }
    crash_test(&[PoolSpec::btrfs("bt")], 12).await;
}

/// The same on a filesystem whose administrator turned on full qgroup
/// accounting before the driver came: the driver keeps that mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_qgroup_pools_survive_sigkill_at_random_points() {
    if !common::root_or_skip(
        "the pools live on loop-mounted filesystems and volumes are published with bind mounts",
    ) {
        return;
    }
    if !have("btrfs") || !have("mkfs.btrfs") {
        common::skip("btrfs-progs is not installed");
        return;
    }
    crash_test(&[PoolSpec::btrfs_qgroups("bt")], 12).await;
}

/// Image volumes: mkfs, losetup and mount run inside the calls killed.
/// This test once failed intermittently (2 of 6 runs with the default
/// seed; seed 4 more often): a `losetup --find --nooverlap` started by a
/// driver that was then killed kept running, lost its race for a free
/// device to the restarted driver's retry, and attached a second, idle
/// device to the image after the retried call had mounted it. Since tools
/// die with the driver (`setpriv --pdeathsig`, src/sys/cmd.rs) and a stray
/// device on a mounted image is released, it passed every run here
/// (2026-12-02: 6 with the default seed, 3 with seed 4, and 19 runs of 30
/// kills with other seeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_pools_survive_sigkill_at_random_points() {
    if !common::root_or_skip(
        "the pools live on loop-mounted filesystems and volumes are published with bind mounts",
    ) {
        return;
    }
    if !have("mkfs.xfs") || !have("xfs_growfs") {
        common::skip("xfsprogs is not installed");
        return;
    }
    // xfs: it grows online without CAP_SYS_RESOURCE, which ext4 needs.
    crash_test(&[PoolSpec::image("img", "xfs")], 12).await;
}

/// What a pool looks like after a kill in the middle of calls: deletes
/// that parked their volume (`.<token>.deleting`) but kept the record, and
/// creates that left a half-written record (`.<token>.meta.tmp`). The CO
/// retries those calls as soon as the driver is back, while the driver's
/// startup sweep is removing leftovers; the retries must simply succeed.
/// The race is timing-dependent, so the scenario runs a few times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_calls_do_not_race_the_startup_sweep() {
    if !common::root_or_skip(
        "the pools live on loop-mounted filesystems and volumes are published with bind mounts",
    ) {
        return;
    }
    let mut errors = Vec::new();
    for _ in 0..3 {
        errors.extend(sweep_scenario().await);
    }
    assert!(
        errors.is_empty(),
        "{} retried calls failed while the startup sweep ran:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

async fn capabilities(socket: &Path) -> (bool, bool) {
    let ch = robust_support::connect_once(socket).await.unwrap();
    let c = ControllerClient::new(ch.clone())
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let n = NodeClient::new(ch)
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ctrl = c.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type == CtrlRpc::ExpandVolume as i32)
    });
    let node = n.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == NodeRpc::ExpandVolume as i32)
    });
    (ctrl, node)
}

/// The whole test, for any set of pools; `default_rounds` kills unless
/// `HOSTPATH_CSI_CRASH_ROUNDS` says otherwise.
async fn crash_test(pools: &[PoolSpec], default_rounds: u64) {
    let rounds = env_u64("HOSTPATH_CSI_CRASH_ROUNDS", default_rounds);
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 0x5eed_0005);
    let clients = env_u64("HOSTPATH_CSI_CRASH_CLIENTS", 6) as usize;
    let kinds: Vec<&str> = pools.iter().map(|p| p.kind.as_str()).collect();
    eprintln!("crash test {kinds:?}: {rounds} kills, {clients} clients, seed {seed:#x}");
    let started = Instant::now();
    let mut rng = Rng::new(seed);

    // Declared in this order so they drop in reverse: the driver is
    // killed first, then the test's filesystems go, then whatever is left
    // below the work directory (mounts, loop devices, files).
    let work = Workdir::new("hostpath-csi-crash");
    let root = work.path().to_path_buf();
    let _keep_log = KeepLog(root.join("driver.log"), kinds.join("-"));
    std::fs::create_dir_all(root.join("targets")).unwrap();
    make_canary(&root.join("canary"));
    let canary_before = tree_digest(&root, DRIVER_OWNED);
    // btrfs and image pools get a filesystem of their own (sparse; see
    // `PoolSpec::own_fs`).
    let own_fs: Vec<LoopFs> = pools
        .iter()
        .filter_map(|p| p.own_fs().map(|(kind, bytes)| (p, kind, bytes)))
        .map(|(p, kind, bytes)| {
            let fs = LoopFs::new(&root, p.name, kind, bytes);
            if p.full_qgroups {
                btrfs_support::enable_qgroups(&fs.mount);
            }
            fs
        })
        .collect();

    // A first run to learn what the driver advertises.
    let mut driver = Driver::start(&root, pools).await;
    let (ctrl_expand, node_expand) = capabilities(&driver.socket).await;
    eprintln!("expansion advertised: controller {ctrl_expand}, node {node_expand}");
    let mut infos = Vec::new();
    for p in pools {
        infos.push(PoolInfo {
            name: p.name,
            kind: p.kind,
            filesystem: p.filesystem,
            full_qgroups: p.full_qgroups,
            dir: p.dir_in(&root),
            // 18 volumes of up to 33 MiB, with some expansions, fit the
            // 1 GiB btrfs; images are 300 MiB (xfs) whatever is asked.
            max_mib: if p.kind == PoolKind::Btrfs { 32 } else { 64 },
            min_bytes: minimum_size(&driver.socket, p.name).await,
        });
    }

    let shared = Arc::new(Shared {
        socket: root.join("csi.sock"),
        root: root.clone(),
        pools: infos,
        generation: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        controller_expand: AtomicBool::new(ctrl_expand),
        node_expand: AtomicBool::new(node_expand),
        counts: Counts::default(),
        in_flight: Mutex::new(BTreeMap::new()),
        interrupted: Mutex::new(BTreeMap::new()),
        unexpected: Mutex::new(Vec::new()),
        killed: Mutex::new(BTreeMap::new()),
        transport: Mutex::new(BTreeMap::new()),
    });
    shared.counts.runs.fetch_add(1, SeqCst);

    let mut handles = Vec::new();
    for c in 0..clients {
        let slots = (0..3)
            .map(|index| Slot {
                client: c,
                index,
                generation: 0,
                state: State::Absent,
                pool: pools[0].name,
                capacity: 0,
                data: None,
                target: None,
                publications: 0,
                node_expand_due: false,
            })
            .collect();
        let client = Client {
            shared: Arc::clone(&shared),
            rng: Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1)),
            conn: None,
            slots,
            deleted: Vec::new(),
        };
        handles.push(tokio::spawn(client.run()));
    }

    // Calls a kill may wait for, so that each is interrupted on every kind.
    let mut aimed_at = vec!["CreateVolume", "DeleteVolume"];
    if ctrl_expand {
        aimed_at.push("ControllerExpandVolume");
    }
    if node_expand {
        aimed_at.push("NodeExpandVolume");
    }

    // The killer: let the driver serve for a random short while, kill it,
    // start it again. Some kills land while the pools are still opening
    // or the leftovers are being swept; half wait for one of `aimed_at`
    // to be under way (for up to a second) and kill within a few ms.
    let mut aimed = 0u64;
    for round in 0..rounds {
        if round > 0 {
            driver = Driver::spawn(&root, pools);
            shared.counts.runs.fetch_add(1, SeqCst);
            if rng.chance(3, 4) {
                driver.wait_ready(Duration::from_secs(20)).await;
            }
        }
        let delay = if rng.chance(1, 5) {
            rng.below(30)
        } else {
            20 + rng.below(250)
        };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        if rng.chance(1, 2) {
            let rpc = aimed_at[rng.below(aimed_at.len() as u64) as usize];
            let until = Instant::now() + Duration::from_secs(1);
            while shared.in_flight(rpc) == 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(8))).await;
            aimed += 1;
        }
        shared.generation.fetch_add(1, SeqCst);
        shared.note_interrupted();
        if let Some(status) = driver.exited() {
            shared.unexpected(format!("the driver exited by itself: {status}"));
        }
        let children = robust_support::children(driver.pid());
        shared.killed.lock().unwrap().insert(driver.pid(), children);
        driver.kill();
        shared.generation.fetch_add(1, SeqCst);
        shared.counts.kills.fetch_add(1, SeqCst);
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
    }
    driver = Driver::start(&root, pools).await;
    shared.counts.runs.fetch_add(1, SeqCst);
    // Let the clients finish the calls they are retrying.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(status) = driver.exited() {
        shared.unexpected(format!("the driver exited by itself: {status}"));
    }
    shared.stop.store(true, SeqCst);
    let mut slots = Vec::new();
    let mut deleted = Vec::new();
    for h in handles {
        let m = h.await.expect("client task panicked");
        slots.extend(m.slots);
        deleted.extend(m.deleted);
    }
    let alive_at_end = slots.iter().filter(|s| s.state != State::Absent).count();

    verify(&shared, &driver, &slots, &deleted, &own_fs).await;

    // With the test's own filesystems gone too, nothing is mounted or
    // attached below the work directory any more.
    // The test's filesystems go with a plain unmount, after waiting for
    // whatever still uses them (a killed driver's leftover children, see
    // `wait_unused`). The lazy unmount of `LoopFs::drop` left the release
    // to the kernel's own pace: twice in 70 btrfs runs at load 11-17
    // (2026-12-02) its loop device was still attached after the 5 s
    // below, with no process using the mount just before, and gone soon
    // after ("left at the end: loop devices [/dev/loop0 on fs/bt.img]").
    drop(driver);
    for fs in &own_fs {
        let waited_for = common::unmount_when_unused(&fs.mount, Duration::from_secs(30));
        if !waited_for.is_empty() {
            eprintln!("waited for users of {}: {waited_for:?}", fs.mount.display());
        }
    }
    drop(own_fs);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(mounts_below(&root).is_empty() && loops_below(&root).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "left at the end: mounts {:?}, loop devices {:?}",
            mounts_below(&root),
            loops_below(&root)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        tree_digest(&root, DRIVER_OWNED),
        canary_before,
        "something outside the pools and targets changed"
    );
    let c = &shared.counts;
    let interrupted = shared.interrupted.lock().unwrap().clone();
    eprintln!(
        "crash test {kinds:?}: {} runs, {} kills ({aimed} aimed at a call), {} calls, \
         {} calls retried ({} failed attempts, {} with a broken connection, {} of them \
         accepted by a killed driver before the next one replaced the socket file); \
         acknowledged: {} creates, {} deletes, \
         {} publishes, {} unpublishes, {} controller expands, {} node expands, {} reads; \
         {alive_at_end} volumes alive at the end; attempts under way at a kill: {interrupted:?}; \
         wall time {:.1} s",
        c.runs.load(SeqCst),
        c.kills.load(SeqCst),
        c.calls.load(SeqCst),
        c.calls_retried.load(SeqCst),
        c.failed_attempts.load(SeqCst),
        c.transport_errors.load(SeqCst),
        c.to_killed_same_file.load(SeqCst),
        c.creates.load(SeqCst),
        c.deletes.load(SeqCst),
        c.publishes.load(SeqCst),
        c.unpublishes.load(SeqCst),
        c.expands.load(SeqCst),
        c.node_expands.load(SeqCst),
        c.reads.load(SeqCst),
        started.elapsed().as_secs_f64(),
    );
    for (why, n) in shared.transport.lock().unwrap().iter() {
        eprintln!("  transport errors, {n:>4}: {why}");
    }
    let unexpected = shared.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} answers no crash explains:\n{}",
        unexpected.len(),
        unexpected.join("\n"),
    );
    assert!(c.kills.load(SeqCst) >= rounds.min(1), "no kill happened");
    // The workload must really have done what it claims to test: volumes
    // made, published and deleted, and kills landing during the aimed calls.
    for (what, n) in [
        ("creates", c.creates.load(SeqCst)),
        ("deletes", c.deletes.load(SeqCst)),
        ("publishes", c.publishes.load(SeqCst)),
    ] {
        assert!(n > 0, "no acknowledged {what}: the workload did not run");
    }
    if rounds > 0 {
        let hit: u64 = aimed_at
            .iter()
            .filter_map(|rpc| interrupted.get(*rpc))
            .sum();
        assert!(
            hit > 0,
            "no kill landed during any of {aimed_at:?}: {interrupted:?}"
        );
    }
}

/// Copies the driver's log (all runs) to `$HOSTPATH_CSI_CRASH_LOG_DIR`,
/// if set, when the test ends, however it ends.
struct KeepLog(PathBuf, String);

impl Drop for KeepLog {
    fn drop(&mut self) {
        if let Some(dir) = std::env::var_os("HOSTPATH_CSI_CRASH_LOG_DIR") {
            let to = Path::new(&dir).join(format!("crash-{}.log", self.1));
            let _ = std::fs::create_dir_all(&dir);
            match std::fs::copy(&self.0, &to) {
                Ok(_) => eprintln!("driver log kept at {}", to.display()),
                Err(e) => eprintln!("keeping the driver log at {}: {e}", to.display()),
            }
        }
    }
}

/// GetCapacity's minimum volume size for a pool.
async fn minimum_size(socket: &Path, pool: &str) -> i64 {
    let ch = robust_support::connect_once(socket).await.unwrap();
    ControllerClient::new(ch)
        .get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("pool".into(), pool.into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .minimum_volume_size
        .unwrap_or(0)
}
