//! The driver's configuration: [`Config`], its pools, and the pieces the
//! command line (`src/cli.rs`, with the binary) assembles it from: an
//! endpoint, `--pool` flags, a TOML file.
//!
//! Pools can come from `--pool` flags for the simple case or a TOML file
//! for the full set of pool settings; both are documented in the README.
//! The checks a configuration must pass live here too; the command line
//! runs them before the driver starts.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::volume::id::valid_pool_name;

/// How a pool stores volumes.
///
/// Room is left for a project-quota kind (`xfs-quota`/`ext4-quota`: one
/// directory per volume with an XFS or ext4 project quota as its limit). It
/// is not offered because the kernels this driver is tested on are built
/// without quota support, so it could not be tested; it would slot in as
/// one more variant and backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "dir" => Some(PoolKind::Dir),
            "btrfs" => Some(PoolKind::Btrfs),
            "image" => Some(PoolKind::Image),
            _ => None,
        }
    }

    /// Whether the kind enforces volume sizes (writes beyond fail).
    pub(crate) fn enforces_size(self) -> bool {
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
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn parse(s: &str) -> Option<Self> {
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
    /// Whether the pool serves CSI inline ephemeral volumes. Off by
    /// default: an inline volume is asked for in a pod's spec, so any pod
    /// author can ask for one, past the StorageClasses and quotas an
    /// administrator uses to control persistent claims; a pool has to be
    /// opened to them on purpose.
    #[serde(default)]
    pub ephemeral: bool,
    /// Largest inline ephemeral volume (required with `ephemeral`): the
    /// limit an administrator sets on what a pod spec alone can take.
    #[serde(default)]
    pub max_ephemeral_volume_size: Option<ByteSize>,
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
            ephemeral: false,
            max_ephemeral_volume_size: None,
        }
    }

    /// The largest inline ephemeral volume the pool makes, or `None` when
    /// it serves none.
    pub fn ephemeral_limit(&self) -> Option<u64> {
        if !self.ephemeral {
            return None;
        }
        self.max_ephemeral_volume_size.map(|b| b.0)
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
        match (self.ephemeral, self.max_ephemeral_volume_size) {
            (true, None) => {
                return bad(
                    "`ephemeral = true` needs `max_ephemeral_volume_size`: inline \
                     volumes are asked for by any pod author, so the pool must say how \
                     large one may be"
                        .into(),
                );
            }
            (false, Some(_)) => {
                return bad(
                    "`max_ephemeral_volume_size` applies only with `ephemeral = true`".into(),
                );
            }
            (true, Some(m)) if m.0 == 0 => {
                return bad("max_ephemeral_volume_size must not be 0".into());
            }
            (true, Some(m)) if self.max_volume_size.is_some_and(|max| m > max) => {
                return bad("max_ephemeral_volume_size exceeds max_volume_size".into());
            }
            _ => {}
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
    /// Where volumes grow: in ControllerExpandVolume (then the node's
    /// filesystem in NodeExpandVolume), or wholly in NodeExpandVolume.
    pub expansion: Expansion,
}

/// Which CSI call grows a volume.
///
/// A node-local volume can only be grown by the driver on its node. With
/// csi-provisioner in distributed mode that is fine for creation, but
/// csi-resizer runs leader-elected: one instance, on any node, calls
/// ControllerExpandVolume on the driver beside it, which does not hold the
/// volume. With [`Expansion::Node`] the driver advertises node expansion
/// only; csi-resizer then just records the new size in the PV (its "trivial
/// resizer", for drivers without controller expansion), and the kubelet's
/// NodeExpandVolume, on the node where the volume is published, does all of
/// the growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expansion {
    /// ControllerExpandVolume grows the volume (promise, image or limit,
    /// record); NodeExpandVolume grows an image's filesystem. For a CO that
    /// calls the controller on the volume's node (or one node only).
    #[default]
    Controller,
    /// NodeExpandVolume does everything; ControllerExpandVolume is not
    /// offered. For distributed mode with csi-resizer.
    Node,
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
    /// `--healthz-address` not an address to listen on.
    #[error("health address {0:?} is not HOST:PORT, [IPV6]:PORT or :PORT")]
    HealthzAddress(String),
}

/// A pool from a `--pool` flag: `NAME=DIR` or `NAME=DIR:KIND`. A
/// directory whose name itself ends in `:something` that is not a kind is
/// taken whole.
pub fn parse_pool_flag(flag: &str) -> Result<PoolConfig, ConfigError> {
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

/// The socket path of a `unix://` endpoint (or a plain path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(ConfigError::Endpoint(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Reads a TOML config file.
pub fn load_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File(path.to_path_buf(), e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::File(path.to_path_buf(), e.to_string()))
}

/// Checks pools together: valid, unique names, absolute directories, sane
/// settings, no directory inside another.
pub fn check_pools(pools: &[PoolConfig]) -> Result<(), ConfigError> {
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

/// Checks a driver name: domain-like, at most 63 characters.
pub fn check_driver_name(name: &str) -> Result<(), ConfigError> {
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

    /// Whether ControllerExpandVolume is offered.
    pub fn controller_expands(&self) -> bool {
        self.expansion == Expansion::Controller && self.expansion_supported()
    }

    /// Whether NodeExpandVolume is offered. In node mode always: csi-resizer
    /// refuses to start beside a driver that offers no expansion at all, and
    /// a node whose pools are all dirs still runs it (their StorageClasses
    /// do not allow expansion, and a dir volume's NodeExpandVolume answers
    /// UNIMPLEMENTED).
    pub fn node_expands(&self) -> bool {
        self.expansion == Expansion::Node || self.expansion_supported()
    }
}

impl PoolKind {
    /// Whether volumes of this kind can be expanded.
    pub(crate) fn can_expand(self) -> bool {
        match self {
            PoolKind::Dir => false,
            PoolKind::Btrfs | PoolKind::Image => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_volumes_need_an_opt_in_with_a_maximum() {
        let base = || PoolConfig::dir("p", PathBuf::from("/p"));
        let check = |p: PoolConfig| p.check_settings().map_err(|e| e.to_string());
        assert_eq!(base().ephemeral_limit(), None);
        let opened = PoolConfig {
            ephemeral: true,
            max_ephemeral_volume_size: Some(ByteSize(1 << 30)),
            ..base()
        };
        assert_eq!(opened.ephemeral_limit(), Some(1 << 30));
        assert!(check(opened.clone()).is_ok());
        let e = check(PoolConfig {
            max_ephemeral_volume_size: None,
            ..opened.clone()
        })
        .unwrap_err();
        assert!(e.contains("needs `max_ephemeral_volume_size`"), "{e}");
        let e = check(PoolConfig {
            ephemeral: false,
            ..opened.clone()
        })
        .unwrap_err();
        assert!(e.contains("only with `ephemeral = true`"), "{e}");
        let e = check(PoolConfig {
            max_volume_size: Some(ByteSize(1 << 20)),
            ..opened.clone()
        })
        .unwrap_err();
        assert!(e.contains("exceeds max_volume_size"), "{e}");
        let file: ConfigFile = toml::from_str(
            "[[pools]]\nname = \"p\"\npath = \"/p\"\nephemeral = true\nmax_ephemeral_volume_size = \"2Gi\"\n",
        )
        .unwrap();
        assert_eq!(file.pools[0].ephemeral_limit(), Some(2 << 30));
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
