//! Orphans: volumes that nothing in the cluster will use again, found by
//! comparing what is on this node's disks with what the API server knows.
//!
//! - `local`: this node's volumes, from the read-only pool inventory
//!   (works while the driver runs and while it does not; changes nothing);
//! - this module: the rules, plain functions of this node's volumes and of
//!   what the API server knows ([`Cluster`], read by `crate::kubeapi`), so
//!   they are tested without a cluster; what reclaim may touch; counts and
//!   bytes by reason for the metrics ([`summary`]);
//! - `report`: both sides read and classified, for the command and the
//!   driver's periodic scan;
//! - `scan`: the driver's periodic report: metrics and Events;
//! - `reclaim`: removing the reclaimable ones through the driver's own
//!   DeleteVolume (its locks, its crash safety, its `onDelete`).
//!
//! The reasons:
//! - `no_pv`: a volume on disk that no PersistentVolume names (its PV was
//!   deleted by hand with its finalizer stripped, or never made);
//! - `released`: its PV is Released (reclaim policy Retain) and no claim
//!   will bind it again;
//! - `unused`: its PV is Bound but no pod uses the claim, and none has for
//!   longer than `--unused-after`;
//! - `node_gone`: a PV of this driver pinned to a node that no longer
//!   exists (its data was on that node; reported from any node).
//!
//! Reclaim only ever touches `no_pv` and `released` volumes made by the
//! driver (a record), on this node, not published, idle for longer than the
//! grace period: a Bound PV could be used again any time, and an
//! administrator's directory is not ours to remove.

pub mod local;
pub mod reclaim;
pub mod report;
pub mod scan;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::volume::inventory::Origin;

/// Why a volume is an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// On disk, no PersistentVolume names it.
    NoPv,
    /// Its PV is Released and will not be bound again.
    Released,
    /// Its PV is Bound, but no pod has used the claim for a long time.
    Unused,
    /// Its PV is pinned to a node that no longer exists.
    NodeGone,
}

impl Reason {
    /// The label value (metrics, JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoPv => "no_pv",
            Reason::Released => "released",
            Reason::Unused => "unused",
            Reason::NodeGone => "node_gone",
        }
    }

    /// What it means, for people.
    pub fn explain(self) -> &'static str {
        match self {
            Reason::NoPv => "no PersistentVolume names this volume",
            Reason::Released => "its PersistentVolume is Released and no claim will bind it again",
            Reason::Unused => "its claim is bound but no pod has used it for a long time",
            Reason::NodeGone => "its PersistentVolume is pinned to a node that no longer exists",
        }
    }
}

/// A volume on this node, as the pool directories show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    /// Its id (`<pool>:<token>`), the PV's `volumeHandle`.
    pub id: String,
    /// The PV name the provisioner passed at creation, if any.
    pub pv: Option<String>,
    /// The claim (`namespace/name`) the provisioner passed, if any.
    pub claim: Option<String>,
    /// Its size (the record's), or what it uses (a static directory).
    pub bytes: u64,
    /// When it was made, seconds since the epoch, if known: records of
    /// older drivers carry no time, and entries the driver did not make
    /// have none.
    pub created_unix: Option<u64>,
    /// When it was last published or unpublished, if known.
    pub last_used_unix: Option<u64>,
    /// Whether it is mounted somewhere now.
    pub published: bool,
    /// Who made it: only the driver's volumes are ever reclaimed; a
    /// directory without a record is an administrator's, and a file or a
    /// symlink is nobody's volume.
    pub origin: Origin,
    /// What is wrong with the entry, if anything (a symlink, a file, a
    /// record whose storage is missing).
    pub problem: Option<String>,
}

impl LocalVolume {
    /// When it was last touched (made, published or unpublished), if any
    /// of those is known.
    fn idle_since(&self) -> Option<u64> {
        self.created_unix.max(self.last_used_unix)
    }
}

/// A PersistentVolume of this driver, as the API server shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPv {
    /// Its name.
    pub name: String,
    /// Its uid (Events name the object by it).
    pub uid: String,
    /// `spec.csi.volumeHandle`.
    pub handle: String,
    /// `status.phase` (Available, Bound, Released, Failed, Pending).
    pub phase: String,
    /// The claim it is bound to (`namespace/name`), if any.
    pub claim: Option<String>,
    /// The node its node affinity pins it to, if any.
    pub node: Option<String>,
    /// `spec.capacity.storage` in bytes.
    pub bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

/// What the API server knows that the report needs.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    /// PersistentVolumes of this driver.
    pub pvs: Vec<ClusterPv>,
    /// Claims that exist: `namespace/name` to their uid.
    pub claims: HashMap<String, String>,
    /// Claims that a pod (not finished) uses.
    pub claims_in_use: HashSet<String>,
    /// Names of the nodes that exist.
    pub nodes: HashSet<String>,
}

/// One orphan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    /// Why.
    pub reason: Reason,
    /// The volume id (the PV's handle for `node_gone`).
    pub volume_id: String,
    /// The PV, where one exists (or the name it had).
    pub pv: Option<String>,
    /// The claim, where one is known.
    pub claim: Option<String>,
    /// The node holding the data.
    pub node: String,
    /// Bytes: the volume's size.
    pub bytes: u64,
    /// Seconds since it was last made, published or unpublished; `None`
    /// when none of those times is known (JSON `null`, `-` in the table),
    /// rather than a count from 1970.
    pub idle_seconds: Option<u64>,
    /// Who made the entry (`driver`, `static`, `foreign`).
    pub origin: Origin,
    /// What is wrong with the entry, if anything.
    pub problem: Option<String>,
    /// Why reclaim must leave it alone; `None`: it may be reclaimed once
    /// idle for the grace period.
    pub keep: Option<String>,
}

/// Thresholds of the report.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Seconds since the epoch now.
    pub now: u64,
    /// How long a bound claim may go unused before it is reported.
    pub unused_for: u64,
    /// A volume younger than this is not yet `no_pv`: the provisioner
    /// makes the PV just after CreateVolume returns.
    pub settle: u64,
}

/// Whether something idle for `idle` seconds has been idle for at least
/// `secs`. An unknown idle time counts as long enough: the driver records
/// when it makes, publishes and unpublishes a volume, so an entry with none
/// of those times was made by a driver from before they were recorded, or
/// not by the driver at all (which reclaim never touches anyway).
pub fn idle_for_at_least(idle: Option<u64>, secs: u64) -> bool {
    idle.is_none_or(|i| i >= secs)
}

/// The orphans among this node's volumes and the driver's PVs.
pub fn classify(node: &str, local: &[LocalVolume], cluster: &Cluster, rules: Rules) -> Vec<Orphan> {
    let by_handle: BTreeMap<&str, &ClusterPv> =
        cluster.pvs.iter().map(|p| (p.handle.as_str(), p)).collect();
    let mut out = Vec::new();
    for v in local {
        // A pod's inline ephemeral volume: no PV ever names it, and its
        // pod's unpublish (or the driver's sweep) removes it.
        if v.origin == Origin::Ephemeral {
            continue;
        }
        let idle = v.idle_since().map(|t| rules.now.saturating_sub(t));
        let orphan = |reason: Reason, pv: Option<&ClusterPv>| Orphan {
            reason,
            volume_id: v.id.clone(),
            pv: pv.map(|p| p.name.clone()).or_else(|| v.pv.clone()),
            claim: pv.and_then(|p| p.claim.clone()).or_else(|| v.claim.clone()),
            node: node.to_string(),
            bytes: v.bytes,
            idle_seconds: idle,
            origin: v.origin,
            problem: v.problem.clone(),
            keep: None,
        };
        let found = match by_handle.get(v.id.as_str()) {
            None if idle_for_at_least(idle, rules.settle) => Some(orphan(Reason::NoPv, None)),
            None => None,
            Some(pv) if pv.phase == "Released" => Some(orphan(Reason::Released, Some(pv))),
            Some(pv)
                if pv.phase == "Bound"
                    && !v.published
                    && idle_for_at_least(idle, rules.unused_for)
                    && !pv
                        .claim
                        .as_ref()
                        .is_some_and(|c| cluster.claims_in_use.contains(c)) =>
            {
                Some(orphan(Reason::Unused, Some(pv)))
            }
            Some(_) => None,
        };
        if let Some(mut o) = found {
            o.keep = keep_reason(&o, v, by_handle.get(v.id.as_str()).copied());
            out.push(o);
        }
    }
    for pv in &cluster.pvs {
        if let Some(n) = &pv.node
            && !cluster.nodes.contains(n)
        {
            out.push(Orphan {
                reason: Reason::NodeGone,
                volume_id: pv.handle.clone(),
                pv: Some(pv.name.clone()),
                claim: pv.claim.clone(),
                node: n.clone(),
                bytes: pv.bytes,
                // A PV without a creation time (0): none is known.
                idle_seconds: (pv.created_unix > 0)
                    .then(|| rules.now.saturating_sub(pv.created_unix)),
                origin: Origin::Driver,
                problem: None,
                keep: Some(format!("its data was on node {n}, which is gone")),
            });
        }
    }
    out.sort_by(|a, b| (a.reason, &a.volume_id).cmp(&(b.reason, &b.volume_id)));
    out
}

/// Why reclaim must leave an orphan on this node alone, if it must.
fn keep_reason(o: &Orphan, v: &LocalVolume, pv: Option<&ClusterPv>) -> Option<String> {
    match v.origin {
        Origin::Driver => {}
        Origin::Ephemeral => {
            return Some("an inline ephemeral volume: its pod's unpublish removes it".into());
        }
        Origin::Static => {
            return Some(
                "a directory without a record: an administrator's static volume, never reclaimed"
                    .into(),
            );
        }
        Origin::Foreign => {
            let what = v.problem.as_deref().unwrap_or("not a volume");
            return Some(format!("not the driver's ({what}): never touched"));
        }
    }
    if v.published {
        return Some("published: mounted in a pod now".into());
    }
    match (o.reason, pv) {
        (Reason::NoPv | Reason::Released, None) => None,
        (Reason::Released, Some(p)) if p.phase == "Released" => None,
        (_, Some(p)) => Some(format!(
            "PersistentVolume {} is {}: it could be used again",
            p.name, p.phase
        )),
        (_, None) => Some("not reclaimable".into()),
    }
}

/// Orphans counted and sized by reason (for metrics).
pub fn summary(orphans: &[Orphan]) -> BTreeMap<Reason, (u64, u64)> {
    let mut out = BTreeMap::new();
    for o in orphans {
        let e = out.entry(o.reason).or_insert((0, 0));
        e.0 += 1;
        e.1 += o.bytes;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str) -> LocalVolume {
        LocalVolume {
            id: id.into(),
            pv: Some(format!("pv-{id}")),
            claim: Some(format!("ns/{id}")),
            bytes: 100,
            created_unix: Some(1_000),
            last_used_unix: None,
            published: false,
            origin: Origin::Driver,
            problem: None,
        }
    }

    fn pv(id: &str, phase: &str, node: &str) -> ClusterPv {
        ClusterPv {
            name: format!("pv-{id}"),
            uid: format!("uid-{id}"),
            handle: id.into(),
            phase: phase.into(),
            claim: Some(format!("ns/{id}")),
            node: Some(node.into()),
            bytes: 100,
            created_unix: 1_000,
        }
    }

    const RULES: Rules = Rules {
        now: 100_000,
        unused_for: 3_600,
        settle: 120,
    };

    #[test]
    fn each_reason_and_what_reclaim_may_touch() {
        let mut fresh = vol("p:fresh");
        fresh.created_unix = Some(RULES.now - 10);
        let mut used_recently = vol("p:recent");
        used_recently.last_used_unix = Some(RULES.now - 60);
        let mut published = vol("p:mounted");
        published.published = true;
        let mut stat = vol("p:static");
        stat.origin = Origin::Static;
        let mut link = vol("p:link");
        link.origin = Origin::Foreign;
        link.problem = Some("a symlink, not a directory".into());
        let mut eph = vol("p:eph");
        eph.origin = Origin::Ephemeral;
        let local = vec![
            vol("p:nopv"),
            vol("p:released"),
            vol("p:unused"),
            vol("p:inuse"),
            vol("p:fine"),
            fresh,
            used_recently,
            published,
            stat,
            link,
            eph,
        ];
        let mut cluster = Cluster {
            pvs: vec![
                pv("p:released", "Released", "n1"),
                pv("p:unused", "Bound", "n1"),
                pv("p:inuse", "Bound", "n1"),
                pv("p:recent", "Bound", "n1"),
                pv("p:mounted", "Bound", "n1"),
                pv("p:fine", "Available", "n1"),
                pv("q:lost", "Bound", "n9"),
            ],
            nodes: ["n1".to_string()].into(),
            ..Default::default()
        };
        cluster.claims_in_use.insert("ns/p:inuse".into());
        // A pod can use the claim of an unpublished volume (not started yet).
        let got = classify("n1", &local, &cluster, RULES);
        let brief: Vec<(&str, &str, bool)> = got
            .iter()
            .map(|o| (o.reason.as_str(), o.volume_id.as_str(), o.keep.is_none()))
            .collect();
        assert_eq!(
            brief,
            [
                ("no_pv", "p:link", false),
                ("no_pv", "p:nopv", true),
                ("no_pv", "p:static", false),
                ("released", "p:released", true),
                ("unused", "p:unused", false),
                ("node_gone", "q:lost", false),
            ]
        );
        assert_eq!(got[5].node, "n9");
        assert!(
            got[0].keep.as_deref().unwrap().contains("a symlink"),
            "{got:?}"
        );
        assert!(
            got[2].keep.as_deref().unwrap().contains("static"),
            "{got:?}"
        );
        let s = summary(&got);
        assert_eq!(s[&Reason::NoPv], (3, 300));
        assert_eq!(s[&Reason::NodeGone], (1, 100));
    }

    #[test]
    fn a_published_released_volume_is_kept() {
        let mut v = vol("p:r");
        v.published = true;
        let cluster = Cluster {
            pvs: vec![pv("p:r", "Released", "n1")],
            nodes: ["n1".to_string()].into(),
            ..Default::default()
        };
        let got = classify("n1", &[v], &cluster, RULES);
        assert_eq!(got.len(), 1);
        assert!(got[0].keep.as_deref().unwrap().contains("published"));
    }

    #[test]
    fn an_entry_with_no_known_time_has_no_idle_time_not_one_since_1970() {
        // An administrator's directory, and a volume of a driver from
        // before creation times were recorded: no time is known.
        let mut stat = vol("p:static");
        stat.origin = Origin::Static;
        stat.created_unix = None;
        let mut old = vol("p:old");
        old.created_unix = None;
        let mut published_once = vol("p:used");
        published_once.created_unix = None;
        published_once.last_used_unix = Some(RULES.now - 30);
        let cluster = Cluster {
            nodes: ["n1".to_string()].into(),
            ..Default::default()
        };
        let got = classify("n1", &[old, stat, published_once], &cluster, RULES);
        let idle: Vec<(&str, Option<u64>)> = got
            .iter()
            .map(|o| (o.volume_id.as_str(), o.idle_seconds))
            .collect();
        // Not known: still past the settle time (it is older than any
        // record the driver keeps); p:used is younger than it.
        assert_eq!(idle, [("p:old", None), ("p:static", None)]);
        let json = serde_json::to_value(&got[0]).unwrap();
        assert_eq!(json["idle_seconds"], serde_json::Value::Null, "{json}");
        let known = classify("n1", &[vol("p:known")], &cluster, RULES);
        assert_eq!(known[0].idle_seconds, Some(RULES.now - 1_000));
        let json = serde_json::to_value(&known[0]).unwrap();
        assert_eq!(json["idle_seconds"], RULES.now - 1_000);
        // A PV without a creation time, on a node that is gone.
        let mut lost = pv("q:lost", "Bound", "n9");
        lost.created_unix = 0;
        let cluster = Cluster {
            pvs: vec![lost],
            ..cluster
        };
        let got = classify("n1", &[], &cluster, RULES);
        assert_eq!(got[0].idle_seconds, None);
    }
}
