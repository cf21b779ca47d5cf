//! `hostpath-csi volumes`, the real binary, against pools of a driver that
//! runs (in-process) and then of one that is stopped: it shows each volume
//! with its claim, PV, size, usage and where it is published, as a table
//! and as JSON, and changes nothing (every path, type, mode, size, mtime and
//! content under the pools is the same before and after, and no file is
//! added). Real bind mounts: needs root.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{Harness, create_request, for_claim};
use sha2::{Digest, Sha256};

const MIB: i64 = 1 << 20;

/// Everything under `root` that a change would show: per path, its type,
/// mode, size, mtime and (for files) a digest of its bytes.
fn fingerprint(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p).unwrap().display().to_string()
            } else {
                String::new()
            };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(
                rel,
                format!(
                    "{:o} {} {}.{} {content}",
                    m.mode(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn run_volumes(h: &Harness, extra: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"));
    cmd.arg("volumes").args(["--node-id", "n1"]);
    for p in &h.pools {
        cmd.arg("--pool")
            .arg(format!("{}={}", p.name, p.path.display()));
    }
    let out = cmd.args(extra).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn lists_every_volume_and_changes_nothing_with_the_driver_running_or_stopped() {
    if !common::root_or_skip("bind mounts") {
        return;
    }
    let mut h = Harness::start().await;
    let v = h
        .create_volume(for_claim(
            create_request("pvc-77", "ssd", 3 * MIB),
            "web",
            "cache",
        ))
        .await;
    h.create("pvc-10", "hdd", 5 * MIB).await;
    std::fs::write(h.pool_dir("ssd").join("pvc-77/f"), vec![1u8; 2 << 20]).unwrap();
    std::fs::create_dir(h.pool_dir("hdd").join("admin-data")).unwrap();
    std::fs::write(h.pool_dir("hdd").join("stray.txt"), b"?").unwrap();
    let target = h.target("pod-x");
    h.publish(&v.volume_id, &target, false).await.unwrap();

    let pools = h.root.path().join("pools");
    for running in [true, false] {
        if !running {
            h.shutdown().await;
        }
        let before = fingerprint(&pools);

        let table = run_volumes(&h, &[]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("POOL"), "{table}");
        // Sorted by pool, then volume.
        let order: Vec<&str> = lines[1..]
            .iter()
            .filter(|l| !l.starts_with('!'))
            .map(|l| l.split_whitespace().nth(2).unwrap())
            .collect();
        assert_eq!(
            order,
            ["admin-data", "pvc-10", "stray.txt", "pvc-77"],
            "{table}"
        );
        let row = lines.iter().find(|l| l.contains("pvc-77")).unwrap();
        for want in [
            "ssd",
            "dir",
            "driver",
            "web/cache",
            "3 MiB",
            "2.0 MiB",
            "no",
        ] {
            assert!(row.contains(want), "{want:?} not in {row:?}");
        }
        assert!(row.contains(&target.display().to_string()), "{row}");
        assert!(row.contains("s ago"), "last published: {row}");
        assert!(
            table.contains("! hdd:stray.txt: a file, not a directory"),
            "{table}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&run_volumes(&h, &["-o", "json"])).unwrap();
        let vols: Vec<&serde_json::Value> = json["pools"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| p["volumes"].as_array().unwrap())
            .collect();
        let pvc = vols.iter().find(|v| v["id"] == "ssd:pvc-77").unwrap();
        assert_eq!(pvc["claim_namespace"], "web");
        assert_eq!(pvc["claim_name"], "cache");
        assert_eq!(pvc["pv_name"], "pvc-77");
        assert_eq!(pvc["capacity_bytes"], 3 * MIB);
        assert_eq!(pvc["origin"], "driver");
        assert!(pvc["used_bytes"].as_u64().unwrap() >= 2 << 20);
        assert_eq!(pvc["published_at"][0], target.display().to_string());
        assert!(pvc["last_published_unix"].as_u64().is_some());
        let admin = vols.iter().find(|v| v["id"] == "hdd:admin-data").unwrap();
        assert_eq!(admin["origin"], "static");
        assert_eq!(vols.len(), 4);

        assert_eq!(
            fingerprint(&pools),
            before,
            "`volumes` changed the pools (driver running: {running})"
        );
    }
}

#[test]
fn a_missing_pool_is_reported_and_not_created() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("later");
    let out = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .args(["volumes", "--node-id", "n1", "--pool"])
        .arg(format!("late={}", missing.display()))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool late"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(no volumes)"));
    assert!(!missing.exists());
}
