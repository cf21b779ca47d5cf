//! Crash test: the real binary is killed with SIGKILL at random points
//! while several clients drive a mixed workload against it, then
//! restarted; every interrupted call is retried until it succeeds, as a CO
//! does. A model of what was acknowledged is checked against the pools,
//! ListVolumes and the data written through published targets.
//!
//! Tunables (environment): `HOSTPATH_CSI_CRASH_ROUNDS` (kills, default
//! 30), `HOSTPATH_CSI_CRASH_SEED` (default fixed, printed), and
//! `HOSTPATH_CSI_CRASH_CLIENTS` (default 6). The pools are a parameter
//! ([`crash_test`]), so other pool kinds get the same test by adding a
//! `#[tokio::test]` with their [`PoolSpec`]s.

mod robust_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostpath_csi::csi;
use hostpath_csi::csi::controller_client::ControllerClient;
use hostpath_csi::csi::controller_service_capability::rpc::Type as CtrlRpc;
use hostpath_csi::csi::identity_client::IdentityClient;
use hostpath_csi::csi::node_client::NodeClient;
use hostpath_csi::csi::node_service_capability::rpc::Type as NodeRpc;
use hostpath_csi::csi::volume_capability::access_mode::Mode;
use hostpath_csi::volume::id::token_for_name;
use robust_support::{
    Driver, PoolSpec, Rng, Workdir, env_u64, make_canary, mounts_below, pool_dir, tree_digest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

const MIB: i64 = 1 << 20;
/// Top-level entries of the work directory the driver may change.
const DRIVER_OWNED: &[&str] = &["pools", "targets", "csi.sock", "driver.log", "pools.toml"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_pools_survive_sigkill_at_random_points() {
    crash_test(&[PoolSpec::dir("a"), PoolSpec::dir("b")]).await;
}

/// Counters printed at the end.
#[derive(Default)]
struct Counts {
    runs: AtomicU64,
    kills: AtomicU64,
    calls: AtomicU64,
    calls_retried: AtomicU64,
    failed_attempts: AtomicU64,
    creates: AtomicU64,
    deletes: AtomicU64,
    publishes: AtomicU64,
    unpublishes: AtomicU64,
    expands: AtomicU64,
    reads: AtomicU64,
}

/// What all clients and the killer share.
struct Shared {
    root: PathBuf,
    socket: PathBuf,
    pools: Vec<&'static str>,
    /// Bumped just before every kill and again once the process is reaped
    /// (so it is odd while a kill is under way): an attempt that saw it
    /// change or odd may have been interrupted by the crash, whatever error
    /// it got.
    generation: AtomicU64,
    stop: AtomicBool,
    controller_expand: AtomicBool,
    node_expand: AtomicBool,
    counts: Counts,
    /// Answers the driver gave that no crash explains.
    unexpected: Mutex<Vec<String>>,
}

impl Shared {
    fn unexpected(&self, what: String) {
        eprintln!("UNEXPECTED: {what}");
        self.unexpected.lock().unwrap().push(what);
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
}

impl Slot {
    fn name(&self) -> String {
        format!("c{}-s{}-g{}", self.client, self.index, self.generation)
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
            match f(ch).await {
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
        let pools = self.shared.pools.clone();
        let slot = &mut self.slots[i];
        slot.pool = pools[self.rng.below(pools.len() as u64) as usize];
        slot.capacity = (1 + self.rng.below(64) as i64) * MIB;
        let (name, pool, capacity) = (slot.name(), slot.pool, slot.capacity);
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
        if v.volume_id != slot.volume_id() || v.capacity_bytes != capacity {
            self.shared.unexpected(format!(
                "CreateVolume {name}: got {} with {} bytes, wanted {} with {capacity}",
                v.volume_id,
                v.capacity_bytes,
                slot.volume_id()
            ));
        }
        slot.state = State::Created;
        slot.data = None;
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
        let source = pool_dir(&self.shared.root, slot.pool).join(token_for_name(&slot.name()));
        if identity(&target) != identity(&source) {
            self.shared.unexpected(format!(
                "NodePublishVolume {id}: {} does not show the volume",
                target.display()
            ));
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
        let slot = &self.slots[i];
        if r.node_expansion_required
            && let Some(target) = slot.target.clone()
        {
            let req = csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: want,
                    limit_bytes: 0,
                }),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            };
            self.call(&format!("NodeExpandVolume {id}"), |ch| {
                let req = req.clone();
                async move { NodeClient::new(ch).node_expand_volume(req).await }
            })
            .await;
        }
    }

    async fn read_only_call(&mut self) {
        let pools = self.shared.pools.clone();
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

/// Dot-files and directories in a pool that are neither a live volume nor
/// its record.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") || name.ends_with(".deleting") {
            out.push(name);
        }
    }
    out
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

/// The whole test, for any set of pools.
async fn crash_test(pools: &[PoolSpec]) {
    let rounds = env_u64("HOSTPATH_CSI_CRASH_ROUNDS", 30);
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 0x5eed_0005);
    let clients = env_u64("HOSTPATH_CSI_CRASH_CLIENTS", 6) as usize;
    eprintln!("crash test: {rounds} kills, {clients} clients, seed {seed:#x}");
    let mut rng = Rng::new(seed);

    let work = Workdir::new("hostpath-csi-crash");
    let root = work.path().to_path_buf();
    std::fs::create_dir_all(root.join("targets")).unwrap();
    make_canary(&root.join("canary"));
    let canary_before = tree_digest(&root, DRIVER_OWNED);

    let shared = Arc::new(Shared {
        socket: root.join("csi.sock"),
        root: root.clone(),
        pools: pools.iter().map(|p| p.name).collect(),
        generation: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        controller_expand: AtomicBool::new(false),
        node_expand: AtomicBool::new(false),
        counts: Counts::default(),
        unexpected: Mutex::new(Vec::new()),
    });

    // A first run to learn what the driver advertises.
    let mut driver = Driver::start(&root, pools).await;
    shared.counts.runs.fetch_add(1, SeqCst);
    let (ctrl_expand, node_expand) = capabilities(&shared.socket).await;
    shared.controller_expand.store(ctrl_expand, SeqCst);
    shared.node_expand.store(node_expand, SeqCst);
    eprintln!("expansion advertised: controller {ctrl_expand}, node {node_expand}");

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

    // The killer: let the driver serve for a random short while, kill it,
    // start it again. Some kills land while the pools are still opening
    // or the leftovers are being swept.
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
        shared.generation.fetch_add(1, SeqCst);
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
    shared.stop.store(true, SeqCst);
    let mut slots = Vec::new();
    let mut deleted = Vec::new();
    for h in handles {
        let m = h.await.expect("client task panicked");
        slots.extend(m.slots);
        deleted.extend(m.deleted);
    }

    verify(&shared, &driver, &slots, &deleted, pools).await;

    assert_eq!(
        tree_digest(&root, DRIVER_OWNED),
        canary_before,
        "something outside the pools and targets changed"
    );
    let c = &shared.counts;
    eprintln!(
        "crash test: {} runs, {} kills, {} calls, {} calls retried ({} failed attempts); \
         acknowledged: {} creates, {} deletes, {} publishes, {} unpublishes, {} expands, {} reads; \
         {} volumes alive at the end",
        c.runs.load(SeqCst),
        c.kills.load(SeqCst),
        c.calls.load(SeqCst),
        c.calls_retried.load(SeqCst),
        c.failed_attempts.load(SeqCst),
        c.creates.load(SeqCst),
        c.deletes.load(SeqCst),
        c.publishes.load(SeqCst),
        c.unpublishes.load(SeqCst),
        c.expands.load(SeqCst),
        c.reads.load(SeqCst),
        slots.iter().filter(|s| s.state != State::Absent).count(),
    );
    let unexpected = shared.unexpected.lock().unwrap().clone();
    assert!(
        unexpected.is_empty(),
        "{} answers no crash explains:\n{}\nlog:\n{}",
        unexpected.len(),
        unexpected.join("\n"),
        driver.log_tail()
    );
    assert!(c.kills.load(SeqCst) >= rounds.min(1), "no kill happened");
}

/// Checks the end state against the model, then unpublishes and deletes
/// everything and checks the pools end up empty.
async fn verify(
    shared: &Shared,
    driver: &Driver,
    slots: &[Slot],
    deleted: &[(String, String)],
    pools: &[PoolSpec],
) {
    let root = &shared.root;
    let ch = robust_support::connect_once(&shared.socket).await.unwrap();
    let mut ctrl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    // The sweep of leftovers runs in the background after start.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<String> = pools
            .iter()
            .flat_map(|p| leftovers(&pool_dir(root, p.name)))
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

    // On disk: each pool holds exactly the live volumes' directories and
    // records, nothing else.
    for p in pools {
        let dir = pool_dir(root, p.name);
        let mut want = BTreeSet::new();
        for s in alive.iter().filter(|s| s.pool == p.name) {
            let t = token_for_name(&s.name());
            want.insert(t.clone());
            want.insert(format!(".{t}.meta"));
        }
        let got: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(got, want, "entries of pool {}", p.name);
    }
    for (pool, name) in deleted {
        let t = token_for_name(name);
        for p in pools {
            let dir = pool_dir(root, p.name);
            assert!(
                !dir.join(&t).exists() && !dir.join(format!(".{t}.meta")).exists(),
                "deleted volume {pool}:{name} is still in pool {}",
                p.name
            );
        }
    }

    // The data written through the targets is in the volumes: read it
    // through the current target, or through a fresh publication.
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
        let got = std::fs::read(target.join("data")).ok();
        assert_eq!(
            got,
            s.data,
            "data of {id} read through {}",
            target.display()
        );
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("unpublishing {id}: {e:?}"));
    }
    assert_eq!(
        mounts_below(root),
        Vec::<PathBuf>::new(),
        "mounts left after unpublishing everything"
    );
    let targets: Vec<_> = std::fs::read_dir(root.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(targets.is_empty(), "targets left behind: {targets:?}");

    // Everything can still be deleted, leaving empty pools.
    for s in &alive {
        ctrl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: s.volume_id(),
            secrets: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("deleting {}: {e:?}", s.volume_id()));
    }
    for p in pools {
        let left: Vec<_> = std::fs::read_dir(pool_dir(root, p.name))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "pool {} not empty: {left:?}", p.name);
    }
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
async fn sweep_scenario() -> Vec<String> {
    use hostpath_csi::config::PoolKind;
    use hostpath_csi::volume::pool::Record;

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
            let mut c = ControllerClient::new(robust_support::connect_once(&socket).await.unwrap());
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
                for _ in 0..50 {
                    match c.delete_volume(del.clone()).await {
                        Ok(_) => break,
                        Err(s) => {
                            if s.code() != Code::Aborted {
                                errors.lock().unwrap().push(format!(
                                    "delete {i}: {:?}: {}",
                                    s.code(),
                                    s.message()
                                ));
                            }
                        }
                    }
                }
                for _ in 0..50 {
                    match c.create_volume(create.clone()).await {
                        Ok(_) => break,
                        Err(s) => {
                            if s.code() != Code::Aborted {
                                errors.lock().unwrap().push(format!(
                                    "create {i}: {:?}: {}",
                                    s.code(),
                                    s.message()
                                ));
                            }
                        }
                    }
                }
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
        .filter(|n| !n.starts_with("fresh-") && !n.starts_with(".fresh-"))
        .collect();
    left.sort();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    driver.kill();
    errors
}
