//! The ioctl against a real btrfs: a sparse image, loop-mounted in a temp
//! directory (needs root and btrfs-progs; skipped otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;

use btrfs_squota::enable_simple_quotas;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok()
}

/// A loop-mounted btrfs, unmounted (and its loop device freed) on drop.
struct LoopBtrfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl LoopBtrfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        run("mkfs.btrfs", &["-q", "-f", img.to_str().unwrap()]);
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
        );
        LoopBtrfs { _dir: dir, mnt }
    }

    /// `/sys/fs/btrfs/<fsid>/qgroups/mode`.
    fn mode(&self) -> String {
        let show = run("btrfs", &["filesystem", "show", self.mnt.to_str().unwrap()]);
        let fsid = show
            .split_whitespace()
            .skip_while(|w| *w != "uuid:")
            .nth(1)
            .unwrap()
            .to_string();
        std::fs::read_to_string(Path::new("/sys/fs/btrfs").join(fsid).join("qgroups/mode"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for LoopBtrfs {
    fn drop(&mut self) {
        // A loop mount made with `-o loop` frees its device on unmount.
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn usable() -> bool {
    let ok = nix::unistd::geteuid().is_root()
        && have("mkfs.btrfs")
        && Path::new("/sys/fs/btrfs/features/simple_quota").exists();
    if !ok {
        eprintln!("skipped: needs root, btrfs-progs and a kernel with simple quotas");
    }
    ok
}

#[test]
fn enables_simple_quotas_once_and_leaves_an_enabled_mode_alone() {
    if !usable() {
        return;
    }
    let fs = LoopBtrfs::new();
    let dir = std::fs::File::open(&fs.mnt).unwrap();
    enable_simple_quotas(&dir).unwrap();
    assert_eq!(fs.mode(), "squota");
    // Again: success, nothing changes.
    enable_simple_quotas(&dir).unwrap();
    assert_eq!(fs.mode(), "squota");

    // A filesystem whose quotas are already in full qgroup mode keeps it:
    // the kernel answers success without switching.
    let other = LoopBtrfs::new();
    run("btrfs", &["quota", "enable", other.mnt.to_str().unwrap()]);
    enable_simple_quotas(std::fs::File::open(&other.mnt).unwrap()).unwrap();
    assert_eq!(other.mode(), "qgroup");
}
