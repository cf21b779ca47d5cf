//! `btrfs` pools: a subvolume per volume, its size enforced by a quota
//! group limit.
//!
//! The pool directory must be on btrfs. Each volume is a subvolume at
//! `<pool>/<token>` whose qgroup (`0/<subvolume id>`) has a limit on
//! referenced bytes equal to the volume's capacity, so writes beyond it
//! fail with EDQUOT. Used bytes come from the qgroup, inodes from walking
//! the subvolume. Expanding raises the limit; nothing is needed on the node.
//!
//! Quotas: when the pool is opened on a filesystem without quotas, the
//! driver turns on *simple quotas* where the kernel has them (Linux 6.7+)
//! and the pool holds no subvolume yet, full qgroup accounting otherwise; a
//! filesystem whose quotas are already on keeps its mode. Full accounting
//! can become inconsistent, and then the kernel may stop counting, so limits
//! silently stop holding; simple quotas cannot. The pool asks the kernel
//! before every promise and every stats call (`quota`, through
//! [`Backend::unreliable`]): while the accounting is inconsistent or being
//! rebuilt, the pool promises nothing and its volumes report why; an
//! inconsistent filesystem gets a rescan, started by the driver (the kernel
//! runs it; see `sys::btrfs`).
//!
//! Crash safety: `btrfs subvolume create` and `delete` are atomic, so the
//! only half-made state is a subvolume without its limit (create killed
//! between the two commands), which a retry finds empty and finishes. A
//! deleted subvolume's qgroup is removed by the kernel once the subvolume
//! is cleaned up (older kernels, and now and then newer ones, leave it
//! "stale"; preparing the pool clears stale qgroups). Nothing about quotas
//! is remembered by the driver: a driver killed during a rescan finds the
//! rescan still running (or done) when it starts again.

mod quota;

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Backend, BackendError, RESTORE, Result, Source, VolumeUsage};
use crate::config::PoolKind;
use crate::sys;
use crate::sys::cmd::{self, CmdError};
use quota::Watch;

/// Inode number of every subvolume's root directory on btrfs.
const SUBVOLUME_ROOT_INO: u64 = 256;
/// Smallest volume: room for the subvolume's own metadata and some data.
const MIN_VOLUME: u64 = 1 << 20;

/// How often a group snapshot is cut again when a volume was written
/// between its snapshots, before the call fails.
const GROUP_ATTEMPTS: u32 = 5;

/// The `btrfs` backend of one pool.
#[derive(Debug, Default)]
pub(crate) struct BtrfsBackend {
    /// The pool's filesystem and what was last said about its quotas.
    watch: Mutex<Watch>,
}

impl BtrfsBackend {
    /// The watch; a panic elsewhere leaves nothing half-changed in it (a
    /// cache and the log's memory), so a poisoned lock is used as it is.
    fn lock(&self) -> MutexGuard<'_, Watch> {
        self.watch.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One row of `btrfs qgroup show --raw -r`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QgroupRow {
    /// `0/<subvolume id>`.
    id: String,
    /// Referenced bytes.
    referenced: u64,
    /// Limit on referenced bytes, if any.
    max_referenced: Option<u64>,
    /// Path relative to the filesystem's top level (`<stale>` for qgroups
    /// whose subvolume is gone).
    path: String,
}

/// Parses the output of `btrfs qgroup show --raw -r` (columns: qgroupid,
/// referenced, exclusive, max referenced, path).
fn parse_qgroups(text: &str) -> Vec<QgroupRow> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let id = f.next()?;
            if !id.starts_with("0/") {
                return None;
            }
            let referenced = f.next()?.parse().ok()?;
            let _exclusive = f.next()?;
            let max_referenced = match f.next()? {
                "none" => None,
                n => Some(n.parse().ok()?),
            };
            let path = f.collect::<Vec<_>>().join(" ");
            Some(QgroupRow {
                id: id.to_string(),
                referenced,
                max_referenced,
                path,
            })
        })
        .collect()
}

fn is_subvolume(meta: &std::fs::Metadata) -> bool {
    meta.is_dir() && meta.ino() == SUBVOLUME_ROOT_INO
}

/// Commits the filesystem's transaction so that qgroup figures include
/// what was just written (they are updated at commit time).
fn sync_fs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path)
        .map_err(|e| BackendError::io(format!("opening {}", path.display()), e))?;
    nix::unistd::syncfs(&f)
        .map_err(|e| BackendError::io(format!("syncfs {}", path.display()), e.into()))
}

/// Where `dir` is inside its btrfs filesystem, relative to the top level,
/// as `btrfs qgroup show` prints paths (no leading slash).
fn path_in_fs(dir: &Path) -> Result<PathBuf> {
    let table =
        sys::mountinfo::read().map_err(|e| BackendError::io("reading the mount table", e))?;
    let holder =
        sys::mountinfo::containing(&table, dir).ok_or_else(|| BackendError::NotMounted {
            dir: dir.to_path_buf(),
        })?;
    let rel = dir
        .strip_prefix(&holder.mount_point)
        .unwrap_or(Path::new(""));
    let full = holder.root.join(rel);
    Ok(full.strip_prefix("/").unwrap_or(&full).to_path_buf())
}

fn limit(path: &Path, capacity: u64) -> Result<()> {
    cmd::run(
        "btrfs",
        [
            "qgroup".as_ref(),
            "limit".as_ref(),
            capacity.to_string().as_ref(),
            path.as_os_str(),
        ],
    )?;
    Ok(())
}

impl Backend for BtrfsBackend {
    fn kind(&self) -> PoolKind {
        PoolKind::Btrfs
    }

    fn prepare(&self, pool_dir: &Path) -> Result<()> {
        let statfs = nix::sys::statfs::statfs(pool_dir)
            .map_err(|e| BackendError::io(format!("statfs {}", pool_dir.display()), e.into()))?;
        if statfs.filesystem_type() != nix::sys::statfs::BTRFS_SUPER_MAGIC {
            return Err(BackendError::NotBtrfs {
                dir: pool_dir.to_path_buf(),
            });
        }
        let fs = quota::set_up(pool_dir)?;
        // Qgroups of deleted subvolumes that the kernel left behind, empty
        // ("stale": older kernels always, 6.18 now and then when a delete
        // was interrupted). Harmless when there are none.
        if let Ok(Err(f)) = cmd::run_raw(
            "btrfs",
            ["qgroup".as_ref(), "clear-stale".as_ref(), pool_dir],
        ) {
            tracing::debug!(error = %f, "clearing stale qgroups failed; ignored");
        }
        self.lock().fs = Some(fs);
        // Logs the pool's health and starts a rescan if one is needed.
        let _ = self.unreliable(pool_dir);
        Ok(())
    }

    fn unreliable(&self, pool_dir: &Path) -> Option<String> {
        self.lock().check(pool_dir)
    }

    fn missing_limits(&self, pool_dir: &Path) -> Result<Vec<String>> {
        // One `qgroup show` for the whole filesystem: cheap enough to run
        // at every open, which is what makes the repair crash-safe.
        let base = path_in_fs(pool_dir)?;
        Ok(qgroup_show(pool_dir, false)?
            .into_iter()
            .filter(|r| r.max_referenced.is_none())
            .filter_map(|r| {
                let path = PathBuf::from(r.path);
                let token = path.strip_prefix(&base).ok()?.to_str()?;
                crate::volume::id::valid_token(token).then(|| token.to_string())
            })
            .collect())
    }

    fn create(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
        let path = pool_dir.join(token);
        let made = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                cmd::run(
                    "btrfs",
                    ["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
                )?;
                true
            }
            Err(e) => {
                return Err(BackendError::io(
                    format!("inspecting {}", path.display()),
                    e,
                ));
            }
            Ok(meta) => {
                // A subvolume left by an attempt killed before its limit was
                // set is empty: finish it. Anything else is not ours.
                let empty = is_subvolume(&meta)
                    && sys::fs::is_empty_dir(&path)
                        .map_err(|e| BackendError::io(format!("reading {}", path.display()), e))?;
                if !empty {
                    return Err(BackendError::Occupied {
                        path,
                        what: "is not an empty subvolume",
                    });
                }
                false
            }
        };
        // The root's mode and owner are the pool's to set (`Pool::set_root`).
        if let Err(e) = limit(&path, capacity) {
            if made {
                let _ = self.delete(pool_dir, token);
            }
            return Err(e);
        }
        Ok(())
    }

    fn delete(&self, pool_dir: &Path, token: &str) -> Result<()> {
        let path = pool_dir.join(token);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(BackendError::io(
                    format!("inspecting {}", path.display()),
                    e,
                ));
            }
        };
        if !is_subvolume(&meta) {
            // A plain directory: a volume made while the pool was of kind
            // dir. Remove it the way that kind does.
            return super::dir::DirBackend.delete(pool_dir, token);
        }
        // --commit-after: the removal is on disk before the record goes.
        cmd::run(
            "btrfs",
            [
                "subvolume".as_ref(),
                "delete".as_ref(),
                "--commit-after".as_ref(),
                path.as_os_str(),
            ],
        )
        .map_err(|e| match e {
            CmdError::Failed(f) if f.to_string().contains("not empty") => {
                BackendError::NestedSubvolumes(f)
            }
            e => e.into(),
        })?;
        Ok(())
    }

    fn purge(&self, path: &Path) -> Result<()> {
        // An archived subvolume goes the way a snapshot or scratch copy
        // does: `btrfs subvolume delete`, or a tree removal for anything else.
        self.discard(path)
    }

    fn usage(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<VolumeUsage> {
        let path = pool_dir.join(token);
        sync_fs(&path)?;
        let row = qgroup_show(&path, true)?
            .into_iter()
            .next()
            .ok_or_else(|| BackendError::NoQgroup { path: path.clone() })?;
        let total = row.max_referenced.unwrap_or(capacity);
        let used = row.referenced;
        let available = total.saturating_sub(used);
        let inodes = sys::fs::usage(&path)
            .map_err(|e| BackendError::io(format!("measuring {}", path.display()), e))?;
        // btrfs makes inodes on demand and statfs reports none; estimate
        // what is left as one inode per 4 KiB of space left.
        let available_inodes = available / 4096;
        Ok(VolumeUsage {
            used_bytes: used,
            available_bytes: available,
            total_bytes: total,
            used_inodes: inodes.inodes,
            available_inodes,
            total_inodes: inodes.inodes + available_inodes,
        })
    }

    fn expand(&self, pool_dir: &Path, token: &str, capacity: u64) -> Result<()> {
        let path = pool_dir.join(token);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if is_subvolume(&m) => limit(&path, capacity),
            Ok(_) => Err(BackendError::NotSubvolume { path }),
            Err(e) => Err(BackendError::io(
                format!("inspecting {}", path.display()),
                e,
            )),
        }
    }

    fn min_volume_size(&self) -> u64 {
        MIN_VOLUME
    }

    fn held(
        &self,
        pool_dir: &Path,
        tokens: &[&str],
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        if tokens.is_empty() {
            return Ok(Default::default());
        }
        // One `qgroup show` for all of them, and no sync first (unlike
        // NodeGetVolumeStats): a listing must not commit anything, so
        // what was written in the last seconds may not count yet.
        let base = path_in_fs(pool_dir)?;
        let rows = qgroup_show(pool_dir, false)?;
        Ok(tokens
            .iter()
            .filter_map(|t| {
                let p = base.join(t);
                let row = rows.iter().find(|r| Path::new(&r.path) == p)?;
                Some((t.to_string(), row.referenced))
            })
            .collect())
    }

    fn snapshot(&self, pool_dir: &Path, token: &str, dest: &Path) -> Result<()> {
        // Read-only and instant: the snapshot shares every extent with the
        // volume. The ioctl flushes the volume's dirty data first and
        // returns once the transaction holding the snapshot is committed.
        let from = subvolume(&pool_dir.join(token))?;
        cmd::run(
            "btrfs",
            [
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                "-r".as_ref(),
                from.as_os_str(),
                dest.as_os_str(),
            ],
        )?;
        Ok(())
    }

    fn snapshots_groups(&self) -> bool {
        true
    }

    fn snapshot_group(&self, pool_dir: &Path, members: &[(&str, &Path)]) -> Result<()> {
        // btrfs cannot freeze one subvolume, nor snapshot several in one
        // step, and freezing the filesystem would stop the snapshots too.
        // So the snapshots are cut one after the other and then checked:
        // once the filesystem is flushed, a volume that no transaction
        // changed after its own snapshot's was not written between its
        // snapshot and the last one, and every snapshot then holds the
        // moment of the last. A write landing in between (or an atime
        // update) makes the attempt start again; the last volume's writes
        // do not matter, its snapshot is that moment.
        let mut attempt = 0;
        loop {
            attempt += 1;
            for (token, dest) in members {
                self.snapshot(pool_dir, token, dest)?;
            }
            sys::copy::sync_fs(pool_dir)
                .map_err(|e| BackendError::io(format!("flushing {}", pool_dir.display()), e))?;
            let mut written = Vec::new();
            for (token, dest) in &members[..members.len().saturating_sub(1)] {
                let volume = sys::btrfs::generations(&pool_dir.join(token))?;
                if volume.last_change > sys::btrfs::generations(dest)?.created {
                    written.push(*token);
                }
            }
            if written.is_empty() {
                return Ok(());
            }
            tracing::debug!(attempt, volumes = ?written, "written during a group snapshot; again");
            for (_, dest) in members {
                self.discard(dest)?;
            }
            if attempt == GROUP_ATTEMPTS {
                return Err(BackendError::WrittenDuringGroup {
                    volumes: written.join(", "),
                    attempts: GROUP_ATTEMPTS,
                });
            }
        }
    }

    fn create_from(
        &self,
        pool_dir: &Path,
        token: &str,
        capacity: u64,
        source: Source<'_>,
    ) -> Result<()> {
        let from = subvolume(&match source {
            Source::Snapshot(p) => p.to_path_buf(),
            Source::Volume(t) => pool_dir.join(t),
        })?;
        let scratch = pool_dir.join(format!(".{token}{RESTORE}"));
        self.discard(&scratch)?;
        let build = || -> Result<()> {
            // A writable snapshot of the source: instant, sharing extents.
            cmd::run(
                "btrfs",
                [
                    "subvolume".as_ref(),
                    "snapshot".as_ref(),
                    from.as_os_str(),
                    scratch.as_os_str(),
                ],
            )?;
            limit(&scratch, capacity)?;
            std::fs::rename(&scratch, pool_dir.join(token)).map_err(|e| {
                BackendError::io(format!("moving {} into place", scratch.display()), e)
            })
        };
        build().inspect_err(|_| {
            let _ = self.discard(&scratch);
        })
    }

    fn discard(&self, path: &Path) -> Result<()> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io(
                format!("inspecting {}", path.display()),
                e,
            )),
            Ok(m) if is_subvolume(&m) => {
                cmd::run(
                    "btrfs",
                    [
                        "subvolume".as_ref(),
                        "delete".as_ref(),
                        "--commit-after".as_ref(),
                        path.as_os_str(),
                    ],
                )?;
                Ok(())
            }
            Ok(_) => sys::fs::remove_tree(path)
                .map_err(|e| BackendError::io(format!("removing {}", path.display()), e)),
        }
    }

    fn scratch_suffixes(&self) -> &'static [&'static str] {
        &[RESTORE]
    }

    fn used_by(&self, pool_dir: &Path, tokens: &[&str]) -> Result<u64> {
        if tokens.is_empty() {
            return Ok(0);
        }
        let base = path_in_fs(pool_dir)?;
        let wanted: std::collections::HashSet<PathBuf> =
            tokens.iter().map(|t| base.join(t)).collect();
        Ok(qgroup_show(pool_dir, false)?
            .into_iter()
            .filter(|r| wanted.contains(Path::new(&r.path)))
            .map(|r| r.referenced)
            .sum())
    }
}

/// `path` if it is a subvolume, the source of a snapshot or clone.
fn subvolume(path: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if is_subvolume(&m) => Ok(path.to_path_buf()),
        Ok(_) => Err(BackendError::NotOfKind {
            path: path.to_path_buf(),
            kind: PoolKind::Btrfs,
        }),
        Err(e) => Err(BackendError::io(
            format!("inspecting {}", path.display()),
            e,
        )),
    }
}

/// `btrfs qgroup show --raw -r` for the filesystem holding `path`; with
/// `only_path`, just the qgroups of the subvolume at `path` (`-f`).
fn qgroup_show(path: &Path, only_path: bool) -> Result<Vec<QgroupRow>> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "qgroup".as_ref(),
        "show".as_ref(),
        "--raw".as_ref(),
        "-r".as_ref(),
    ];
    if only_path {
        args.push("-f".as_ref());
    }
    args.push(path.as_os_str());
    let out = cmd::run("btrfs", args)?;
    Ok(parse_qgroups(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qgroup_tables() {
        let text = "\
Qgroupid    Referenced    Exclusive  Max referenced   Path 
--------    ----------    ---------  --------------   ---- 
0/5              16384        16384            none   <toplevel>
0/256         10469376     10469376        10485760   pools/fast/pvc-1
0/257                0            0        10485760   pools/fast/a b
0/258            16384        16384            none   <stale>
";
        let rows = parse_qgroups(text);
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[1],
            QgroupRow {
                id: "0/256".into(),
                referenced: 10469376,
                max_referenced: Some(10485760),
                path: "pools/fast/pvc-1".into(),
            }
        );
        assert_eq!(rows[2].path, "pools/fast/a b");
        assert_eq!(rows[0].max_referenced, None);
    }
}
