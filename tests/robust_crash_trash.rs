//! Crash test of archive on delete: the real binary is killed with SIGKILL
//! while DeleteVolume moves volumes into the trash, and again while its
//! sweep purges the ones whose retention ran out; each time it is
//! restarted and every unfinished delete retried, as a CO does. At the end
//! every volume kept for an hour is in the trash exactly once with its data
//! intact, every volume kept for a second is gone, and nothing is left
//! half-made: no record, volume directory, half-made trash entry, mount,
//! loop device or subvolume.
//!
//! Per pool kind: `dir`, `btrfs` and `image` (ext4), the last two on
//! loop-mounted filesystems the test makes (root; btrfs-progs, e2fsprogs).
//! `HOSTPATH_CSI_CRASH_ROUNDS` sets the kills during archiving (default 6),
//! `HOSTPATH_CSI_CRASH_SEED` the seed.

mod common;
mod robust_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use hostpath_csi::config::PoolKind;
use hostpath_csi::volume::TrashMeta;
use robust_support::{
    Driver, LoopFs, PoolSpec, Rng, Workdir, connect_once, env_u64, have, loops_below, make_canary,
    mounts_below, run, tree_digest,
};

const MIB: i64 = 1 << 20;
/// Volumes per round; the first is kept for a second, the others an hour.
const PER_ROUND: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_archive_and_purge_survive_sigkill() {
    trash_crash(PoolSpec::dir("a")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_archive_and_purge_survive_sigkill() {
    if !may_mount() || !have("btrfs") || !have("mkfs.btrfs") {
        eprintln!("skipped: needs root and btrfs-progs");
        return;
    }
    trash_crash(PoolSpec::btrfs("bt")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_archive_and_purge_survive_sigkill() {
    if !may_mount() || !have("mkfs.ext4") || !have("losetup") {
        eprintln!("skipped: needs root and e2fsprogs, util-linux");
        return;
    }
    trash_crash(PoolSpec::image("img", "ext4")).await;
}

fn may_mount() -> bool {
    let root = nix::unistd::geteuid().is_root();
    assert!(
        root || std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "this test needs root (loop devices, mounts)"
    );
    root
}

fn archive_request(name: &str, pool: &str, retention: &str) -> csi::CreateVolumeRequest {
    let mut r = common::create_request(name, pool, 32 * MIB);
    r.parameters.insert("onDelete".into(), "archive".into());
    r.parameters
        .insert("archiveRetention".into(), retention.into());
    r
}

async fn controller(d: &Driver) -> ControllerClient<tonic::transport::Channel> {
    ControllerClient::new(connect_once(&d.socket).await.unwrap())
}

/// Deletes `id` until it succeeds, as a CO retries (ABORTED while a sweep
/// holds the volume, say).
async fn delete_until_done(d: &Driver, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = controller(d)
            .await
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying delete of {id}: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("delete of {id} never succeeded: {e:?}\n{}", d.log_tail()),
        }
    }
}

/// The digest of a volume's data as archived: a directory or subvolume
/// directly, an image through a read-only mount of it.
fn archived_digest(data: &Path, kind: PoolKind, scratch: &Path) -> String {
    if kind != PoolKind::Image {
        return tree_digest(data, &[]);
    }
    std::fs::create_dir_all(scratch).unwrap();
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop,ro,noload".as_ref(),
            data.as_os_str(),
            scratch.as_os_str(),
        ],
    );
    let d = tree_digest(scratch, &["lost+found"]);
    run("umount", &[scratch]);
    d
}

async fn trash_crash(spec: PoolSpec) {
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 12);
    let rounds = env_u64("HOSTPATH_CSI_CRASH_ROUNDS", 6);
    eprintln!("{}: seed {seed}, {rounds} rounds", spec.name);
    let mut rng = Rng::new(seed);
    let work = Workdir::new("hpc-trash-crash-");
    let root = work.path();
    let _fs = spec
        .own_fs()
        .map(|(kind, bytes)| LoopFs::new(root, spec.name, kind, bytes));
    let pool = spec.dir_in(root);
    let pools = [spec.clone()];
    let mut driver = Driver::start(root, &pools).await;

    // Volumes kept an hour: their data must survive in the trash.
    let mut kept: BTreeMap<String, String> = BTreeMap::new();
    let mut short: BTreeSet<String> = BTreeSet::new();
    let mut kills = 0;
    let mut states: BTreeMap<&str, u32> = BTreeMap::new();
    for round in 0..rounds {
        let mut ids = Vec::new();
        for i in 0..PER_ROUND {
            let name = format!("pvc-r{round}-{i}");
            let retention = if i == 0 { "1s" } else { "1h" };
            let v = controller(&driver)
                .await
                .create_volume(archive_request(&name, spec.name, retention))
                .await
                .unwrap_or_else(|e| panic!("create {name}: {e:?}"))
                .into_inner()
                .volume
                .unwrap();
            let dir = pool.join(&name);
            make_canary(&dir.join("canary"));
            std::fs::write(dir.join("blob"), vec![round as u8; 1 << 20]).unwrap();
            let digest = tree_digest(&dir, &["lost+found"]);
            if i == 0 {
                short.insert(name);
            } else {
                kept.insert(name, digest);
            }
            ids.push(v.volume_id);
        }
        // All deletes at once, and a kill somewhere in them.
        let mut calls = Vec::new();
        for id in &ids {
            let socket = driver.socket.clone();
            let id = id.clone();
            calls.push(tokio::spawn(async move {
                let mut c = ControllerClient::new(connect_once(&socket).await.ok()?);
                c.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await
                .ok()
            }));
        }
        tokio::time::sleep(Duration::from_micros(rng.below(30_000))).await;
        driver.kill();
        kills += 1;
        for c in calls {
            let _ = c.await;
        }
        // Where the kill left each volume: not touched yet (record, data
        // in place), half-way (record, and its trash entry), or done.
        for id in &ids {
            let token = id.split_once(':').unwrap().1;
            let record = pool.join(format!(".{token}.meta")).exists();
            let entry = std::fs::read_dir(pool.join(".trash"))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().contains(token))
                })
                .unwrap_or(false);
            *states
                .entry(match (record, entry) {
                    (true, false) => "untouched",
                    (true, true) => "half-way",
                    (false, _) => "done",
                })
                .or_insert(0) += 1;
        }
        driver = Driver::start(root, &pools).await;
        for id in &ids {
            delete_until_done(&driver, id).await;
        }
    }

    // Kills while the sweep purges the expired ones (at start and after).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..4 {
        driver.kill();
        kills += 1;
        driver = Driver::spawn(root, &pools);
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
    }
    driver.wait_ready(Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let entries = loop {
        let entries = trash(&pool);
        let gone = entries.values().all(|(_, m)| !short.contains(&m.token));
        // No entry without meta (half-made, or half-purged) either.
        let all = std::fs::read_dir(pool.join(".trash")).map_or(0, |d| d.count());
        if gone && all == entries.len() {
            break entries;
        }
        assert!(
            Instant::now() < deadline,
            "expired entries not purged: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "{}: {kills} kills, {} volumes kept in the trash; deletes found after a kill: {states:?}",
        spec.name,
        kept.len()
    );

    // Exactly the kept volumes, once each, with their data.
    let tokens: Vec<&str> = entries.values().map(|(_, m)| m.token.as_str()).collect();
    let want: Vec<&str> = kept.keys().map(String::as_str).collect();
    let mut got = tokens.clone();
    got.sort();
    assert_eq!(got, want, "trash holds each kept volume once");
    for (name, (path, meta)) in &entries {
        assert_eq!(meta.record.name, meta.token, "{name}");
        let d = archived_digest(&path.join("data"), spec.kind, &root.join("check"));
        assert_eq!(d, kept[&meta.token], "data of {} changed", meta.token);
    }
    // Nothing else in the pool: no record, volume, scratch or half entry.
    let left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".trash")
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    assert!(mounts_below(&pool).is_empty(), "{:?}", mounts_below(&pool));
    assert!(loops_below(&pool).is_empty(), "{:?}", loops_below(&pool));
    if spec.kind == PoolKind::Btrfs {
        let list = run(
            "btrfs",
            &["subvolume".as_ref(), "list".as_ref(), pool.as_os_str()],
        );
        let subvols = list.lines().count();
        assert_eq!(
            subvols,
            kept.len(),
            "one subvolume per kept volume:\n{list}"
        );
    }
    drop(driver);
}

/// The pool's trash: entry name -> (path, meta). Every entry must have a
/// meta (an entry without one is a half-made one left behind).
fn trash(pool: &Path) -> HashMap<String, (PathBuf, TrashMeta)> {
    let Ok(rd) = std::fs::read_dir(pool.join(".trash")) else {
        return HashMap::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = std::fs::read(e.path().join("meta")).ok()?;
            Some((
                name,
                (e.path(), serde_json::from_slice(&meta).expect("meta reads")),
            ))
        })
        .collect()
}
