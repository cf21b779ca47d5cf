//! The real binary as an operator runs it: flags, socket handling, logs,
//! signals.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::identity_client::IdentityClient;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");

/// A driver process that is killed if the test fails.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, extra: &[&str]) -> Driver {
    spawn_under(&[], dir, extra)
}

/// Starts the driver through `wrapper` (a program and its arguments that
/// end by running the command line after them), e.g. `setpriv ...`.
fn spawn_under(wrapper: &[&str], dir: &Path, extra: &[&str]) -> Driver {
    let log = std::fs::File::create(dir.join("driver.log")).unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let child = cmd
        .args([
            "--endpoint",
            &format!("unix://{}", dir.join("csi.sock").display()),
        ])
        .args([
            "--node-id",
            "proc-node",
            "--pool",
            &format!("p={}", dir.join("pool").display()),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Driver(child)
}

async fn wait_ready(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(ch) = csi_proto::connect(sock).await
            && let Ok(r) = IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
            && r.into_inner().ready == Some(true)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(sock.with_file_name("driver.log")).unwrap_or_default();
    panic!(
        "driver at {} never became ready; its log:\n{log}",
        sock.display()
    );
}

async fn wait_exit(d: &mut Driver) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = d.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "driver did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn socket_is_private_stale_sockets_are_replaced_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut d = spawn(dir.path(), &[]);
    wait_ready(&sock).await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "socket must not be world-writable"
    );

    // kill -9 leaves the socket file behind; a new start replaces it.
    d.0.kill().unwrap();
    d.0.wait().unwrap();
    assert!(sock.exists());
    let mut d = spawn(dir.path(), &[]);
    wait_ready(&sock).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(&mut d).await;
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("csi.sock"), b"important").unwrap();
    let mut d = spawn(dir.path(), &[]);
    let status = wait_exit(&mut d).await;
    assert!(!status.success());
    assert_eq!(
        std::fs::read(dir.path().join("csi.sock")).unwrap(),
        b"important"
    );
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains("not a socket"), "{log}");
}

#[tokio::test]
async fn json_logs_and_secrets_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut d = spawn(
        dir.path(),
        &["--log-format", "json", "--log-level", "trace"],
    );
    wait_ready(&sock).await;
    let ch = csi_proto::connect(&sock).await.unwrap();
    let mut c = csi::controller_client::ControllerClient::new(ch.clone());
    let mut req = common::create_request("with-secret", "p", 1 << 20);
    req.secrets
        .insert("password".into(), "hunter2-very-secret".into());
    c.create_volume(req).await.unwrap();
    c.create_volume(common::create_request("second", "p", 1 << 20))
        .await
        .unwrap();
    let mut n = csi::node_client::NodeClient::new(ch);
    let mut bad = common::publish_request("p:with-secret", Path::new("relative"), false);
    bad.secrets
        .insert("token".into(), "hunter2-very-secret".into());
    n.node_publish_volume(bad).await.unwrap_err();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "p:with-secret".into(),
        secrets: [("k".to_string(), "hunter2-very-secret".to_string())].into(),
    })
    .await
    .unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(wait_exit(&mut d).await.success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert_eq!(log.matches("volume created").count(), 2, "{log}");
    // The dir pool's unenforced sizes are said once, at start, not per call.
    assert_eq!(log.matches("does not enforce sizes").count(), 1, "{log}");
    assert!(!log.contains("hunter2"), "a secret reached the log:\n{log}");
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    }
}

#[test]
fn help_explains_every_flag_and_bad_config_is_reported() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--endpoint",
        "--node-id",
        "--driver-name",
        "--pool",
        "--config",
        "--max-volumes-per-node",
        "--log-format",
        "CSI_ENDPOINT",
        "NODE_NAME",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    let out = Command::new(BIN)
        .args(["--pool", "Bad Name=/x", "--node-id", "n"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool name"));
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let h = common::Harness::start().await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = h.controller();
        tasks.push(tokio::spawn(async move {
            c.create_volume(common::create_request("raced", "hdd", 1 << 20))
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.volume.unwrap().volume_id, "hdd:raced");
                ok += 1;
            }
            Err(e) => assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}"),
        }
    }
    assert!(ok >= 1);
    let names: Vec<_> = std::fs::read_dir(h.pool_dir("hdd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, [".raced.meta", "raced"]);
}

#[tokio::test]
async fn probe_is_not_ready_until_the_pools_can_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    // A file where the pool's parent directory should be: the pool cannot
    // be created until an operator fixes it.
    std::fs::write(dir.path().join("disk"), b"not a directory").unwrap();
    let log = std::fs::File::create(dir.path().join("driver.log")).unwrap();
    let _d = Driver(
        Command::new(BIN)
            .args(["--endpoint", &format!("unix://{}", sock.display())])
            .args([
                "--node-id",
                "n",
                "--pool",
                &format!("p={}", dir.path().join("disk/pool").display()),
            ])
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let ch = loop {
        if let Ok(ch) = csi_proto::connect(&sock).await {
            break ch;
        }
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let probe = IdentityClient::new(ch.clone())
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(false));
    let e = csi::controller_client::ControllerClient::new(ch)
        .create_volume(common::create_request("early", "p", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // Once the disk is there, the driver picks it up without a restart.
    std::fs::remove_file(dir.path().join("disk")).unwrap();
    wait_ready(&sock).await;
}

/// Records of new volumes are written nameless and linked in place. Kernels
/// before 6.10 allow that only with CAP_DAC_READ_SEARCH and answer ENOENT
/// otherwise, and the driver then goes through a temp file; this machine's
/// kernel (6.18) allows it to the process that opened the file. Either way
/// a driver whose container drops the capability must still create, find
/// and delete volumes. (The fallback itself is tested in `sys::fs`.)
#[tokio::test]
async fn volumes_work_without_the_capability_to_link_nameless_files() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (the capability only matters there)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let drop_cap = [
        "setpriv",
        "--inh-caps",
        "-dac_read_search",
        "--bounding-set",
        "-dac_read_search",
    ];
    let d = spawn_under(&drop_cap, dir.path(), &[]);
    wait_ready(&sock).await;
    // The test tests what it claims: the driver really lacks it.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.0.id())).unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let eff = u64::from_str_radix(eff.split_whitespace().nth(1).unwrap(), 16).unwrap();
    const CAP_DAC_READ_SEARCH: u32 = 2;
    assert_eq!(eff & (1 << CAP_DAC_READ_SEARCH), 0, "{eff:x}");
    assert_ne!(eff & (1 << 21), 0, "CAP_SYS_ADMIN kept: {eff:x}");

    let ch = csi_proto::connect(&sock).await.unwrap();
    let mut c = csi::controller_client::ControllerClient::new(ch);
    let v = c
        .create_volume(common::create_request("no-cap", "p", 1 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let token = v.volume_id.strip_prefix("p:").unwrap().to_string();
    let pool = dir.path().join("pool");
    let mut names: Vec<String> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [format!(".{token}.meta"), token.clone()]);
    let record = std::fs::read_to_string(pool.join(format!(".{token}.meta"))).unwrap();
    assert!(record.contains("\"no-cap\""), "{record}");
    // Asked again, the same volume (the record is found, not rewritten).
    let again = c
        .create_volume(common::create_request("no-cap", "p", 1 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read_dir(&pool).unwrap().count(), 0);
}

/// Starts the driver on `socket` with one pool `p` in `pool`, logging to
/// `log`.
fn spawn_on(socket: &Path, pool: &Path, log: &Path) -> Driver {
    let out = std::fs::File::create(log).unwrap();
    let child = Command::new(BIN)
        .args(["--endpoint", &format!("unix://{}", socket.display())])
        .args(["--node-id", "proc-node"])
        .args(["--pool", &format!("p={}", pool.display())])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    Driver(child)
}

async fn probe_ready(sock: &Path) -> Option<bool> {
    let ch = csi_proto::connect(sock).await.ok()?;
    IdentityClient::new(ch)
        .probe(csi::ProbeRequest {})
        .await
        .ok()?
        .into_inner()
        .ready
}

/// Waits until `log` contains `needle`; returns the log.
async fn wait_log(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?}:\n{text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `cargo run` twice: the second driver must not take over the live
/// socket of the first (nor serve its pool); it refuses to start and names
/// the process that serves. The first keeps serving on its own socket.
#[tokio::test]
async fn a_second_driver_on_a_live_socket_refuses_to_start_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let pool = dir.path().join("pool");
    let first = spawn_on(&sock, &pool, &dir.path().join("first.log"));
    wait_ready(&sock).await;
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap());

    let second_log = dir.path().join("second.log");
    let mut second = spawn_on(&sock, &pool, &second_log);
    let status = wait_exit(&mut second).await;
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(&second_log).unwrap();
    assert!(
        log.contains(&format!("process {}", first.0.id())) && log.contains("another driver"),
        "the refusal must name the serving process:\n{log}"
    );
    // The first driver's socket is untouched and still answers.
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&sock).unwrap()),
        ino
    );
    assert_eq!(probe_ready(&sock).await, Some(true));
}

/// A driver removes only the socket it created: if another driver has
/// bound the endpoint since (here: the file was deleted under the first,
/// as an operator cleaning up might), the first one's exit leaves it.
#[tokio::test]
async fn a_driver_never_removes_a_socket_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut first = spawn_on(&sock, &dir.path().join("pool1"), &dir.path().join("1.log"));
    wait_ready(&sock).await;
    std::fs::remove_file(&sock).unwrap();
    let _second = spawn_on(&sock, &dir.path().join("pool2"), &dir.path().join("2.log"));
    wait_ready(&sock).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(wait_exit(&mut first).await.success());
    assert!(
        sock.exists(),
        "the first driver deleted the second's socket"
    );
    assert_eq!(probe_ready(&sock).await, Some(true));
    let log = std::fs::read_to_string(dir.path().join("1.log")).unwrap();
    assert!(log.contains("left in place"), "{log}");
}

/// One pool, two drivers on different endpoints: the second does not serve
/// the pool (Probe not ready, calls UNAVAILABLE, the log names the pool
/// and the holder) until the first is gone; a kill -9 of the first frees
/// the pool (the kernel drops its lock) and the second takes over.
#[tokio::test]
async fn a_pool_is_served_by_one_driver_and_a_kill_hands_it_over() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock1 = dir.path().join("one.sock");
    let sock2 = dir.path().join("two.sock");
    let mut first = spawn_on(&sock1, &pool, &dir.path().join("one.log"));
    wait_ready(&sock1).await;
    let ch1 = csi_proto::connect(&sock1).await.unwrap();
    csi::controller_client::ControllerClient::new(ch1)
        .create_volume(common::create_request("before", "p", 1 << 20))
        .await
        .unwrap();

    let log2 = dir.path().join("two.log");
    let _second = spawn_on(&sock2, &pool, &log2);
    let log = wait_log(&log2, "cannot open pools").await;
    assert!(
        log.contains("pool p:") && log.contains(&format!("process {}", first.0.id())),
        "the log must name the pool and the driver holding it:\n{log}"
    );
    assert_eq!(probe_ready(&sock2).await, Some(false));
    let ch2 = csi_proto::connect(&sock2).await.unwrap();
    let e = csi::controller_client::ControllerClient::new(ch2.clone())
        .create_volume(common::create_request("raced", "p", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // The first still serves meanwhile.
    assert_eq!(probe_ready(&sock1).await, Some(true));

    first.0.kill().unwrap();
    first.0.wait().unwrap();
    wait_ready(&sock2).await;
    let mut c2 = csi::controller_client::ControllerClient::new(ch2);
    let listed = c2
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1, "{listed:?}");
    c2.create_volume(common::create_request("after", "p", 1 << 20))
        .await
        .unwrap();
    // Said once, not every retry.
    let log = std::fs::read_to_string(&log2).unwrap();
    assert_eq!(log.matches("cannot open pools").count(), 1, "{log}");
}
