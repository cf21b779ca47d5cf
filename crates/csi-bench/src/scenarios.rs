//! The scenarios. Each one checks what the driver advertises, says why it
//! skips when it cannot run, stops when told to (Ctrl-C, time limit, a
//! burst of errors), and records into the report.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::driver::{Clients, Managed, memory_kib};
use crate::floor::FloorRun;
use crate::lock;
use crate::ops::Ctx;
use crate::progress::Progress;
use crate::report::{FLOOR_SCENARIO, Floor, Report};
use crate::stats::{Samples, rate};

/// A phase stops after this many failed calls: something is wrong and
/// hammering on says nothing more.
pub const MAX_ERRORS: u64 = 10;

/// What the scenarios share besides the call context.
#[derive(Debug)]
pub struct Env<'a> {
    /// The report being filled.
    pub report: &'a Mutex<Report>,
    /// The run's own directory under `--workdir`.
    pub run_dir: PathBuf,
    /// Volume name prefix unique to this run.
    pub prefix: String,
    /// The driver process, if the bench started it.
    pub managed: &'a tokio::sync::Mutex<Option<Managed>>,
    /// The driver's pid for memory figures.
    pub pid: Option<u32>,
    /// CSI endpoint.
    pub endpoint: String,
}

impl Env<'_> {
    /// The report, locked.
    pub fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        lock(self.report)
    }

    /// The current driver pid (a restarted driver has a new one).
    pub async fn current_pid(&self) -> Option<u32> {
        match self.managed.lock().await.as_ref() {
            Some(m) => m.pid(),
            None => self.pid,
        }
    }
}

/// Sequential Probes: the cost of a round trip through the socket and the
/// gRPC stack, with no work behind it.
pub async fn probe(ctx: &Ctx, env: &Env<'_>, count: usize) {
    let mut s = Samples::default();
    let bar = Progress::new("Probe", count as u64);
    let t = Instant::now();
    for _ in 0..count {
        if ctx.should_stop() || s.errors >= MAX_ERRORS {
            break;
        }
        match ctx.probe().await {
            (d, Ok(_)) => s.push(d),
            (_, Err(e)) => s.fail(e),
        }
        bar.inc();
    }
    let ops = rate(s.len(), t.elapsed());
    env.report()
        .op("probe", "Probe (gRPC round trip)", &s, Some(ops), None);
}

/// Runs a step of the floor on the blocking pool; a failure is reported
/// as the floor's skip reason and ends the floor (`None`).
async fn floor_step<T: Send + 'static>(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    step: impl FnOnce(&Ctx) -> std::io::Result<T> + Send + 'static,
) -> Option<T> {
    let c = Arc::clone(ctx);
    let why = match tokio::task::spawn_blocking(move || step(&c)).await {
        Ok(Ok(v)) => return Some(v),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(e) => format!("panicked: {e}"),
    };
    env.report().skip(FLOOR_SCENARIO, why);
    None
}

/// Starts the floor: its directory and the durable creates from `workers`
/// threads at once. With `interleave`, the sequential durable creates are
/// left for [`create_sequential`] to spread between the driver's; without,
/// they run now.
pub async fn floor_start(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    count: usize,
    workers: usize,
    interleave: bool,
) -> Option<FloorRun> {
    let dir = env.run_dir.join("floor");
    let f = floor_step(ctx, env, move |c| {
        let mut f = FloorRun::new(&dir, count)?;
        if workers > 1 {
            f.parallel(workers, c);
        }
        if !interleave {
            let bar = Progress::new("floor: durable create", count as u64);
            f.sequential(count, c, Some(&bar));
        }
        Ok(f)
    })
    .await?;
    if let Some((s, wall)) = &f.samples.create_parallel {
        env.report().op(
            FLOOR_SCENARIO,
            &format!("durable create, {workers} threads at once"),
            s,
            Some(rate(s.len(), *wall)),
            None,
        );
    }
    Some(f)
}

/// Completes the floor: any sequential durable creates not done yet, then
/// the deletes of what it made and the mount syscalls; reports it all.
pub async fn floor_finish(ctx: &Arc<Ctx>, env: &Env<'_>, mut f: FloorRun) {
    let Some(f) = floor_step(ctx, env, move |c| {
        let rest = f.remaining();
        if rest > 0 {
            let bar = Progress::new("floor: durable create", rest as u64);
            f.sequential(rest, c, Some(&bar));
        }
        f.finish(c).map(|()| f.samples)
    })
    .await
    else {
        return;
    };
    let mut r = env.report();
    r.op(
        FLOOR_SCENARIO,
        Floor::DurableCreate.op(),
        &f.create,
        None,
        None,
    );
    if let Some(x) = f.create.flatness() {
        r.figure(
            FLOOR_SCENARIO,
            &format!(
                "flatness: p50 last/first tenth of {} durable creates",
                f.create.len()
            ),
            x,
            "ratio",
        );
    }
    r.op(
        FLOOR_SCENARIO,
        Floor::DurableDelete.op(),
        &f.delete,
        None,
        None,
    );
    match (f.bind, f.unmount) {
        (Some(b), Some(u)) => {
            r.op(FLOOR_SCENARIO, Floor::BindMount.op(), &b, None, None);
            r.op(FLOOR_SCENARIO, Floor::Unmount.op(), &u, None, None);
        }
        _ => r.skip("floor (mounts)", "bind mounts need root"),
    }
}

/// Resident memory of the driver now, as a figure.
pub async fn rss(env: &Env<'_>, what: &str) {
    let Some(pid) = env.current_pid().await else {
        env.report()
            .skip("rss", "needs --driver-pid or --driver-cmd");
        return;
    };
    match memory_kib(pid) {
        Ok((rss, hwm)) => {
            let mut r = env.report();
            r.figure("rss", &format!("VmRSS {what}"), rss as f64 / 1024.0, "MiB");
            r.figure(
                "rss",
                &format!("VmHWM (peak) {what}"),
                hwm as f64 / 1024.0,
                "MiB",
            );
        }
        Err(e) => env
            .report()
            .skip("rss", format!("reading /proc/{pid}/status: {e}")),
    }
}

/// Creates `count` volumes one after another; returns (name, id) of those
/// made.
pub async fn create_sequential(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    scenario: &str,
    count: usize,
    mut floor: Option<FloorRun>,
) -> (Vec<(String, String)>, Option<FloorRun>) {
    let mut s = Samples::default();
    let mut made = Vec::with_capacity(count);
    let bar = Progress::new("CreateVolume (sequential)", count as u64);
    let t = Instant::now();
    let mut floor_time = Duration::ZERO;
    for i in 0..count {
        if ctx.should_stop() || s.errors >= MAX_ERRORS {
            break;
        }
        let name = format!("{}-s-{i}", env.prefix);
        match ctx.create(&name).await {
            (d, Ok(id)) => {
                s.push(d);
                made.push((name, id));
            }
            (_, Err(e)) => s.fail(e),
        }
        bar.inc();
        // The floor keeps pace: after the driver's i-th create, the same
        // share of the floor's creates is done.
        if let Some(mut f) = floor.take() {
            let due = f.due(i + 1, count);
            if due == 0 {
                floor = Some(f);
            } else {
                let started = Instant::now();
                floor = floor_step(ctx, env, move |c| {
                    f.sequential(due, c, None);
                    Ok(f)
                })
                .await;
                floor_time += started.elapsed();
            }
        }
    }
    let ops = rate(s.len() + s.errors as usize, t.elapsed() - floor_time);
    drop(bar);
    let mut r = env.report();
    r.op(
        scenario,
        "CreateVolume (sequential)",
        &s,
        Some(ops),
        Some(Floor::DurableCreate),
    );
    if let Some(f) = s.flatness() {
        r.figure(
            scenario,
            &format!("flatness: p50 last/first tenth of {} creates", s.len()),
            f,
            "ratio",
        );
    }
    (made, floor)
}

/// Deletes volumes one after another.
pub async fn delete_sequential(
    ctx: &Ctx,
    env: &Env<'_>,
    scenario: &str,
    vols: &[(String, String)],
) {
    let mut s = Samples::default();
    let bar = Progress::new("DeleteVolume (sequential)", vols.len() as u64);
    let t = Instant::now();
    for (name, id) in vols {
        // Deleting goes on past the time limit (but not past Ctrl-C or an
        // error burst): cleanup would have to do it anyway.
        if ctx.stop.load(Ordering::Relaxed) || s.errors >= MAX_ERRORS {
            break;
        }
        match ctx.delete(name, id).await {
            (d, Ok(())) => s.push(d),
            (_, Err(e)) => s.fail(e),
        }
        bar.inc();
    }
    let ops = rate(s.len() + s.errors as usize, t.elapsed());
    env.report().op(
        scenario,
        "DeleteVolume (sequential)",
        &s,
        Some(ops),
        Some(Floor::DurableDelete),
    );
}

/// Creates `count` volumes with `workers` concurrent callers; returns
/// (name, id) of each made, for [`concurrent_deletes`].
pub async fn concurrent_creates(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    count: usize,
    workers: usize,
) -> Vec<(String, String)> {
    let prefix = Arc::new(format!("{}-c", env.prefix));
    let label = format!("CreateVolume ({workers} workers)");
    let (s, made, wall) = fan_out(
        ctx,
        &label,
        workers,
        count,
        Ctx::should_stop,
        move |ctx, i| {
            let name = format!("{prefix}-{i}");
            async move {
                let (d, r) = ctx.create(&name).await;
                (d, r.map(|id| (name, id)))
            }
        },
    )
    .await;
    let ops = Some(rate(s.len() + s.errors as usize, wall));
    env.report()
        .op("concurrent", &label, &s, ops, Some(Floor::DurableCreate));
    made
}

/// Deletes what [`concurrent_creates`] made, from `workers` callers.
pub async fn concurrent_deletes(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    made: Vec<(String, String)>,
    workers: usize,
) {
    let made = Arc::new(made);
    let label = format!("DeleteVolume ({workers} workers)");
    // Deletes run past the time limit (only Ctrl-C stops them): they undo
    // what the creates made.
    let interrupted = |c: &Ctx| c.stop.load(Ordering::Relaxed);
    let (s, _, wall) = fan_out(
        ctx,
        &label,
        workers,
        made.len(),
        interrupted,
        move |ctx, i| {
            let made = Arc::clone(&made);
            async move {
                let (name, id) = &made[i];
                ctx.delete(name, id).await
            }
        },
    )
    .await;
    let ops = Some(rate(s.len() + s.errors as usize, wall));
    env.report()
        .op("concurrent", &label, &s, ops, Some(Floor::DurableDelete));
}

/// Runs `op(ctx, i)` for every `i` in `0..count` from `workers` concurrent
/// tasks, with a progress bar, stopping early when `stop` says so or after
/// too many errors. Returns the samples, what the successful calls returned, and
/// the wall time.
async fn fan_out<T, F, Fut>(
    ctx: &Arc<Ctx>,
    label: &str,
    workers: usize,
    count: usize,
    stop: fn(&Ctx) -> bool,
    op: F,
) -> (Samples, Vec<T>, Duration)
where
    T: Send + 'static,
    F: Fn(Arc<Ctx>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = crate::ops::Timed<T>> + Send,
{
    let bar = Arc::new(Progress::new(label, count as u64));
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (ctx, next, bar, op) = (
            Arc::clone(ctx),
            Arc::clone(&next),
            Arc::clone(&bar),
            Arc::clone(&op),
        );
        tasks.push(tokio::spawn(async move {
            let mut s = Samples::default();
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || stop(&ctx) || s.errors >= MAX_ERRORS {
                    break;
                }
                match op(Arc::clone(&ctx), i).await {
                    (d, Ok(v)) => {
                        s.push(d);
                        done.push(v);
                    }
                    (_, Err(e)) => s.fail(e),
                }
                bar.inc();
            }
            (s, done)
        }));
    }
    let mut s = Samples::default();
    let mut done = Vec::new();
    for task in tasks {
        if let Ok((ws, wd)) = task.await {
            s.merge(ws);
            done.extend(wd);
        }
    }
    let wall = t.elapsed();
    bar.finish();
    (s, done, wall)
}

/// Full ListVolumes listings, paged, `repeats` times.
pub async fn list(ctx: &Ctx, env: &Env<'_>, page_size: i32, repeats: usize, present: usize) {
    let mut pages = Samples::default();
    let mut full = Samples::default();
    let mut seen = 0;
    let bar = Progress::new("ListVolumes", repeats as u64);
    // A listing is bounded too: never more pages than the volumes present
    // could fill, plus slack for other users of the driver.
    let max_pages = (present / page_size.max(1) as usize + 1) * 4 + 100;
    'outer: for _ in 0..repeats {
        if ctx.should_stop() {
            break;
        }
        let mut token = String::new();
        let mut n = 0;
        let t = Instant::now();
        for _ in 0..max_pages {
            match ctx.list_page(&token, page_size).await {
                (d, Ok((count, next))) => {
                    pages.push(d);
                    n += count;
                    token = next;
                }
                (_, Err(e)) => {
                    pages.fail(&e);
                    full.fail(e);
                    continue 'outer;
                }
            }
            if token.is_empty() {
                break;
            }
        }
        full.push(t.elapsed());
        seen = n;
        bar.inc();
    }
    drop(bar);
    let mut r = env.report();
    r.op(
        "list",
        &format!("ListVolumes page (max_entries {page_size})"),
        &pages,
        None,
        None,
    );
    r.op(
        "list",
        &format!("ListVolumes full listing ({present} present)"),
        &full,
        None,
        None,
    );
    r.figure("list", "entries in one full listing", seen as f64, "count");
}

/// Publishes `vols` (staging first when the driver advertises it, after
/// ControllerPublish when it advertises that), takes `stats_rounds` rounds
/// of NodeGetVolumeStats, and unpublishes.
pub async fn publish(
    ctx: &Ctx,
    env: &Env<'_>,
    vols: &[(String, String)],
    measure_publish: bool,
    stats_rounds: usize,
) {
    let targets = env.run_dir.join("targets");
    let staging_root = env.run_dir.join("staging");
    for d in [&targets, &staging_root] {
        if let Err(e) = std::fs::create_dir_all(d) {
            env.report()
                .skip("publish", format!("creating {}: {e}", d.display()));
            return;
        }
    }
    let caps = ctx.caps.clone();
    let mut cpub = Samples::default();
    let mut stage = Samples::default();
    let mut publ = Samples::default();
    let mut done: Vec<(&str, PathBuf, Option<PathBuf>)> = Vec::new();
    let bar = Progress::new("NodePublishVolume", vols.len() as u64);
    for (i, (_, id)) in vols.iter().enumerate() {
        if ctx.should_stop() || publ.errors + stage.errors + cpub.errors >= MAX_ERRORS {
            break;
        }
        let mut context = HashMap::new();
        if caps.controller_publish {
            match ctx.controller_publish(id).await {
                (d, Ok(c)) => {
                    cpub.push(d);
                    context = c;
                }
                (_, Err(e)) => {
                    cpub.fail(e);
                    continue;
                }
            }
        }
        let staging = if caps.stage {
            let p = staging_root.join(i.to_string());
            // The CO makes the staging directory (CSI spec, NodeStageVolume).
            if let Err(e) = std::fs::create_dir(&p) {
                stage.fail(format!("creating {}: {e}", p.display()));
                continue;
            }
            match ctx.stage(id, &p, &context).await {
                (d, Ok(())) => stage.push(d),
                (_, Err(e)) => {
                    stage.fail(e);
                    continue;
                }
            }
            Some(p)
        } else {
            None
        };
        let target = targets.join(i.to_string());
        match ctx.publish(id, &target, staging.as_deref(), &context).await {
            (d, Ok(())) => {
                publ.push(d);
                done.push((id, target, staging));
            }
            (_, Err(e)) => publ.fail(e),
        }
        bar.inc();
    }
    drop(bar);

    let mut stats = Samples::default();
    if stats_rounds > 0 && !done.is_empty() {
        let bar = Progress::new("NodeGetVolumeStats", (stats_rounds * done.len()) as u64);
        'rounds: for _ in 0..stats_rounds {
            for (id, target, _) in &done {
                if ctx.should_stop() || stats.errors >= MAX_ERRORS {
                    break 'rounds;
                }
                match ctx.stats(id, target).await {
                    (d, Ok(())) => stats.push(d),
                    (_, Err(e)) => stats.fail(e),
                }
                bar.inc();
            }
        }
    }

    let mut unpub = Samples::default();
    let mut unstage = Samples::default();
    let mut cunpub = Samples::default();
    let bar = Progress::new("NodeUnpublishVolume", done.len() as u64);
    for (id, target, staging) in &done {
        // Undoing goes on past the time limit; only Ctrl-C stops it (and
        // cleanup then takes over).
        if ctx.stop.load(Ordering::Relaxed) {
            break;
        }
        match ctx.unpublish(id, target).await {
            (d, Ok(())) => unpub.push(d),
            (_, Err(e)) => {
                unpub.fail(e);
                continue;
            }
        }
        if let Some(p) = staging {
            match ctx.unstage(id, p).await {
                (d, Ok(())) => unstage.push(d),
                (_, Err(e)) => {
                    unstage.fail(e);
                    continue;
                }
            }
            remove_empty_dir(p);
        }
        if caps.controller_publish {
            match ctx.controller_unpublish(id).await {
                (d, Ok(())) => cunpub.push(d),
                (_, Err(e)) => cunpub.fail(e),
            }
        }
        bar.inc();
    }
    drop(bar);
    let mut r = env.report();
    if measure_publish {
        if caps.controller_publish {
            r.op("publish", "ControllerPublishVolume", &cpub, None, None);
        }
        if caps.stage {
            r.op("publish", "NodeStageVolume", &stage, None, None);
        }
        r.op(
            "publish",
            "NodePublishVolume",
            &publ,
            None,
            Some(Floor::BindMount),
        );
        r.op(
            "publish",
            "NodeUnpublishVolume",
            &unpub,
            None,
            Some(Floor::Unmount),
        );
        if caps.stage {
            r.op("publish", "NodeUnstageVolume", &unstage, None, None);
        }
        if caps.controller_publish {
            r.op("publish", "ControllerUnpublishVolume", &cunpub, None, None);
        }
    } else if publ.errors + unpub.errors > 0 {
        r.op("stats", "NodePublishVolume (setup)", &publ, None, None);
        r.op("stats", "NodeUnpublishVolume (setup)", &unpub, None, None);
    }
    if stats_rounds > 0 {
        r.op("stats", "NodeGetVolumeStats", &stats, None, None);
    }
}

/// Restarts the driver `repeats` times with the volumes present and times
/// each start to its first ready Probe.
pub async fn startup(ctx: &Ctx, env: &Env<'_>, repeats: usize, present: usize, limit: Duration) {
    let mut s = Samples::default();
    let mut guard = env.managed.lock().await;
    let Some(m) = guard.as_mut() else {
        drop(guard);
        env.report().skip(
            "startup",
            "needs --driver-cmd (the bench must start the driver)",
        );
        return;
    };
    let bar = Progress::new("restart to first Probe", repeats as u64);
    for _ in 0..repeats {
        if ctx.should_stop() {
            break;
        }
        if let Err(e) = m.stop(Duration::from_secs(10)).await {
            s.fail(e);
        }
        match m.start(&env.endpoint, limit).await {
            Ok((d, channel)) => {
                s.push(d);
                ctx.reconnect(Clients::new(channel));
            }
            Err(e) => {
                s.fail(e);
                break;
            }
        }
        bar.inc();
    }
    drop(bar);
    drop(guard);
    env.report().op(
        "startup",
        &format!("start to first ready Probe ({present} volumes)"),
        &s,
        None,
        None,
    );
}

/// Removes a directory the bench made, only if it is empty: a directory
/// that still shows a mount keeps its contents.
pub fn remove_empty_dir(p: &Path) {
    let _ = std::fs::remove_dir(p);
}
