//! Support for the robustness tests (`tests/robust_*.rs`): the real
//! binary as a child process, a work directory that cleans up after
//! itself, a canary tree with a checksum, and a small seeded RNG.
//!
//! Everything lives under one temporary directory. Dropping a [`Driver`]
//! kills and reaps its process; dropping a [`LoopFs`] unmounts its
//! filesystem and detaches its loop device; dropping a [`Workdir`] detaches
//! every mount below it and every loop device backed by a file below it
//! before the directory is removed, so a failing test leaves no process,
//! mount, loop device or directory behind.

#![allow(dead_code)]

#[allow(unused_imports)]
pub use crate::common::{have, loops_below, mounts_below, run, unmount_below};
#[allow(unused_imports)]
pub use rpc::Rpc;

pub mod rpc;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::identity_client::IdentityClient;
use hostpath_csi::config::PoolKind;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tonic::transport::Channel;

/// Node id the real binary is started with.
pub const NODE: &str = "n1";

/// A temporary directory that unmounts everything below itself before it
/// is removed.
pub struct Workdir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl Workdir {
    /// A new, empty directory under the system's temp dir.
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let path = std::fs::canonicalize(dir.path()).unwrap();
        Workdir {
            dir: Some(dir),
            path,
        }
    }

    /// Its canonical path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        unmount_below(&self.path);
        detach_loops_below(&self.path);
        // Never let the removal run through a mount that would not go.
        if mounts_below(&self.path).is_empty() {
            drop(self.dir.take());
        } else {
            eprintln!("{} still has mounts; left in place", self.path.display());
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// Detaches every loop device backed by a file at or below `dir`, waiting
/// a little for devices that are still being released (auto-clear after a
/// lazy unmount).
pub fn detach_loops_below(dir: &Path) {
    for _ in 0..50 {
        let devs = loops_below(dir);
        if devs.is_empty() {
            return;
        }
        for (dev, _) in devs {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "loop devices still attached below {}: {:?}",
        dir.display(),
        loops_below(dir)
    );
}

/// Whether a loop device detaches itself at its last close (sysfs).
pub fn loop_autoclear(dev: &Path) -> Option<bool> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
        .ok()
        .map(|s| s.trim() == "1")
}

/// A filesystem made in a sparse file and loop-mounted, for pools that
/// need one (btrfs). Dropping it unmounts it and detaches its device.
pub struct LoopFs {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// Its loop device.
    pub device: PathBuf,
    /// The file holding it.
    pub image: PathBuf,
}

impl LoopFs {
    /// `truncate -s BYTES root/fs/NAME.img; mkfs.KIND; mount -o loop` at
    /// `root/fs/NAME`.
    pub fn new(root: &Path, name: &str, kind: &str, bytes: u64) -> Self {
        let base = root.join("fs");
        let image = base.join(format!("{name}.img"));
        let mount = base.join(name);
        std::fs::create_dir_all(&mount).unwrap();
        File::create(&image).unwrap().set_len(bytes).unwrap();
        run(&format!("mkfs.{kind}"), &["-q".as_ref(), image.as_os_str()]);
        // Guard first, so a failing mount still cleans up.
        let mut fs = LoopFs {
            mount,
            device: PathBuf::new(),
            image,
        };
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                fs.image.as_os_str(),
                fs.mount.as_os_str(),
            ],
        );
        let table = hostpath_csi::sys::mountinfo::read().unwrap();
        let entry = hostpath_csi::sys::mountinfo::mounted_at(&table, &fs.mount)
            .expect("the loop filesystem is mounted");
        fs.device = PathBuf::from(&entry.source);
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Bind mounts of its contents elsewhere (targets) keep it busy:
        // those go with the Workdir, and the device (auto-clear, from
        // `mount -o loop`) with them.
        unmount_below(&self.mount);
        if loops_below(&self.image)
            .iter()
            .any(|(d, _)| *d == self.device)
        {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.device)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// One pool of the driver under test. The crash and load tests take a
/// list of these, so new pool kinds only need a new entry.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Pool name.
    pub name: &'static str,
    /// Pool kind.
    pub kind: PoolKind,
    /// Image pools: the filesystem inside the images (`ext4`, `xfs`);
    /// `None` for the driver's default.
    pub filesystem: Option<&'static str>,
    /// btrfs pools: full qgroup accounting is turned on before the driver
    /// sees the filesystem (which it then keeps), rather than left to the
    /// driver (which turns on simple quotas where the kernel has them).
    pub full_qgroups: bool,
    /// The largest inline ephemeral volume, for a pool opened to them
    /// (`ephemeral = true`); `None` for a pool that serves none.
    pub ephemeral_max: Option<&'static str>,
}

impl PoolSpec {
    /// A `dir` pool.
    pub const fn dir(name: &'static str) -> Self {
        PoolSpec {
            name,
            kind: PoolKind::Dir,
            filesystem: None,
            full_qgroups: false,
            ephemeral_max: None,
        }
    }

    /// A `btrfs` pool; it lives on the btrfs [`LoopFs`] named after it
    /// (see [`PoolSpec::dir_in`]), which the test makes.
    pub const fn btrfs(name: &'static str) -> Self {
        PoolSpec {
            name,
            kind: PoolKind::Btrfs,
            filesystem: None,
            full_qgroups: false,
            ephemeral_max: None,
        }
    }

    /// A `btrfs` pool on a filesystem with full qgroup accounting.
    pub const fn btrfs_qgroups(name: &'static str) -> Self {
        PoolSpec {
            full_qgroups: true,
            ..Self::btrfs(name)
        }
    }

    /// An `image` pool with images of filesystem `fs`.
    pub const fn image(name: &'static str, fs: &'static str) -> Self {
        PoolSpec {
            name,
            kind: PoolKind::Image,
            filesystem: Some(fs),
            full_qgroups: false,
            ephemeral_max: None,
        }
    }

    /// This pool, opened to inline ephemeral volumes of at most `max`
    /// (a size as the config file writes it, `"64Mi"`).
    pub const fn with_ephemeral(self, max: &'static str) -> Self {
        PoolSpec {
            ephemeral_max: Some(max),
            ..self
        }
    }

    /// Where the pool lives under `root`: [`pool_dir`], except for pools
    /// that get a filesystem of their own (see [`PoolSpec::own_fs`]), which
    /// live in `pool` on the filesystem `LoopFs::new(root, name, ..)` mounts.
    pub fn dir_in(&self, root: &Path) -> PathBuf {
        match self.own_fs() {
            Some(_) => root.join("fs").join(self.name).join("pool"),
            None => pool_dir(root, self.name),
        }
    }

    /// The filesystem kind and size the test makes for this pool, if it
    /// gets one of its own: btrfs pools need btrfs, and image pools promise
    /// their images' full size against the free space below them, so on the
    /// host's disk what they can promise would depend on how full the
    /// machine running the test happens to be (CI once had 4 GiB free,
    /// fewer than 18 images of 300 MiB). Both are sparse: only what the
    /// volumes write takes space.
    pub fn own_fs(&self) -> Option<(&'static str, u64)> {
        match self.kind {
            PoolKind::Btrfs => Some(("btrfs", 1 << 30)),
            PoolKind::Image => Some(("ext4", 16 << 30)),
            _ => None,
        }
    }
}

/// Where pool `name` lives under `root` (any kind but btrfs).
pub fn pool_dir(root: &Path, name: &str) -> PathBuf {
    root.join("pools").join(name)
}

/// Command-line arguments for the pools: `--pool NAME=DIR` for plain `dir`
/// pools, a TOML config file for any other kind and for pools opened to
/// inline ephemeral volumes.
pub fn pool_args(root: &Path, pools: &[PoolSpec]) -> Vec<String> {
    let mut args = Vec::new();
    let mut toml = String::new();
    for p in pools {
        let dir = p.dir_in(root);
        if p.kind == PoolKind::Dir && p.ephemeral_max.is_none() {
            args.push("--pool".to_string());
            args.push(format!("{}={}", p.name, dir.display()));
        } else {
            toml.push_str(&format!(
                "[[pools]]\nname = {:?}\npath = {:?}\nkind = {:?}\n",
                p.name,
                dir.display().to_string(),
                p.kind.as_str()
            ));
            if let Some(fs) = p.filesystem {
                toml.push_str(&format!("filesystem = {fs:?}\n"));
            }
            if let Some(max) = p.ephemeral_max {
                toml.push_str(&format!(
                    "ephemeral = true\nmax_ephemeral_volume_size = {max:?}\n"
                ));
            }
            toml.push('\n');
        }
    }
    if !toml.is_empty() {
        let file = root.join("pools.toml");
        std::fs::write(&file, toml).unwrap();
        args.push("--config".to_string());
        args.push(file.display().to_string());
    }
    args
}

/// The real `hostpath-csi` binary running as a child process. Dropping it
/// kills it with SIGKILL and reaps it.
pub struct Driver {
    child: Option<Child>,
    /// Its socket.
    pub socket: PathBuf,
    /// Where its stderr goes (appended across restarts).
    pub log: PathBuf,
}

impl Driver {
    /// Starts the binary serving `pools` on `root/csi.sock`; does not wait
    /// for it to be ready.
    pub fn spawn(root: &Path, pools: &[PoolSpec]) -> Self {
        // HOSTPATH_CSI_TEST_DRIVER_LOG (e.g. `debug`) to see every command
        // the driver runs when a test fails.
        let level = std::env::var("HOSTPATH_CSI_TEST_DRIVER_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn_logging(root, pools, &level)
    }

    /// [`Driver::spawn`] with the log filter `level`, for tests that read
    /// the log.
    pub fn spawn_logging(root: &Path, pools: &[PoolSpec], level: &str) -> Self {
        let socket = root.join("csi.sock");
        let log = root.join("driver.log");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"));
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(NODE)
            .args(pool_args(root, pools))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for var in [
            "CSI_ENDPOINT",
            "NODE_NAME",
            "HOSTPATH_CSI_CONFIG",
            "HOSTPATH_CSI_DRIVER_NAME",
            "HOSTPATH_CSI_STATE_DIR",
            "HOSTPATH_CSI_MAX_VOLUMES_PER_NODE",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("HOSTPATH_CSI_LOG", level);
        let child = cmd.spawn().expect("starting hostpath-csi");
        Driver {
            child: Some(child),
            socket,
            log,
        }
    }

    /// Starts the binary and waits until Probe says ready.
    pub async fn start(root: &Path, pools: &[PoolSpec]) -> Self {
        let mut d = Self::spawn(root, pools);
        d.wait_ready(Duration::from_secs(20)).await;
        d
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits until Probe answers ready, panicking (with the log's tail)
    /// if the process exits or the deadline passes.
    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("driver exited with {status}; log:\n{}", self.log_tail());
            }
            if let Ok(ch) = connect_once(&self.socket).await
                && let Ok(r) = IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
                && r.into_inner().ready == Some(true)
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("driver not ready in time; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// How the process ended, if it already has (without being killed).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    /// Resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// The last lines of the driver's log.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One connection attempt to a CSI socket.
pub async fn connect_once(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    csi_proto::connect(socket).await
}

/// The process that served a [`connect_traced`] channel's connection: the
/// pid the kernel recorded when the listening socket was made
/// (`SO_PEERCRED`). A connection that lands on a listener a killed driver
/// left behind (a copy held by a child it had just forked, until that
/// child's exec closes it) names the killed driver, whichever socket file
/// is at the path by then: the only exact way to tell whether a broken
/// connection was ever served by a live driver.
#[derive(Debug, Clone, Default)]
pub struct PeerPid(Arc<AtomicI32>);

impl PeerPid {
    /// The pid of the last connection made, if one was made.
    pub fn get(&self) -> Option<u32> {
        u32::try_from(self.0.load(Ordering::SeqCst))
            .ok()
            .filter(|p| *p > 0)
    }
}

/// [`connect_once`], also telling which process accepted the connection
/// (see [`PeerPid`]; tonic reconnects through the same connector, so it
/// always names the latest connection).
pub async fn connect_traced(socket: &Path) -> Result<(Channel, PeerPid), tonic::transport::Error> {
    let peer = PeerPid::default();
    let ch = connect_noting_peer(socket, &peer).await?;
    Ok((ch, peer))
}

/// [`connect_traced`], noting the peer in `peer` as soon as the socket is
/// connected: also when the HTTP/2 handshake then fails, which tells a
/// connection that a process accepted and then broke from a socket nobody
/// listened on.
pub async fn connect_noting_peer(
    socket: &Path,
    peer: &PeerPid,
) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    let record = peer.clone();
    tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (path, record) = (path.clone(), record.clone());
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                let pid = s.peer_cred()?.pid().unwrap_or(0);
                record.0.store(pid, Ordering::SeqCst);
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// Whether a failed call failed in the client's transport (the connection
/// broke, was reset or refused the stream) rather than being answered by
/// the driver. A status the driver sent comes off the wire with no cause
/// attached; one the client made up from a hyper or h2 error carries it.
/// tonic maps those to several codes (`Unknown: transport error`,
/// `Cancelled: operation was canceled`, `Internal: h2 protocol error`,
/// `Unavailable` for a refused stream), so the code alone cannot tell:
/// an `Unavailable` the client made up would otherwise pass for the
/// driver's "not ready" and be retried unseen.
pub fn is_transport_error(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some()
        || s.code() == tonic::Code::Unknown && s.message().starts_with("transport error")
}

/// A status with its whole chain of causes (hyper, h2, the socket's
/// errno), which `Status`'s own message leaves out: `transport error`
/// alone does not tell a reset from a GOAWAY or a refused connect.
pub fn error_chain(s: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    if let Some(c) = std::error::Error::source(s) {
        out.push_str(" <- ");
        out.push_str(&causes(c));
    }
    out
}

/// An error and its causes, outermost first.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(" <- {c}"));
        cause = c.source();
    }
    out
}

/// A single-node-writer capability with raw block access.
pub fn block_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, access_mode::Mode};
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(Default::default())),
    }
}

/// The children of process `pid` now, with their command names: a child
/// still named after the thread that forked it (`tokio-rt-worker` for
/// the driver) has not exec'd yet, and holds copies of all the parent's
/// descriptors, its listening socket included.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for child in list
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm"))
                .map_or_else(|_| "(gone)".to_string(), |c| c.trim().to_string());
            out.push((child, comm));
        }
    }
    out
}

/// Creates a tree of files, directories and a symlink that nothing in the
/// driver should ever touch.
pub fn make_canary(dir: &Path) {
    std::fs::create_dir_all(dir.join("etc/sub")).unwrap();
    std::fs::write(dir.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/sub/secret"), b"do not touch").unwrap();
    std::fs::write(dir.join("top"), vec![7u8; 4096]).unwrap();
    std::fs::set_permissions(dir.join("top"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("link-to-etc")).unwrap();
}

/// A checksum of a tree: every entry's relative path, type, mode, owner
/// and content (symlinks by their target), without following symlinks.
/// Top-level entries named in `skip` are left out.
pub fn tree_digest(root: &Path, skip: &[&str]) -> String {
    let mut h = Sha256::new();
    let mut stack = vec![root.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if dir == root && skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            entries.push(path.clone());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        h.update(rel.as_os_str().as_encoded_bytes());
        h.update(format!(" {:o} {}:{} ", m.mode(), m.uid(), m.gid()).as_bytes());
        if m.file_type().is_symlink() {
            h.update(
                std::fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_encoded_bytes(),
            );
        } else if m.is_file() {
            h.update(std::fs::read(&path).unwrap());
        }
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// SplitMix64: a tiny, seeded, reproducible generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// A `u64` from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
