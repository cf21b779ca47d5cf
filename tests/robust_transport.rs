//! No kill, only load: a live driver must never drop a connection or a
//! call. Many concurrent clients work through whole volume lives (create,
//! publish, write through the target, stats, unpublish, delete) with real
//! mounts on a dir pool, raw block volumes on loop devices (losetup at
//! publish and unpublish) and image volumes (mkfs, losetup, mount), so the
//! driver forks tools all the time while it accepts connections; half of
//! the clients open a new connection for every call, the others share one
//! (concurrent streams on one connection, as a sidecar's workers make).
//! A few more only open connections and ask Probe, ListVolumes and
//! GetCapacity, and two Python grpcio clients (which send the socket path
//! as `:authority`, so the driver's authority filter rewrites every header
//! block of their connections) ask the same all along. Every failed call
//! fails the test, printed with its whole chain of causes (reset, GOAWAY,
//! refused stream...), and so does a refusal or a panic in the driver's
//! log.
//!
//! Why: the crash tests saw calls fail with `transport error` with no kill
//! to explain them. A client that sees one from a live driver is a
//! kubelet seeing a failed mount; this test would catch a driver that
//! drops connections under load, a listener lost to a forked tool, or the
//! authority filter (src/grpc/authority.rs) corrupting a busy connection,
//! without any kill to blame.
//!
//! Needs root (mounts, loop devices), losetup and mkfs.ext4. Tunables:
//! `HOSTPATH_CSI_TRANSPORT_SECS` (default 15), `HOSTPATH_CSI_TRANSPORT_CLIENTS`
//! (default 24 working clients, plus 4 that only connect).

mod common;
mod robust_support;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_proto as csi;
use robust_support::{
    Driver, LoopFs, PoolSpec, Rpc, Workdir, block_cap, connect_traced, env_u64, error_chain, have,
    is_transport_error, loops_below, mounts_below,
};
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

/// What a volume's life exercises in the driver.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A directory, bind-mounted: no tool runs.
    Dir,
    /// A raw block volume on the dir pool: losetup at publish and
    /// unpublish.
    Block,
    /// An image volume: mkfs at create, losetup and mount at publish.
    Image,
}

impl Kind {
    fn pool(self) -> &'static str {
        match self {
            Kind::Dir | Kind::Block => "d",
            Kind::Image => "i",
        }
    }
}

/// What all clients did.
#[derive(Debug, Default)]
struct Tally {
    /// Answered calls per RPC.
    answered: BTreeMap<&'static str, u64>,
    /// Connections opened.
    connections: u64,
    /// Volume lives completed, per kind.
    lives: BTreeMap<String, u64>,
    /// Every failure, with its causes.
    failures: Vec<String>,
    /// ... of which the transport failed (the driver never answered).
    transport: u64,
}

/// One client's way of calling: a connection kept for every call (shared
/// with other clients), or a new one for each.
struct Caller {
    who: String,
    socket: PathBuf,
    fresh_each_call: bool,
    ch: Option<Channel>,
    tally: Arc<Mutex<Tally>>,
}

impl Caller {
    /// Sends `req` once; a failure is recorded (never retried: a live
    /// driver has no excuse).
    async fn call<R: Rpc>(&mut self, subject: &str, req: R) -> Option<R::Reply> {
        let ch = match self.ch.clone() {
            Some(ch) => ch,
            None => match connect_traced(&self.socket).await {
                Ok((ch, _)) => {
                    self.tally.lock().unwrap().connections += 1;
                    if !self.fresh_each_call {
                        self.ch = Some(ch.clone());
                    }
                    ch
                }
                Err(e) => {
                    let mut t = self.tally.lock().unwrap();
                    t.transport += 1;
                    t.failures.push(format!(
                        "{}: connecting for {} {subject}: {}",
                        self.who,
                        R::NAME,
                        robust_support::causes(&e)
                    ));
                    return None;
                }
            },
        };
        let res = req.send(ch).await;
        let mut t = self.tally.lock().unwrap();
        match res {
            Ok(r) => {
                *t.answered.entry(R::NAME).or_default() += 1;
                Some(r.into_inner())
            }
            Err(s) => {
                t.transport += u64::from(is_transport_error(&s));
                t.failures.push(format!(
                    "{}: {} {subject}: {}",
                    self.who,
                    R::NAME,
                    error_chain(&s)
                ));
                self.ch = None;
                None
            }
        }
    }
}

/// One volume's whole life; `None` at the first failed step (recorded).
async fn life(c: &mut Caller, kind: Kind, name: &str, targets: &Path) -> Option<()> {
    let mut create = common::create_request(name, kind.pool(), 16 * MIB);
    let cap = match kind {
        Kind::Block => block_cap(),
        Kind::Dir | Kind::Image => {
            common::mount_cap(csi::volume_capability::access_mode::Mode::SingleNodeWriter)
        }
    };
    create.volume_capabilities = vec![cap.clone()];
    let id = c.call(name, create).await?.volume?.volume_id;
    let target = targets.join(name);
    let publish = csi::NodePublishVolumeRequest {
        volume_capability: Some(cap),
        ..common::publish_request(&id, &target, false)
    };
    c.call(&id, publish).await?;
    let (t, data) = (target.clone(), format!("{name} was here").into_bytes());
    let wrote = tokio::task::spawn_blocking(move || write_and_read_back(kind, &t, &data))
        .await
        .unwrap();
    if let Err(e) = wrote {
        let mut t = c.tally.lock().unwrap();
        t.failures.push(format!(
            "{}: writing through {}: {e}",
            c.who,
            target.display()
        ));
        return None;
    }
    let stats = csi::NodeGetVolumeStatsRequest {
        volume_id: id.clone(),
        volume_path: target.display().to_string(),
        staging_target_path: String::new(),
    };
    c.call(&id, stats).await?;
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    c.call(&id, unpublish).await?;
    let delete = csi::DeleteVolumeRequest {
        volume_id: id.clone(),
        secrets: Default::default(),
    };
    c.call(&id, delete).await?;
    *c.tally
        .lock()
        .unwrap()
        .lives
        .entry(format!("{kind:?}"))
        .or_default() += 1;
    Some(())
}

/// Writes `data` through the published target (a file in a mounted
/// volume, or the start of a block device) and reads it back.
fn write_and_read_back(kind: Kind, target: &Path, data: &[u8]) -> std::io::Result<()> {
    let path = match kind {
        Kind::Block => target.to_path_buf(),
        Kind::Dir | Kind::Image => target.join("data"),
    };
    let mut f = std::fs::OpenOptions::new()
        .create(!matches!(kind, Kind::Block))
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    f.write_all(data)?;
    f.sync_all()?;
    f.seek(SeekFrom::Start(0))?;
    let mut back = vec![0; data.len()];
    f.read_exact(&mut back)?;
    if back != data {
        return Err(std::io::Error::other("read back something else"));
    }
    Ok(())
}

/// A working client: volume lives of every kind until `until`.
async fn worker(mut c: Caller, id: usize, targets: PathBuf, until: Instant) {
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        // Image volumes cost a mkfs each: one life in four.
        let kind = match (id + n) % 4 {
            0 => Kind::Image,
            1 => Kind::Block,
            _ => Kind::Dir,
        };
        if life(&mut c, kind, &format!("w{id}-{n}"), &targets)
            .await
            .is_none()
        {
            return;
        }
    }
}

/// The Python of scripts/setup.sh's grpcio venv (the version tests/clients.rs
/// pins); `None`, with a note, where it is missing (a failure under
/// HOSTPATH_CSI_REQUIRE_TOOLS).
fn grpcio_python() -> Option<PathBuf> {
    let python = common::setup_cache().join("grpcio-1.85.1/bin/python");
    common::installed("grpcio 1.85.1, for the grpcio clients", &python).then_some(python)
}

/// A client that only connects and asks what needs no volume, each call
/// on a new connection: the accept path under load.
async fn connector(mut c: Caller, until: Instant) {
    while Instant::now() < until {
        let list = csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: String::new(),
        };
        let capacity = csi::GetCapacityRequest {
            parameters: [("pool".to_string(), "d".to_string())].into(),
            ..Default::default()
        };
        if c.call("", csi::ProbeRequest {}).await.is_none()
            || c.call("", list).await.is_none()
            || c.call("d", capacity).await.is_none()
        {
            return;
        }
    }
}

/// Python's grpcio (the real library, installed by scripts/setup.sh) on
/// one channel, calling in lockstep until `until`. It sends the socket's
/// path as `:authority`, so every header block of its connection is
/// rewritten by the driver's authority filter (src/grpc/authority.rs)
/// while the driver is busy with the other clients.
fn grpcio_client(python: &Path, socket: &Path, until: Instant, who: &str, tally: &Mutex<Tally>) {
    use prost::Message;
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/grpcio_client.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
    let mut stdin = child.stdin.take().unwrap();
    let mut replies = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let capacity = csi::GetCapacityRequest {
        parameters: [("pool".to_string(), "d".to_string())].into(),
        ..Default::default()
    };
    let calls = [
        (
            "grpcio Probe",
            "/csi.v1.Identity/Probe",
            csi::ProbeRequest {}.encode_to_vec(),
        ),
        (
            "grpcio GetCapacity",
            "/csi.v1.Controller/GetCapacity",
            capacity.encode_to_vec(),
        ),
        (
            "grpcio ListVolumes",
            "/csi.v1.Controller/ListVolumes",
            csi::ListVolumesRequest::default().encode_to_vec(),
        ),
    ];
    for (name, method, req) in calls.iter().cycle() {
        if Instant::now() >= until {
            break;
        }
        writeln!(stdin, "{method} {}", hex::encode(req)).unwrap();
        let reply = replies.next().and_then(Result::ok);
        let mut t = tally.lock().unwrap();
        match reply {
            Some(r) if r.starts_with("OK ") => *t.answered.entry(name).or_default() += 1,
            other => {
                t.failures.push(format!("{who}: {name}: {other:?}"));
                break;
            }
        }
    }
    drop(stdin);
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_driver_under_load_drops_no_connection_and_no_call() {
    if !common::root_or_skip("the clients publish volumes with bind mounts and loop devices") {
        return;
    }
    for tool in ["losetup", "mkfs.ext4"] {
        if !have(tool) {
            common::skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let secs = env_u64("HOSTPATH_CSI_TRANSPORT_SECS", 15);
    let workers = env_u64("HOSTPATH_CSI_TRANSPORT_CLIENTS", 24) as usize;
    let work = Workdir::new("hostpath-csi-transport");
    let root = work.path().to_path_buf();
    let targets = root.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let pools = [PoolSpec::dir("d"), PoolSpec::image("i", "ext4")];
    let _fs: Vec<LoopFs> = pools
        .iter()
        .filter_map(|p| {
            p.own_fs()
                .map(|(kind, bytes)| LoopFs::new(&root, p.name, kind, bytes))
        })
        .collect();
    // Every tool the driver runs is logged (cmd.rs, at debug): the test
    // counts them, to show the forks really happened under the load.
    let mut driver = Driver::spawn_logging(&root, &pools, "warn,hostpath_csi::sys::cmd=debug");
    driver.wait_ready(Duration::from_secs(30)).await;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let caller = |who: String, fresh_each_call: bool, ch: Option<Channel>| Caller {
        who,
        socket: driver.socket.clone(),
        fresh_each_call,
        ch,
        tally: Arc::clone(&tally),
    };
    // One connection that half of the workers share, as a sidecar's
    // workers share its one connection: their calls are concurrent
    // streams, whose frames interleave through the authority filter.
    let (shared_ch, _) = connect_traced(&driver.socket).await.unwrap();
    tally.lock().unwrap().connections += 1;
    let mut tasks = Vec::new();
    for id in 0..workers {
        let c = if id % 2 == 0 {
            caller(format!("worker {id}"), true, None)
        } else {
            caller(format!("worker {id}"), false, Some(shared_ch.clone()))
        };
        tasks.push(tokio::spawn(worker(c, id, targets.clone(), until)));
    }
    for id in 0..4 {
        let c = caller(format!("connector {id}"), true, None);
        tasks.push(tokio::spawn(connector(c, until)));
    }
    let grpcio = grpcio_python();
    let mut blocking = Vec::new();
    for id in 0..2 {
        let Some(python) = grpcio.clone() else { break };
        let (socket, tally) = (driver.socket.clone(), Arc::clone(&tally));
        blocking.push(tokio::task::spawn_blocking(move || {
            grpcio_client(&python, &socket, until, &format!("grpcio {id}"), &tally)
        }));
    }
    for t in tasks {
        t.await.expect("client panicked");
    }
    for t in blocking {
        t.await.expect("grpcio client panicked");
    }
    let wall = started.elapsed().as_secs_f64();
    if let Some(status) = driver.exited() {
        panic!(
            "the driver exited under load: {status}; log:\n{}",
            driver.log_tail()
        );
    }
    let log = std::fs::read_to_string(&driver.log).unwrap();
    let tools = log
        .lines()
        .filter(|l| l.contains("hostpath_csi::sys::cmd") && l.contains("running"))
        .count();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("refused a"))
        .collect();
    let t = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    let calls: u64 = t.answered.values().sum();
    eprintln!("answered: {:?}", t.answered);
    eprintln!(
        "transport load: {workers} working clients + 4 connecting + {} grpcio, {wall:.1} s: \
         {calls} calls \
         answered on {} connections, volume lives {:?}, {} tools forked by the driver; \
         {} failed calls ({} in the transport)",
        if grpcio.is_some() { 2 } else { 0 },
        t.connections,
        t.lives,
        tools,
        t.failures.len(),
        t.transport
    );
    assert!(
        t.failures.is_empty(),
        "{} calls failed with no kill ({} in the transport):\n{}\ndriver log:\n{}",
        t.failures.len(),
        t.transport,
        t.failures.join("\n"),
        driver.log_tail()
    );
    assert!(
        complaints.is_empty(),
        "the driver's log has panics or refused calls:\n{}",
        complaints.join("\n")
    );
    // The load was what the test claims: every kind lived, many
    // connections were made, and the driver forked tools meanwhile.
    for kind in ["Dir", "Block", "Image"] {
        assert!(
            t.lives.get(kind).is_some_and(|n| *n > 0),
            "no {kind} volume lived"
        );
    }
    assert!(t.connections > 100, "only {} connections", t.connections);
    if grpcio.is_some() {
        assert!(
            t.answered.get("grpcio Probe").is_some_and(|n| *n > 0),
            "grpcio got no answer"
        );
    }
    assert!(tools > 10, "the driver ran only {tools} tools");
    drop(driver);
    // Nothing of the volumes is left mounted or attached.
    let pool_dirs = pools.map(|p| p.dir_in(&root));
    for dir in pool_dirs.iter().chain([&targets]) {
        assert!(
            mounts_below(dir).is_empty(),
            "left mounted: {:?}",
            mounts_below(dir)
        );
        assert!(
            loops_below(dir).is_empty(),
            "left attached: {:?}",
            loops_below(dir)
        );
    }
}

/// The experiment behind the crash tests' rule for broken connections
/// (issue 11), run by hand (`cargo test --test robust_transport --
/// --ignored --nocapture`; `HOSTPATH_CSI_FORK_KILLS` kills, default 40):
/// the real binary publishes and unpublishes a raw block volume in a loop
/// (a losetup each time) and is killed at a moment it has a child that
/// has not exec'd yet (still named `tokio-rt-worker`, after the thread
/// that forked it), then reaped, as the crash tests do before they call a
/// kill over; then connects to its socket are tried for 50 ms. A connect that succeeds
/// after the reap was accepted by the dead driver's listener, which only a
/// child it had forked and not yet exec'd can still hold: the kernel names
/// the killed driver as the peer, and the connection is reset, never
/// answered, when the child's exec closes the copy. That is a broken
/// connection with no live driver behind it, before the next driver
/// replaces the socket file: what the crash tests once counted as
/// unexplained. Seen here after 7 of 100 kills aimed so, and after 2 of
/// 400 kills at moments with any child (2026-12-02). Without the
/// reap, connects are accepted after most kills (36 of 40): a process
/// killed is not gone until the kernel has torn it down, which is why the
/// crash tests count a kill as under way until the reap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "an experiment: it says how often the window was hit, which depends on the machine"]
async fn a_kill_between_fork_and_exec_leaves_a_listener_that_resets() {
    use std::os::unix::net::UnixStream;
    if !common::root_or_skip("block volumes are loop devices bound onto targets") {
        return;
    }
    let rounds = env_u64("HOSTPATH_CSI_FORK_KILLS", 40);
    let work = Workdir::new("hostpath-csi-forkkill");
    let root = work.path().to_path_buf();
    let pools = [PoolSpec::dir("d")];
    let mut driver = Driver::start(&root, &pools).await;
    let mut create = common::create_request("blk", "d", 8 * MIB);
    create.volume_capabilities = vec![block_cap()];
    let id = create
        .send(robust_support::connect_once(&driver.socket).await.unwrap())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let target = root.join("t");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The load: publish and unpublish, on whatever driver runs now.
    let load = {
        let (socket, stop, id, target) = (
            driver.socket.clone(),
            stop.clone(),
            id.clone(),
            target.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(ch) = robust_support::connect_once(&socket).await else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                };
                let publish = csi::NodePublishVolumeRequest {
                    volume_capability: Some(block_cap()),
                    ..common::publish_request(&id, &target, false)
                };
                let _ = publish.send(ch.clone()).await;
                let unpublish = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.display().to_string(),
                };
                let _ = unpublish.send(ch).await;
            }
        })
    };
    let (mut aimed, mut after_reap, mut accepted, mut reset, mut answered) = (0, 0, 0, 0, 0);
    for _ in 0..rounds {
        let (pid, socket) = (driver.pid(), driver.socket.clone());
        // Spin on /proc until the driver has a child that has not exec'd
        // yet (for 2 s at most), kill at once and reap (as the crash tests
        // do before they call a kill over), then connect for 50 ms.
        let (pid, pre_exec, outcomes) = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(2);
            // Best: a child not exec'd yet, still named after the tokio
            // thread that forked it; else any child.
            let mut pre_exec = false;
            while Instant::now() < deadline && !pre_exec {
                pre_exec = robust_support::children(pid)
                    .iter()
                    .any(|(_, comm)| comm.starts_with("tokio"));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            let mut outcomes = Vec::new();
            let until = Instant::now() + Duration::from_millis(50);
            while Instant::now() < until {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    continue;
                };
                let peer =
                    nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
                        .map(|c| c.pid() as u32)
                        .unwrap_or(0);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                let mut buf = [0u8; 64];
                outcomes.push((peer, s.read(&mut buf).map_err(|e| e.kind())));
            }
            (pid, pre_exec, outcomes)
        })
        .await
        .unwrap();
        aimed += u64::from(pre_exec);
        after_reap += u64::from(!outcomes.is_empty());
        for (peer, read) in outcomes {
            accepted += 1;
            assert_eq!(
                peer, pid,
                "a connect after the kill reached another process"
            );
            match read {
                Err(std::io::ErrorKind::ConnectionReset) | Ok(0) => reset += 1,
                _ => answered += 1,
            }
        }
        driver.kill();
        driver = Driver::start(&root, &pools).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    load.await.unwrap();
    eprintln!(
        "{rounds} kills, {aimed} of them while a child had not exec'd yet, each reaped \
         before connecting: after {after_reap} of them \
         connects were accepted ({accepted} in all, each by the killed driver's listener): \
         {reset} reset or closed, {answered} answered"
    );
    assert_eq!(answered, 0, "a dead driver's listener answered");
    drop(driver);
}
