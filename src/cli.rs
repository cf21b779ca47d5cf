//! The driver's command line: `hostpath-csi [serve] [FLAGS]`, each flag
//! also readable from an environment variable so that a DaemonSet can set
//! it from the downward API. [`ServeArgs::resolve`] turns the flags into
//! the library's checked [`Config`]; the checks themselves live in
//! `hostpath_csi::config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hostpath_csi::config::{self, Config, ConfigError, Expansion, PoolConfig};
use hostpath_csi::healthz;
use hostpath_csi::kubelet::Registration;
use hostpath_csi::orphans::report::Options as OrphanOptions;
use hostpath_csi::orphans::scan::Scan;

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
    /// List every volume in every pool: claim, PV, size, usage, where it is
    /// published, when it was last used. Reads only; works whether the
    /// driver runs or not. Takes the flags of `serve` (pools, config file).
    Volumes(VolumesArgs),
    /// List the orphans: volumes on this node no PV names, Released PVs no
    /// claim will bind, bound claims no pod has used for --unused-after,
    /// PVs pinned to nodes that are gone; with the reason, size and idle
    /// time of each. Asks the API server (--kubeconfig, KUBECONFIG, or the
    /// pod's service account). `--reclaim` removes the safe ones through
    /// the running driver (a dry run unless `--yes`).
    Orphans(OrphansArgs),
}

/// Flags of `hostpath-csi orphans`.
#[derive(Debug, Clone, Args)]
pub struct OrphansArgs {
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Reclaim the orphans that are safe to remove (made by the driver, on
    /// this node, no PV or a Released one, not published, idle for
    /// --grace), through the driver's DeleteVolume, so the StorageClass's
    /// onDelete (delete or archive) applies. Shows what it would do unless
    /// --yes is given too.
    #[arg(long)]
    pub reclaim: bool,
    /// With --reclaim: really remove them.
    #[arg(long, requires = "reclaim")]
    pub yes: bool,
    /// Reclaim only orphans idle (not made, published or unpublished) for
    /// at least this long: `90s`, `30m`, `24h`, `7d`.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub grace: Duration,
    /// The pools, the node, the driver and the API server, as `serve` is
    /// given them.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// A duration flag: `90s`, `30m`, `72h`, `7d`, `1h30m`.
fn duration(s: &str) -> Result<Duration, String> {
    hostpath_csi::volume::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as 90s, 30m, 24h or 7d"))
}

/// Flags of `hostpath-csi volumes`.
#[derive(Debug, Clone, Args)]
pub struct VolumesArgs {
    /// `table` for people, `json` for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Do not measure used bytes (a walk of each dir volume's tree).
    #[arg(long)]
    pub no_usage: bool,
    /// The pools, as `serve` is given them.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Output format of the listing commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// An aligned table, sorted, sizes in KiB/MiB/GiB.
    #[default]
    Table,
    /// One JSON document (`volumes`: `{"pools": [...]}`; `orphans`: the
    /// report, see the README).
    Json,
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

/// Which CSI call grows volumes (see `hostpath_csi::config::Expansion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExpansionMode {
    /// ControllerExpandVolume, then NodeExpandVolume for the filesystem.
    Controller,
    /// NodeExpandVolume alone, on the volume's node.
    Node,
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

    /// The kubelet's plugin registration directory (usually
    /// `/var/lib/kubelet/plugins_registry`): the driver registers itself
    /// with the kubelet by serving `<DIR>/<driver name>-reg.sock`, as
    /// node-driver-registrar would. Off when unset. The directory must
    /// exist.
    #[arg(long, env = "KUBELET_REGISTRATION_DIR", value_name = "DIR")]
    pub kubelet_registration_dir: Option<PathBuf>,

    /// The CSI socket's path as the kubelet sees it, sent to the kubelet
    /// at registration (in a container: the host path of the socket).
    /// Defaults to the path the driver serves on.
    #[arg(long, env = "KUBELET_CSI_ENDPOINT", value_name = "PATH")]
    pub kubelet_csi_endpoint: Option<String>,

    /// Which call grows volumes: `controller` (ControllerExpandVolume, then
    /// NodeExpandVolume for an image's filesystem) or `node` (all of it in
    /// NodeExpandVolume on the volume's node; for csi-resizer beside
    /// csi-provisioner in distributed mode, where the controller call may
    /// reach another node's driver).
    #[arg(long, env = "HOSTPATH_CSI_EXPANSION", value_enum, default_value_t = ExpansionMode::Controller)]
    pub expansion: ExpansionMode,

    /// Serve `GET /healthz` here for a livenessProbe (`HOST:PORT`, or
    /// `:PORT` for every interface): 200 when the driver's Probe says
    /// ready, 503 with the reason otherwise. Off when unset.
    #[arg(long, env = "HEALTHZ_ADDRESS", value_name = "ADDR")]
    pub healthz_address: Option<String>,

    /// Serve Prometheus metrics (`GET /metrics`) here: `HOST:PORT`. Off
    /// when unset. Only a loopback address unless --metrics-allow-remote:
    /// the metrics name claims and namespaces, and the endpoint has no
    /// authentication.
    #[arg(long, env = "HOSTPATH_CSI_METRICS_ADDRESS", value_name = "ADDR")]
    pub metrics_address: Option<String>,

    /// Allow --metrics-address to be a non-loopback address (a pod's own
    /// IP or `0.0.0.0`, for a Prometheus that scrapes pods).
    #[arg(long, env = "HOSTPATH_CSI_METRICS_ALLOW_REMOTE")]
    pub metrics_allow_remote: bool,

    /// Leave out the per-volume series (`hostpath_csi_volume_used_bytes`),
    /// for nodes with very many volumes.
    #[arg(long, env = "HOSTPATH_CSI_NO_VOLUME_METRICS")]
    pub no_volume_metrics: bool,

    /// The kubeconfig for the API server (orphan report and scan). Unset:
    /// KUBECONFIG, ~/.kube/config, then the pod's service account.
    #[arg(long, env = "HOSTPATH_CSI_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Scan for orphans this often (`10m`), filling the orphan metrics and
    /// posting Events on the claims and PVs concerned. Off when unset. It
    /// only reports; it never reclaims.
    #[arg(long, env = "HOSTPATH_CSI_ORPHAN_SCAN_INTERVAL", value_name = "DURATION", value_parser = duration)]
    pub orphan_scan_interval: Option<Duration>,

    /// A Bound volume whose claim no pod has used for this long is an
    /// orphan (`unused`).
    #[arg(long, env = "HOSTPATH_CSI_UNUSED_AFTER", value_name = "DURATION", default_value = "7d", value_parser = duration)]
    pub unused_after: Duration,

    /// A volume without a PV counts as an orphan only once it is this old:
    /// csi-provisioner makes the PV just after CreateVolume returns.
    #[arg(long, env = "HOSTPATH_CSI_ORPHAN_SETTLE", value_name = "DURATION", default_value = "10m", value_parser = duration)]
    pub orphan_settle: Duration,
}

impl ServeArgs {
    /// Resolves flags, environment and config file into a checked config.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let socket = config::socket_path(&self.endpoint)?;
        let mut pools = match &self.config {
            Some(path) => config::load_file(path)?.pools,
            None => Vec::new(),
        };
        for flag in &self.pools {
            pools.push(config::parse_pool_flag(flag)?);
        }
        if pools.is_empty() {
            pools.push(PoolConfig::dir("default", self.state_dir.join("default")));
        }
        config::check_pools(&pools)?;
        config::check_driver_name(&self.driver_name)?;
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
            expansion: match self.expansion {
                ExpansionMode::Controller => Expansion::Controller,
                ExpansionMode::Node => Expansion::Node,
            },
        })
    }
}

impl ServeArgs {
    /// Registration with the kubelet, when `--kubelet-registration-dir` is
    /// given; `config` is the resolved configuration (driver name, socket).
    pub fn registration(&self, config: &Config) -> Result<Option<Registration>, ConfigError> {
        let Some(dir) = &self.kubelet_registration_dir else {
            return Ok(None);
        };
        let csi_endpoint = match &self.kubelet_csi_endpoint {
            Some(e) => config::socket_path(e)?,
            None => config.socket.clone(),
        };
        Ok(Some(Registration {
            dir: dir.clone(),
            driver_name: config.driver_name.clone(),
            csi_endpoint,
        }))
    }

    /// The metrics endpoint's address, when `--metrics-address` is given;
    /// an error naming the reason for a remote one not explicitly allowed.
    pub fn metrics_address(&self) -> Result<Option<SocketAddr>, String> {
        let Some(a) = &self.metrics_address else {
            return Ok(None);
        };
        let addr = healthz::parse_address(a)
            .ok_or_else(|| format!("--metrics-address {a:?} is not HOST:PORT"))?;
        if !addr.ip().is_loopback() && !self.metrics_allow_remote {
            return Err(format!(
                "--metrics-address {addr} is not a loopback address; the metrics name claims \
                 and namespaces and are served without authentication, so serving them beyond \
                 this host needs --metrics-allow-remote"
            ));
        }
        Ok(Some(addr))
    }

    /// What the orphan report is made for, from the resolved `config`.
    pub fn orphan_options(&self, config: &Config) -> OrphanOptions {
        OrphanOptions {
            driver: config.driver_name.clone(),
            node: config.node_id.clone(),
            pools: config.pools.clone(),
            unused_after: self.unused_after,
            settle: self.orphan_settle,
        }
    }

    /// The driver's periodic orphan scan, when `--orphan-scan-interval` is
    /// given.
    pub fn orphan_scan(&self, config: &Config) -> Option<Scan> {
        Some(Scan {
            every: self.orphan_scan_interval?,
            kubeconfig: self.kubeconfig.clone(),
            options: self.orphan_options(config),
        })
    }

    /// The health endpoint's address, when `--healthz-address` is given.
    pub fn healthz_address(&self) -> Result<Option<SocketAddr>, ConfigError> {
        self.healthz_address
            .as_deref()
            .map(|a| healthz::parse_address(a).ok_or_else(|| ConfigError::HealthzAddress(a.into())))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostpath_csi::config::{ByteSize, Filesystem, Overcommit, PoolKind};

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
        assert!(c.controller_expands() && c.node_expands());
        let c = args(&["--pool", "a=/x:image", "--expansion", "node"])
            .resolve()
            .unwrap();
        assert_eq!(c.expansion, Expansion::Node);
        assert!(!c.controller_expands() && c.node_expands());
        assert!(
            args(&["--pool", "a=/x", "--expansion", "node"])
                .resolve()
                .unwrap()
                .node_expands()
        );
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
    fn kubelet_registration_and_healthz_flags() {
        let a = args(&["--endpoint", "unix:///csi/csi.sock"]);
        let c = a.resolve().unwrap();
        assert_eq!(a.registration(&c).unwrap(), None);
        assert_eq!(a.healthz_address().unwrap(), None);

        let a = args(&[
            "--endpoint",
            "unix:///csi/csi.sock",
            "--kubelet-registration-dir",
            "/registration",
        ]);
        let r = a.registration(&a.resolve().unwrap()).unwrap().unwrap();
        assert_eq!(
            r.socket_path(),
            PathBuf::from("/registration/hostpath-csi.dev-reg.sock")
        );
        // Without --kubelet-csi-endpoint the kubelet is told the serving path.
        assert_eq!(r.csi_endpoint, PathBuf::from("/csi/csi.sock"));

        let a = args(&[
            "--kubelet-registration-dir",
            "/registration",
            "--kubelet-csi-endpoint",
            "unix:///var/lib/kubelet/plugins/hostpath-csi.dev/csi.sock",
        ]);
        let r = a.registration(&a.resolve().unwrap()).unwrap().unwrap();
        assert_eq!(
            r.csi_endpoint,
            PathBuf::from("/var/lib/kubelet/plugins/hostpath-csi.dev/csi.sock")
        );
        let a = args(&[
            "--kubelet-registration-dir",
            "/r",
            "--kubelet-csi-endpoint",
            "tcp://x:1",
        ]);
        assert!(matches!(
            a.registration(&a.resolve().unwrap()),
            Err(ConfigError::Endpoint(_))
        ));

        for (flag, want) in [
            (":9808", "0.0.0.0:9808"),
            ("127.0.0.1:9808", "127.0.0.1:9808"),
            ("[::1]:80", "[::1]:80"),
        ] {
            let got = args(&["--healthz-address", flag])
                .healthz_address()
                .unwrap();
            assert_eq!(got, Some(want.parse().unwrap()), "{flag}");
        }
        for bad in ["9808", "localhost:9808", ":http", "1.2.3.4", ":70000"] {
            assert!(
                matches!(
                    args(&["--healthz-address", bad]).healthz_address(),
                    Err(ConfigError::HealthzAddress(_))
                ),
                "{bad}"
            );
        }
    }
}
