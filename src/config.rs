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

    /// A pool of kind `dir`: `NAME=DIR`. Repeatable. StorageClasses pick a
    /// pool with the parameter `pool: NAME`. With no pools from flags or
    /// the config file, one pool `default` lives under --state-dir.
    #[arg(
        long = "pool",
        value_name = "NAME=DIR",
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// A plain directory per volume; size is not enforced.
    #[default]
    Dir,
}

impl PoolKind {
    /// Name used in configs and volume contexts.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Dir => "dir",
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
}

impl PoolConfig {
    /// A `dir` pool with default settings.
    pub fn dir(name: &str, path: PathBuf) -> Self {
        PoolConfig {
            name: name.to_string(),
            path,
            kind: PoolKind::Dir,
        }
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
    /// `--pool` not of the form NAME=DIR.
    #[error("--pool {0:?} is not NAME=DIR")]
    PoolFlag(String),
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
            let (name, dir) = flag
                .split_once('=')
                .ok_or_else(|| ConfigError::PoolFlag(flag.clone()))?;
            pools.push(PoolConfig {
                name: name.to_string(),
                path: PathBuf::from(dir),
                kind: PoolKind::Dir,
            });
        }
        if pools.is_empty() {
            pools.push(PoolConfig {
                name: "default".into(),
                path: self.state_dir.join("default"),
                kind: PoolKind::Dir,
            });
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
}
