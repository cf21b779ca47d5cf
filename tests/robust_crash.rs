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

mod btrfs_support;
mod common;
mod robust_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::controller_service_capability::rpc::Type as CtrlRpc;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use csi_proto::node_service_capability::rpc::Type as NodeRpc;
use csi_proto::volume_capability::access_mode::Mode;
use hostpath_csi::config::PoolKind;
use hostpath_csi::volume::id::token_for_name;
use hostpath_csi::volume::record::Record;
use robust_support::{
    Driver, LoopFs, PoolSpec, Rng, Workdir, env_u64, have, loop_autoclear, loops_below,
    make_canary, mounts_below, pool_dir, run, tree_digest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

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
    crash_test(&[PoolSpec::dir("a"), PoolSpec::dir("b")], 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_pools_survive_sigkill_at_random_points() {
    if !have("btrfs") || !have("mkfs.btrfs") {
        eprintln!("skipped: btrfs-progs is not installed");
        return;
    }
    crash_test(&[PoolSpec::btrfs("bt")], 12).await;
}

/// The same on a filesystem whose administrator turned on full qgroup
/// accounting before the driver came: the driver keeps that mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_qgroup_pools_survive_sigkill_at_random_points() {
    if !have("btrfs") || !have("mkfs.btrfs") {
        eprintln!("skipped: btrfs-progs is not installed");
        return;
    }
    crash_test(&[PoolSpec::btrfs_qgroups("bt")], 12).await;
}

/// Fails intermittently (2 of 6 runs with the default seed; seed 4 more
/// often): a `losetup --find --nooverlap` started by a driver that is then
/// killed keeps running, loses its race for a free device to the
/// restarted driver's retry, sleeps 200 ms (util-linux retries on EBUSY
/// without checking for overlap again) and attaches a second, idle device
/// without auto-clear to the image after the retried call has mounted it
/// and tidied up. Nothing removes it until the volume is unpublished,
/// stat'ed or deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_pools_survive_sigkill_at_random_points() {
    if !have("mkfs.xfs") || !have("xfs_growfs") {
        eprintln!("skipped: xfsprogs is not installed");
        return;
    }
    // xfs: it grows online without CAP_SYS_RESOURCE, which ext4 needs.
    crash_test(&[PoolSpec::image("img", "xfs")], 12).await;
}

/// Counters printed at the end.
#[derive(Default)]
struct Counts {
    runs: AtomicU64,
    kills: AtomicU64,
    calls: AtomicU64,
    calls_retried: AtomicU64,
    failed_attempts: AtomicU64,
    /// Failed attempts with a broken connection that no kill explains.
    transport_errors: AtomicU64,
    creates: AtomicU64,
    deletes: AtomicU64,
    publishes: AtomicU64,
    unpublishes: AtomicU64,
    expands: AtomicU64,
    node_expands: AtomicU64,
    reads: AtomicU64,
}

/// What the clients and the checks know about a pool.
#[derive(Debug, Clone)]
struct PoolInfo {
    name: &'static str,
    kind: PoolKind,
    /// Image pools: the images' filesystem.
    filesystem: Option<&'static str>,
    /// btrfs pools: on full qgroups rather than the driver's choice.
    full_qgroups: bool,
    dir: PathBuf,
    /// Creates ask for 1 to this many MiB.
    max_mib: u64,
    /// Smallest volume the pool makes (GetCapacity); smaller requests
    /// are rounded up to it.
    min_bytes: i64,
}

/// What all clients and the killer share.
struct Shared {
    root: PathBuf,
    socket: PathBuf,
    pools: Vec<PoolInfo>,
    /// Bumped just before every kill and again once the process is reaped
    /// (so it is odd while a kill is under way): an attempt that saw it
    /// change or odd may have been interrupted by the crash, whatever error
    /// it got.
    generation: AtomicU64,
    stop: AtomicBool,
    controller_expand: AtomicBool,
    node_expand: AtomicBool,
    counts: Counts,
    /// Attempts under way, per RPC.
    in_flight: Mutex<BTreeMap<String, u64>>,
    /// Attempts under way when the driver was killed, per RPC.
    interrupted: Mutex<BTreeMap<String, u64>>,
    /// Answers the driver gave that no crash explains.
    unexpected: Mutex<Vec<String>>,
}

impl Shared {
    fn unexpected(&self, what: String) {
        eprintln!("UNEXPECTED: {what}");
        self.unexpected.lock().unwrap().push(what);
    }

    fn pool(&self, name: &str) -> &PoolInfo {
        self.pools.iter().find(|p| p.name == name).unwrap()
    }

    fn in_flight(&self, rpc: &str) -> u64 {
        self.in_flight
            .lock()
            .unwrap()
            .get(rpc)
            .copied()
            .unwrap_or(0)
    }

    fn attempt(&self, rpc: &str, delta: i64) {
        let mut m = self.in_flight.lock().unwrap();
        let n = m.entry(rpc.to_string()).or_default();
        *n = n.checked_add_signed(delta).unwrap();
    }

    /// Notes the attempts under way as interrupted (just before a kill).
    fn note_interrupted(&self) {
        let now = self.in_flight.lock().unwrap().clone();
        let mut m = self.interrupted.lock().unwrap();
        for (rpc, n) in now.into_iter().filter(|(_, n)| *n > 0) {
            *m.entry(rpc).or_default() += n;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Absent,
    Created,
    Published,
}

/// One volume name a client works through: create, publish, write,
/// unpublish, delete, then on to the next generation's name.
#[derive(Debug, Clone)]
struct Slot {
    client: usize,
    index: usize,
    generation: u32,
    state: State,
    pool: &'static str,
    capacity: i64,
    /// What the test last wrote into the volume (through its target).
    data: Option<Vec<u8>>,
    target: Option<PathBuf>,
    publications: u32,
    /// Expanded by the controller while not published: the node half
    /// (growing the filesystem) is due at the next publication.
    node_expand_due: bool,
}

impl Slot {
    fn name(&self) -> String {
        format!("c{}-s{}-g{}", self.client, self.index, self.generation)
    }

    fn token(&self) -> String {
        token_for_name(&self.name())
    }

    fn volume_id(&self) -> String {
        format!("{}:{}", self.pool, token_for_name(&self.name()))
    }
}

/// The model a client returns: its live slots and the volumes it deleted.
struct Model {
    slots: Vec<Slot>,
    deleted: Vec<(String, String)>,
}

struct Client {
    shared: Arc<Shared>,
    rng: Rng,
    channel: Option<(u64, Channel)>,
    slots: Vec<Slot>,
    deleted: Vec<(String, String)>,
}

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
    }
}

impl Client {
    /// Runs one call until it succeeds, reconnecting after crashes.
    /// Errors that no crash explains are recorded and retried too (a CO
    /// would), but a call that keeps failing that way fails the test.
    async fn call<T, F, Fut>(&mut self, what: &str, mut f: F) -> T
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let sh = Arc::clone(&self.shared);
        sh.counts.calls.fetch_add(1, SeqCst);
        let started = Instant::now();
        let mut failed = 0u32;
        let mut unexplained = 0u32;
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{what}: no success within 120 s"
            );
            let generation = sh.generation.load(SeqCst);
            let ch = match &self.channel {
                Some((g, ch)) if *g == generation => ch.clone(),
                _ => match robust_support::connect_once(&sh.socket).await {
                    Ok(ch) => {
                        self.channel = Some((generation, ch.clone()));
                        ch
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                },
            };
            let rpc = what.split(' ').next().unwrap_or(what);
            sh.attempt(rpc, 1);
            let result = f(ch).await;
            sh.attempt(rpc, -1);
            match result {
                Ok(r) => {
                    if failed > 0 {
                        sh.counts.calls_retried.fetch_add(1, SeqCst);
                    }
                    return r.into_inner();
                }
                Err(s) => {
                    failed += 1;
                    sh.counts.failed_attempts.fetch_add(1, SeqCst);
                    self.channel = None;
                    // Odd: a kill is under way (see `Shared::generation`).
                    let now = sh.generation.load(SeqCst);
                    let crashed = now != generation || now % 2 == 1;
                    let retryable = matches!(s.code(), Code::Unavailable | Code::Aborted);
                    // A connection that broke under the call with no kill
                    // around it is a violation too: a kubelet would see a
                    // failed mount (a driver that died by itself is also
                    // caught at the next kill).
                    let transport =
                        s.code() == Code::Unknown && s.message().starts_with("transport error");
                    if transport && !crashed {
                        sh.counts.transport_errors.fetch_add(1, SeqCst);
                    }
                    if !crashed && !retryable {
                        unexplained += 1;
                        sh.unexpected(format!("{what}: {:?}: {}", s.code(), s.message()));
                        assert!(unexplained < 20, "{what} keeps failing: {s:?}");
                    }
                    let pause = 2 + self.rng.below(15);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
    }

    async fn run(mut self) -> Model {
        while !self.shared.stop.load(SeqCst) {
            self.step().await;
        }
        Model {
            slots: self.slots,
            deleted: self.deleted,
        }
    }

    async fn step(&mut self) {
        if self.rng.chance(1, 10) {
            return self.read_only_call().await;
        }
        let i = self.rng.below(self.slots.len() as u64) as usize;
        let roll = self.rng.below(100);
        match self.slots[i].state {
            State::Absent => self.create(i).await,
            State::Created if roll < 45 => self.publish(i).await,
            State::Created if roll < 85 => self.delete(i).await,
            State::Created if self.shared.controller_expand.load(SeqCst) => self.expand(i).await,
            State::Created => self.validate(i).await,
            State::Published if roll < 50 => self.unpublish(i).await,
            State::Published if roll < 75 => self.stats(i).await,
            State::Published => self.write(i).await,
        }
    }

    async fn create(&mut self, i: usize) {
        let sh = Arc::clone(&self.shared);
        let info = &sh.pools[self.rng.below(sh.pools.len() as u64) as usize];
        let slot = &mut self.slots[i];
        slot.pool = info.name;
        slot.capacity = (1 + self.rng.below(info.max_mib) as i64) * MIB;
        let (name, pool, capacity) = (slot.name(), slot.pool, slot.capacity);
        // Rounded up to the pool's minimum and to whole 4 KiB blocks.
        let most = (capacity.max(info.min_bytes) as u64).next_multiple_of(4096) as i64;
        let req = csi::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: capacity,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: HashMap::from([("pool".to_string(), pool.to_string())]),
            ..Default::default()
        };
        let r = self
            .call(&format!("CreateVolume {name}"), |ch| {
                let req = req.clone();
                async move { ControllerClient::new(ch).create_volume(req).await }
            })
            .await;
        let v = r.volume.expect("CreateVolume answered without a volume");
        let slot = &mut self.slots[i];
        if v.volume_id != slot.volume_id() || v.capacity_bytes < capacity || v.capacity_bytes > most
        {
            self.shared.unexpected(format!(
                "CreateVolume {name}: got {} with {} bytes, wanted {} with {capacity} \
                 (at most {most})",
                v.volume_id,
                v.capacity_bytes,
                slot.volume_id()
            ));
        }
        // What was acknowledged is what the volume must have.
        slot.capacity = v.capacity_bytes.max(capacity);
        slot.state = State::Created;
        slot.data = None;
        slot.node_expand_due = false;
        self.shared.counts.creates.fetch_add(1, SeqCst);
    }

    async fn delete(&mut self, i: usize) {
        let id = self.slots[i].volume_id();
        let req = csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        };
        self.call(&format!("DeleteVolume {id}"), |ch| {
            let req = req.clone();
            async move { ControllerClient::new(ch).delete_volume(req).await }
        })
        .await;
        let slot = &mut self.slots[i];
        self.deleted.push((slot.pool.to_string(), slot.name()));
        slot.generation += 1;
        slot.state = State::Absent;
        slot.data = None;
        slot.publications = 0;
        slot.node_expand_due = false;
        self.shared.counts.deletes.fetch_add(1, SeqCst);
    }

    async fn publish(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.publications += 1;
        let target = self.shared.root.join("targets").join(format!(
            "{}-p{}",
            slot.name(),
            slot.publications
        ));
        let id = slot.volume_id();
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        self.call(&format!("NodePublishVolume {id}"), |ch| {
            let req = req.clone();
            async move { NodeClient::new(ch).node_publish_volume(req).await }
        })
        .await;
        self.shared.counts.publishes.fetch_add(1, SeqCst);
        let slot = &mut self.slots[i];
        slot.state = State::Published;
        slot.target = Some(target.clone());
        let source = self.shared.pool(slot.pool).dir.join(slot.token());
        if identity(&target) != identity(&source) {
            self.shared.unexpected(format!(
                "NodePublishVolume {id}: {} does not show the volume",
                target.display()
            ));
        }
        if self.slots[i].node_expand_due {
            self.node_expand(i).await;
        }
        self.write(i).await;
    }

    /// Writes new content into the volume through its target (no RPC).
    async fn write(&mut self, i: usize) {
        let n = self.rng.next_u64();
        let slot = &mut self.slots[i];
        let target = slot.target.clone().expect("published");
        let data = format!("{} wrote {n:016x}\n", slot.name()).into_bytes();
        let file = target.join("data");
        let bytes = data.clone();
        tokio::task::spawn_blocking(move || std::fs::write(file, bytes))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("writing through {}: {e}", target.display()));
        slot.data = Some(data);
    }

    async fn unpublish(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let target = slot.target.clone().expect("published");
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        };
        self.call(&format!("NodeUnpublishVolume {id}"), |ch| {
            let req = req.clone();
            async move { NodeClient::new(ch).node_unpublish_volume(req).await }
        })
        .await;
        self.shared.counts.unpublishes.fetch_add(1, SeqCst);
        if !mounts_below(&target).is_empty() || std::fs::symlink_metadata(&target).is_ok() {
            self.shared.unexpected(format!(
                "NodeUnpublishVolume {id}: {} is still there or mounted",
                target.display()
            ));
        }
        let slot = &mut self.slots[i];
        slot.state = State::Created;
        slot.target = None;
    }

    async fn stats(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: slot.target.as_ref().unwrap().display().to_string(),
            staging_target_path: String::new(),
        };
        let r = self
            .call(&format!("NodeGetVolumeStats {id}"), |ch| {
                let req = req.clone();
                async move { NodeClient::new(ch).node_get_volume_stats(req).await }
            })
            .await;
        if r.usage.is_empty() || r.volume_condition.is_some_and(|c| c.abnormal) {
            self.shared
                .unexpected(format!("NodeGetVolumeStats {id}: bad answer"));
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
        if self.shared.node_expand.load(SeqCst) && self.rng.chance(1, 2) {
            self.expand(i).await;
        }
    }

    async fn validate(&mut self, i: usize) {
        let id = self.slots[i].volume_id();
        let req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        };
        let r = self
            .call(&format!("ValidateVolumeCapabilities {id}"), |ch| {
                let req = req.clone();
                async move {
                    ControllerClient::new(ch)
                        .validate_volume_capabilities(req)
                        .await
                }
            })
            .await;
        if r.confirmed.is_none() {
            self.shared.unexpected(format!(
                "ValidateVolumeCapabilities {id}: not confirmed: {}",
                r.message
            ));
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
    }

    /// ControllerExpandVolume (and NodeExpandVolume when published and
    /// the node asks for it); only reached when the driver advertises it.
    async fn expand(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let want = slot.capacity + MIB;
        let req = csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: want,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        let r = self
            .call(&format!("ControllerExpandVolume {id}"), |ch| {
                let req = req.clone();
                async move {
                    ControllerClient::new(ch)
                        .controller_expand_volume(req)
                        .await
                }
            })
            .await;
        if r.capacity_bytes < want {
            self.shared.unexpected(format!(
                "ControllerExpandVolume {id}: {} bytes < {want}",
                r.capacity_bytes
            ));
        }
        self.slots[i].capacity = r.capacity_bytes.max(want);
        self.shared.counts.expands.fetch_add(1, SeqCst);
        if r.node_expansion_required {
            self.slots[i].node_expand_due = true;
            if self.slots[i].target.is_some() {
                self.node_expand(i).await;
            }
        }
    }

    /// NodeExpandVolume at the volume's target.
    async fn node_expand(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let want = slot.capacity;
        let req = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: slot.target.as_ref().unwrap().display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: want,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        let r = self
            .call(&format!("NodeExpandVolume {id}"), |ch| {
                let req = req.clone();
                async move { NodeClient::new(ch).node_expand_volume(req).await }
            })
            .await;
        if r.capacity_bytes != 0 && r.capacity_bytes < want {
            self.shared.unexpected(format!(
                "NodeExpandVolume {id}: {} bytes < {want}",
                r.capacity_bytes
            ));
        }
        self.slots[i].node_expand_due = false;
        self.shared.counts.node_expands.fetch_add(1, SeqCst);
    }

    async fn read_only_call(&mut self) {
        let pools: Vec<&'static str> = self.shared.pools.iter().map(|p| p.name).collect();
        match self.rng.below(3) {
            0 => {
                let max_entries = self.rng.below(5) as i32;
                self.call("ListVolumes", |ch| async move {
                    ControllerClient::new(ch)
                        .list_volumes(csi::ListVolumesRequest {
                            max_entries,
                            starting_token: String::new(),
                        })
                        .await
                })
                .await;
            }
            1 => {
                let pool = pools[self.rng.below(pools.len() as u64) as usize];
                self.call("GetCapacity", |ch| async move {
                    ControllerClient::new(ch)
                        .get_capacity(csi::GetCapacityRequest {
                            parameters: HashMap::from([("pool".into(), pool.into())]),
                            ..Default::default()
                        })
                        .await
                })
                .await;
            }
            _ => {
                self.call("Probe", |ch| async move {
                    IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
                })
                .await;
            }
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
    }
}

fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// Leftovers of interrupted calls in a pool: half-written records
/// (`.meta.tmp`), parked volumes (`.deleting`), half-made images
/// (`.img.new`).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.ends_with(".deleting") || name.ends_with(".new") {
            out.push(name);
        }
    }
    out
}

/// Names in a directory.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Subvolumes directly below a pool directory on btrfs, by name.
fn subvolumes(dir: &Path) -> BTreeSet<String> {
    run(
        "btrfs",
        &[
            "subvolume".as_ref(),
            "list".as_ref(),
            "-o".as_ref(),
            dir.as_os_str(),
        ],
    )
    .lines()
    .filter_map(|l| l.split_once(" path ").map(|(_, p)| p.to_string()))
    .map(|p| {
        // Paths are relative to the filesystem's top level: `pool/<token>`.
        Path::new(&p)
            .strip_prefix("pool")
            .map(|t| t.display().to_string())
            .unwrap_or(p)
    })
    .collect()
}

/// The limit on referenced bytes of a subvolume's qgroup.
fn qgroup_limit(subvolume: &Path) -> Option<u64> {
    let out = run(
        "btrfs",
        &[
            "qgroup".as_ref(),
            "show".as_ref(),
            "--raw".as_ref(),
            "-r".as_ref(),
            "-f".as_ref(),
            subvolume.as_os_str(),
        ],
    );
    out.lines()
        .filter(|l| l.starts_with("0/"))
        .find_map(|l| l.split_whitespace().nth(3)?.parse().ok())
}

/// Size of the data section of the xfs filesystem mounted at `mnt`.
fn xfs_size(mnt: &Path) -> u64 {
    let out = run("xfs_info", &[mnt.as_os_str()]);
    let line = out
        .lines()
        .find(|l| l.starts_with("data"))
        .unwrap_or_else(|| panic!("xfs_info {}: no data line:\n{out}", mnt.display()));
    let field = |key: &str| -> u64 {
        line.split(|c: char| c.is_whitespace() || c == ',')
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("xfs_info {}: no {key} in {line:?}", mnt.display()))
    };
    field("bsize=") * field("blocks=")
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
            channel: None,
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
    drop(driver);
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
         {} calls retried ({} failed attempts, {} with a broken connection no kill explains); \
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
        c.creates.load(SeqCst),
        c.deletes.load(SeqCst),
        c.publishes.load(SeqCst),
        c.unpublishes.load(SeqCst),
        c.expands.load(SeqCst),
        c.node_expands.load(SeqCst),
        c.reads.load(SeqCst),
        started.elapsed().as_secs_f64(),
    );
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

/// The storage side of the state: mounts and loop devices below the work
/// directory, checked against what the live volumes and the test's own
/// filesystems explain. `targets` are the published targets (bind
/// mounts). Returns nothing; panics with the difference.
fn check_mounts_and_loops(
    shared: &Shared,
    alive: &[&Slot],
    targets: &[PathBuf],
    own_fs: &[LoopFs],
    when: &str,
) {
    let root = &shared.root;
    let table = hostpath_csi::sys::mountinfo::read().unwrap();
    let mut got: Vec<PathBuf> = table
        .iter()
        .map(|e| e.mount_point.clone())
        .filter(|m| m.starts_with(root))
        .collect();
    got.sort();
    let mut want: Vec<PathBuf> = own_fs.iter().map(|f| f.mount.clone()).collect();
    want.extend(targets.iter().cloned());
    let mut want_loops: Vec<PathBuf> = own_fs.iter().map(|f| f.device.clone()).collect();
    let loops = loops_below(root);
    for s in alive {
        let info = shared.pool(s.pool);
        if info.kind != PoolKind::Image {
            continue;
        }
        // A live image volume: its own image, loop-mounted once at
        // <pool>/<token> through a device that goes with the mount.
        let mnt = info.dir.join(s.token());
        want.push(mnt.clone());
        let entry = hostpath_csi::sys::mountinfo::mounted_at(&table, &mnt)
            .unwrap_or_else(|| panic!("{when}: image volume {} is not mounted", s.volume_id()));
        let dev = PathBuf::from(&entry.source);
        let img = info.dir.join(format!(".{}.img", s.token()));
        assert!(
            loops.iter().any(|(d, b)| *d == dev && *b == img),
            "{when}: {} is mounted from {}, which is not a loop device on {} (loops: {loops:?})",
            mnt.display(),
            dev.display(),
            img.display()
        );
        assert_eq!(
            loop_autoclear(&dev),
            Some(true),
            "{when}: {} (behind {}) would outlive its mount",
            dev.display(),
            mnt.display()
        );
        want_loops.push(dev);
    }
    want.sort();
    assert_eq!(got, want, "{when}: mounts below the work directory");
    let mut got_loops: Vec<PathBuf> = loops.iter().map(|(d, _)| d.clone()).collect();
    got_loops.sort();
    want_loops.sort();
    assert_eq!(
        got_loops,
        want_loops,
        "{when}: loop devices on files below the work directory; attached: {}",
        loops
            .iter()
            .map(|(d, b)| format!(
                "{} on {} (auto-clear {:?})",
                d.display(),
                b.display(),
                loop_autoclear(d)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// Checks the end state against the model, then unpublishes and deletes
/// everything and checks the pools end up empty.
async fn verify(
    shared: &Shared,
    driver: &Driver,
    slots: &[Slot],
    deleted: &[(String, String)],
    own_fs: &[LoopFs],
) {
    let root = &shared.root;
    let ch = robust_support::connect_once(&shared.socket).await.unwrap();
    let mut ctrl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    // The sweep of leftovers runs in the background after start.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = shared
            .pools
            .iter()
            .flat_map(|p| leftovers(&p.dir))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leftovers not swept: {left:?}\nlog:\n{}",
            driver.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ListVolumes shows every acknowledged volume exactly once, with its
    // capacity, and nothing else.
    let listed = ctrl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.next_token.is_empty());
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    for e in listed.entries {
        let v = e.volume.unwrap();
        assert!(
            seen.insert(v.volume_id.clone(), v.capacity_bytes).is_none(),
            "{} listed twice",
            v.volume_id
        );
    }
    let alive: Vec<&Slot> = slots.iter().filter(|s| s.state != State::Absent).collect();
    let want: BTreeMap<String, i64> = alive.iter().map(|s| (s.volume_id(), s.capacity)).collect();
    assert_eq!(
        seen, want,
        "ListVolumes differs from the acknowledged state"
    );

    // On disk: each pool holds exactly the live volumes (directory or
    // mount point, record, and the image of an image volume), nothing
    // else; each record says what was acknowledged; the storage is whole.
    for p in &shared.pools {
        let mut want = BTreeSet::new();
        let mine: Vec<&&Slot> = alive.iter().filter(|s| s.pool == p.name).collect();
        for s in &mine {
            let t = s.token();
            want.insert(t.clone());
            want.insert(format!(".{t}.meta"));
            // When it was last published and unpublished (empty markers,
            // there once the volume was).
            for m in [format!(".{t}.published"), format!(".{t}.unpublished")] {
                if p.dir.join(&m).exists() {
                    want.insert(m);
                }
            }
            if p.kind == PoolKind::Image {
                want.insert(format!(".{t}.img"));
            }
            let rec: Record =
                serde_json::from_slice(&std::fs::read(p.dir.join(format!(".{t}.meta"))).unwrap())
                    .unwrap();
            assert_eq!(
                (rec.name.as_str(), rec.kind, rec.capacity_bytes as i64),
                (s.name().as_str(), p.kind, s.capacity),
                "record of {}",
                s.volume_id()
            );
            match p.kind {
                PoolKind::Btrfs => {
                    let limit = qgroup_limit(&p.dir.join(&t));
                    assert!(
                        limit.is_some_and(|l| l >= s.capacity as u64),
                        "{}: qgroup limit {limit:?} below its capacity {}",
                        s.volume_id(),
                        s.capacity
                    );
                }
                PoolKind::Image => {
                    let len = std::fs::metadata(p.dir.join(format!(".{t}.img")))
                        .unwrap()
                        .len();
                    assert!(
                        len >= s.capacity as u64,
                        "{}: image of {len} bytes, below its capacity {}",
                        s.volume_id(),
                        s.capacity
                    );
                }
                PoolKind::Dir => {}
            }
        }
        assert_eq!(entries(&p.dir), want, "entries of pool {}", p.name);
        if p.kind == PoolKind::Btrfs {
            let want: BTreeSet<String> = mine.iter().map(|s| s.token()).collect();
            assert_eq!(subvolumes(&p.dir), want, "subvolumes of pool {}", p.name);
            check_quotas(p, &want);
        }
    }
    for (pool, name) in deleted {
        let t = token_for_name(name);
        for p in &shared.pools {
            for entry in [
                t.clone(),
                format!(".{t}.meta"),
                format!(".{t}.img"),
                format!(".{t}.published"),
                format!(".{t}.unpublished"),
            ] {
                assert!(
                    std::fs::symlink_metadata(p.dir.join(&entry)).is_err(),
                    "deleted volume {pool}:{name}: {entry} is still in pool {}",
                    p.name
                );
            }
        }
    }
    let published: Vec<PathBuf> = alive.iter().filter_map(|s| s.target.clone()).collect();
    check_mounts_and_loops(shared, &alive, &published, own_fs, "after the crashes");

    // The data written through the targets is in the volumes: read it
    // through the current target, or through a fresh publication (doing
    // the node half of an expansion still due, as kubelet would). Image
    // volumes' filesystems then fill their images.
    // A few btrfs volumes per run also show their limit holds.
    let mut limits_checked = 0;
    for s in &alive {
        let id = s.volume_id();
        let (target, fresh) = match &s.target {
            Some(t) => (t.clone(), false),
            None => (
                root.join("targets").join(format!("verify-{}", s.name())),
                true,
            ),
        };
        if fresh {
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("publishing {id} for verification: {e:?}"));
        }
        assert!(
            !s.node_expand_due || fresh,
            "{id}: node expansion due while published"
        );
        if s.node_expand_due {
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: s.capacity,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeExpandVolume {id} for verification: {e:?}"));
        }
        let got = std::fs::read(target.join("data")).ok();
        assert_eq!(
            got,
            s.data,
            "data of {id} read through {}",
            target.display()
        );
        let info = shared.pool(s.pool);
        if info.kind == PoolKind::Btrfs && limits_checked < 3 {
            limits_checked += 1;
            limit_holds(&mut node, &id, &target, s.capacity).await;
        }
        if info.filesystem == Some("xfs") {
            let t = s.token();
            let img = std::fs::metadata(info.dir.join(format!(".{t}.img")))
                .unwrap()
                .len();
            let fs = xfs_size(&info.dir.join(&t));
            assert!(
                fs == img && fs >= s.capacity as u64,
                "{id}: filesystem of {fs} bytes in an image of {img}, capacity {}",
                s.capacity
            );
        }
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unpublishing {id}: {e:?}"));
    }
    check_mounts_and_loops(shared, &alive, &[], own_fs, "after unpublishing everything");
    let targets: Vec<_> = std::fs::read_dir(root.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(targets.is_empty(), "targets left behind: {targets:?}");

    // Everything can still be deleted, leaving empty pools, and no mount
    // or loop device but the test's own.
    for s in &alive {
        ctrl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: s.volume_id(),
            secrets: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("deleting {}: {e:?}", s.volume_id()));
    }
    for p in &shared.pools {
        assert_eq!(
            entries(&p.dir),
            BTreeSet::new(),
            "pool {} not empty",
            p.name
        );
        if p.kind == PoolKind::Btrfs {
            assert_eq!(
                subvolumes(&p.dir),
                BTreeSet::new(),
                "subvolumes left in pool {}",
                p.name
            );
            check_quotas(p, &BTreeSet::new());
            // The kernel removes a deleted subvolume's qgroup when it drops
            // the subvolume, but now and then (once in a 12-kill run, never
            // in 1,000 uninterrupted cycles) leaves it behind, empty and
            // "stale": harmless, and cleared when the driver opens the pool.
            // Anything else would be a qgroup of a subvolume that exists.
            let left: Vec<_> = btrfs_support::qgroups(p.dir.parent().unwrap())
                .into_iter()
                .filter(|(_, path)| path != "<stale>")
                .collect();
            assert_eq!(
                left,
                vec![],
                "qgroups left on the filesystem of pool {}",
                p.name
            );
        }
    }
    check_mounts_and_loops(shared, &[], &[], own_fs, "after deleting everything");
}

/// A btrfs pool's quotas after the crashes: in the mode the pool was
/// meant to have, consistent as the kernel sees it, and a qgroup for each
/// of the pool's volumes (`tokens`), no more.
fn check_quotas(p: &PoolInfo, tokens: &BTreeSet<String>) {
    let mnt = p.dir.parent().unwrap();
    // Deleted subvolumes are dropped (and their qgroups with them) by the
    // kernel in the background: wait for that first.
    run("btrfs", &["subvolume", "sync", mnt.to_str().unwrap()]);
    let want_mode = if p.full_qgroups || !btrfs_support::kernel_has_simple_quotas() {
        "qgroup"
    } else {
        "squota"
    };
    assert_eq!(
        btrfs_support::mode(mnt),
        want_mode,
        "quota mode of pool {}",
        p.name
    );
    assert!(
        !btrfs_support::inconsistent(mnt) && !btrfs_support::rescan_running(mnt),
        "the kernel finds the quota accounting of pool {} inconsistent or rescanning",
        p.name
    );
    let in_pool: BTreeSet<String> = btrfs_support::qgroups(mnt)
        .into_iter()
        .filter_map(|(_, path)| path.strip_prefix("pool/").map(String::from))
        .collect();
    assert_eq!(
        &in_pool, tokens,
        "qgroups of the volumes of pool {}",
        p.name
    );
}

/// What a pool looks like after a kill in the middle of calls: deletes
/// that parked their volume (`.<token>.deleting`) but kept the record, and
/// creates that left a half-written record (`.<token>.meta.tmp`). The CO
/// retries those calls as soon as the driver is back, while the driver's
/// startup sweep is removing leftovers; the retries must simply succeed.
/// The race is timing-dependent, so the scenario runs a few times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_calls_do_not_race_the_startup_sweep() {
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

/// One restart over a pool full of leftovers; returns the failures.
/// Calls `call` until it succeeds (50 tries, 10 ms apart), recording in
/// `errors` every failure other than ABORTED ("busy, retry") and a call
/// that never succeeded.
async fn retry_as_a_co<T, Fut>(
    errors: &Mutex<Vec<String>>,
    what: &str,
    mut call: impl FnMut() -> Fut,
) where
    Fut: Future<Output = Result<T, Status>>,
{
    for _ in 0..50 {
        match call().await {
            Ok(_) => return,
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{what}: {:?}: {}", s.code(), s.message()))
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    errors
        .lock()
        .unwrap()
        .push(format!("{what}: never succeeded in 50 tries"));
}

async fn sweep_scenario() -> Vec<String> {
    use hostpath_csi::config::PoolKind;
    use hostpath_csi::volume::record::Record;

    const N: usize = 120;
    let work = Workdir::new("hostpath-csi-sweep");
    let root = work.path().to_path_buf();
    let pools = [PoolSpec::dir("a"), PoolSpec::dir("b")];
    let pool = pool_dir(&root, "a");
    std::fs::create_dir_all(&pool).unwrap();
    for i in 0..N {
        // An interrupted delete: record kept, data parked, with enough
        // files that removing them takes a moment.
        let name = format!("parked-{i}");
        let record = Record {
            name: name.clone(),
            kind: PoolKind::Dir,
            capacity_bytes: MIB as u64,
            parameters: BTreeMap::from([("pool".to_string(), "a".to_string())]),
            created_unix: 0,
            content_source: None,
        };
        std::fs::write(
            pool.join(format!(".{name}.meta")),
            serde_json::to_vec(&record).unwrap(),
        )
        .unwrap();
        let parked = pool.join(format!(".{name}.deleting"));
        std::fs::create_dir_all(parked.join("sub")).unwrap();
        for f in 0..40 {
            std::fs::write(parked.join("sub").join(f.to_string()), b"x").unwrap();
        }
        // An interrupted create: the record was being written.
        std::fs::write(pool.join(format!(".fresh-{i}.meta.tmp")), b"{\"na").unwrap();
    }

    let mut driver = Driver::spawn(&root, &pools);
    driver.wait_ready(Duration::from_secs(20)).await;
    let socket = driver.socket.clone();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let socket = socket.clone();
        let errors = Arc::clone(&errors);
        tasks.push(tokio::spawn(async move {
            let c = ControllerClient::new(robust_support::connect_once(&socket).await.unwrap());
            for i in (t..N).step_by(8) {
                let del = csi::DeleteVolumeRequest {
                    volume_id: format!("a:parked-{i}"),
                    secrets: Default::default(),
                };
                let create = csi::CreateVolumeRequest {
                    name: format!("fresh-{i}"),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: MIB,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![mount_cap()],
                    parameters: HashMap::from([("pool".to_string(), "a".to_string())]),
                    ..Default::default()
                };
                // As a CO would: retry until it works, but note every
                // failure that is not "busy, retry".
                let what = format!("delete {i}");
                retry_as_a_co(&errors, &what, || {
                    let (mut c, del) = (c.clone(), del.clone());
                    async move { c.delete_volume(del).await }
                })
                .await;
                let what = format!("create {i}");
                retry_as_a_co(&errors, &what, || {
                    let (mut c, create) = (c.clone(), create.clone());
                    async move { c.create_volume(create).await }
                })
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    let mut left: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // Exactly the fresh volumes and their records: every parked volume
    // and every half-written record gone.
    let mut want: Vec<String> = (0..N)
        .flat_map(|i| [format!("fresh-{i}"), format!(".fresh-{i}.meta")])
        .collect();
    want.sort();
    assert_eq!(left, want, "the pool after the retried calls");
    driver.kill();
    errors
}

/// A btrfs volume after the crashes: a write past its size fails with
/// EDQUOT, and its usage counts what is in it.
async fn limit_holds(node: &mut NodeClient<Channel>, id: &str, target: &Path, capacity: i64) {
    use std::io::Write;
    let path = target.join("fill");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0i64;
    let err = loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            break e;
        }
        written += chunk.len() as i64;
        assert!(
            written <= capacity + MIB,
            "{id}: {written} bytes written past its capacity of {capacity}"
        );
    };
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EDQUOT as i32),
        "{id}: {err}"
    );
    let r = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("stats of {id}: {e:?}"))
        .into_inner();
    let used = r.usage[0].used;
    assert!(
        used >= written && used <= capacity + MIB,
        "{id}: {used} bytes used with {written} written into {capacity}"
    );
    assert!(!r.volume_condition.unwrap().abnormal, "{id}: abnormal");
    drop(f);
    std::fs::remove_file(&path).unwrap();
}
