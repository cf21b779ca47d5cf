//! What a new user meets in the first hour, with the real binary: the log
//! names the socket the driver serves, and carries no colour codes when it
//! goes to a file or a pipe; the driver can be called by hand with a real
//! grpcurl (built by `scripts/setup.sh`) through gRPC reflection, with no
//! copy of csi.proto.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The driver, started with its log on a pipe; killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the driver on a socket in `root` and waits for the socket.
fn start(root: &std::path::Path) -> (Driver, std::path::PathBuf) {
    let socket = root.join("csi.sock");
    let d = Driver(
        Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
            .args(["--node-id", "n1", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(format!("p={}", root.join("pool").display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no socket within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    (d, socket)
}

/// grpcurl as `scripts/setup.sh` installs it (or `HOSTPATH_CSI_GRPCURL`).
/// Without it the test is skipped with a note, unless the README's test
/// command runs it (`HOSTPATH_CSI_REQUIRE_TOOLS=1`), where it fails.
fn grpcurl() -> Option<std::path::PathBuf> {
    let cache = std::env::var("HOSTPATH_CSI_CACHE").unwrap_or("/var/cache/hostpath-csi".into());
    let path = std::env::var_os("HOSTPATH_CSI_GRPCURL")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(&cache).join("bin/grpcurl"));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("HOSTPATH_CSI_REQUIRE_TOOLS").is_none(),
        "grpcurl is required (HOSTPATH_CSI_REQUIRE_TOOLS is set) but {} is missing; run scripts/setup.sh",
        path.display()
    );
    eprintln!(
        "skipped: no grpcurl at {} (scripts/setup.sh builds it)",
        path.display()
    );
    None
}

/// `grpcurl -plaintext FLAGS unix://SOCKET REST...`: its standard output.
fn call(
    grpcurl: &std::path::Path,
    socket: &std::path::Path,
    flags: &[&str],
    rest: &[&str],
) -> String {
    let out = Command::new(grpcurl)
        .arg("-plaintext")
        .args(flags)
        // grpcurl v1.9.3 dials a plain path given with `-unix` over TCP;
        // the `unix://` form works.
        .arg(format!("unix://{}", socket.display()))
        .args(rest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl {flags:?} {rest:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn grpcurl_lists_and_calls_the_driver_through_reflection() {
    let Some(grpcurl) = grpcurl() else { return };
    let root = tempfile::tempdir().unwrap();
    let (_driver, socket) = start(root.path());

    let services = call(&grpcurl, &socket, &[], &["list"]);
    for s in ["csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node"] {
        assert!(services.lines().any(|l| l == s), "{s} not in {services}");
    }
    let methods = call(&grpcurl, &socket, &[], &["list", "csi.v1.Node"]);
    assert!(methods.contains("csi.v1.Node.NodeGetInfo"), "{methods}");
    let described = call(
        &grpcurl,
        &socket,
        &[],
        &["describe", "csi.v1.CreateVolumeRequest"],
    );
    assert!(described.contains("capacity_range"), "{described}");

    let info: serde_json::Value = serde_json::from_str(&call(
        &grpcurl,
        &socket,
        &["-d", "{}"],
        &["csi.v1.Identity/GetPluginInfo"],
    ))
    .unwrap();
    assert_eq!(info["name"], "hostpath-csi.dev");
    let node: serde_json::Value = serde_json::from_str(&call(
        &grpcurl,
        &socket,
        &["-d", "{}"],
        &["csi.v1.Node/NodeGetInfo"],
    ))
    .unwrap();
    assert_eq!(node["nodeId"], "n1");
}

#[test]
fn the_log_names_the_socket_and_has_no_colour_codes_in_a_pipe() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("csi.sock");
    let mut d = Driver(
        Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
            .args(["--node-id", "n1", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(format!("p={}", root.path().join("pool").display()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = d.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let wanted = format!("serving CSI on {}", socket.display());
    while !seen.iter().any(|l: &String| l.contains(&wanted)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {wanted:?} in the log within 30 s: {seen:#?}"),
        }
    }
    // Until the pools are open too, to see a few more lines.
    while !seen.iter().any(|l| l.contains("ready")) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    for line in &seen {
        assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
    }
}
