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
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nix::mount::{MntFlags, MsFlags};

use super::ops::Ctx;
use super::progress::Progress;
use super::stats::Samples;

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

/// What the create phase left on disk for [`finish`] to delete.
#[derive(Debug)]
pub struct Made {
    dir: std::path::PathBuf,
    count: usize,
    sequential: usize,
    parallel: usize,
}

/// Measures `count` durable creates in `dir` (created here), one after
/// another and then from `workers` threads, and keeps what they made.
///
/// Deleting comes later, in [`finish`], after the driver's own creates:
/// on ext4 without a journal, every new inode is slower while inodes freed
/// in the last minutes are near it (the allocator checks them one by one),
/// so creates measured right after mass deletes cost more than the same
/// creates on a quiet disk. The floor and the driver are both measured
/// before any deleting, so neither pays for the other's.
pub fn creates(
    dir: &Path,
    count: usize,
    workers: usize,
    ctx: &Arc<Ctx>,
) -> io::Result<(FloorSamples, Made)> {
    let mut out = FloorSamples::default();
    fs::create_dir_all(dir)?;
    let bar = Progress::new("floor: durable create", count as u64);
    let mut made = 0;
    for i in 0..count {
        if ctx.should_stop() {
            break;
        }
        let t = Instant::now();
        match durable_create(dir, &format!("s{i}")) {
            Ok(()) => out.create.push(t.elapsed()),
            Err(e) => out.create.fail(e.to_string()),
        }
        made = i + 1;
        bar.inc();
    }
    drop(bar);
    let mut parallel_made = 0;
    if workers > 1 {
        let (samples, wall, n) = parallel(dir, count, workers, ctx);
        out.create_parallel = Some((samples, wall));
        parallel_made = n;
    }
    let made = Made {
        dir: dir.to_path_buf(),
        count,
        sequential: made,
        parallel: parallel_made,
    };
    Ok((out, made))
}

/// Measures durable deletes of what [`creates`] made (the parallel ones
/// are removed unmeasured), then the mount syscalls (root only).
pub fn finish(made: Made, out: &mut FloorSamples, ctx: &Arc<Ctx>) -> io::Result<()> {
    let dir = &made.dir;
    let bar = Progress::new("floor: durable delete", made.sequential as u64);
    for i in 0..made.sequential {
        let t = Instant::now();
        match durable_delete(dir, &format!("s{i}")) {
            Ok(()) => out.delete.push(t.elapsed()),
            Err(e) => out.delete.fail(e.to_string()),
        }
        bar.inc();
    }
    drop(bar);
    for i in 0..made.parallel {
        let _ = fs::remove_dir(dir.join(format!("p{i}")));
        let _ = fs::remove_file(dir.join(format!(".p{i}.meta")));
        let _ = fs::remove_file(dir.join(format!(".p{i}.meta.tmp")));
    }
    let _ = File::open(dir).and_then(|d| d.sync_all());
    if nix::unistd::geteuid().is_root() {
        let (bind, unmount) = mounts(dir, made.count, ctx)?;
        out.bind = Some(bind);
        out.unmount = Some(unmount);
    }
    Ok(())
}

/// Durable creates from `workers` threads; returns the samples, the wall
/// time and how many names were used.
fn parallel(
    dir: &Path,
    count: usize,
    workers: usize,
    ctx: &Arc<Ctx>,
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
                            Err(e) => mine.fail(e.to_string()),
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

fn mounts(dir: &Path, count: usize, ctx: &Arc<Ctx>) -> io::Result<(Samples, Samples)> {
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
        let r = nix::mount::mount(
            Some(&src),
            &dst,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
        match r {
            Ok(()) => bind.push(t.elapsed()),
            Err(e) => {
                bind.fail(format!("mount: {e}"));
                break;
            }
        }
        let t = Instant::now();
        match nix::mount::umount2(&dst, MntFlags::UMOUNT_NOFOLLOW) {
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
