//! `csi-bench` as a user runs it: against the real driver of this
//! workspace (`hostpath-csi`), which the bench starts itself, with every
//! scenario. The figures are not judged here (speed targets live in
//! BENCHMARKS.md); what is checked is what a user relies on: every
//! scenario ran without errors, the report holds what the docs promise, a
//! failing driver makes the exit code non-zero, and nothing the bench made
//! is left behind.
//!
//! The driver binary is taken from the same target directory as the
//! bench's: `cargo test` at the workspace root (which `scripts/test.sh`
//! runs) builds both. Publishing bind-mounts, so this needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_csi-bench");

/// The driver, built beside the bench by a workspace `cargo test`.
fn driver_bin() -> PathBuf {
    let bin = Path::new(BENCH).with_file_name("hostpath-csi");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests from the workspace root (`cargo test`), which builds the driver too",
        bin.display()
    );
    bin
}

fn bench(dir: &Path, extra: &[&str]) -> (Output, Vec<Value>) {
    let sock = format!("unix://{}", dir.join("csi.sock").display());
    let driver = format!(
        "{} --endpoint {sock} --node-id bench-node --pool default={}",
        driver_bin().display(),
        dir.join("pool").display()
    );
    let out = Command::new(BENCH)
        .args(["--endpoint", &sock, "--driver-cmd", &driver])
        .arg("--workdir")
        .arg(dir.join("work"))
        .args([
            "--format",
            "json",
            "--rpc-timeout",
            "20",
            "--max-duration",
            "300",
        ])
        .args(extra)
        .output()
        .expect("running the bench");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (out, lines)
}

fn op<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|v| v["type"] == "op" && v["op"] == name)
        .unwrap_or_else(|| panic!("no row {name:?} in {lines:#?}"))
}

fn figure(lines: &[Value], prefix: &str) -> f64 {
    lines
        .iter()
        .find(|v| v["type"] == "figure" && v["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no figure {prefix:?} in {lines:#?}"))["value"]
        .as_f64()
        .unwrap()
}

/// Entries left in `dir` (recursively), for a readable failure message.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    out
}

#[test]
fn every_scenario_runs_clean_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, lines) = bench(
        tmp.path(),
        &[
            "--count",
            "40",
            "--floor-count",
            "30",
            "--workers",
            "4",
            "--publish-count",
            "5",
            "--stats-rounds",
            "2",
            "--list-repeats",
            "2",
            "--page-size",
            "7",
            "--startup-repeats",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}\n{lines:#?}");

    // Capabilities were read from the driver, not assumed.
    let info = &lines[0]["info"];
    assert_eq!(info["capabilities"]["node_id"], "bench-node", "{info}");
    assert_eq!(info["capabilities"]["stage_unstage"], false);

    let rows = [
        ("Probe (gRPC round trip)", 40),
        ("CreateVolume (sequential)", 40),
        ("DeleteVolume (sequential)", 40),
        ("CreateVolume (4 workers)", 40),
        ("DeleteVolume (4 workers)", 40),
        ("NodePublishVolume", 5),
        ("NodeUnpublishVolume", 5),
        ("NodeGetVolumeStats", 10),
        ("ListVolumes page (max_entries 7)", 2 * 6),
        ("start to first ready Probe (40 volumes)", 2),
        ("durable create (mkdir+write+fsync+rename+fsync dir)", 30),
        ("durable delete (rmdir+unlink+fsync dir)", 30),
        ("durable create, 4 threads at once", 30),
    ];
    for (name, count) in rows {
        let row = op(&lines, name);
        assert_eq!(row["errors"], 0, "{row}");
        assert_eq!(row["count"], count, "{row}");
        assert!(row["p50_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Creates are compared with the floor measured in the same run.
    let create = op(&lines, "CreateVolume (sequential)");
    assert!(create["ratio_to_floor"].as_f64().unwrap() > 0.0, "{create}");
    assert!(
        op(&lines, "CreateVolume (4 workers)")["ops_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(figure(&lines, "entries in one full listing"), 40.0);
    for f in ["VmRSS idle", "VmRSS at 40 volumes", "VmRSS after a restart"] {
        let mib = figure(&lines, f);
        assert!(mib > 0.5 && mib < 512.0, "{f}: {mib} MiB");
    }
    assert!(
        !lines.iter().any(|v| v["type"] == "cleanup"),
        "cleanup problems: {lines:#?}"
    );

    // Every volume was deleted (the driver's records included), the
    // bench's work directory is gone and nothing stays mounted.
    assert_eq!(leftovers(&tmp.path().join("pool")), Vec::<String>::new());
    assert!(
        !tmp.path().join("work").exists(),
        "{:?}",
        leftovers(&tmp.path().join("work"))
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(tmp.path().to_str().unwrap()),
        "mounts left: {mountinfo}"
    );
    assert!(!tmp.path().join("csi.sock").exists(), "driver not stopped");
}

#[test]
fn failing_calls_make_the_exit_code_non_zero_and_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    // A pool the driver does not have: every CreateVolume fails.
    let (out, lines) = bench(
        tmp.path(),
        &[
            "--scenario",
            "create-delete",
            "--count",
            "20",
            "--parameter",
            "pool=nope",
        ],
    );
    assert!(!out.status.success(), "{lines:#?}");
    let row = op(&lines, "CreateVolume (sequential)");
    // A phase stops after 10 failed calls.
    assert_eq!(row["errors"], 10, "{row}");
    let first = row["first_errors"][0].as_str().unwrap();
    assert!(
        first.contains("InvalidArgument") && first.contains("nope"),
        "{first}"
    );
    assert_eq!(leftovers(&tmp.path().join("pool")), Vec::<String>::new());
}

/// The snapshot scenario (asked for by name: `all` leaves it out) writes
/// its data through a publish, times each snapshot and restore next to
/// the copy floor, says why a kind of copy cannot be made on this disk,
/// and leaves no volume, snapshot, mount or file behind.
#[test]
fn the_snapshot_scenario_times_snapshots_and_restores_next_to_the_copy_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, lines) = bench(
        tmp.path(),
        &[
            "--scenario",
            "snapshot",
            "--size",
            "16Mi",
            "--snapshot-data",
            "4Mi",
            "--snapshot-rounds",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}\n{lines:#?}");
    assert_eq!(
        lines[0]["info"]["capabilities"]["create_delete_snapshot"], true,
        "{}",
        lines[0]
    );
    for name in [
        "CreateSnapshot (16 MiB volume, 4 MiB of data)",
        "CreateVolume from the snapshot (restore)",
        "DeleteVolume (restored)",
        "DeleteSnapshot",
        "cp --reflink=never + syncfs",
    ] {
        let row = op(&lines, name);
        assert_eq!(
            (row["count"].as_u64(), row["errors"].as_u64()),
            (Some(2), Some(0)),
            "{row}"
        );
    }
    // Compared with the fastest copy this disk allows.
    for name in [
        "CreateSnapshot (16 MiB volume, 4 MiB of data)",
        "CreateVolume from the snapshot (restore)",
    ] {
        let row = op(&lines, name);
        assert_eq!(row["floor"], "the fastest copy floor", "{row}");
        assert!(row["ratio_to_floor"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Each other kind of copy is measured or skipped with a reason.
    for kind in [
        "cp --reflink=always + syncfs",
        "btrfs subvolume snapshot -r",
    ] {
        let measured = lines.iter().any(|v| v["type"] == "op" && v["op"] == kind);
        let skipped = lines.iter().find(|v| {
            v["type"] == "skipped" && v["scenario"] == format!("floor ({kind})").as_str()
        });
        assert!(
            measured != skipped.is_some(),
            "{kind}: measured {measured}, skipped {skipped:?}"
        );
        if let Some(s) = skipped {
            assert!(!s["reason"].as_str().unwrap().is_empty(), "{s}");
        }
    }
    assert!(figure(&lines, "writing 4 MiB into the published volume") > 0.0);
    assert!(
        !lines.iter().any(|v| v["type"] == "cleanup"),
        "cleanup problems: {lines:#?}"
    );
    // The pool keeps only the driver's (now empty) snapshot directory.
    let pool = tmp.path().join("pool");
    assert_eq!(
        leftovers(&pool),
        vec![pool.join(".snapshots").display().to_string()]
    );
    assert!(
        !tmp.path().join("work").exists(),
        "{:?}",
        leftovers(&tmp.path().join("work"))
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(tmp.path().to_str().unwrap()),
        "mounts left: {mountinfo}"
    );
}
