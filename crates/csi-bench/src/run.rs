//! One bench run from start to end: start or reach the driver, learn
//! what it advertises, run the chosen scenarios in an order that keeps
//! the figures fair, undo everything, report.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, atomic::Ordering};
use std::time::{Duration, Instant};

use crate::args::{BenchArgs, Format, Scenario, selected};
use crate::driver::{self, Caps, Clients, Managed};
use crate::floor::FloorRun;
use crate::lock;
use crate::ops::{self, Ctx};
use crate::report::Report;
use crate::scenarios::{self, Env};

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> ExitCode {
    let report = Mutex::new(Report::default());
    let ok = run_inner(&args, &report).await;
    let report = report
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ok = ok && report.cleanup.is_empty() && report.ops.iter().all(|r| r.errors == 0);
    match args.format {
        Format::Table => print!("{}", report.table()),
        Format::Json => {
            if let Err(e) = report.write_json(std::io::stdout().lock()) {
                eprintln!("csi-bench: writing JSON to stdout: {e}");
            }
        }
    }
    if let Some(path) = &args.json {
        let res = std::fs::File::create(path).and_then(|f| report.write_json(f));
        if let Err(e) = res {
            eprintln!("csi-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_inner(args: &BenchArgs, report: &Mutex<Report>) -> bool {
    let chosen = selected(args);
    let rpc_timeout = Duration::from_secs(args.rpc_timeout.max(1));
    let startup_limit = Duration::from_secs(args.startup_timeout.max(1));
    let say = |k: &str, v: serde_json::Value| lock(report).info(k, v);

    // The run's own directory: nothing outside it is ever removed.
    let workdir_existed = args.workdir.exists();
    let run_dir = args.workdir.join(format!("run-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        eprintln!("csi-bench: creating {}: {e}", run_dir.display());
        return false;
    }

    let managed = tokio::sync::Mutex::new(
        args.driver_cmd
            .as_deref()
            .map(|c| Managed::new(c, args.driver_log.as_deref())),
    );
    let channel = {
        let mut m = managed.lock().await;
        match m.as_mut() {
            Some(m) => match m.start(&args.endpoint, startup_limit).await {
                Ok((d, ch)) => {
                    lock(report).figure(
                        "startup",
                        "start to first ready Probe (no bench volumes)",
                        d.as_secs_f64() * 1e3,
                        "ms",
                    );
                    Ok(ch)
                }
                Err(e) => Err(e),
            },
            None => driver::connect(&args.endpoint, rpc_timeout).await,
        }
    };
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            eprintln!("csi-bench: {e}");
            finish_dirs(&run_dir, &args.workdir, workdir_existed, report);
            return false;
        }
    };
    let clients = Clients::new(channel);
    let caps = match Caps::discover(&clients, rpc_timeout).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("csi-bench: {e}");
            stop_driver(&managed, report).await;
            finish_dirs(&run_dir, &args.workdir, workdir_existed, report);
            return false;
        }
    };
    say("driver", format!("{} {}", caps.name, caps.version).into());
    say(
        "capabilities",
        serde_json::json!({
            "controller_service": caps.controller_service,
            "create_delete_volume": caps.create_delete,
            "list_volumes": caps.list_volumes,
            "controller_publish": caps.controller_publish,
            "create_delete_snapshot": caps.snapshots,
            "node_service": caps.node_service,
            "stage_unstage": caps.stage,
            "get_volume_stats": caps.stats,
            "node_id": caps.node_id,
            "topology": caps.topology,
        }),
    );
    say("load average at start", loadavg().into());
    say("volumes (N)", args.count.into());
    say("workers (W)", args.workers.into());
    say("size bytes", args.size.into());
    say("workdir", run_dir.display().to_string().into());
    say(
        "scenarios",
        chosen
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(",")
            .into(),
    );

    let prefix = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 1_000_000)
            .unwrap_or(0)
    );
    let ctx = Arc::new(Ctx {
        clients: Mutex::new(clients),
        caps,
        rpc_timeout,
        deadline: Instant::now() + Duration::from_secs(args.max_duration),
        stop: AtomicBool::new(false),
        size: args.size as i64,
        parameters: args.parameters.iter().cloned().collect::<HashMap<_, _>>(),
        ledger: Mutex::new(ops::Ledger::default()),
    });
    let env = Env {
        report,
        run_dir: run_dir.clone(),
        prefix,
        managed: &managed,
        pid: args.driver_pid,
        endpoint: args.endpoint.clone(),
    };

    {
        let work = scenarios_in_order(&ctx, &env, args, &chosen, startup_limit);
        tokio::pin!(work);
        tokio::select! {
            () = &mut work => {}
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\ncsi-bench: interrupted; finishing the current calls, then cleaning up");
                ctx.stop.store(true, Ordering::Relaxed);
                // Calls in flight finish (each is bounded); a second Ctrl-C
                // abandons them.
                tokio::select! {
                    _ = tokio::time::timeout(rpc_timeout + Duration::from_secs(5), &mut work) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                lock(report).info("interrupted", true);
            }
        }
    }

    let until = Instant::now() + Duration::from_secs(args.cleanup_timeout);
    let problems = tokio::select! {
        p = ctx.undo_all(until) => p,
        _ = tokio::signal::ctrl_c() => vec!["cleanup interrupted by a second Ctrl-C".to_string()],
    };
    let leftover = lock(&ctx.ledger).volumes.len();
    {
        let mut r = lock(report);
        r.cleanup.extend(problems);
        if leftover > 0 {
            r.cleanup.push(format!(
                "{leftover} volumes created by the bench may remain"
            ));
        }
    }
    if chosen.contains(&Scenario::Rss) {
        scenarios::rss(&env, "at the end (bench volumes deleted)").await;
    }
    stop_driver(&managed, report).await;
    finish_dirs(&run_dir, &args.workdir, workdir_existed, report);
    lock(report).info("load average at end", loadavg());
    true
}

/// /proc/loadavg's first three fields: other load on the machine makes
/// every figure noisier, so the report says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn scenarios_in_order(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    args: &BenchArgs,
    chosen: &BTreeSet<Scenario>,
    startup_limit: Duration,
) {
    let n = args.count as usize;
    let has = |s: Scenario| chosen.contains(&s);

    if has(Scenario::Probe) {
        scenarios::probe(ctx, env, n.min(10_000)).await;
    }
    // Every create comes before any delete, the floor's included, and the
    // floor's sequential creates are spread between the driver's (see
    // `floor::FloorRun` for why).
    let interleave = has(Scenario::CreateDelete) && ctx.caps.creates_volumes();
    let floor = if has(Scenario::Floor) {
        let (count, workers) = (args.floor_count as usize, args.workers as usize);
        scenarios::floor_start(ctx, env, count, workers, interleave).await
    } else {
        None
    };
    if has(Scenario::Rss) {
        scenarios::rss(env, "idle").await;
    }
    let floor = volume_scenarios(ctx, env, args, chosen, startup_limit, floor).await;
    if let Some(f) = floor {
        scenarios::floor_finish(ctx, env, f).await;
    }
    // Last: it makes and removes files of hundreds of MiB, which the
    // figures above should not pay for.
    if has(Scenario::Snapshot) && !ctx.should_stop() {
        if ctx.caps.creates_volumes() {
            let (bytes, rounds) = (args.snapshot_data, args.snapshot_rounds as usize);
            crate::snapshot::run(ctx, env, bytes, rounds).await;
        } else {
            lock(env.report).skip(
                "snapshot",
                "the driver does not advertise CONTROLLER_SERVICE with CREATE_DELETE_VOLUME",
            );
        }
    }
}

/// The scenarios that create volumes: sequential creates (and the
/// scenarios that need volumes present), concurrent creates, then the
/// deletes of both.
async fn volume_scenarios(
    ctx: &Arc<Ctx>,
    env: &Env<'_>,
    args: &BenchArgs,
    chosen: &BTreeSet<Scenario>,
    startup_limit: Duration,
    mut floor: Option<FloorRun>,
) -> Option<FloorRun> {
    let n = args.count as usize;
    let has = |s: Scenario| chosen.contains(&s);
    let skip = |s: &str, why: &str| lock(env.report).skip(s, why);

    let at_scale = [
        Scenario::CreateDelete,
        Scenario::List,
        Scenario::Startup,
        Scenario::Publish,
        Scenario::Stats,
        Scenario::Rss,
    ];
    let needs_volumes = at_scale.iter().any(|s| has(*s));
    if !ctx.caps.creates_volumes() {
        let why = "the driver does not advertise CONTROLLER_SERVICE with CREATE_DELETE_VOLUME";
        for s in at_scale.iter().chain([&Scenario::Concurrent]) {
            if has(*s) {
                skip(&format!("{s:?}"), why);
            }
        }
        return floor;
    }
    let mut vols = Vec::new();
    let scenario = if has(Scenario::CreateDelete) {
        "create-delete"
    } else {
        "populate"
    };
    if needs_volumes {
        (vols, floor) = scenarios::create_sequential(ctx, env, scenario, n, floor).await;
        if has(Scenario::Rss) {
            scenarios::rss(env, &format!("at {} volumes", vols.len())).await;
        }
        if has(Scenario::List) {
            if ctx.caps.list_volumes {
                scenarios::list(
                    ctx,
                    env,
                    args.page_size,
                    args.list_repeats as usize,
                    vols.len(),
                )
                .await;
            } else {
                skip("list", "the driver does not advertise LIST_VOLUMES");
            }
        }
        if has(Scenario::Publish) || has(Scenario::Stats) {
            if !ctx.caps.node_service {
                skip("publish", "the driver has no node service");
            } else {
                let p = (args.publish_count as usize).min(vols.len());
                let rounds = if !has(Scenario::Stats) {
                    0
                } else if ctx.caps.stats {
                    args.stats_rounds as usize
                } else {
                    skip("stats", "the driver does not advertise GET_VOLUME_STATS");
                    0
                };
                if has(Scenario::Publish) || rounds > 0 {
                    scenarios::publish(ctx, env, &vols[..p], has(Scenario::Publish), rounds).await;
                }
            }
        }
        if has(Scenario::Startup) && !ctx.should_stop() {
            scenarios::startup(
                ctx,
                env,
                args.startup_repeats as usize,
                vols.len(),
                startup_limit,
            )
            .await;
            if has(Scenario::Rss) && env.managed.lock().await.is_some() {
                scenarios::rss(env, &format!("after a restart with {} volumes", vols.len())).await;
            }
        }
    }
    let made = if has(Scenario::Concurrent) && !ctx.should_stop() {
        scenarios::concurrent_creates(ctx, env, n, args.workers as usize).await
    } else {
        Vec::new()
    };
    if needs_volumes {
        scenarios::delete_sequential(ctx, env, scenario, &vols).await;
    }
    if !made.is_empty() {
        scenarios::concurrent_deletes(ctx, env, made, args.workers as usize).await;
    }
    floor
}

async fn stop_driver(managed: &tokio::sync::Mutex<Option<Managed>>, report: &Mutex<Report>) {
    if let Some(m) = managed.lock().await.as_mut()
        && let Err(e) = m.stop(Duration::from_secs(10)).await
    {
        lock(report).cleanup.push(e.to_string());
    }
}

/// Removes the run directory's (empty) subdirectories and itself, and the
/// workdir if the bench made it. Only empty directories are removed, so a
/// target that is somehow still mounted keeps what it shows.
fn finish_dirs(run_dir: &Path, workdir: &Path, workdir_existed: bool, report: &Mutex<Report>) {
    let mut problems = Vec::new();
    for sub in ["targets", "staging", "floor", "snapshot", "copy-floor"] {
        let dir = run_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if let Err(err) = std::fs::remove_dir(e.path()) {
                problems.push(format!("{} left in place: {err}", e.path().display()));
            }
        }
        if let Err(err) = std::fs::remove_dir(&dir) {
            problems.push(format!("{} left in place: {err}", dir.display()));
        }
    }
    if let Err(err) = std::fs::remove_dir(run_dir) {
        problems.push(format!("{} left in place: {err}", run_dir.display()));
    }
    if !workdir_existed {
        let _ = std::fs::remove_dir(workdir);
    }
    lock(report).cleanup.extend(problems);
}
