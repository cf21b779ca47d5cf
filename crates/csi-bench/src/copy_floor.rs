//! What a snapshot or a restore costs with no driver, on the --workdir
//! disk: copies of a file holding as many bytes of the same kind of data
//! as the snapshot scenario's volume, each made the way a driver would
//! and flushed as a driver must before it can say the copy exists.
//!
//! - reflink: `cp --reflink=always`, then `syncfs` (btrfs, xfs with
//!   reflink: extents shared, nothing copied); skipped, with `cp`'s
//!   reason, where the filesystem cannot;
//! - plain copy: `cp --reflink=never`, then `syncfs`: every byte read and
//!   written;
//! - subvolume snapshot: `btrfs subvolume snapshot -r` of a subvolume
//!   holding the data (returns once its transaction is committed);
//!   skipped, with the reason, off btrfs.
//!
//! The tools are run, not reimplemented, so the floor pays the fork and
//! exec a driver that runs them pays too.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::data;
use crate::stats::Samples;
use crate::sys;

/// Floor rows, by how the copy is made.
#[derive(Debug, Default)]
pub struct CopySamples {
    /// `cp --reflink=always` + syncfs.
    pub reflink: Samples,
    /// `cp --reflink=never` + syncfs.
    pub plain: Samples,
    /// `btrfs subvolume snapshot -r`.
    pub subvolume: Samples,
}

/// The copy floor of one run: its directory, the data it copies, why a
/// kind of copy cannot be made here, and what was measured.
#[derive(Debug)]
pub struct CopyFloor {
    dir: PathBuf,
    source: PathBuf,
    /// A subvolume holding the data, or why there is none.
    subvolume: Result<PathBuf, String>,
    /// Why reflinks cannot be made here, once a try said so.
    no_reflink: Option<String>,
    rounds: usize,
    /// What was measured so far.
    pub samples: CopySamples,
}

impl CopyFloor {
    /// Makes `dir` with `bytes` of data to copy (a file, and a btrfs
    /// subvolume holding the same where the filesystem is btrfs).
    pub fn new(dir: &Path, bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let source = dir.join("source");
        data::write(&source, bytes)?;
        let sub = dir.join("subvolume");
        let subvolume = run(
            "btrfs",
            &["subvolume".as_ref(), "create".as_ref(), sub.as_os_str()],
        )
        .and_then(|()| {
            data::write(&sub.join("data"), bytes).map_err(|e| {
                delete_subvolume(&sub);
                format!("writing the data into {}: {e}", sub.display())
            })
        })
        .map(|()| sub);
        sys::sync_fs(dir)?;
        Ok(CopyFloor {
            dir: dir.to_path_buf(),
            source,
            subvolume,
            no_reflink: None,
            rounds: 0,
            samples: CopySamples::default(),
        })
    }

    /// Why a kind of copy was not measured: (row, reason).
    pub fn skipped(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(why) = &self.no_reflink {
            out.push((REFLINK, why.clone()));
        }
        if let Err(why) = &self.subvolume {
            out.push((SUBVOLUME, why.clone()));
        }
        out
    }

    /// One copy of each kind that can be made here, timed, then removed
    /// (untimed).
    pub fn round(&mut self) {
        let n = self.rounds;
        self.rounds += 1;
        if self.no_reflink.is_none() {
            let dest = self.dir.join(format!("reflink-{n}"));
            match self.timed_cp("--reflink=always", &dest) {
                Ok(d) => self.samples.reflink.push(d),
                // The first try tells whether the filesystem can; a later
                // failure is a failure.
                Err(e) if n == 0 => self.no_reflink = Some(e),
                Err(e) => self.samples.reflink.fail(e),
            }
            let _ = fs::remove_file(&dest);
        }
        let dest = self.dir.join(format!("copy-{n}"));
        match self.timed_cp("--reflink=never", &dest) {
            Ok(d) => self.samples.plain.push(d),
            Err(e) => self.samples.plain.fail(e),
        }
        let _ = fs::remove_file(&dest);
        if let Ok(sub) = &self.subvolume {
            let snap = self.dir.join(format!("snapshot-{n}"));
            let args = [
                "subvolume".as_ref(),
                "snapshot".as_ref(),
                "-r".as_ref(),
                sub.as_os_str(),
                snap.as_os_str(),
            ];
            let t = Instant::now();
            match run("btrfs", &args) {
                Ok(()) => self.samples.subvolume.push(t.elapsed()),
                Err(e) => self.samples.subvolume.fail(e),
            }
            delete_subvolume(&snap);
        }
    }

    /// `cp MODE source dest` and a flush of the filesystem, timed.
    fn timed_cp(&self, mode: &str, dest: &Path) -> Result<std::time::Duration, String> {
        let t = Instant::now();
        run(
            "cp",
            &[mode.as_ref(), self.source.as_os_str(), dest.as_os_str()],
        )?;
        sys::sync_fs(&self.dir).map_err(|e| format!("syncfs: {e}"))?;
        Ok(t.elapsed())
    }

    /// Removes everything the floor made, and its directory if empty.
    pub fn finish(self) {
        let _ = fs::remove_file(&self.source);
        if let Ok(sub) = &self.subvolume {
            delete_subvolume(sub);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Row name of the reflink copy.
pub const REFLINK: &str = "cp --reflink=always + syncfs";
/// Row name of the plain copy.
pub const PLAIN: &str = "cp --reflink=never + syncfs";
/// Row name of the subvolume snapshot.
pub const SUBVOLUME: &str = "btrfs subvolume snapshot -r";

fn delete_subvolume(path: &Path) {
    if path.exists() {
        let _ = run(
            "btrfs",
            &["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()],
        );
    }
}

/// Runs a tool; its stderr (or why it could not start) on failure.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // `cp` names itself in its messages; `btrfs` does not.
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.starts_with(&format!("{program}: ")) {
        Err(err)
    } else {
        Err(format!("{program}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On whatever filesystem the temporary directory is on, the plain
    /// copy is measured, each other kind is measured or skipped with a
    /// reason, and nothing is left behind.
    #[test]
    fn a_round_measures_or_explains_each_kind_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("floor");
        let mut f = CopyFloor::new(&dir, 1 << 20).unwrap();
        f.round();
        f.round();
        assert_eq!(f.samples.plain.len(), 2, "{:?}", f.samples.plain);
        let skipped: Vec<&str> = f.skipped().iter().map(|(k, _)| *k).collect();
        assert!(f.samples.reflink.len() == 2 || skipped.contains(&REFLINK));
        assert!(f.samples.subvolume.len() == 2 || skipped.contains(&SUBVOLUME));
        f.finish();
        assert!(!dir.exists(), "the floor's directory is left");
    }
}
