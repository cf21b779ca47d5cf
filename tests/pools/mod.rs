//! Helpers for the pool-kind tests (`pools_btrfs`, `pools_image`,
//! `capacity`): small loop-mounted filesystems to put pools on, and a guard
//! that takes every mount and loop device a test made away again, even when
//! the test fails.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use csi_proto as csi;
use tempfile::TempDir;

use crate::common::{self, Harness};
#[allow(unused_imports)]
pub use crate::common::{have, loops_below, run as sh, write_file};

/// MiB.
pub const MIB: i64 = 1 << 20;

/// Unmounts everything under a directory and detaches loop devices backed
/// by files under it when dropped. Declare it before the harness so it
/// runs after the harness has stopped.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        common::unmount_below(&self.0);
        for (dev, _) in loops_below(&self.0) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

/// A temporary root with a cleanup guard for it.
pub fn root() -> (TempDir, Cleanup) {
    let root = tempfile::Builder::new()
        .prefix("hostpath-csi-pools")
        .tempdir()
        .unwrap();
    let guard = Cleanup(std::fs::canonicalize(root.path()).unwrap());
    (root, guard)
}

/// Makes a filesystem of `kind` (`btrfs`, `ext4`) in a sparse file of
/// `bytes` under `root` and loop-mounts it at `root/<name>`; returns the
/// mount point. `mount -o loop` sets the device to auto-clear, so it goes
/// away with the mount.
pub fn loop_fs(root: &Path, name: &str, kind: &str, bytes: u64) -> PathBuf {
    let img = root.join(format!("{name}.fs"));
    let mnt = root.join(name);
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::File::create(&img).unwrap().set_len(bytes).unwrap();
    match kind {
        "btrfs" => sh("mkfs.btrfs", &["-q", "-f", img.to_str().unwrap()]),
        "ext4" => sh("mkfs.ext4", &["-q", "-F", "-m", "0", img.to_str().unwrap()]),
        _ => panic!("unknown filesystem {kind}"),
    };
    sh(
        "mount",
        &["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()],
    );
    std::fs::canonicalize(mnt).unwrap()
}

/// Names in a directory, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// GetCapacity for a pool: (available, maximum, minimum).
pub async fn capacity(h: &Harness, pool: &str) -> (i64, i64, i64) {
    let r = h
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![common::mount_cap(
                csi::volume_capability::access_mode::Mode::SingleNodeWriter,
            )],
            parameters: HashMap::from([("pool".to_string(), pool.to_string())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (
        r.available_capacity,
        r.maximum_volume_size.unwrap_or(-1),
        r.minimum_volume_size.unwrap_or(0),
    )
}

/// ControllerExpandVolume to `bytes`.
pub async fn expand(
    h: &Harness,
    id: &str,
    bytes: i64,
) -> Result<csi::ControllerExpandVolumeResponse, tonic::Status> {
    h.controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// NodeExpandVolume at `path`.
pub async fn node_expand(
    h: &Harness,
    id: &str,
    path: &Path,
    bytes: i64,
) -> Result<i64, tonic::Status> {
    h.node()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string_lossy().into_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

/// NodeGetVolumeStats: (bytes used, available, total, inodes used).
pub async fn stats(h: &Harness, id: &str, path: &Path) -> (i64, i64, i64, i64) {
    let r = h
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = &r.usage[0];
    let inodes = &r.usage[1];
    (bytes.used, bytes.available, bytes.total, inodes.used)
}

/// DeleteVolume.
pub async fn delete(h: &Harness, id: &str) -> Result<(), tonic::Status> {
    h.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}
