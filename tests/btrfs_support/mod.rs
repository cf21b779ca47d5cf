//! What the btrfs tests (`pools_btrfs`, `robust_btrfs_rescan`,
//! `robust_crash`) ask the kernel about a loop-mounted test filesystem's
//! quotas, and how they put it in the states the driver must cope with:
//! full qgroups turned on by an administrator, accounting the kernel marks
//! inconsistent, a rescan that takes seconds.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A btrfs a test made: a sparse image, loop-mounted. Dropping it
/// unmounts it (the device, attached with `mount -o loop`, goes with the
/// mount) and removes the image.
///
/// The image lives in `/dev/shm` where there is one. The filesystem and
/// its loop device are as real either way, but every transaction commit
/// and fsync of a loop device backed by the test VM's disk costs 100 ms or
/// more while other work shares it (one create/write/delete cycle through
/// the driver took 1.25 s, against about 0.15 s in memory), and the
/// 1,000-cycle tests would take 20 minutes per quota mode.
#[derive(Debug)]
pub struct BtrfsFs {
    /// Where it is mounted.
    pub mnt: PathBuf,
    /// Its image file.
    pub img: PathBuf,
    _image_dir: tempfile::TempDir,
}

impl BtrfsFs {
    /// Makes a btrfs of `bytes` (sparse) and mounts it at `mnt`, created
    /// if missing.
    pub fn new(mnt: &Path, bytes: u64) -> Self {
        let shm = Path::new("/dev/shm");
        let mut builder = tempfile::Builder::new();
        builder.prefix("hostpath-csi-btrfs");
        let image_dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        }
        .unwrap();
        let img = image_dir.path().join("fs.img");
        std::fs::File::create(&img).unwrap().set_len(bytes).unwrap();
        sh("mkfs.btrfs", &["-q", "-f", img.to_str().unwrap()]);
        std::fs::create_dir_all(mnt).unwrap();
        let fs = BtrfsFs {
            mnt: std::fs::canonicalize(mnt).unwrap(),
            img,
            _image_dir: image_dir,
        };
        fs.mount();
        fs
    }
}

impl Drop for BtrfsFs {
    fn drop(&mut self) {
        // Mounts of its contents elsewhere (published targets) do not keep
        // it busy; whatever is left below the test's root goes with the
        // test's own cleanup guard.
        let _ = Command::new("umount").arg(&self.mnt).output();
    }
}

/// Processes with a descriptor, working directory or root below `mnt`, as
/// "pid command", for the message of a failed unmount.
fn holders(mnt: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let proc_dir = entry.path();
        let links = std::fs::read_dir(proc_dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|fd| fd.path())
            .chain([proc_dir.join("cwd"), proc_dir.join("root")]);
        let holds = links
            .filter_map(|l| std::fs::read_link(l).ok())
            .any(|t| t.starts_with(mnt));
        if holds {
            let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            found.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    found
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
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

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Whether this kernel has simple quotas.
pub fn kernel_has_simple_quotas() -> bool {
    Path::new("/sys/fs/btrfs/features/simple_quota").exists()
}

/// `/sys/fs/btrfs/<fsid>/qgroups` of the filesystem mounted at `mnt`.
pub fn qgroups_sysfs(mnt: &Path) -> PathBuf {
    let show = sh("btrfs", &["filesystem", "show", mnt.to_str().unwrap()]);
    let fsid = show
        .split_whitespace()
        .skip_while(|w| *w != "uuid:")
        .nth(1)
        .unwrap()
        .to_string();
    Path::new("/sys/fs/btrfs").join(fsid).join("qgroups")
}

/// Turns on full qgroup accounting, as an administrator would, and waits
/// for the rescan that starts with it.
pub fn enable_qgroups(mnt: &Path) {
    sh("btrfs", &["quota", "enable", mnt.to_str().unwrap()]);
    wait_for_rescan(mnt);
}

/// The kernel's quota mode for the filesystem (`squota`, `qgroup`).
pub fn mode(mnt: &Path) -> String {
    read_trimmed(&qgroups_sysfs(mnt).join("mode"))
}

/// Whether the kernel marks the accounting inconsistent.
pub fn inconsistent(mnt: &Path) -> bool {
    read_trimmed(&qgroups_sysfs(mnt).join("inconsistent")) != "0"
}

/// Whether a qgroup rescan is running.
pub fn rescan_running(mnt: &Path) -> bool {
    sh("btrfs", &["quota", "rescan", "-s", mnt.to_str().unwrap()])
        .starts_with("rescan operation running")
}

/// Waits for a running rescan to end (at most 5 minutes).
pub fn wait_for_rescan(mnt: &Path) {
    let start = Instant::now();
    while rescan_running(mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "rescan never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Level-0 qgroups (`0/N`) with their paths relative to the top level
/// (`<stale>` for a deleted subvolume's), the top level's excepted.
pub fn qgroups(mnt: &Path) -> Vec<(String, String)> {
    sh(
        "btrfs",
        &["qgroup", "show", "--raw", "-r", mnt.to_str().unwrap()],
    )
    .lines()
    .filter_map(|l| {
        let mut f = l.split_whitespace();
        let id = f.next()?;
        let path = f.nth(3)?;
        Some((id.to_string(), path.to_string()))
    })
    .filter(|(id, _)| id.starts_with("0/") && id != "0/5")
    .collect()
}

impl BtrfsFs {
    fn mnt_str(&self) -> &str {
        self.mnt.to_str().unwrap()
    }

    /// See [`enable_qgroups`].
    pub fn enable_qgroups(&self) {
        enable_qgroups(&self.mnt)
    }

    /// See [`mode`].
    pub fn mode(&self) -> String {
        mode(&self.mnt)
    }

    /// See [`inconsistent`].
    pub fn inconsistent(&self) -> bool {
        inconsistent(&self.mnt)
    }

    /// See [`rescan_running`].
    pub fn rescan_running(&self) -> bool {
        rescan_running(&self.mnt)
    }

    /// See [`wait_for_rescan`].
    pub fn wait_for_rescan(&self) {
        wait_for_rescan(&self.mnt)
    }

    /// See [`qgroups`].
    pub fn qgroups(&self) -> Vec<(String, String)> {
        qgroups(&self.mnt)
    }

    /// Unmounts the filesystem, changes its label offline and mounts it
    /// again. btrfs-progs commits a transaction without updating the quota
    /// status, and at the next mount the kernel finds the generations
    /// apart: it marks the accounting inconsistent and stops counting, so
    /// limits stop holding (as after a crash at the wrong moment; measured
    /// on Linux 6.18). Nothing may hold the filesystem busy (no driver
    /// call, no published volume).
    pub fn make_inconsistent(&self) {
        self.unmount();
        sh(
            "btrfs",
            &["filesystem", "label", self.img.to_str().unwrap(), "offline"],
        );
        self.mount();
        assert!(
            self.inconsistent(),
            "the kernel did not mark the accounting inconsistent"
        );
    }

    /// Unmounts and mounts the filesystem again, as a reboot would.
    pub fn remount(&self) {
        self.unmount();
        self.mount();
    }

    /// Unmounts the filesystem, waiting while something still holds it.
    /// A driver killed with SIGKILL does not take its children with it:
    /// a `btrfs` command it had just started keeps a descriptor inside the
    /// filesystem until it exits, which on a loaded machine can take a
    /// while (seen: "target is busy" right after a kill). Fails after 30 s,
    /// naming the processes that hold it.
    fn unmount(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("umount").arg(&self.mnt).output().unwrap();
            if out.status.success() {
                return;
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("busy") || Instant::now() > deadline {
                panic!(
                    "umount {}: {err}; held by: {:?}",
                    self.mnt.display(),
                    holders(&self.mnt)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn mount(&self) {
        sh(
            "mount",
            &["-o", "loop", self.img.to_str().unwrap(), self.mnt_str()],
        );
    }

    /// Makes a qgroup rescan of the filesystem take a while (seconds): a
    /// subvolume outside any pool with `files` small files (an extent
    /// each) and `snapshots` snapshots of it, so every extent has many
    /// owners to resolve. (2,000 files and 100 snapshots: 2.7 s on the
    /// 2-core test machine.)
    pub fn ballast(&self, files: usize, snapshots: usize) {
        let data = self.mnt.join("ballast");
        sh("btrfs", &["subvolume", "create", data.to_str().unwrap()]);
        let bytes = vec![0x5au8; 5000];
        for i in 0..files {
            let dir = data.join(format!("d{}", i / 1000));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("f{i}")), &bytes).unwrap();
        }
        sh("btrfs", &["filesystem", "sync", self.mnt_str()]);
        for i in 0..snapshots {
            sh(
                "btrfs",
                &[
                    "subvolume",
                    "snapshot",
                    data.to_str().unwrap(),
                    self.mnt.join(format!("ballast-{i}")).to_str().unwrap(),
                ],
            );
        }
        sh("btrfs", &["filesystem", "sync", self.mnt_str()]);
    }
}
