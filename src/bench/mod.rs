//! `hostpath-csi bench`: a load generator for any CSI driver's socket.
//!
//! It asks the driver what it supports and follows that (ControllerPublish
//! and NodeStage before NodePublish when advertised), skips what it does
//! not support (saying so), and measures latency percentiles and rates per
//! operation, next to a floor measured in the same run on the same disk.
//! Everything it makes (volumes, publications, directories) is undone at
//! the end, on Ctrl-C and on errors; every phase is bounded in count and
//! time.
//!
//! - `stats`: samples, percentiles, flatness.
//! - `report`: the table and the JSON lines.
//! - `progress`: the stderr progress bar.
//! - `driver`: clients, capabilities, the started driver, memory figures.
//! - `ops`: one timed CSI call each, and the ledger cleanup undoes.
//! - `floor`: the same operations with no driver.
//! - `scenarios`: the scenarios.

pub mod driver;
pub mod floor;
pub mod ops;
pub mod progress;
pub mod report;
pub mod scenarios;
pub mod stats;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, atomic::Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use driver::{Caps, Clients, Managed};
use floor::FloorRun;
use ops::Ctx;
use report::Report;
use scenarios::Env;

/// A scenario of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// Every scenario below.
    All,
    /// Sequential Probes (the gRPC round trip).
    Probe,
    /// N sequential CreateVolume, then N sequential DeleteVolume.
    CreateDelete,
    /// N CreateVolume then N DeleteVolume from W concurrent workers.
    Concurrent,
    /// NodePublish/NodeUnpublish (staged when advertised) on real targets.
    Publish,
    /// NodeGetVolumeStats on published volumes.
    Stats,
    /// Paged ListVolumes with N volumes present.
    List,
    /// Restarts to the first ready Probe with N volumes (needs --driver-cmd).
    Startup,
    /// The driver's resident memory idle and at N volumes.
    Rss,
    /// The same operations with no driver, on the --workdir disk.
    Floor,
}

/// Output format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON lines.
    Json,
}

/// Flags of `hostpath-csi bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// CSI endpoint of the driver under test (`unix:///path` or a path).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub scenario: Vec<Scenario>,
    /// Also measure the floor (same as adding `floor` to --scenario).
    #[arg(long)]
    pub floor: bool,
    /// Volumes to create (N).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub count: u32,
    /// Concurrent workers for the concurrent scenario (W).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: u32,
    /// Requested volume size: bytes or with a suffix (Ki, Mi, Gi, Ti, K, M, G, T).
    #[arg(long, default_value = "1Gi", value_parser = parse_size)]
    pub size: u64,
    /// A CreateVolume parameter (StorageClass parameter), `key=value`; repeatable.
    #[arg(long = "parameter", value_parser = parse_kv)]
    pub parameters: Vec<(String, String)>,
    /// Directory for publish targets, staging paths and the floor (on the
    /// disk the driver's pool is on). The bench works in its own
    /// subdirectory and removes it.
    #[arg(long, default_value = "/tmp/hostpath-csi-bench")]
    pub workdir: PathBuf,
    /// Volumes to publish (at most N).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub publish_count: u32,
    /// Rounds of NodeGetVolumeStats over the published volumes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub stats_rounds: u32,
    /// ListVolumes max_entries per page.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=100_000))]
    pub page_size: i32,
    /// Full listings to time.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub list_repeats: u32,
    /// Restarts to time in the startup scenario.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub startup_repeats: u32,
    /// Operations of each kind in the floor.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub floor_count: u32,
    /// The driver's command line; the bench starts it (in its own process
    /// group), times its start, restarts it, reads its memory, stops it.
    #[arg(long)]
    pub driver_cmd: Option<String>,
    /// File for the started driver's output (default: discarded).
    #[arg(long)]
    pub driver_log: Option<PathBuf>,
    /// Pid of an already running driver, for the memory figures.
    #[arg(long, conflicts_with = "driver_cmd")]
    pub driver_pid: Option<u32>,
    /// Seconds one call may take.
    #[arg(long, default_value_t = 30)]
    pub rpc_timeout: u64,
    /// Seconds all scenarios together may take; then cleanup.
    #[arg(long, default_value_t = 1800)]
    pub max_duration: u64,
    /// Seconds cleanup may take.
    #[arg(long, default_value_t = 600)]
    pub cleanup_timeout: u64,
    /// Seconds a started driver has to answer Probe ready.
    #[arg(long, default_value_t = 60)]
    pub startup_timeout: u64,
    /// What goes to stdout.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Also write the results as JSON lines to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Parses a size such as `1Gi`, `512M` or `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(format!("unknown size suffix {unit:?}")),
    };
    n.checked_mul(mult)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The scenarios to run, `all` expanded.
pub fn selected(args: &BenchArgs) -> BTreeSet<Scenario> {
    let mut out: BTreeSet<Scenario> = args.scenario.iter().copied().collect();
    if out.remove(&Scenario::All) {
        out.extend(
            Scenario::value_variants()
                .iter()
                .copied()
                .filter(|s| *s != Scenario::All),
        );
    }
    if args.floor {
        out.insert(Scenario::Floor);
    }
    out
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> ExitCode {
    let report = Mutex::new(Report::default());
    let ok = run_inner(&args, &report).await;
    let report = report.into_inner().expect("report lock");
    let ok = ok && report.cleanup.is_empty() && report.ops.iter().all(|r| r.errors == 0);
    match args.format {
        Format::Table => print!("{}", report.table()),
        Format::Json => {
            if let Err(e) = report.write_json(std::io::stdout().lock()) {
                eprintln!("bench: writing JSON to stdout: {e}");
            }
        }
    }
    if let Some(path) = &args.json {
        let res = std::fs::File::create(path).and_then(|f| report.write_json(f));
        if let Err(e) = res {
            eprintln!("bench: writing {}: {e}", path.display());
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
    let say = |k: &str, v: serde_json::Value| report.lock().expect("report lock").info(k, v);

    // The run's own directory: nothing outside it is ever removed.
    let workdir_existed = args.workdir.exists();
    let run_dir = args.workdir.join(format!("run-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        eprintln!("bench: creating {}: {e}", run_dir.display());
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
                    report.lock().expect("report lock").figure(
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
            eprintln!("bench: {e}");
            finish_dirs(&run_dir, &args.workdir, workdir_existed, report);
            return false;
        }
    };
    let clients = Clients::new(channel);
    let caps = match Caps::discover(&clients, rpc_timeout).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bench: {e}");
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
                eprintln!("\nbench: interrupted; finishing the current calls, then cleaning up");
                ctx.stop.store(true, Ordering::Relaxed);
                // Calls in flight finish (each is bounded); a second Ctrl-C
                // abandons them.
                tokio::select! {
                    _ = tokio::time::timeout(rpc_timeout + Duration::from_secs(5), &mut work) => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                report.lock().expect("report lock").info("interrupted", true);
            }
        }
    }

    let until = Instant::now() + Duration::from_secs(args.cleanup_timeout);
    let problems = tokio::select! {
        p = ctx.undo_all(until) => p,
        _ = tokio::signal::ctrl_c() => vec!["cleanup interrupted by a second Ctrl-C".to_string()],
    };
    let leftover = ctx.ledger.lock().expect("ledger lock").volumes.len();
    {
        let mut r = report.lock().expect("report lock");
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
    report
        .lock()
        .expect("report lock")
        .info("load average at end", loadavg());
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
    let skip = |s: &str, why: &str| env.report.lock().expect("report lock").skip(s, why);

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
        report.lock().expect("report lock").cleanup.push(e);
    }
}

/// Removes the run directory's (empty) subdirectories and itself, and the
/// workdir if the bench made it. Only empty directories are removed, so a
/// target that is somehow still mounted keeps what it shows.
fn finish_dirs(run_dir: &Path, workdir: &Path, workdir_existed: bool, report: &Mutex<Report>) {
    let mut problems = Vec::new();
    for sub in ["targets", "staging", "floor"] {
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
    report.lock().expect("report lock").cleanup.extend(problems);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512_000_000);
        assert_eq!(parse_size("42").unwrap(), 42);
        assert!(parse_size("1Qi").is_err());
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn key_values() {
        assert_eq!(
            parse_kv("pool=fast").unwrap(),
            ("pool".to_string(), "fast".to_string())
        );
        assert_eq!(parse_kv("a=b=c").unwrap().1, "b=c");
        assert!(parse_kv("novalue").is_err());
        assert!(parse_kv("=x").is_err());
    }
}
