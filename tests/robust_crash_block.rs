//! Raw block volumes survive `kill -9` at any moment, in a pool of every
//! kind (`dir`, `btrfs`, `image`: a block volume is a sparse file in the
//! pool's directory whatever the kind, but the pool's filesystem differs,
//! and btrfs and image pools live on loop-mounted filesystems the test
//! makes, so their own loop devices sit beside the volumes'): the real
//! binary is killed while it creates a block volume's file, attaches its loop device
//! and binds the device node onto a target (publish), unbinds and detaches
//! it (unpublish), or deletes the volume; then it is restarted and the
//! interrupted call retried until it succeeds, as the kubelet and the
//! provisioner do. Half of the kills wait for the driver to be running a
//! tool (losetup) and strike within a few milliseconds; the others come
//! after a random delay.
//!
//! After every round, what a user would notice: each published volume has
//! exactly one loop device, backed by its file, bound at exactly the
//! targets published (no stale bind anywhere below the targets), each
//! showing what was written through the volume's first publication; no
//! unpublished or deleted volume has a device (a device a killed publish
//! attached is released by the retry or the startup sweep, within a few
//! seconds); no loop device below the pool belongs to no volume; the pool
//! holds exactly the files and records of the volumes made (no scratch
//! file of a killed create, no record without its file, nothing of a
//! deleted volume). At the end everything is unpublished and deleted: no
//! device, mount or file is left.
//!
//! Needs root (loop devices, bind mounts) and losetup; mkfs.btrfs and
//! mkfs.ext4 for the btrfs and image pools' filesystems. Rounds per kind:
//! `HOSTPATH_CSI_BLOCK_CRASH_ROUNDS` (default 40, about 12 s each), seed
//! `HOSTPATH_CSI_CRASH_SEED` (printed).

mod common;
mod robust_support;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi_proto as csi;
use robust_support::{
    Driver, LoopFs, PoolSpec, Rng, Rpc, Workdir, block_cap, children, connect_once, env_u64,
    error_chain, have, loops_below, mounts_below,
};
use tonic::Code;

const MIB: i64 = 1 << 20;
/// Block volumes the test works through at once.
const SLOTS: usize = 3;
/// Targets one volume is published at, at most.
const MAX_TARGETS: usize = 2;

/// One block volume name the test works through.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    created: bool,
    /// Where it is published now.
    targets: BTreeSet<PathBuf>,
    /// Publications so far (target names are never reused).
    publications: u32,
    /// What was last written at the start of the device.
    data: Option<Vec<u8>>,
}

impl Slot {
    fn name(&self, i: usize) -> String {
        format!("b{i}-g{}", self.generation)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Create,
    Publish(PathBuf),
    Unpublish(PathBuf),
    Delete,
}

struct Test {
    root: PathBuf,
    pools: Vec<PoolSpec>,
    pool: PathBuf,
    targets: PathBuf,
    driver: Driver,
    slots: Vec<Slot>,
}

impl Test {
    fn file(&self, i: usize) -> PathBuf {
        self.pool.join(self.slots[i].name(i))
    }

    fn choose(&mut self, rng: &mut Rng, i: usize) -> Op {
        let s = &self.slots[i];
        if !s.created {
            Op::Create
        } else if s.targets.is_empty() {
            if rng.chance(2, 3) {
                Op::Publish(self.new_target(i))
            } else {
                Op::Delete
            }
        } else if s.targets.len() < MAX_TARGETS && rng.chance(1, 3) {
            Op::Publish(self.new_target(i))
        } else {
            let t = s
                .targets
                .iter()
                .nth(rng.below(s.targets.len() as u64) as usize);
            Op::Unpublish(t.unwrap().clone())
        }
    }

    /// A target path slot `i` was never published at.
    fn new_target(&mut self, i: usize) -> PathBuf {
        let s = &mut self.slots[i];
        s.publications += 1;
        self.targets
            .join(format!("{}-t{}", s.name(i), s.publications))
    }

    /// Runs `op` on slot `i` once.
    async fn send(&self, i: usize, op: &Op) -> Result<(), tonic::Status> {
        send(
            self.driver.socket.clone(),
            self.slots[i].name(i),
            op.clone(),
        )
        .await
    }

    /// Retries `op` after a restart until it succeeds: ABORTED and
    /// UNAVAILABLE are what a CO retries; anything else fails the test.
    async fn retry(&self, i: usize, op: &Op) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.send(i, op).await {
                Ok(()) => return,
                Err(s) if matches!(s.code(), Code::Aborted | Code::Unavailable) => {
                    assert!(Instant::now() < deadline, "{op:?} on slot {i}: still {s:?}");
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(s) => panic!(
                    "{op:?} on slot {i} failed after the restart: {}\nlog:\n{}",
                    error_chain(&s),
                    self.driver.log_tail()
                ),
            }
        }
    }

    /// The model after `op` on slot `i` succeeded; data is written through
    /// a first publication and read back through every later one.
    fn apply(&mut self, i: usize, op: &Op) {
        let s = &mut self.slots[i];
        match op {
            Op::Create => s.created = true,
            Op::Publish(t) => {
                s.targets.insert(t.clone());
                match &s.data {
                    Some(d) => assert_eq!(
                        &read_start(t, d.len()),
                        d,
                        "{} does not show what was written",
                        t.display()
                    ),
                    None => {
                        let d = format!("{} publication {}\n", s.name(i), s.publications);
                        write_start(t, d.as_bytes());
                        s.data = Some(d.into_bytes());
                    }
                }
            }
            Op::Unpublish(t) => {
                s.targets.remove(t);
                assert!(
                    std::fs::symlink_metadata(t).is_err(),
                    "{} is still there after its unpublish",
                    t.display()
                );
            }
            Op::Delete => {
                *s = Slot {
                    generation: s.generation + 1,
                    ..Slot::default()
                };
            }
        }
    }

    /// What a user would notice, against the model; `Err` says what is
    /// wrong (the caller gives the startup sweep a moment first).
    fn check(&self) -> Result<(), String> {
        let mut devices = BTreeSet::new();
        for (i, s) in self.slots.iter().enumerate() {
            let file = self.file(i);
            let loops: Vec<PathBuf> = loops_below(&file).into_iter().map(|(d, _)| d).collect();
            if s.created != file.is_file() {
                return Err(format!("{}: file there: {}", s.name(i), file.is_file()));
            }
            if s.targets.is_empty() {
                if !loops.is_empty() {
                    return Err(format!("{} is not published but has {loops:?}", s.name(i)));
                }
                continue;
            }
            let [dev] = loops.as_slice() else {
                return Err(format!("{} is published with devices {loops:?}", s.name(i)));
            };
            let rdev = std::fs::metadata(dev).map_err(|e| e.to_string())?.rdev();
            for t in &s.targets {
                let m = std::fs::metadata(t).map_err(|e| format!("{}: {e}", t.display()))?;
                if !m.file_type().is_block_device() || m.rdev() != rdev {
                    return Err(format!("{} does not show {}", t.display(), dev.display()));
                }
                if let Some(d) = &s.data
                    && read_start(t, d.len()) != *d
                {
                    return Err(format!("{} lost what was written", t.display()));
                }
            }
            devices.insert(dev.clone());
        }
        let all: BTreeSet<PathBuf> = loops_below(&self.pool)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        if all != devices {
            return Err(format!(
                "loop devices below the pool {all:?}, published {devices:?}"
            ));
        }
        // No half-made or leaked volume: the pool holds the file and the
        // record (and use markers) of each volume made, and nothing else.
        let expected = |name: &str| {
            self.slots.iter().enumerate().any(|(i, s)| {
                let own = s.name(i);
                s.created
                    && (name == own
                        || [".meta", ".published", ".unpublished"]
                            .iter()
                            .any(|ext| name == format!(".{own}{ext}")))
            })
        };
        let stray: Vec<String> = common::entries(&self.pool)
            .into_iter()
            .filter(|n| !expected(n))
            .collect();
        if !stray.is_empty() {
            return Err(format!("in the pool, of no volume made: {stray:?}"));
        }
        for (i, s) in self.slots.iter().enumerate() {
            let record = self.pool.join(format!(".{}.meta", s.name(i)));
            if s.created && !record.is_file() {
                return Err(format!("{} has no record", s.name(i)));
            }
        }
        let binds: BTreeSet<PathBuf> = mounts_below(&self.targets).into_iter().collect();
        let want: BTreeSet<PathBuf> = self.slots.iter().flat_map(|s| s.targets.clone()).collect();
        if binds != want {
            return Err(format!(
                "binds below the targets {binds:?}, published {want:?}"
            ));
        }
        Ok(())
    }

    async fn check_soon(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.check() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("{what}: {e}\nlog:\n{}", self.driver.log_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn restart(&mut self) {
        self.driver.kill();
        self.driver = Driver::start(&self.root, &self.pools).await;
    }
}

/// Sends `op` on volume `name` once, on a connection of its own.
async fn send(socket: PathBuf, name: String, op: Op) -> Result<(), tonic::Status> {
    let ch = connect_once(&socket)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let id = format!("p:{name}");
    match op {
        Op::Create => {
            let mut req = common::create_request(&name, "p", 8 * MIB);
            req.volume_capabilities = vec![block_cap()];
            req.send(ch).await.map(drop)
        }
        Op::Publish(t) => {
            let req = csi::NodePublishVolumeRequest {
                volume_capability: Some(block_cap()),
                ..common::publish_request(&id, &t, false)
            };
            req.send(ch).await.map(drop)
        }
        Op::Unpublish(t) => {
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: id,
                target_path: t.display().to_string(),
            };
            req.send(ch).await.map(drop)
        }
        Op::Delete => {
            let req = csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            };
            req.send(ch).await.map(drop)
        }
    }
}

fn write_start(target: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_start(target: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(target).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volumes_in_a_dir_pool_survive_sigkill_at_random_points() {
    if may_attach() {
        crash(PoolSpec::dir("p")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volumes_in_a_btrfs_pool_survive_sigkill_at_random_points() {
    if may_attach() && have("mkfs.btrfs") && have("btrfs") {
        crash(PoolSpec::btrfs("p")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_volumes_in_an_image_pool_survive_sigkill_at_random_points() {
    if may_attach() && have("mkfs.ext4") {
        crash(PoolSpec::image("p", "ext4")).await;
    }
}

fn may_attach() -> bool {
    if !common::root_or_skip("block volumes are loop devices bound onto targets") {
        return false;
    }
    if !have("losetup") {
        common::skip("losetup (util-linux) is not installed");
        return false;
    }
    true
}

/// The kill-anywhere rounds on one pool named `p` of `spec`'s kind.
async fn crash(spec: PoolSpec) {
    let kind = spec.kind.as_str();
    let rounds = env_u64("HOSTPATH_CSI_BLOCK_CRASH_ROUNDS", 40);
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 0xb10c);
    let mut rng = Rng::new(seed);
    eprintln!("block crash test, {kind} pool: {rounds} kills, seed {seed:#x}");
    let work = Workdir::new("hostpath-csi-blockcrash");
    let root = work.path().to_path_buf();
    // btrfs and image pools get a filesystem of their own; its loop
    // device is the test's, not a volume's.
    let fs = spec
        .own_fs()
        .map(|(fs_kind, bytes)| LoopFs::new(&root, spec.name, fs_kind, bytes));
    let pools = vec![spec];
    let pool = pools[0].dir_in(&root);
    std::fs::create_dir_all(&pool).unwrap();
    let targets = root.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let driver = Driver::start(&root, &pools).await;
    let mut t = Test {
        root: root.clone(),
        pools,
        pool,
        targets,
        driver,
        slots: (0..SLOTS).map(|_| Slot::default()).collect(),
    };

    let (mut aimed, mut during_tool, mut interrupted) = (0, 0, 0);
    for round in 0..rounds {
        let i = rng.below(SLOTS as u64) as usize;
        let op = t.choose(&mut rng, i);
        let call = tokio::spawn(send(
            t.driver.socket.clone(),
            t.slots[i].name(i),
            op.clone(),
        ));
        if rng.chance(1, 2) {
            // Aimed: strike while the driver runs a tool for the call.
            aimed += 1;
            let until = Instant::now() + Duration::from_millis(500);
            while children(t.driver.pid()).is_empty()
                && Instant::now() < until
                && !call.is_finished()
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            during_tool += u64::from(!children(t.driver.pid()).is_empty());
            tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
        }
        t.driver.kill();
        let first = call.await.unwrap();
        t.restart().await;
        if first.is_err() {
            interrupted += 1;
            t.retry(i, &op).await;
        }
        eprintln!(
            "round {round}: {op:?} on {}: {}",
            t.slots[i].name(i),
            if first.is_ok() {
                "done before the kill"
            } else {
                "retried after the restart"
            }
        );
        t.apply(i, &op);
        t.check_soon(&format!("after round {round} ({op:?})")).await;
    }
    eprintln!(
        "block crash test, {kind} pool: {rounds} kills, {aimed} aimed ({during_tool} while the \
         driver ran a tool), {interrupted} calls interrupted and retried"
    );
    assert!(interrupted > 0, "no kill interrupted a call");

    // Everything goes; nothing is left.
    for i in 0..SLOTS {
        for target in t.slots[i].targets.clone() {
            let op = Op::Unpublish(target);
            t.retry(i, &op).await;
            t.apply(i, &op);
        }
        if t.slots[i].created {
            t.retry(i, &Op::Delete).await;
            t.apply(i, &Op::Delete);
        }
    }
    t.check_soon("at the end").await;
    let left = common::entries(&t.pool);
    assert!(left.is_empty(), "left in the pool: {left:?}");
    let own = fs.as_ref().map(|f| f.device.clone());
    let left: Vec<_> = loops_below(&root)
        .into_iter()
        .filter(|(d, _)| Some(d) != own.as_ref())
        .collect();
    assert!(left.is_empty(), "left attached: {left:?}");
    drop(t);
    drop(fs);
}
