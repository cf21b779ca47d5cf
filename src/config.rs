//! Command line, environment and config file, turned into one [`Config`].
//!
//! Every flag can also come from an environment variable so that a
//! DaemonSet can set it from the downward API; pools can come from
//! `--pool` flags for the simple case or a TOML file for the full set of
//! pool settings. Both are documented in the README.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::volume::id::valid_pool_name;

/// Default driver name; distinct from the upstream demo driver's so both
/// can run in one cluster.
pub const DEFAULT_DRIVER_NAME: &str = "hostpath-csi.dev";
/// Where the default pool lives when no pool is configured.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hostpath-csi";
/// Default endpoint.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/hostpath-csi/csi.sock";

/// `hostpath-csi`: a CSI driver that turns volumes into directories on this
/// node's disks.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `serve`, accepted without the word `serve` too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI Identity, Controller and Node services (the default).
    Serve(ServeArgs),
    /// Measure any CSI driver: latency and throughput per call, memory,
    /// startup time; see BENCHMARKS.md.
    Bench(crate::bench::BenchArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Flags of `hostpath-csi serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// CSI endpoint to listen on: `unix:///path/to/csi.sock` (or a plain
    /// path). A stale socket file there is replaced.
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,

    /// This node's id, reported by NodeGetInfo and used as the topology
    /// value that pins volumes to this node. Defaults to the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_id: Option<String>,

    /// Driver name reported by GetPluginInfo; StorageClasses name it in
    /// their `provisioner` field.
    #[arg(long, env = "HOSTPATH_CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,

    /// A pool: `NAME=DIR` (kind dir) or `NAME=DIR:KIND` with KIND one of
    /// `dir`, `btrfs` (DIR on btrfs; a subvolume with a qgroup limit per
    /// volume) or `image` (a loop-mounted ext4 image per volume).
    /// Repeatable. StorageClasses pick a pool with the parameter `pool:
    /// NAME`. Size limits, overcommit and the image filesystem are set in
    /// the config file. With no pools from flags or the config file, one
    /// pool `default` lives under --state-dir.
    #[arg(
        long = "pool",
        value_name = "NAME=DIR[:KIND]",
        env = "HOSTPATH_CSI_POOLS",
        value_delimiter = ','
    )]
    pub pools: Vec<String>,

    /// TOML file with `[[pools]]` tables (name, path, kind and size
    /// settings); see the README. Pools from --pool are added to it.
    #[arg(long, env = "HOSTPATH_CSI_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory for the default pool when none is configured.
    #[arg(long, env = "HOSTPATH_CSI_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Most volumes the scheduler may place on this node (0: no limit).
    #[arg(long, env = "HOSTPATH_CSI_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    pub max_volumes_per_node: i64,

    /// Log format.
    #[arg(long, env = "HOSTPATH_CSI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `hostpath_csi=debug` (tracing syntax).
    #[arg(long, env = "HOSTPATH_CSI_LOG", default_value = "info")]
    pub log_level: String,
}

/// How a pool stores volumes.
///
/// Room is left for a project-quota kind (`xfs-quota`/`ext4-quota`: one
/// directory per volume with an XFS or ext4 project quota as its limit). It
/// is not offered because the kernels this driver is tested on are built
/// without quota support, so it could not be tested; it would slot in as
/// one more variant and backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// A plain directory per volume; size is not enforced.
    #[default]
    Dir,
    /// A btrfs subvolume per volume, limited by a qgroup.
    Btrfs,
    /// A loop-mounted filesystem image per volume (ext4 or xfs).
    Image,
}

impl PoolKind {
    /// Name used in configs and volume contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
            PoolKind::Btrfs => "btrfs",
            PoolKind::Image => "image",
        }
    }

    /// Parses a kind name as used in `--pool NAME=DIR:KIND`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dir" => Some(PoolKind::Dir),
            "btrfs" => Some(PoolKind::Btrfs),
            "image" => Some(PoolKind::Image),
            _ => None,
        }
    }

    /// Whether the kind enforces volume sizes (writes beyond fail).
    pub fn enforces_size(self) -> bool {
        !matches!(self, PoolKind::Dir)
    }
}

/// Filesystem made inside each image of an `image` pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    /// ext4 (`mkfs.ext4`, grown online with `resize2fs`).
    #[default]
    Ext4,
    /// XFS (`mkfs.xfs`, grown online with `xfs_growfs`); XFS cannot be made
    /// smaller than 300 MiB, so that is the least such a volume gets.
    Xfs,
}

impl Filesystem {
    /// The filesystem type name, as `mount` knows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }
}

/// A size in bytes, written in a config file as a number of bytes or a
/// string with a binary or decimal suffix: `"512Mi"`, `"10Gi"`, `"1G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `1234`, `"64Ki"`, `"512Mi"`, `"10Gi"`, `"2Ti"`, `"1k"`,
    /// `"5M"`, `"1G"`, `"1T"`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mul: u64 = match unit.trim() {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "k" | "K" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            _ => return None,
        };
        n.checked_mul(mul).map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a size; write bytes (1048576) or a string like \"512Mi\" or \"10Gi\""
                ))
            }),
        }
    }
}

/// How much a pool may promise, relative to the space its volumes can use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Overcommit {
    /// Promises are not counted: a volume fits when the filesystem has its
    /// size free right now. The only policy for `dir` pools, which cannot
    /// enforce sizes.
    None,
    /// Promised bytes may reach this multiple of the space the pool can
    /// use (free space plus what its volumes already hold). `1.0` never
    /// promises a byte that is not there; `2.0` promises up to twice that.
    Ratio(f64),
}

impl<'de> Deserialize<'de> for Overcommit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(r) if r.is_finite() && r > 0.0 => Ok(Overcommit::Ratio(r)),
            Raw::Text(t) if t == "none" => Ok(Overcommit::None),
            _ => Err(serde::de::Error::custom(
                "overcommit must be a ratio above 0 (1.0: promise no more than there is) or \"none\"",
            )),
        }
    }
}

/// One pool as configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name StorageClasses use in `pool:`.
    pub name: String,
    /// Directory holding the pool's volumes.
    pub path: PathBuf,
    /// Storage kind.
    #[serde(default)]
    pub kind: PoolKind,
    /// Smallest volume; smaller requests are rounded up to it (when their
    /// limit allows), and GetCapacity reports it as minimum_volume_size.
    #[serde(default)]
    pub min_volume_size: Option<ByteSize>,
    /// Largest volume; larger requests answer OUT_OF_RANGE.
    #[serde(default)]
    pub max_volume_size: Option<ByteSize>,
    /// Size of a volume whose request names none (default 1 GiB).
    #[serde(default)]
    pub default_volume_size: Option<ByteSize>,
    /// Promise policy; `1.0` for pools that enforce sizes, `"none"` for
    /// `dir` pools when unset.
    #[serde(default)]
    pub overcommit: Option<Overcommit>,
    /// Filesystem inside each image (`image` pools only; default ext4).
    #[serde(default)]
    pub filesystem: Option<Filesystem>,
}

impl PoolConfig {
    /// A `dir` pool with default settings.
    pub fn dir(name: &str, path: PathBuf) -> Self {
        Self::of_kind(name, path, PoolKind::Dir)
    }

    /// A pool of `kind` with default settings.
    pub fn of_kind(name: &str, path: PathBuf, kind: PoolKind) -> Self {
        PoolConfig {
            name: name.to_string(),
            path,
            kind,
            min_volume_size: None,
            max_volume_size: None,
            default_volume_size: None,
            overcommit: None,
            filesystem: None,
        }
    }

    /// The promise policy in force (the setting, or the kind's default).
    pub fn overcommit(&self) -> Overcommit {
        self.overcommit.unwrap_or(if self.kind.enforces_size() {
            Overcommit::Ratio(1.0)
        } else {
            Overcommit::None
        })
    }

    /// The filesystem of an image pool.
    pub fn filesystem(&self) -> Filesystem {
        self.filesystem.unwrap_or_default()
    }

    /// Checks that the settings make sense for the pool's kind.
    fn check_settings(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::Setting(self.name.clone(), why));
        if self.filesystem.is_some() && self.kind != PoolKind::Image {
            return bad("`filesystem` applies to pools of kind image only".into());
        }
        if self.kind == PoolKind::Dir && matches!(self.overcommit, Some(Overcommit::Ratio(_))) {
            return bad(
                "a dir pool cannot enforce sizes, so it cannot account for promises; \
                 drop `overcommit` or use kind btrfs or image"
                    .into(),
            );
        }
        if let (Some(min), Some(max)) = (self.min_volume_size, self.max_volume_size)
            && min > max
        {
            return bad(format!(
                "min_volume_size {} exceeds max_volume_size {}",
                min.0, max.0
            ));
        }
        if let Some(d) = self.default_volume_size {
            if d.0 == 0 {
                return bad("default_volume_size must not be 0".into());
            }
            if self.max_volume_size.is_some_and(|m| d > m) {
                return bad("default_volume_size exceeds max_volume_size".into());
            }
        }
        Ok(())
    }
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Pools.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

/// Everything `serve` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket path to listen on.
    pub socket: PathBuf,
    /// Node id.
    pub node_id: String,
    /// Driver name.
    pub driver_name: String,
    /// Pools, in configuration order.
    pub pools: Vec<PoolConfig>,
    /// Reported by NodeGetInfo.
    pub max_volumes_per_node: i64,
}

/// A configuration mistake, reported before the driver starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The endpoint is not a unix socket.
    #[error("endpoint {0:?} is not a unix socket; use unix:///path/to/csi.sock")]
    Endpoint(String),
    /// `--pool` not of the form NAME=DIR[:KIND].
    #[error("--pool {0:?} is not NAME=DIR or NAME=DIR:KIND (KIND: dir, btrfs, image)")]
    PoolFlag(String),
    /// A pool setting that does not fit the pool.
    #[error("pool {0:?}: {1}")]
    Setting(String, String),
    /// Bad pool name.
    #[error("pool name {0:?} must be 1-31 lowercase letters, digits or inner dashes")]
    PoolName(String),
    /// Two pools with one name.
    #[error("pool {0:?} is configured twice")]
    DuplicatePool(String),
    /// Pool directory not absolute.
    #[error("pool {0:?}: directory {1:?} must be an absolute path")]
    RelativePath(String, PathBuf),
    /// One directory for two pools, or one inside another.
    #[error("pools {0:?} and {1:?} overlap; each pool needs a directory of its own")]
    Overlap(String, String),
    /// Config file unreadable or malformed.
    #[error("config file {0}: {1}")]
    File(PathBuf, String),
    /// Driver name not a domain-like name.
    #[error("driver name {0:?} must be a domain-style name of at most 63 characters")]
    DriverName(String),
    /// Node id missing.
    #[error("no node id: pass --node-id or set NODE_NAME")]
    NodeId,
}

impl ServeArgs {
    /// Resolves flags, environment and config file into a checked config.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let socket = socket_path(&self.endpoint)?;
        let mut pools = match &self.config {
            Some(path) => load_file(path)?.pools,
            None => Vec::new(),
        };
        for flag in &self.pools {
            pools.push(parse_pool_flag(flag)?);
        }
        if pools.is_empty() {
            pools.push(PoolConfig::dir("default", self.state_dir.join("default")));
        }
        check_pools(&pools)?;
        check_driver_name(&self.driver_name)?;
        let node_id = match &self.node_id {
            Some(n) if !n.is_empty() => n.clone(),
            _ => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .ok_or(ConfigError::NodeId)?,
        };
        Ok(Config {
            socket,
            node_id,
            driver_name: self.driver_name.clone(),
            pools,
            max_volumes_per_node: self.max_volumes_per_node.max(0),
        })
    }
}

/// `NAME=DIR` or `NAME=DIR:KIND`. A directory whose name itself ends in
/// `:something` that is not a kind is taken whole.
fn parse_pool_flag(flag: &str) -> Result<PoolConfig, ConfigError> {
    let (name, rest) = flag
        .split_once('=')
        .ok_or_else(|| ConfigError::PoolFlag(flag.to_string()))?;
    let (dir, kind) = match rest.rsplit_once(':') {
        Some((dir, kind)) if PoolKind::parse(kind).is_some() => {
            (dir, PoolKind::parse(kind).unwrap_or_default())
        }
        Some((_, kind)) if !kind.contains('/') && !kind.is_empty() => {
            return Err(ConfigError::PoolFlag(flag.to_string()));
        }
        _ => (rest, PoolKind::Dir),
    };
    if dir.is_empty() {
        return Err(ConfigError::PoolFlag(flag.to_string()));
    }
    Ok(PoolConfig::of_kind(name, PathBuf::from(dir), kind))
}

fn socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(ConfigError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

fn load_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File(path.to_path_buf(), e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::File(path.to_path_buf(), e.to_string()))
}

fn check_pools(pools: &[PoolConfig]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for p in pools {
        if !valid_pool_name(&p.name) {
            return Err(ConfigError::PoolName(p.name.clone()));
        }
        if !names.insert(p.name.as_str()) {
            return Err(ConfigError::DuplicatePool(p.name.clone()));
        }
        if !p.path.is_absolute() {
            return Err(ConfigError::RelativePath(p.name.clone(), p.path.clone()));
        }
        p.check_settings()?;
    }
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) {
                return Err(ConfigError::Overlap(a.name.clone(), b.name.clone()));
            }
        }
    }
    Ok(())
}

fn check_driver_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ConfigError::DriverName(name.to_string()))
    }
}

impl Config {
    /// Whether any pool can grow volumes, which decides whether expansion
    /// capabilities are advertised.
    pub fn expansion_supported(&self) -> bool {
        self.pools.iter().any(|p| p.kind.can_expand())
    }
}

impl PoolKind {
    /// Whether volumes of this kind can be expanded.
    pub fn can_expand(self) -> bool {
        match self {
            PoolKind::Dir => false,
            PoolKind::Btrfs | PoolKind::Image => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut v = vec!["hostpath-csi", "--node-id", "n1"];
        v.extend_from_slice(extra);
        Cli::parse_from(v).serve
    }

    #[test]
    fn defaults_give_one_default_pool() {
        let c = args(&[]).resolve().unwrap();
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].name, "default");
        assert_eq!(
            c.pools[0].path,
            PathBuf::from("/var/lib/hostpath-csi/default")
        );
        assert_eq!(c.socket, PathBuf::from("/run/hostpath-csi/csi.sock"));
        assert_eq!(c.driver_name, DEFAULT_DRIVER_NAME);
    }

    #[test]
    fn pool_flags_and_mistakes() {
        let c = args(&["--pool", "hdd=/mnt/hdd", "--pool", "ssd=/mnt/ssd"])
            .resolve()
            .unwrap();
        assert_eq!(
            c.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["hdd", "ssd"]
        );
        assert!(matches!(
            args(&["--pool", "hdd"]).resolve(),
            Err(ConfigError::PoolFlag(_))
        ));
        assert!(matches!(
            args(&["--pool", "HDD=/x"]).resolve(),
            Err(ConfigError::PoolName(_))
        ));
        assert!(matches!(
            args(&["--pool", "a=rel"]).resolve(),
            Err(ConfigError::RelativePath(..))
        ));
        assert!(matches!(
            args(&["--pool", "a=/x", "--pool", "b=/x/y"]).resolve(),
            Err(ConfigError::Overlap(..))
        ));
        assert!(matches!(
            args(&["--pool", "a=/x", "--pool", "a=/y"]).resolve(),
            Err(ConfigError::DuplicatePool(_))
        ));
        assert!(matches!(
            args(&["--endpoint", "tcp://127.0.0.1:1"]).resolve(),
            Err(ConfigError::Endpoint(_))
        ));
    }

    #[test]
    fn config_file_pools() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[[pools]]\nname = \"hdd\"\npath = \"/mnt/hdd\"\nkind = \"dir\"\n",
        )
        .unwrap();
        let c = args(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        assert_eq!(c.pools[0].kind, PoolKind::Dir);
        std::fs::write(
            &f,
            "[[pools]]\nname = \"hdd\"\npath = \"/mnt/hdd\"\nbogus = 1\n",
        )
        .unwrap();
        assert!(matches!(
            args(&["--config", f.to_str().unwrap()]).resolve(),
            Err(ConfigError::File(..))
        ));
    }

    #[test]
    fn pool_flags_with_kinds() {
        let c = args(&[
            "--pool",
            "a=/x:btrfs",
            "--pool",
            "b=/y:image",
            "--pool",
            "c=/z:dir",
        ])
        .resolve()
        .unwrap();
        let kinds: Vec<_> = c.pools.iter().map(|p| (p.path.clone(), p.kind)).collect();
        assert_eq!(
            kinds,
            [
                (PathBuf::from("/x"), PoolKind::Btrfs),
                (PathBuf::from("/y"), PoolKind::Image),
                (PathBuf::from("/z"), PoolKind::Dir),
            ]
        );
        assert!(c.expansion_supported());
        assert!(matches!(
            args(&["--pool", "a=/x:brtfs"]).resolve(),
            Err(ConfigError::PoolFlag(_))
        ));
        assert!(
            !args(&["--pool", "a=/x"])
                .resolve()
                .unwrap()
                .expansion_supported()
        );
    }

    #[test]
    fn pool_settings_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            r#"
[[pools]]
name = "fast"
path = "/mnt/btrfs/vols"
kind = "btrfs"
min_volume_size = "1Mi"
max_volume_size = 10737418240
default_volume_size = "512Mi"
overcommit = 1.5

[[pools]]
name = "img"
path = "/mnt/img"
kind = "image"
filesystem = "xfs"
overcommit = "none"
"#,
        )
        .unwrap();
        let c = args(&["--config", f.to_str().unwrap()]).resolve().unwrap();
        let fast = &c.pools[0];
        assert_eq!(fast.kind, PoolKind::Btrfs);
        assert_eq!(fast.min_volume_size, Some(ByteSize(1 << 20)));
        assert_eq!(fast.max_volume_size, Some(ByteSize(10 << 30)));
        assert_eq!(fast.default_volume_size, Some(ByteSize(512 << 20)));
        assert_eq!(fast.overcommit(), Overcommit::Ratio(1.5));
        assert_eq!(c.pools[1].filesystem(), Filesystem::Xfs);
        assert_eq!(c.pools[1].overcommit(), Overcommit::None);
        assert_eq!(
            PoolConfig::dir("d", "/d".into()).overcommit(),
            Overcommit::None
        );

        for bad in [
            "kind = \"dir\"\nfilesystem = \"xfs\"",
            "kind = \"dir\"\novercommit = 1.0",
            "kind = \"btrfs\"\nmin_volume_size = \"2Gi\"\nmax_volume_size = \"1Gi\"",
            "kind = \"btrfs\"\nmax_volume_size = \"1 parsec\"",
            "kind = \"btrfs\"\novercommit = -1.0",
        ] {
            std::fs::write(
                &f,
                format!("[[pools]]\nname = \"p\"\npath = \"/p\"\n{bad}\n"),
            )
            .unwrap();
            let r = args(&["--config", f.to_str().unwrap()]).resolve();
            assert!(
                matches!(r, Err(ConfigError::Setting(..) | ConfigError::File(..))),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("64Ki"), Some(ByteSize(65536)));
        assert_eq!(ByteSize::parse("1G"), Some(ByteSize(1_000_000_000)));
        assert_eq!(ByteSize::parse("12"), Some(ByteSize(12)));
        assert_eq!(ByteSize::parse("Gi"), None);
        assert_eq!(ByteSize::parse("1.5Gi"), None);
        assert_eq!(ByteSize::parse("99999999999Ti"), None);
    }
}
