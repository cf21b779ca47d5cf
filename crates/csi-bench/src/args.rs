//! The bench's command line.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// A scenario of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Scenario {
    /// Every scenario below but `snapshot` (it writes gigabytes: ask for
    /// it by name).
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
    /// CreateSnapshot of a volume holding --snapshot-data bytes, and a
    /// restore of it, next to copies with no driver on the --workdir disk
    /// (`cp --reflink`, a plain `cp`, a `btrfs subvolume snapshot`).
    Snapshot,
}

/// Output format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON lines.
    Json,
}

/// `csi-bench`: measures any CSI driver through its socket: latency and
/// throughput per call, memory, startup time, next to a floor measured on
/// the same disk; see BENCHMARKS.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "csi-bench", version, about)]
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
    /// Bytes of data the snapshot scenario writes into its volume (of
    /// --size) before snapshotting it.
    #[arg(long, default_value = "768Mi", value_parser = parse_size)]
    pub snapshot_data: u64,
    /// Snapshots and restores the snapshot scenario times (each followed
    /// by one round of the copy floor).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub snapshot_rounds: u32,
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

/// A command-line value the bench cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ArgError {
    /// Not a number of bytes with an optional suffix.
    #[error("{0:?} is not a size")]
    NotASize(String),
    /// A suffix that is none of those [`parse_size`] knows.
    #[error("unknown size suffix {0:?}")]
    UnknownSuffix(String),
    /// More bytes than a CSI `int64` field can carry.
    #[error("{0:?} is too large")]
    TooLarge(String),
    /// A `--parameter` without `=` or with an empty key.
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
}

/// Parses `--size`: a number of bytes, optionally with a suffix, `Ki Mi
/// Gi Ti` (powers of two) or `K`/`k M G T` (powers of ten), no space in
/// between: `1Gi`, `512M`, `1048576`.
///
/// The bench's own parser rather than the driver's, because the bench
/// measures any driver and shares no code with ours but the CSI messages;
/// it reads sizes the way the driver's config file writes them, and also
/// refuses what a CSI `int64` capacity field cannot carry.
pub fn parse_size(s: &str) -> Result<u64, ArgError> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| ArgError::NotASize(s.to_string()))?;
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
        _ => return Err(ArgError::UnknownSuffix(unit.to_string())),
    };
    n.checked_mul(mult)
        .filter(|&b| b <= i64::MAX as u64)
        .ok_or_else(|| ArgError::TooLarge(s.to_string()))
}

/// Parses `--parameter key=value` (the value may hold `=`).
fn parse_kv(s: &str) -> Result<(String, String), ArgError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| ArgError::NotKeyValue(s.to_string()))
}

/// The scenarios to run, `all` expanded.
pub fn selected(args: &BenchArgs) -> BTreeSet<Scenario> {
    let mut out: BTreeSet<Scenario> = args.scenario.iter().copied().collect();
    if out.remove(&Scenario::All) {
        out.extend(
            Scenario::value_variants()
                .iter()
                .copied()
                .filter(|s| !matches!(s, Scenario::All | Scenario::Snapshot)),
        );
    }
    if args.floor {
        out.insert(Scenario::Floor);
    }
    out
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
