//! Crash test of inline ephemeral volumes: the real binary is killed with
//! SIGKILL while NodePublishVolume makes and binds them, again between
//! publication and unpublication, and again while NodeUnpublishVolume
//! unbinds and removes them; each time it is restarted and the kubelet's
//! part is played: a pod that still runs gets its publication retried
//! (and must then see its volume, its data intact across later kills), a
//! deleted pod gets its unpublication retried, and a forgotten one (the
//! kubelet gave up on a publication that never bound, and removed the
//! pod's directory) gets nothing: the driver's startup sweep must remove
//! it. At the end nothing is left: no record, volume, scratch file, use
//! marker, mount, loop device or subvolume.
//!
//! Per pool kind: `dir`, `btrfs` and `image` (ext4), the last two on
//! loop-mounted filesystems the test makes (root; btrfs-progs,
//! e2fsprogs, util-linux). `HOSTPATH_CSI_CRASH_ROUNDS` sets the rounds
//! (default 6), `HOSTPATH_CSI_CRASH_SEED` the seed.

mod common;
mod robust_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::node_client::NodeClient;
use hostpath_csi::config::PoolKind;
use robust_support::{
    Driver, LoopFs, PoolSpec, Rng, Workdir, connect_once, env_u64, have, loops_below, mounts_below,
    run,
};
use sha2::{Digest, Sha256};

/// Pods per round.
const PODS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_inline_volumes_survive_sigkill() {
    if !may_mount() {
        return;
    }
    crash(PoolSpec::dir("d").with_ephemeral("64Mi")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn btrfs_inline_volumes_survive_sigkill() {
    if !may_mount() || !have("btrfs") || !have("mkfs.btrfs") {
        return;
    }
    crash(PoolSpec::btrfs("bt").with_ephemeral("64Mi")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_inline_volumes_survive_sigkill() {
    if !may_mount() || !have("mkfs.ext4") || !have("losetup") {
        return;
    }
    crash(PoolSpec::image("img", "ext4").with_ephemeral("64Mi")).await;
}

fn may_mount() -> bool {
    common::root_or_skip("inline volumes are bind-mounted; btrfs and image pools loop-mount")
}

/// A pod with one inline volume, laid out as the kubelet does.
#[derive(Clone)]
struct Pod {
    uid: String,
    id: String,
    /// The pod's directory (removed when the pod is gone).
    pod_dir: PathBuf,
    /// The target, `<pod dir>/volumes/kubernetes.io~csi/scratch/mount`.
    target: PathBuf,
}

impl Pod {
    fn new(kubelet: &Path, round: u64, i: usize) -> Self {
        let uid = format!("pod-{round}-{i}");
        let pod_dir = kubelet.join("pods").join(&uid);
        let dir = pod_dir.join("volumes/kubernetes.io~csi/scratch");
        std::fs::create_dir_all(&dir).unwrap();
        Pod {
            id: format!(
                "csi-{}",
                hex::encode(Sha256::digest(format!("{uid}scratch")))
            ),
            target: dir.join("mount"),
            pod_dir,
            uid,
        }
    }

    fn publish_request(&self, pool: &str) -> csi::NodePublishVolumeRequest {
        let context: HashMap<String, String> = [
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", self.uid.as_str()),
            ("csi.storage.k8s.io/pod.namespace", "crash"),
            ("pool", pool),
            ("size", "16Mi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        csi::NodePublishVolumeRequest {
            volume_context: context,
            ..common::publish_request(&self.id, &self.target, false)
        }
    }

    fn unpublish_request(&self) -> csi::NodeUnpublishVolumeRequest {
        csi::NodeUnpublishVolumeRequest {
            volume_id: self.id.clone(),
            target_path: self.target.display().to_string(),
        }
    }

    fn mounted(&self) -> bool {
        !common::mounts_at(&self.target).is_empty()
    }
}

async fn node(d: &Driver) -> NodeClient<tonic::transport::Channel> {
    NodeClient::new(connect_once(&d.socket).await.unwrap())
}

/// Retries a call until it succeeds, as the kubelet does (ABORTED while
/// the sweep holds the volume, say).
async fn until_done<F, Fut>(d: &Driver, what: &str, call: F)
where
    F: Fn(NodeClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match call(node(d).await).await {
            Ok(()) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying {what}: {e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what} never succeeded: {e:?}\n{}", d.log_tail()),
        }
    }
}

async fn publish(d: &Driver, pod: &Pod, pool: &str) {
    let r = pod.publish_request(pool);
    until_done(d, &format!("publish of {}", pod.uid), |mut c| {
        let r = r.clone();
        async move { c.node_publish_volume(r).await.map(|_| ()) }
    })
    .await;
}

async fn unpublish(d: &Driver, pod: &Pod) {
    let r = pod.unpublish_request();
    until_done(d, &format!("unpublish of {}", pod.uid), |mut c| {
        let r = r.clone();
        async move { c.node_unpublish_volume(r).await.map(|_| ()) }
    })
    .await;
}

/// Sends `calls` at once, kills the driver somewhere in them (within
/// `span`, about as long as they take), and starts it again (its startup
/// sweep runs).
async fn kill_during<T: Send + 'static>(
    driver: &mut Driver,
    root: &Path,
    pools: &[PoolSpec],
    rng: &mut Rng,
    span: Duration,
    calls: Vec<tokio::task::JoinHandle<T>>,
) {
    let micros = span.as_micros() as u64;
    tokio::time::sleep(Duration::from_micros(rng.below(micros.max(1)))).await;
    driver.kill();
    for c in calls {
        let _ = c.await;
    }
    *driver = Driver::start(root, pools).await;
}

/// Where a kill left a pod's volume.
fn state(pool: &Path, pod: &Pod) -> &'static str {
    let record = pool.join(format!(".{}.meta", pod.id)).exists();
    let storage = pool.join(&pod.id).exists();
    match (record, pod.mounted()) {
        (false, false) if storage => "half-made (storage, no record)",
        (false, false) => "not made",
        (true, false) => "made, not bound",
        (true, true) => "bound",
        (false, true) => "bound without a record",
    }
}

async fn crash(spec: PoolSpec) {
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 13);
    let rounds = env_u64("HOSTPATH_CSI_CRASH_ROUNDS", 6);
    eprintln!("{}: seed {seed}, {rounds} rounds", spec.name);
    let mut rng = Rng::new(seed);
    let work = Workdir::new("hpc-eph-crash-");
    let root = work.path();
    let _fs = spec
        .own_fs()
        .map(|(kind, bytes)| LoopFs::new(root, spec.name, kind, bytes));
    let pool = spec.dir_in(root);
    let pools = [spec.clone()];
    let kubelet = root.join("kubelet");
    let mut driver = Driver::start(root, &pools).await;
    let mut states: BTreeMap<&str, u32> = BTreeMap::new();
    let mut fates: BTreeMap<&str, u32> = BTreeMap::new();
    let mut kills = 0;

    // How long a publication and an unpublication take here (an image
    // volume's mkfs, a btrfs subvolume and its limit, a bare mkdir), so
    // the kills land anywhere in them rather than before they start.
    let probe = Pod::new(&kubelet, 999, 0);
    let t = Instant::now();
    publish(&driver, &probe, spec.name).await;
    let publish_time = t.elapsed();
    let t = Instant::now();
    unpublish(&driver, &probe).await;
    let unpublish_time = t.elapsed();
    std::fs::remove_dir_all(&probe.pod_dir).unwrap();
    // The calls of a round run side by side on a busy machine: kill
    // within three times one call's time.
    let (publish_span, unpublish_span) = (publish_time * 3, unpublish_time * 3);

    for round in 0..rounds {
        let pods: Vec<Pod> = (0..PODS).map(|i| Pod::new(&kubelet, round, i)).collect();
        // Publications, and a kill somewhere in them.
        let calls = pods
            .iter()
            .map(|p| {
                let (socket, r) = (driver.socket.clone(), p.publish_request(spec.name));
                tokio::spawn(async move {
                    let mut c = NodeClient::new(connect_once(&socket).await.ok()?);
                    c.node_publish_volume(r).await.ok()
                })
            })
            .collect();
        kill_during(&mut driver, root, &pools, &mut rng, publish_span, calls).await;
        kills += 1;
        let mut running = Vec::new();
        for pod in &pods {
            let s = state(&pool, pod);
            assert_ne!(s, "bound without a record", "{}", pod.uid);
            *states.entry(s).or_insert(0) += 1;
            // The kubelet's part, by the pod's fate.
            let fate = match rng.below(3) {
                0 => "runs",
                1 => "deleted",
                _ => "forgotten",
            };
            *fates.entry(fate).or_insert(0) += 1;
            match fate {
                "runs" => {
                    publish(&driver, pod, spec.name).await;
                    assert!(pod.mounted(), "{} is published", pod.uid);
                    std::fs::write(pod.target.join("data"), pod.uid.as_bytes()).unwrap();
                    running.push(pod.clone());
                }
                // A forgotten pod whose volume was bound is not forgotten:
                // the kubelet sees the mount and unpublishes it.
                "forgotten" if !pod.mounted() => {
                    std::fs::remove_dir_all(&pod.pod_dir).unwrap();
                }
                _ => {
                    unpublish(&driver, pod).await;
                    assert!(!pod.target.exists(), "{}: target removed", pod.uid);
                    std::fs::remove_dir_all(&pod.pod_dir).unwrap();
                }
            }
        }

        // A kill between publication and unpublication: the running pods
        // keep their volumes and data.
        driver.kill();
        kills += 1;
        driver = Driver::start(root, &pools).await;
        for pod in &running {
            assert!(pod.mounted(), "{} still published", pod.uid);
            assert_eq!(
                std::fs::read(pod.target.join("data")).unwrap(),
                pod.uid.as_bytes(),
                "{}: data intact",
                pod.uid
            );
        }

        // Unpublications, and a kill somewhere in them; then the
        // kubelet's retries.
        let calls = running
            .iter()
            .map(|p| {
                let (socket, r) = (driver.socket.clone(), p.unpublish_request());
                tokio::spawn(async move {
                    let mut c = NodeClient::new(connect_once(&socket).await.ok()?);
                    c.node_unpublish_volume(r).await.ok()
                })
            })
            .collect();
        kill_during(&mut driver, root, &pools, &mut rng, unpublish_span, calls).await;
        kills += 1;
        for pod in &running {
            unpublish(&driver, pod).await;
            assert!(!pod.target.exists(), "{}: target removed", pod.uid);
            std::fs::remove_dir_all(&pod.pod_dir).unwrap();
        }
    }

    // A last restart: its sweep removes the forgotten volumes.
    driver.kill();
    driver = Driver::start(root, &pools).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = loop {
        let left: Vec<String> = std::fs::read_dir(&pool)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "{}: {kills} kills (publication takes {publish_time:?}, unpublication \
         {unpublish_time:?}); after a kill during publication: {states:?}; pods: {fates:?}",
        spec.name
    );
    assert!(
        left.is_empty(),
        "left in the pool: {left:?}\n{}",
        driver.log_tail()
    );
    assert!(
        mounts_below(&kubelet).is_empty(),
        "{:?}",
        mounts_below(&kubelet)
    );
    assert!(mounts_below(&pool).is_empty(), "{:?}", mounts_below(&pool));
    assert!(loops_below(&pool).is_empty(), "{:?}", loops_below(&pool));
    if spec.kind == PoolKind::Btrfs {
        let list = run(
            "btrfs",
            &["subvolume".as_ref(), "list".as_ref(), pool.as_os_str()],
        );
        assert!(list.trim().is_empty(), "subvolumes left:\n{list}");
    }
    drop(driver);
}
