//! The orphan report: this node's volumes (read-only inventory) and what
//! the API server knows, put through the rules. Used by `hostpath-csi
//! orphans` and by the driver's periodic scan.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Cluster, Orphan, Reason, Rules, classify, local, summary};
use crate::config::PoolConfig;
use crate::kubeapi::{Kube, KubeError};
use crate::metrics::OrphanCount;

/// What the report is made for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The driver's name (PVs of other drivers are not looked at).
    pub driver: String,
    /// This node's id (the topology value in its PVs' node affinity).
    pub node: String,
    /// The pools of this node.
    pub pools: Vec<PoolConfig>,
    /// How long a bound claim may go without a pod before it is reported.
    pub unused_after: Duration,
    /// How old a volume without a PV must be before it counts: the
    /// provisioner makes the PV just after CreateVolume returns.
    pub settle: Duration,
}

/// Why no report could be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The API server could not be read (unreachable, refused).
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// This node's volumes could not be read (the mount table).
    #[error("reading this node's volumes: {0}")]
    Local(#[from] local::LocalError),
    /// The blocking read of the pools panicked.
    #[error("reading this node's volumes: {0}")]
    Panicked(String),
}

/// The orphans of this node and the driver's PVs, with what they were
/// found from.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The API server asked.
    pub server: String,
    /// This node.
    pub node: String,
    /// When, seconds since the epoch.
    pub at_unix: u64,
    /// How many PVs of this driver the API server has.
    pub pvs: usize,
    /// How many volumes this node's pools hold (every entry).
    pub local_volumes: usize,
    /// The orphans, by reason then volume id.
    pub orphans: Vec<Orphan>,
    /// Count and bytes per reason (every reason, zeros included).
    pub summary: Vec<ReasonCount>,
    /// What the API server showed (not serialized: large, and only used to
    /// target Events and to re-check before a reclaim).
    #[serde(skip)]
    pub cluster: Cluster,
}

/// Orphans of one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    /// The reason.
    pub reason: Reason,
    /// How many volumes.
    pub volumes: u64,
    /// How many bytes they hold.
    pub bytes: u64,
}

impl Report {
    /// The figures for the metrics' orphan gauges.
    pub fn metrics(&self) -> Vec<OrphanCount> {
        self.summary
            .iter()
            .map(|c| OrphanCount {
                reason: c.reason.as_str().to_string(),
                volumes: c.volumes,
                bytes: c.bytes,
            })
            .collect()
    }
}

/// Seconds since the epoch now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Makes the report: the API server is read first (a refusal or an
/// unreachable server ends it before the pools are walked), then this
/// node's pools.
pub async fn make(kube: &Kube, opts: &Options) -> Result<Report, ReportError> {
    let cluster = kube.read_cluster(&opts.driver).await?;
    let pools = opts.pools.clone();
    let local = tokio::task::spawn_blocking(move || local::volumes(&pools))
        .await
        .map_err(|e| ReportError::Panicked(e.to_string()))??;
    let rules = Rules {
        now: now_unix(),
        unused_for: opts.unused_after.as_secs(),
        settle: opts.settle.as_secs(),
    };
    let orphans = classify(&opts.node, &local, &cluster, rules);
    Ok(Report {
        server: kube.server().to_string(),
        node: opts.node.clone(),
        at_unix: rules.now,
        pvs: cluster.pvs.len(),
        local_volumes: local.len(),
        summary: counts(&orphans),
        orphans,
        cluster,
    })
}

/// Count and bytes per reason, every reason listed (a reason with no
/// orphans is a 0, not a missing series).
pub fn counts(orphans: &[Orphan]) -> Vec<ReasonCount> {
    let s = summary(orphans);
    [
        Reason::NoPv,
        Reason::Released,
        Reason::Unused,
        Reason::NodeGone,
    ]
    .into_iter()
    .map(|r| {
        let (volumes, bytes) = s.get(&r).copied().unwrap_or((0, 0));
        ReasonCount {
            reason: r,
            volumes,
            bytes,
        }
    })
    .collect()
}
