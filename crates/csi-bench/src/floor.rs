//! What the operations cost with no driver, on the same disk and in the
//! same run: the figures the driver's are divided by.
//!
//! - durable create: `mkdir`, then a small record written durably (write a
//!   temp file, fsync it, rename it into place, fsync the directory): the
//!   least a crash-safe CreateVolume can do;
//! - durable delete: `rmdir`, unlink the record, fsync the directory;
//! - a bind mount and its unmount, as bare syscalls (root only).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ops::Ctx;
use crate::progress::Progress;
use crate::stats::Samples;
use crate::sys;

/// A record about the size of a driver's (a few hundred bytes of JSON).
const RECORD: &[u8] = br#"{
  "name": "pvc-00000000-0000-0000-0000-000000000000",
  "kind": "dir",
  "capacity_bytes": 1073741824,
  "parameters": {
    "csi.storage.k8s.io/pvc/name": "data",
    "csi.storage.k8s.io/pvc/namespace": "default"
  },
  "created_unix": 1700000000
}"#;

/// Floor samples.
#[derive(Debug, Default)]
pub struct FloorSamples {
    /// Durable create.
    pub create: Samples,
    /// Durable delete.
    pub delete: Samples,
    /// Durable create from `workers` threads at once, and its wall time:
    /// what the disk allows concurrent CreateVolume calls.
    pub create_parallel: Option<(Samples, std::time::Duration)>,
    /// Bind mount syscall; `None` when not root.
    pub bind: Option<Samples>,
    /// Unmount syscall.
    pub unmount: Option<Samples>,
}

/// The floor of one bench run: its directory, what it has made there so
/// far, and its samples.
///
/// Creates and deletes are separate steps because of when they may run.
/// Every create comes before any delete: on ext4 without a journal, every
/// new inode is slower while inodes freed in the last minutes are near it
/// (the allocator checks them one by one), so creates measured after mass
/// deletes would pay for them. And the sequential durable creates can be
/// spread between the driver's creates ([`FloorRun::sequential`] in
/// slices), so both see the disk in the same state: its speed drifts
/// during a run (writeback of earlier work, other tenants of the host).
#[derive(Debug)]
pub struct FloorRun {
    dir: PathBuf,
    /// Sequential durable creates wanted in all.
    count: usize,
    sequential: usize,
    parallel: usize,
    /// What was measured so far.
    pub samples: FloorSamples,
}

impl FloorRun {
    /// A floor of `count` durable creates in `dir` (created here).
    pub fn new(dir: &Path, count: usize) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(FloorRun {
            dir: dir.to_path_buf(),
            count,
            sequential: 0,
            parallel: 0,
            samples: FloorSamples::default(),
        })
    }

    /// Sequential durable creates still to do.
    pub fn remaining(&self) -> usize {
        self.count - self.sequential
    }

    /// Sequential durable creates due so that, after `done` of `of` steps
    /// of something measured alongside, the same share of the floor is done.
    pub fn due(&self, done: usize, of: usize) -> usize {
        (self.count * done)
            .div_ceil(of.max(1))
            .min(self.count)
            .saturating_sub(self.sequential)
    }

    /// Up to `n` more sequential durable creates (at most the remaining).
    pub fn sequential(&mut self, n: usize, ctx: &Ctx, bar: Option<&Progress>) {
        for _ in 0..n.min(self.remaining()) {
            if ctx.should_stop() {
                break;
            }
            let name = format!("s{}", self.sequential);
            let t = Instant::now();
            match durable_create(&self.dir, &name) {
                Ok(()) => self.samples.create.push(t.elapsed()),
                Err(e) => self.samples.create.fail(e),
            }
            self.sequential += 1;
            if let Some(b) = bar {
                b.inc();
            }
        }
    }

    /// `count` durable creates from `workers` threads at once.
    pub fn parallel(&mut self, workers: usize, ctx: &Ctx) {
        let (samples, wall, n) = parallel(&self.dir, self.count, workers, ctx);
        self.samples.create_parallel = Some((samples, wall));
        self.parallel = n;
    }

    /// Measures durable deletes of the sequential creates (the parallel
    /// ones are removed unmeasured), then the mount syscalls (root only).
    pub fn finish(&mut self, ctx: &Ctx) -> io::Result<()> {
        let dir = &self.dir;
        let out = &mut self.samples;
        let bar = Progress::new("floor: durable delete", self.sequential as u64);
        for i in 0..self.sequential {
            let t = Instant::now();
            match durable_delete(dir, &format!("s{i}")) {
                Ok(()) => out.delete.push(t.elapsed()),
                Err(e) => out.delete.fail(e),
            }
            bar.inc();
        }
        drop(bar);
        for i in 0..self.parallel {
            let _ = fs::remove_dir(dir.join(format!("p{i}")));
            let _ = fs::remove_file(dir.join(format!(".p{i}.meta")));
            let _ = fs::remove_file(dir.join(format!(".p{i}.meta.tmp")));
        }
        let _ = File::open(dir).and_then(|d| d.sync_all());
        if sys::is_root() {
            let (bind, unmount) = mounts(dir, self.count, ctx)?;
            out.bind = Some(bind);
            out.unmount = Some(unmount);
        }
        Ok(())
    }
}

/// Durable creates from `workers` threads; returns the samples, the wall
/// time and how many names were used.
fn parallel(
    dir: &Path,
    count: usize,
    workers: usize,
    ctx: &Ctx,
) -> (Samples, std::time::Duration, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let bar = Progress::new(&format!("floor: create x{workers}"), count as u64);
    let t = Instant::now();
    let mut all = Samples::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Samples::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count || ctx.should_stop() {
                            break;
                        }
                        let t = Instant::now();
                        match durable_create(dir, &format!("p{i}")) {
                            Ok(()) => mine.push(t.elapsed()),
                            Err(e) => mine.fail(e),
                        }
                        bar.inc();
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            if let Ok(m) = h.join() {
                all.merge(m);
            }
        }
    });
    let wall = t.elapsed();
    drop(bar);
    (all, wall, count.min(next.load(Ordering::Relaxed)))
}

fn durable_create(dir: &Path, name: &str) -> io::Result<()> {
    fs::create_dir(dir.join(name))?;
    let tmp = dir.join(format!(".{name}.meta.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(RECORD)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(format!(".{name}.meta")))?;
    File::open(dir)?.sync_all()
}

fn durable_delete(dir: &Path, name: &str) -> io::Result<()> {
    fs::remove_dir(dir.join(name))?;
    fs::remove_file(dir.join(format!(".{name}.meta")))?;
    File::open(dir)?.sync_all()
}

fn mounts(dir: &Path, count: usize, ctx: &Ctx) -> io::Result<(Samples, Samples)> {
    let src = dir.join("bind-source");
    let dst = dir.join("bind-target");
    fs::create_dir_all(&src)?;
    fs::create_dir_all(&dst)?;
    let mut bind = Samples::default();
    let mut unmount = Samples::default();
    let bar = Progress::new("floor: bind mount", count as u64);
    for _ in 0..count {
        if ctx.should_stop() {
            break;
        }
        let t = Instant::now();
        match sys::bind_mount(&src, &dst) {
            Ok(()) => bind.push(t.elapsed()),
            Err(e) => {
                bind.fail(format!("mount: {e}"));
                break;
            }
        }
        let t = Instant::now();
        match sys::unmount(&dst) {
            Ok(()) => unmount.push(t.elapsed()),
            Err(e) => {
                unmount.fail(format!("umount: {e}"));
                break;
            }
        }
        bar.inc();
    }
    drop(bar);
    // Only empty directories are removed: if an unmount failed, the
    // target still shows the source and must not be emptied.
    fs::remove_dir(&dst)?;
    fs::remove_dir(&src)?;
    Ok((bind, unmount))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(count: usize) -> FloorRun {
        FloorRun {
            dir: PathBuf::from("/nonexistent"),
            count,
            sequential: 0,
            parallel: 0,
            samples: FloorSamples::default(),
        }
    }

    /// Replays `steps` steps, doing what is due after each; returns how
    /// many floor creates each step got.
    fn spread(count: usize, steps: usize) -> Vec<usize> {
        let mut f = run(count);
        (1..=steps)
            .map(|done| {
                let due = f.due(done, steps);
                f.sequential += due;
                due
            })
            .collect()
    }

    #[test]
    fn the_floor_keeps_pace_evenly_and_finishes_with_the_last_step() {
        // 1000 floor creates along 10000 driver creates: one every tenth.
        let s = spread(1000, 10_000);
        assert_eq!(s.iter().sum::<usize>(), 1000);
        assert!(s.iter().all(|&d| d <= 1), "{:?}", &s[..20]);
        assert_eq!(s.iter().take(10).sum::<usize>(), 1);
        // More floor creates than steps: several after each, evenly.
        let s = spread(1000, 300);
        assert_eq!(s.iter().sum::<usize>(), 1000);
        assert!(s.iter().all(|&d| d == 3 || d == 4), "{s:?}");
        // The last step completes the floor even if the steps stopped
        // short (then `floor_finish` does the rest).
        assert_eq!(spread(7, 1), vec![7]);
        assert_eq!(run(5).due(0, 10), 0);
    }
}
