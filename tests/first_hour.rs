//! What a new user meets in the first hour, with the real binary: the log
//! names the socket the driver serves, and carries no colour codes when it
//! goes to a file or a pipe.

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
