//! The node plugin's own kubelet-facing parts, which replace the
//! node-driver-registrar and livenessprobe sidecars (neither can be built
//! here): the plugin registration socket and `/healthz`.
//!
//! The registration tests play the kubelet's plugin watcher with a tonic
//! client of `pluginregistration.Registration` (GetInfo, then
//! NotifyRegistrationStatus), against the real binary. A real kubelet
//! picking the socket up is the cluster test's part (`tests/e2e`, the
//! issue9-cluster work), not this file's.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto::pluginregistration as reg;
use reg::registration_client::RegistrationClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");
const DRIVER: &str = "hostpath-csi.dev";

/// A driver process, killed if the test fails.
struct Driver {
    child: Child,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(dir: &Path, pool: &Path, extra: &[&str]) -> Driver {
        let log = dir.join("driver.log");
        let child = Command::new(BIN)
            .args([
                "--endpoint",
                &format!("unix://{}", dir.join("csi.sock").display()),
            ])
            .args([
                "--node-id",
                "reg-node",
                "--pool",
                &format!("p={}", pool.display()),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Driver { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "driver did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn wait_for(what: &str, driver: &Driver, mut cond: impl FnMut() -> bool) {
    // The driver looks at its registration socket every 5 s; the rest is
    // slack for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; driver log:\n{}",
            driver.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// A loopback port that was free a moment ago.
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One HTTP/1.1 request, as the kubelet's httpGet probe sends it; the
/// status code and body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await?;
    let code = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

#[tokio::test]
async fn the_kubelet_registers_the_driver_through_its_socket_and_loses_it_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("plugins_registry");
    std::fs::create_dir(&registry).unwrap();
    let reg_sock = registry.join(format!("{DRIVER}-reg.sock"));
    // A socket left by a driver killed with -9: replaced at start.
    drop(std::os::unix::net::UnixListener::bind(&reg_sock).unwrap());
    assert!(is_socket(&reg_sock));

    let mut d = Driver::start(
        dir.path(),
        &dir.path().join("pool"),
        &[
            "--kubelet-registration-dir",
            registry.to_str().unwrap(),
            "--kubelet-csi-endpoint",
            "/var/lib/kubelet/plugins/hostpath-csi.dev/csi.sock",
        ],
    );
    let ch = loop {
        // The stale socket refuses connections until the driver replaced it.
        if let Ok(ch) = csi_proto::connect(&reg_sock).await {
            break ch;
        }
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "driver exited:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut kubelet = RegistrationClient::new(ch);
    let info = kubelet
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, DRIVER);
    assert_eq!(
        info.endpoint,
        "/var/lib/kubelet/plugins/hostpath-csi.dev/csi.sock"
    );
    assert_eq!(info.supported_versions, ["1.0.0"]);

    kubelet
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    let reason = "RegisterPlugin error -- failed to get plugin info using RPC GetInfo at socket x";
    kubelet
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: false,
            error: reason.into(),
        })
        .await
        .unwrap();
    // A refused registration is logged with the kubelet's reason; the
    // driver keeps serving.
    let info_again = kubelet
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info_again, info);
    wait_for("the refusal in the log", &d, || d.log().contains(reason)).await;
    let log = d.log();
    let refusal = log.lines().find(|l| l.contains(reason)).unwrap();
    assert!(refusal.contains("ERROR"), "{refusal}");
    assert!(log.contains("registered with the kubelet"), "{log}");
    drop(kubelet);

    // SIGTERM: the registration socket goes (the kubelet deregisters) and
    // the driver exits cleanly.
    d.terminate();
    assert!(d.wait_exit().await.success(), "{}", d.log());
    assert!(
        !reg_sock.exists(),
        "registration socket left behind:\n{}",
        d.log()
    );
    assert!(!dir.path().join("csi.sock").exists());
}

#[tokio::test]
async fn a_removed_registration_socket_is_made_again_but_another_process_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("plugins_registry");
    std::fs::create_dir(&registry).unwrap();
    let reg_sock = registry.join(format!("{DRIVER}-reg.sock"));
    let mut d = Driver::start(
        dir.path(),
        &dir.path().join("pool"),
        &["--kubelet-registration-dir", registry.to_str().unwrap()],
    );
    wait_for("the registration socket", &d, || is_socket(&reg_sock)).await;
    // Without --kubelet-csi-endpoint the kubelet is told the serving path.
    let info = RegistrationClient::new(csi_proto::connect(&reg_sock).await.unwrap())
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Path::new(&info.endpoint), dir.path().join("csi.sock"));

    // Someone cleans the directory: the driver notices and serves again.
    std::fs::remove_file(&reg_sock).unwrap();
    wait_for("the socket to be made again", &d, || is_socket(&reg_sock)).await;
    let info = RegistrationClient::new(csi_proto::connect(&reg_sock).await.unwrap())
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER);

    // Another instance takes the path over (a rolling update): the driver
    // leaves its socket alone, now and at exit.
    std::fs::remove_file(&reg_sock).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&reg_sock).unwrap();
    wait_for("the driver to give the socket up", &d, || {
        d.log().contains("another process replaced")
    })
    .await;
    d.terminate();
    assert!(d.wait_exit().await.success(), "{}", d.log());
    assert!(
        is_socket(&reg_sock),
        "the other process's socket was removed"
    );
    drop(other);
}

#[tokio::test]
async fn bad_registration_and_health_settings_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let registry = dir.path().join("plugins_registry");
    let cases: Vec<(Vec<String>, &str, i32)> = vec![
        (
            vec![
                "--kubelet-registration-dir".into(),
                registry.display().to_string(),
            ],
            "does not exist",
            1,
        ),
        (
            vec!["--healthz-address".into(), "localhost:9808".into()],
            "is not HOST:PORT",
            2,
        ),
        (
            // TEST-NET-1: no address of this machine.
            vec!["--healthz-address".into(), "192.0.2.1:9808".into()],
            "cannot listen on health address 192.0.2.1:9808",
            1,
        ),
    ];
    for (args, message, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut d = Driver::start(dir.path(), &pool, &args);
        let status = d.wait_exit().await;
        assert_eq!(status.code(), Some(code), "{args:?}: {}", d.log());
        assert!(d.log().contains(message), "{args:?}: {}", d.log());
        assert!(
            !dir.path().join("csi.sock").exists(),
            "{args:?}: CSI socket left behind"
        );
    }

    // Something that is not a socket where the socket belongs is kept.
    std::fs::create_dir(&registry).unwrap();
    let occupied = registry.join(format!("{DRIVER}-reg.sock"));
    std::fs::write(&occupied, b"not mine").unwrap();
    let mut d = Driver::start(
        dir.path(),
        &pool,
        &["--kubelet-registration-dir", registry.to_str().unwrap()],
    );
    assert_eq!(d.wait_exit().await.code(), Some(1));
    assert!(
        d.log().contains("exists and is not a socket"),
        "{}",
        d.log()
    );
    assert_eq!(std::fs::read(&occupied).unwrap(), b"not mine");

    // A registration "directory" that is a file.
    let mut d = Driver::start(
        dir.path(),
        &pool,
        &["--kubelet-registration-dir", occupied.to_str().unwrap()],
    );
    assert_eq!(d.wait_exit().await.code(), Some(1));
    assert!(d.log().contains("is not a directory"), "{}", d.log());
}

#[tokio::test]
async fn healthz_answers_from_the_drivers_probe() {
    let dir = tempfile::tempdir().unwrap();
    // The pool's parent is a file for now, so the pool cannot be opened and
    // Probe says not ready; the driver retries every 3 s.
    let blocker = dir.path().join("disk");
    std::fs::write(&blocker, b"").unwrap();
    let addr = free_port();
    let mut d = Driver::start(
        dir.path(),
        &blocker.join("pool"),
        &["--healthz-address", &addr.to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        match http_get(addr, "/healthz").await {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("healthz never answered: {e}\n{}", d.log()),
        }
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not ready"), "{body}");

    let (code, body) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 404, "{body}");

    // The disk appears: the driver opens the pool and turns healthy.
    std::fs::remove_file(&blocker).unwrap();
    std::fs::create_dir(&blocker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(addr, "/healthz").await.unwrap();
        if code == 200 {
            assert_eq!(body, "ok\n");
            break;
        }
        assert_eq!(code, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "never healthy: {body}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The CSI socket gone (deleted by hand): unhealthy, with the reason,
    // so the kubelet restarts the container.
    std::fs::remove_file(dir.path().join("csi.sock")).unwrap();
    let (code, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("cannot reach the driver's CSI socket"),
        "{body}"
    );

    d.terminate();
    assert!(d.wait_exit().await.success(), "{}", d.log());
    assert!(
        http_get(addr, "/healthz").await.is_err(),
        "healthz outlived the driver"
    );
}

/// SIGTERM in the first moments after start (a pod deleted as soon as it
/// started, a rollout) is a clean stop like any other: the handler is in
/// place before the driver binds anything. It once was installed only
/// when the CSI server started, after the registration socket was already
/// answering; a SIGTERM in between killed the driver outright (seen under
/// load in CI: no "shutting down", exit by signal). The signal is sent as
/// soon as the CSI socket file exists, many times over.
#[tokio::test]
async fn sigterm_right_after_start_stops_cleanly() {
    for round in 0..25 {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("plugins_registry");
        std::fs::create_dir(&registry).unwrap();
        let csi_sock = dir.path().join("csi.sock");
        let mut d = Driver::start(
            dir.path(),
            &dir.path().join("pool"),
            &["--kubelet-registration-dir", registry.to_str().unwrap()],
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while !csi_sock.exists() {
            assert!(
                d.child.try_wait().unwrap().is_none(),
                "round {round}: driver exited:\n{}",
                d.log()
            );
            assert!(Instant::now() < deadline, "round {round}: no socket");
            std::thread::sleep(Duration::from_micros(200));
        }
        d.terminate();
        let status = d.wait_exit().await;
        assert!(
            status.success(),
            "round {round}: SIGTERM just after the socket was bound ended the driver with {status}:\n{}",
            d.log()
        );
        assert!(d.log().contains("SIGTERM: shutting down"), "{}", d.log());
        assert!(!csi_sock.exists(), "round {round}: CSI socket left behind");
        assert!(
            !registry.join(format!("{DRIVER}-reg.sock")).exists(),
            "round {round}: registration socket left behind"
        );
    }
}
