//! Load: 64 concurrent clients, each with volumes of its own, mix every
//! call (create, publish, stats, list, capacity, probe, validate,
//! unpublish, delete) for a bounded time. No call may fail, and the real
//! binary's memory (VmRSS) and open file descriptors must stay flat after
//! warm-up.
//!
//! Tunables (environment): `HOSTPATH_CSI_LOAD_SECS` (default 10) and
//! `HOSTPATH_CSI_LOAD_CLIENTS` (default 64).

mod common;
mod robust_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use csi_proto::volume_capability::access_mode::Mode;
use robust_support::{Driver, PoolSpec, Workdir, env_u64, mounts_below};
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

/// What a load run did.
#[derive(Debug, Default)]
struct Report {
    /// Calls per RPC, with the slowest and the total time.
    calls: BTreeMap<&'static str, (u64, Duration, Duration)>,
    /// Every failed call.
    errors: Vec<String>,
    /// Volume lifecycles completed.
    cycles: u64,
}

impl Report {
    fn total(&self) -> u64 {
        self.calls.values().map(|c| c.0).sum()
    }

    fn print(&self, what: &str, secs: f64) {
        eprintln!(
            "{what}: {} calls in {secs:.1} s ({:.0}/s), {} volume lifecycles, {} errors",
            self.total(),
            self.total() as f64 / secs,
            self.cycles,
            self.errors.len()
        );
        for (rpc, (n, max, sum)) in &self.calls {
            eprintln!(
                "  {rpc:<28} {n:>7} calls, mean {:>8.2?}, max {:>8.2?}",
                *sum / (*n).max(1) as u32,
                max
            );
        }
    }
}

fn mount_cap() -> csi::VolumeCapability {
    common::mount_cap(Mode::SingleNodeWriter)
}

/// One client: works through volumes of its own until `until`.
struct Client {
    id: usize,
    ch: Channel,
    pool: String,
    targets: PathBuf,
    report: Arc<Mutex<Report>>,
}

impl Client {
    async fn timed<T>(
        &self,
        rpc: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Option<T> {
        let start = Instant::now();
        let res = fut.await;
        let took = start.elapsed();
        let mut r = self.report.lock().unwrap();
        let e = r.calls.entry(rpc).or_default();
        e.0 += 1;
        e.1 = e.1.max(took);
        e.2 += took;
        match res {
            Ok(v) => Some(v.into_inner()),
            Err(s) => {
                r.errors.push(format!(
                    "client {} {rpc}: {:?}: {}",
                    self.id,
                    s.code(),
                    s.message()
                ));
                None
            }
        }
    }

    async fn run(self, until: Instant) {
        let mut ctrl = ControllerClient::new(self.ch.clone());
        let mut node = NodeClient::new(self.ch.clone());
        let mut ident = IdentityClient::new(self.ch.clone());
        let mut n = 0u64;
        while Instant::now() < until {
            n += 1;
            let name = format!("load-{}-{n}", self.id);
            let req = common::create_request(&name, &self.pool, MIB);
            let Some(v) = self.timed("CreateVolume", ctrl.create_volume(req)).await else {
                continue;
            };
            let id = v.volume.unwrap().volume_id;
            let target = self.targets.join(&name);
            let publish = csi::NodePublishVolumeRequest {
                volume_id: id.clone(),
                target_path: target.display().to_string(),
                volume_capability: Some(mount_cap()),
                ..Default::default()
            };
            let published = self
                .timed("NodePublishVolume", node.node_publish_volume(publish))
                .await
                .is_some();
            if published {
                std::fs::write(target.join("file"), name.as_bytes()).unwrap();
                let stats = csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: String::new(),
                };
                self.timed("NodeGetVolumeStats", node.node_get_volume_stats(stats))
                    .await;
            }
            let list = csi::ListVolumesRequest {
                max_entries: 16,
                starting_token: String::new(),
            };
            if let Some(page) = self.timed("ListVolumes", ctrl.list_volumes(list)).await
                && !page.next_token.is_empty()
            {
                let next = csi::ListVolumesRequest {
                    max_entries: 16,
                    starting_token: page.next_token,
                };
                self.timed("ListVolumes", ctrl.list_volumes(next)).await;
            }
            let cap = csi::GetCapacityRequest {
                parameters: HashMap::from([("pool".to_string(), self.pool.clone())]),
                ..Default::default()
            };
            self.timed("GetCapacity", ctrl.get_capacity(cap)).await;
            self.timed("Probe", ident.probe(csi::ProbeRequest {})).await;
            let validate = csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![mount_cap()],
                ..Default::default()
            };
            self.timed(
                "ValidateVolumeCapabilities",
                ctrl.validate_volume_capabilities(validate),
            )
            .await;
            if published {
                let unpublish = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                };
                self.timed("NodeUnpublishVolume", node.node_unpublish_volume(unpublish))
                    .await;
            }
            let delete = csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            };
            if self
                .timed("DeleteVolume", ctrl.delete_volume(delete))
                .await
                .is_some()
            {
                self.report.lock().unwrap().cycles += 1;
            }
        }
    }
}

/// Runs `clients` clients against `socket` for `secs`.
async fn load(socket: &Path, pools: &[&str], targets: &Path, clients: usize, secs: f64) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for id in 0..clients {
        let client = Client {
            id,
            // Each client has a connection of its own, as separate
            // sidecars and kubelet would.
            ch: csi_proto::connect(socket).await.unwrap(),
            pool: pools[id % pools.len()].to_string(),
            targets: targets.to_path_buf(),
            report: Arc::clone(&report),
        };
        tasks.push(tokio::spawn(client.run(until)));
    }
    for t in tasks {
        t.await.expect("client panicked");
    }
    Arc::try_unwrap(report).unwrap().into_inner().unwrap()
}

fn settings() -> (usize, f64) {
    (
        env_u64("HOSTPATH_CSI_LOAD_CLIENTS", 64) as usize,
        env_u64("HOSTPATH_CSI_LOAD_SECS", 10) as f64,
    )
}

/// Every pool holds nothing, and nothing is mounted below `root`.
fn assert_clean(root: &Path, pool_dirs: &[PathBuf]) {
    assert_eq!(mounts_below(root), Vec::<PathBuf>::new(), "mounts left");
    for dir in pool_dirs {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{} not empty: {left:?}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_mixing_every_call_see_no_errors() {
    if !common::root_or_skip("the clients publish volumes with bind mounts") {
        return;
    }
    let (clients, secs) = settings();
    let h = common::Harness::start().await;
    let targets = h.target("x").parent().unwrap().to_path_buf();
    let started = Instant::now();
    let report = load(&h.socket, &["hdd", "ssd"], &targets, clients, secs).await;
    report.print("load (in-process)", started.elapsed().as_secs_f64());
    assert!(
        report.errors.is_empty(),
        "{} calls failed, first ones:\n{}",
        report.errors.len(),
        report.errors[..report.errors.len().min(20)].join("\n")
    );
    assert!(report.cycles >= clients as u64, "too little work done");
    assert_clean(
        &std::fs::canonicalize(h.root.path()).unwrap(),
        &[h.pool_dir("hdd"), h.pool_dir("ssd")],
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_binary_keeps_memory_and_descriptors_flat_under_load() {
    if !common::root_or_skip("the clients publish volumes with bind mounts") {
        return;
    }
    let (clients, secs) = settings();
    let work = Workdir::new("hostpath-csi-load");
    let root = work.path().to_path_buf();
    let targets = root.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let pools = [PoolSpec::dir("a"), PoolSpec::dir("b")];
    let driver = Driver::start(&root, &pools).await;
    let pid = driver.pid();
    let idle_rss = driver.rss_kib();

    // Warm-up: allocator arenas, thread pools and caches reach their size.
    let warm = (secs / 3.0).max(2.0);
    let r = load(&driver.socket, &["a", "b"], &targets, clients, warm).await;
    assert!(
        r.errors.is_empty(),
        "warm-up errors: {:?}",
        &r.errors[..r.errors.len().min(10)]
    );
    // Let the server notice the closed connections before sampling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warm_rss = driver.rss_kib();
    let warm_fds = open_fds(pid);

    let started = Instant::now();
    let report = load(&driver.socket, &["a", "b"], &targets, clients, secs).await;
    report.print("load (real binary)", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end_rss = driver.rss_kib();
    let end_fds = open_fds(pid);
    eprintln!(
        "VmRSS: idle {idle_rss} KiB, after warm-up {warm_rss} KiB, at the end {end_rss} KiB; \
         open fds: after warm-up {warm_fds}, at the end {end_fds}"
    );
    assert!(
        report.errors.is_empty(),
        "{} calls failed, first ones:\n{}",
        report.errors.len(),
        report.errors[..report.errors.len().min(20)].join("\n")
    );
    assert!(
        end_rss <= warm_rss * 3 / 2 + 4096,
        "memory grew from {warm_rss} KiB to {end_rss} KiB"
    );
    assert!(
        end_fds <= warm_fds + 16,
        "open descriptors grew from {warm_fds} to {end_fds}"
    );
    assert_clean(
        &root,
        &[
            robust_support::pool_dir(&root, "a"),
            robust_support::pool_dir(&root, "b"),
        ],
    );
    drop(driver);
}
