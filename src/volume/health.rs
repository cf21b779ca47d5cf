//! Volume and storage health (CSI 1.13, alpha): what is wrong with a volume
//! or a pool right now, found by looking (a stat, a statvfs, the mount
//! table, the loop devices in sysfs), never by changing anything.
//! ControllerGetVolumeHealth, ControllerListVolumeHealth,
//! NodeGetVolumeHealth and NodeGetStorageHealth report it, and so does
//! NodeGetVolumeStats' `volume_condition`, the field the kubelet reads.
//!
//! The controller and the node are one process on the volume's node here,
//! so both see the same facts; the node's call adds the one thing only it
//! is asked about, the path where the CO published the volume.
//!
//! What is looked at, and why each is worth a report:
//! - the pool: its directory gone, or no longer the one the driver opened
//!   (the disk mounted there was unmounted: the path now shows the empty
//!   directory below), read-only, out of bytes or inodes, size limits that
//!   cannot be trusted (btrfs quota accounting);
//! - the volume's storage: its directory, subvolume, image file or block
//!   file gone or of the wrong type;
//! - what the node holds for it: an image whose filesystem pods still use
//!   but that is no longer mounted where the driver keeps it, a raw block
//!   volume published through a loop device that was detached;
//! - at a publish path: nothing mounted there, something else mounted, a
//!   block target whose loop device is detached.
//!
//! An image volume that is not mounted and not published is healthy: that
//! is what every image volume looks like after a reboot, until its first
//! publish mounts it.

use std::ops::Bound;
use std::path::Path;

use super::controller::page_start;
use super::id::VolumeId;
use super::pool::Pool;
use super::record::{Access, Record, Use};
use super::{Result, VolumeError, Volumes};
use crate::sys;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mountinfo::MountEntry;
use crate::validate::{ListVolumes, VolumeHealthAt, VolumeRef};

/// How a volume problem affects it, in CSI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VolumeStatus {
    /// Usable, but not as it should be.
    Degraded,
    /// Not usable (from this node, which is the only one that has it).
    Inaccessible,
}

/// One problem of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeProblem {
    /// How it affects the volume.
    pub(crate) status: VolumeStatus,
    /// A short CamelCase reason, for machines.
    pub(crate) reason: &'static str,
    /// What is wrong and what to do, for people.
    pub(crate) message: String,
}

/// A volume's health: its id and its problems (none: healthy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeHealth {
    /// The volume id as the CO knows it.
    pub(crate) id: String,
    /// Its problems; empty when none is known.
    pub(crate) problems: Vec<VolumeProblem>,
}

/// How a pool problem affects its volumes, in CSI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StorageStatus {
    /// Working, but its volumes suffer (cannot be written, sizes not held).
    Degraded,
    /// Its volumes cannot be reached at all.
    Unreachable,
}

/// One problem of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageProblem {
    /// How it affects the pool's volumes.
    pub(crate) status: StorageStatus,
    /// A short CamelCase reason, for machines.
    pub(crate) reason: &'static str,
    /// What is wrong and what to do, for people; names the pool.
    pub(crate) message: String,
}

/// The node as one call sees it: the mount table and the loop devices,
/// read once per call.
struct Sight {
    table: Vec<MountEntry>,
    loops: Vec<LoopDevice>,
}

impl Sight {
    fn now() -> Result<Sight> {
        Ok(Sight {
            table: sys::mountinfo::read()
                .map_err(|e| VolumeError::io("reading the mount table", e))?,
            loops: sys::loopdev::attached(),
        })
    }

    /// Loop devices with `file` behind them.
    fn devices_of(&self, file: &Path) -> Vec<&Path> {
        self.loops
            .iter()
            .filter(|d| d.backing == file)
            .map(|d| d.device.as_path())
            .collect()
    }

    /// Where a loop device's filesystem is mounted.
    fn mounts_of(&self, device: &Path) -> Vec<&Path> {
        self.table
            .iter()
            .filter(|e| Path::new(&e.source) == device)
            .map(|e| e.mount_point.as_path())
            .collect()
    }

    /// Binds of loop device nodes that have no file behind them any more
    /// (detached while bound).
    fn detached_device_binds(&self) -> Vec<&Path> {
        self.table
            .iter()
            .filter(|e| loop_name(e).is_some_and(|n| sys::loopdev::backing_of(n).is_none()))
            .map(|e| e.mount_point.as_path())
            .collect()
    }
}

/// The loop device a mount entry binds (`loop3` for a bind of
/// `/dev/loop3`), if it binds one.
fn loop_name(e: &MountEntry) -> Option<&str> {
    let name = e.root.file_name()?.to_str()?;
    (e.root.parent() == Some(Path::new("/")) && name.starts_with("loop")).then_some(name)
}

impl Volumes {
    /// NodeGetStorageHealth: the problems of every pool of this node.
    pub(crate) fn storage_health(&self) -> Vec<StorageProblem> {
        self.pools.iter().flat_map(pool_problems).collect()
    }

    /// ControllerGetVolumeHealth (`at` none) and NodeGetVolumeHealth: the
    /// volume's problems; NOT_FOUND for a volume this node does not have
    /// (no record and no directory).
    pub(crate) fn volume_health(&self, req: &VolumeHealthAt) -> Result<VolumeHealth> {
        let (id, shown_as) = match &req.volume {
            VolumeRef::Volume(id) => (id.clone(), id.to_string()),
            VolumeRef::Other(name) => (
                self.ephemeral_id(name)?
                    .ok_or_else(|| VolumeError::NoSuchVolume(name.clone()))?,
                name.clone(),
            ),
        };
        let pool = self.pool_of(&id)?;
        let record = pool.record(id.token())?;
        let of_pool = pool_problems(pool);
        // Behind an unreachable pool directory nothing can be found: that
        // is the answer, not NOT_FOUND.
        if !unreachable(&of_pool)
            && record.is_none()
            && std::fs::symlink_metadata(pool.volume_path(id.token())).is_err()
        {
            return Err(VolumeError::Missing(id));
        }
        let sight = Sight::now()?;
        let mut problems = volume_problems(pool, &of_pool, id.token(), record.as_ref(), &sight);
        if let Some(target) = &req.at
            && !problems
                .iter()
                .any(|p| p.status == VolumeStatus::Inaccessible)
        {
            let access = record.as_ref().map_or(Access::Mount, |r| r.access);
            problems.extend(at_target(pool, id.token(), access, target, &sight));
        }
        Ok(VolumeHealth {
            id: shown_as,
            problems,
        })
    }

    /// ControllerListVolumeHealth: the volumes with a record that have a
    /// problem, ordered by id, paged as ListVolumes is (the token is the
    /// id of the next volume to look at, so it stays valid while volumes
    /// come and go). Healthy volumes are left out, as the spec suggests.
    pub(crate) fn list_volume_health(
        &self,
        req: &ListVolumes,
    ) -> Result<(Vec<VolumeHealth>, String)> {
        let take = req.max_entries;
        let sight = Sight::now()?;
        let mut pools: Vec<&Pool> = self.pools.iter().collect();
        pools.sort_by_key(|p| format!("{}:", p.name()));
        let mut out = Vec::new();
        'pools: for pool in pools {
            let Some(mut from) = page_start(pool, req.start.as_ref()) else {
                continue;
            };
            let of_pool = pool_problems(pool);
            let gone = unreachable(&of_pool);
            loop {
                let tokens = match pool.page(from.as_ref().map(String::as_str), 256) {
                    Ok(tokens) => tokens,
                    // Its volumes were never listed and cannot be now; the
                    // pool's own health says why.
                    Err(_) if gone => continue 'pools,
                    Err(e) => return Err(e.into()),
                };
                let Some(last) = tokens.last() else { break };
                from = Bound::Excluded(last.clone());
                for token in &tokens {
                    let id = VolumeId::listed(pool.name(), token);
                    if out.len() == take {
                        return Ok((out, id.to_string()));
                    }
                    // A volume deleted while listing is simply skipped; one
                    // behind an unreachable pool directory is reported as
                    // the driver last knew it.
                    let rec = pool.record(token)?;
                    if rec.is_none() && !gone {
                        continue;
                    }
                    let problems = volume_problems(pool, &of_pool, token, rec.as_ref(), &sight);
                    if !problems.is_empty() {
                        out.push(VolumeHealth {
                            id: id.to_string(),
                            problems,
                        });
                    }
                }
                if tokens.len() < 256 {
                    continue 'pools;
                }
            }
        }
        Ok((out, String::new()))
    }

    /// The condition NodeGetVolumeStats reports for a volume of `pool`
    /// whose storage is there: its pool's problems, one sentence each.
    pub(crate) fn pool_condition(&self, pool: &Pool) -> Option<String> {
        let problems = pool_problems(pool);
        (!problems.is_empty()).then(|| {
            problems
                .into_iter()
                .map(|p| p.message)
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// Whether a pool's problems make its volumes unreachable.
fn unreachable(problems: &[StorageProblem]) -> bool {
    problems
        .iter()
        .any(|p| p.status == StorageStatus::Unreachable)
}

/// The problems of one pool.
fn pool_problems(pool: &Pool) -> Vec<StorageProblem> {
    let dir = pool.dir();
    let name = pool.name();
    let unreachable = |reason, message| {
        vec![StorageProblem {
            status: StorageStatus::Unreachable,
            reason,
            message,
        }]
    };
    match sys::fs::identity(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return unreachable(
                "PoolDirectoryMissing",
                format!(
                    "pool {name}: its directory {} is missing; its volumes cannot be reached",
                    dir.display()
                ),
            );
        }
        Err(e) => {
            return unreachable(
                "PoolDirectoryUnreadable",
                format!("pool {name}: {} cannot be inspected: {e}", dir.display()),
            );
        }
        Ok(now) if pool.opened_as().is_some_and(|then| then != now) => {
            return unreachable(
                "PoolNotMounted",
                format!(
                    "pool {name}: {} is no longer the directory the driver opened (another \
                     device or inode): the filesystem mounted there was unmounted, or the \
                     directory replaced, so its volumes are not there; mount it back where it was",
                    dir.display()
                ),
            );
        }
        Ok(_) => {}
    }
    let mut out = Vec::new();
    let mut degraded = |reason, message| {
        out.push(StorageProblem {
            status: StorageStatus::Degraded,
            reason,
            message,
        })
    };
    match sys::fs::space(dir) {
        Err(e) => degraded(
            "PoolSpaceUnknown",
            format!("pool {name}: statfs of {} failed: {e}", dir.display()),
        ),
        Ok(s) => {
            if s.read_only {
                degraded(
                    "PoolReadOnly",
                    format!(
                        "pool {name}: the filesystem of {} is read-only: its volumes can be read \
                         but not written, and none can be created or deleted",
                        dir.display()
                    ),
                );
            }
            if s.available_bytes == 0 {
                degraded(
                    "PoolFull",
                    format!(
                        "pool {name}: no space is left on the filesystem of {}: writes to its \
                         volumes fail (ENOSPC) even below their size",
                        dir.display()
                    ),
                );
            }
            if s.total_inodes > 0 && s.available_inodes == 0 {
                degraded(
                    "PoolOutOfInodes",
                    format!(
                        "pool {name}: no inodes are left on the filesystem of {}: no file can \
                         be made in its volumes",
                        dir.display()
                    ),
                );
            }
        }
    }
    if let Some(why) = pool.unreliable() {
        degraded("SizeLimitsUnreliable", format!("pool {name}: {why}"));
    }
    out
}

/// The problems of volume `token` of `pool` (`record` none: a static
/// directory), its pool's (`of_pool`) included.
fn volume_problems(
    pool: &Pool,
    of_pool: &[StorageProblem],
    token: &str,
    record: Option<&Record>,
    sight: &Sight,
) -> Vec<VolumeProblem> {
    let mut out: Vec<VolumeProblem> = of_pool
        .iter()
        .cloned()
        .map(|p| VolumeProblem {
            status: match p.status {
                StorageStatus::Degraded => VolumeStatus::Degraded,
                StorageStatus::Unreachable => VolumeStatus::Inaccessible,
            },
            reason: p.reason,
            message: p.message,
        })
        .collect();
    if out.iter().any(|p| p.status == VolumeStatus::Inaccessible) {
        // The pool's directory is not the one holding its volumes: what
        // the path shows now says nothing about them.
        return out;
    }
    let path = pool.volume_path(token);
    let access = record.map_or(Access::Mount, |r| r.access);
    // Only a volume the pool made as its kind's has an image: a static
    // directory, or a volume made while the pool had another kind, is a
    // directory.
    let image = record
        .filter(|r| r.access == Access::Mount && r.kind == pool.kind())
        .and_then(|_| pool.storage_file(token));
    let inaccessible = |reason, message| VolumeProblem {
        status: VolumeStatus::Inaccessible,
        reason,
        message,
    };
    if let Some(img) = &image
        && !img.is_file()
    {
        out.push(inaccessible(
            "StorageMissing",
            format!("its image {} is missing or not a file", img.display()),
        ));
        return out;
    }
    let what = match (access, &image) {
        (Access::Block, _) => "raw block volume's file",
        (Access::Mount, Some(_)) => "mount point of its image",
        (Access::Mount, None) => "directory",
    };
    match std::fs::symlink_metadata(&path) {
        Err(_) => {
            out.push(inaccessible(
                "StorageMissing",
                format!("its {what} {} is missing", path.display()),
            ));
            return out;
        }
        Ok(m) if access == Access::Block && !m.is_file() => {
            out.push(inaccessible(
                "StorageNotAFile",
                format!("its {what} {} is not a file", path.display()),
            ));
            return out;
        }
        Ok(m) if access == Access::Mount && !m.is_dir() => {
            out.push(inaccessible(
                "StorageNotADirectory",
                format!("its {what} {} is not a directory", path.display()),
            ));
            return out;
        }
        Ok(_) => {}
    }
    if let Some(img) = &image
        && sys::mountinfo::mounted_at(&sight.table, &path).is_none()
    {
        // Pods that have it published still see their data through their
        // binds; the driver's own mount, which ties those binds to the
        // volume (DeleteVolume's refusal, usage figures), is gone.
        let used: Vec<String> = sight
            .devices_of(img)
            .into_iter()
            .flat_map(|d| sight.mounts_of(d))
            .map(|m| m.display().to_string())
            .collect();
        if !used.is_empty() {
            out.push(VolumeProblem {
                status: VolumeStatus::Degraded,
                reason: "ImageNotMounted",
                message: format!(
                    "its filesystem is not mounted at {}, where the driver keeps it, while {} \
                     still use it; the next NodeGetVolumeStats or NodePublishVolume mounts it \
                     there again",
                    path.display(),
                    used.join(", ")
                ),
            });
        }
    }
    if access == Access::Block && sight.devices_of(&path).is_empty() && published_last(pool, token)
    {
        // Published (its last publication came after its last
        // unpublication), yet no loop device has its file, and a bound
        // device node leads nowhere: someone detached the device under
        // the pod. Without both, it is a volume after a reboot (no binds
        // at all) or one unpublished everywhere.
        let stray = sight.detached_device_binds();
        if !stray.is_empty() {
            out.push(inaccessible(
                "BlockDeviceDetached",
                format!(
                    "it is published, but no loop device has its file {} any more (device nodes \
                     bound at {} lead nowhere): its pod's I/O fails; unpublish and publish it \
                     again (restart the pod)",
                    path.display(),
                    stray
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    out
}

/// Whether volume `token`'s last publication came after its last
/// unpublication that took a mount off.
fn published_last(pool: &Pool, token: &str) -> bool {
    match (
        pool.last(token, Use::Published),
        pool.last(token, Use::Unpublished),
    ) {
        (Some(p), Some(u)) => p > u,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The problems at the publish path the CO named: the volume is not what
/// is mounted there.
fn at_target(
    pool: &Pool,
    token: &str,
    access: Access,
    target: &Path,
    sight: &Sight,
) -> Vec<VolumeProblem> {
    let problem = |reason, message| {
        vec![VolumeProblem {
            status: VolumeStatus::Inaccessible,
            reason,
            message,
        }]
    };
    let Some(entry) = sight.table.iter().rev().find(|e| e.mount_point == target) else {
        return problem(
            "NotPublished",
            format!(
                "nothing is mounted at {}: the volume is not published there",
                target.display()
            ),
        );
    };
    let path = pool.volume_path(token);
    match access {
        Access::Block => match loop_name(entry) {
            Some(name) => match sys::loopdev::backing_of(name) {
                Some(file) if file == path => Vec::new(),
                Some(file) => problem(
                    "OtherVolumeAtTarget",
                    format!(
                        "{} binds /dev/{name}, which is {}, not this volume's {}",
                        target.display(),
                        file.display(),
                        path.display()
                    ),
                ),
                None => problem(
                    "BlockDeviceDetached",
                    format!(
                        "{} binds /dev/{name}, which has no file behind it any more (the loop \
                         device was detached): the pod's I/O fails; unpublish and publish it \
                         again (restart the pod)",
                        target.display()
                    ),
                ),
            },
            None => problem(
                "OtherVolumeAtTarget",
                format!(
                    "{} is mounted from {}, not from this volume's loop device",
                    target.display(),
                    entry.source
                ),
            ),
        },
        Access::Mount => {
            let here = sys::fs::identity(target).ok();
            let ours = sys::fs::identity(&path).ok();
            // An image whose own mount is gone is still what its loop
            // device's binds show.
            let by_device = pool
                .storage_file(token)
                .is_some_and(|img| sight.devices_of(&img).contains(&Path::new(&entry.source)));
            if (here.is_some() && here == ours) || by_device {
                Vec::new()
            } else {
                problem(
                    "OtherVolumeAtTarget",
                    format!(
                        "{} shows something else ({} mounted there), not this volume's {}",
                        target.display(),
                        entry.source,
                        path.display()
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn entry(root: &str, point: &str) -> MountEntry {
        MountEntry {
            device: (0, 5),
            root: PathBuf::from(root),
            mount_point: PathBuf::from(point),
            options: "rw".into(),
            fs_type: "devtmpfs".into(),
            source: "udev".into(),
        }
    }

    #[test]
    fn a_bind_of_a_loop_node_names_its_device() {
        assert_eq!(loop_name(&entry("/loop7", "/t")), Some("loop7"));
        assert_eq!(loop_name(&entry("/dir/loop7", "/t")), None);
        assert_eq!(loop_name(&entry("/sda", "/t")), None);
    }
}
