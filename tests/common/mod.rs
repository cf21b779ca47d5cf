//! Test harness: the real server, in-process, on a socket in a temporary
//! directory, driven through the generated CSI clients like a CO would.
//!
//! Everything a test makes (pools, targets, socket) lives under one
//! temporary directory; dropping the harness stops the server and detaches
//! every mount below that directory before removing it, so a failing test
//! leaves nothing mounted behind. Tests that mount need root (CI runs as
//! root).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::controller_service_capability::rpc::Type as CtrlCap;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use csi_proto::node_service_capability::rpc::Type as NodeCap;
use csi_proto::volume_capability::access_mode::Mode;
use hostpath_csi::config::{Config, PoolConfig, PoolKind};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Node id every harness uses.
pub const NODE: &str = "test-node";
/// How long a started harness may take to answer Probe ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running driver and the directory it owns.
pub struct Harness {
    /// Root of everything this test makes.
    pub root: TempDir,
    /// The driver's socket.
    pub socket: PathBuf,
    /// Pools as configured.
    pub pools: Vec<PoolConfig>,
    /// A test's changes to the rest of the configuration.
    tweak: fn(&mut Config),
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    channel: Option<Channel>,
}

impl Harness {
    /// A driver with two dir pools, `hdd` and `ssd`.
    pub async fn start() -> Self {
        Self::with_pools(&[("hdd", PoolKind::Dir), ("ssd", PoolKind::Dir)]).await
    }

    /// A driver with the given pools, each in its own directory.
    pub async fn with_pools(pools: &[(&str, PoolKind)]) -> Self {
        let root = tempfile::Builder::new()
            .prefix("hostpath-csi-test")
            .tempdir()
            .unwrap();
        let pools = pools
            .iter()
            .map(|(name, kind)| PoolConfig {
                kind: *kind,
                ..PoolConfig::dir(name, root.path().join("pools").join(name))
            })
            .collect();
        Self::with_pool_configs(root, pools).await
    }

    /// A driver with fully specified pools under `root`.
    pub async fn with_pool_configs(root: TempDir, pools: Vec<PoolConfig>) -> Self {
        Self::with_config(root, pools, |_| {}).await
    }

    /// A driver with fully specified pools under `root` and the rest of its
    /// configuration changed by `tweak` (also after restarts).
    pub async fn with_config(
        root: TempDir,
        pools: Vec<PoolConfig>,
        tweak: fn(&mut Config),
    ) -> Self {
        std::fs::create_dir_all(root.path().join("targets")).unwrap();
        let mut h = Harness {
            socket: root.path().join("csi.sock"),
            root,
            pools,
            tweak,
            stop: None,
            task: None,
            channel: None,
        };
        h.launch().await;
        h
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> Config {
        let mut c = Config {
            socket: self.socket.clone(),
            node_id: NODE.to_string(),
            driver_name: "hostpath-csi.dev".to_string(),
            pools: self.pools.clone(),
            max_volumes_per_node: 0,
            expansion: Default::default(),
        };
        (self.tweak)(&mut c);
        c
    }

    async fn launch(&mut self) {
        let listener = hostpath_csi::server::bind(&self.socket).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let config = self.config();
        let task = tokio::spawn(async move {
            hostpath_csi::server::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        self.stop = Some(tx);
        self.task = Some(task);
        let channel = csi_proto::connect(&self.socket).await.unwrap();
        self.channel = Some(channel);
        self.wait_ready().await;
    }

    /// Waits until Probe says ready. Opening a pool flushes its directory
    /// (and mounts or formats nothing), which is quick on a quiet disk but
    /// took over 2 s on this machine while other test suites and builds
    /// kept it busy (load average 20); the limit only bounds a broken
    /// driver, so it is generous.
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let r = self.identity().probe(csi::ProbeRequest {}).await;
            if let Ok(r) = r
                && r.into_inner().ready == Some(true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("driver never became ready within {READY_TIMEOUT:?}");
    }

    /// Stops the server (gracefully) and starts a new one on the same
    /// pools and socket, as after a restart of the node plugin.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        self.launch().await;
    }

    /// Stops the server and waits for it to finish.
    pub async fn shutdown(&mut self) {
        self.channel = None;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    fn channel(&self) -> Channel {
        self.channel.clone().expect("server is running")
    }

    /// Identity client.
    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel())
    }

    /// Controller client.
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    /// Node client.
    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }

    /// GroupController client.
    #[allow(dead_code)] // not every test binary uses it
    pub fn group_controller(&self) -> csi::group_controller_client::GroupControllerClient<Channel> {
        csi::group_controller_client::GroupControllerClient::new(self.channel())
    }

    /// Directory of a pool (canonical, as the driver sees it).
    pub fn pool_dir(&self, name: &str) -> PathBuf {
        let p = self.pools.iter().find(|p| p.name == name).expect("pool");
        std::fs::canonicalize(&p.path).unwrap_or_else(|_| p.path.clone())
    }

    /// A fresh target path (not created) under the harness directory.
    pub fn target(&self, name: &str) -> PathBuf {
        std::fs::canonicalize(self.root.path().join("targets"))
            .unwrap()
            .join(name)
    }

    /// Creates a volume and returns it.
    pub async fn create(&self, name: &str, pool: &str, bytes: i64) -> csi::Volume {
        self.controller()
            .create_volume(create_request(name, pool, bytes))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    /// Creates a volume as `req` asks and returns it (panics, naming the
    /// request, if the driver refuses).
    pub async fn create_volume(&self, req: csi::CreateVolumeRequest) -> csi::Volume {
        let name = req.name.clone();
        self.controller()
            .create_volume(req)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    /// The RPC capabilities the Controller service advertises.
    pub async fn controller_caps(&self) -> Vec<CtrlCap> {
        use csi::controller_service_capability::Type;
        self.controller()
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(Type::Rpc(r)) => CtrlCap::try_from(r.r#type).ok(),
                _ => None,
            })
            .collect()
    }

    /// The RPC capabilities the Node service advertises.
    pub async fn node_caps(&self) -> Vec<NodeCap> {
        use csi::node_service_capability::Type;
        self.node()
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| match c.r#type {
                Some(Type::Rpc(r)) => NodeCap::try_from(r.r#type).ok(),
                _ => None,
            })
            .collect()
    }

    /// Publishes a volume read-write at `target`.
    pub async fn publish(
        &self,
        volume_id: &str,
        target: &Path,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node()
            .node_publish_volume(publish_request(volume_id, target, readonly))
            .await
            .map(|_| ())
    }

    /// Unpublishes a volume from `target`.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), tonic::Status> {
        self.node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                target_path: target.to_string_lossy().into_owned(),
            })
            .await
            .map(|_| ())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        unmount_below(self.root.path());
    }
}

/// Mount points at or below `dir` (canonicalised first, as the mount
/// table holds canonical paths). Panics if the mount table cannot be read:
/// never guess "nothing mounted", a caller may delete the tree next.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    hostpath_csi::sys::mountinfo::read()
        .expect("reading /proc/self/mountinfo")
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(&dir))
        .collect()
}

/// Detaches every mount at or below `dir`, innermost first. Called from
/// `Drop`, so it never panics: a directory that is gone has no mounts.
pub fn unmount_below(dir: &Path) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let Ok(table) = hostpath_csi::sys::mountinfo::read() else {
        return;
    };
    let mut points: Vec<PathBuf> = table
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|m| m.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Waits (up to `limit`) until no process uses anything at or below the
/// mount point `mnt` (`hostpath_csi::sys::mount::users`), so that
/// unmounting it really releases the filesystem and its loop device. A
/// driver killed with SIGKILL does not take its children with it: one it
/// had cloned but not yet exec'd holds copies of its descriptors (a pool's
/// lock included) until it execs or dies, and a tool it started runs to
/// its end; on a loaded machine that takes seconds. Returns the users
/// waited for (empty when there were none), for the test's output; panics
/// naming them if they are still there after `limit`.
pub fn wait_unused(mnt: &Path, limit: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let users = hostpath_csi::sys::mount::users(mnt);
        if users.is_empty() {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} still used after {limit:?} by: {}",
            mnt.display(),
            users
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        );
        for u in users {
            let u = u.to_string();
            if !seen.contains(&u) {
                seen.push(u);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts the filesystem at `mnt` for good (not lazily, so that it and
/// its loop device are released when this returns, not whenever the
/// kernel gets to it): first waits for its users ([`wait_unused`]), then
/// retries a busy unmount, both for up to `limit`; panics naming the users
/// if it cannot. Returns the users waited for, for the test's output.
pub fn unmount_when_unused(mnt: &Path, limit: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + limit;
    let waited_for = wait_unused(mnt, limit);
    loop {
        match nix::mount::umount2(mnt, nix::mount::MntFlags::empty()) {
            Ok(()) => return waited_for,
            Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!(
                "unmounting {}: {e}; used by: {:?}",
                mnt.display(),
                hostpath_csi::sys::mount::users(mnt)
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// Writes `bytes` of data to a new file at `path` in 1 MiB chunks and
/// flushes; returns the first error with how much got written (a size
/// limit shows as EDQUOT or ENOSPC after that many bytes).
pub fn write_file(path: &Path, bytes: u64) -> Result<(), (u64, std::io::Error)> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| (0, e))?;
    let chunk = vec![0xa5u8; 1 << 20];
    let mut done = 0u64;
    while done < bytes {
        let n = chunk.len().min((bytes - done) as usize);
        f.write_all(&chunk[..n]).map_err(|e| (done, e))?;
        done += n as u64;
    }
    f.sync_all().map_err(|e| (done, e))
}

/// Mount points at exactly `path` in this process's mount table.
pub fn mounts_at(path: &Path) -> Vec<hostpath_csi::sys::mountinfo::MountEntry> {
    hostpath_csi::sys::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|e| e.mount_point == path)
        .collect()
}

/// A mount capability with the given access mode.
pub fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume::default(),
        )),
    }
}

/// A CreateVolume request for a single-node-writer mount volume.
pub fn create_request(name: &str, pool: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: HashMap::from([("pool".to_string(), pool.to_string())]),
        ..Default::default()
    }
}

/// `req` with the claim and PV names the external-provisioner adds
/// (`--extra-create-metadata`): claim `namespace/claim`, PV named after
/// the volume.
pub fn for_claim(
    mut req: csi::CreateVolumeRequest,
    namespace: &str,
    claim: &str,
) -> csi::CreateVolumeRequest {
    let pv = req.name.clone();
    for (k, v) in [
        ("csi.storage.k8s.io/pvc/name", claim),
        ("csi.storage.k8s.io/pvc/namespace", namespace),
        ("csi.storage.k8s.io/pv/name", &pv),
    ] {
        req.parameters.insert(k.into(), v.into());
    }
    req
}

/// Asserts that a call was refused with `code` and a message that says
/// `says` (the reason a user reads).
#[track_caller]
pub fn assert_refused(e: &tonic::Status, code: tonic::Code, says: &str) {
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(says),
        "{:?} does not say {says:?}",
        e.message()
    );
}

/// A single-node-writer raw block capability.
pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(csi::volume_capability::AccessType::Block(Default::default())),
    }
}

/// A CreateVolume request for a single-node-writer raw block volume.
pub fn create_block(name: &str, pool: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_capabilities: vec![block_cap()],
        ..create_request(name, pool, bytes)
    }
}

/// A NodePublishVolume request for a raw block volume.
pub fn publish_block(id: &str, target: &Path) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_capability: Some(block_cap()),
        ..publish_request(id, target, false)
    }
}

/// A NodePublishVolume request.
pub fn publish_request(
    volume_id: &str,
    target: &Path,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        readonly,
        ..Default::default()
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(program: &str, args: &[S]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a tool is installed: an executable of that name on `PATH` (or
/// in the sbin directories root's `PATH` has). It is looked up rather than
/// run, as tools disagree on a version flag (`mkfs.xfs --version` fails).
/// Tests that need it are skipped, with a note, where it is not; under
/// `scripts/test.sh`, which installs the tools and sets
/// `HOSTPATH_CSI_REQUIRE_TOOLS=1`, a missing tool fails the test instead,
/// so CI can never pass by testing nothing.
pub fn have(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| {
            std::fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    assert!(
        found || std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "{program} is required (HOSTPATH_CSI_REQUIRE_TOOLS is set) but not installed"
    );
    found
}

/// Where `scripts/setup.sh` installs what the suite needs beyond Debian's
/// packages (csi-sanity, the grpcio and prometheus-client venvs, ...).
pub fn setup_cache() -> PathBuf {
    std::env::var_os("HOSTPATH_CSI_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/hostpath-csi"), PathBuf::from)
}

/// Whether something `scripts/setup.sh` installs is there (`path`); the
/// test is skipped with a note where it is not, and fails under
/// `scripts/test.sh` (HOSTPATH_CSI_REQUIRE_TOOLS), which installs it.
pub fn installed(what: &str, path: &Path) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "{what} is required (HOSTPATH_CSI_REQUIRE_TOOLS is set) but {} is missing: run \
         scripts/setup.sh",
        path.display()
    );
    skip(&format!(
        "{what} is not installed ({} is missing; scripts/setup.sh installs it)",
        path.display()
    ));
    false
}

/// Loop devices backed by a file at or below `dir`: (device, file).
/// Panics if `losetup` cannot answer, so a "no device left" check can
/// never pass by not looking.
pub fn loops_below(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let out = run(
        "losetup",
        &[
            "--list",
            "--noheadings",
            "--raw",
            "--output",
            "NAME,BACK-FILE",
        ],
    );
    out.lines()
        .filter_map(|l| {
            let (dev, back) = l.split_once(' ')?;
            // --raw escapes blanks in names as \x20.
            let back = back.trim().replace("\\x20", " ");
            let back = back.strip_suffix(" (deleted)").unwrap_or(&back);
            let back = PathBuf::from(back);
            back.starts_with(&dir).then(|| (PathBuf::from(dev), back))
        })
        .collect()
}

/// Names in a directory; panics if it cannot be read, so a check of what
/// a directory holds can never pass by not looking.
pub fn entries(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether this test can run: it runs as root, which it needs for `why`
/// (mounts, loop devices, another user's files). As a normal user the
/// test says why it skips and returns early; under `scripts/test.sh`,
/// which runs as root and sets `HOSTPATH_CSI_REQUIRE_TOOLS=1`, a test that
/// would skip fails instead, so CI can never pass by testing nothing.
pub fn root_or_skip(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "this test needs root ({why}), and HOSTPATH_CSI_REQUIRE_TOOLS is set"
    );
    skip(&format!("needs root ({why})"));
    false
}

/// Notes on the terminal that the running test skips, and why. Written to
/// the process's stderr directly, which the test harness does not capture
/// (it captures only `print!` and `eprint!`), so `cargo test` shows it
/// beside the test's `ok`.
pub fn skip(why: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
