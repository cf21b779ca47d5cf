//! Kubernetes Events for orphans, on the claim (where the user who owns
//! the data looks: `kubectl describe pvc`) or else the PV (where the
//! administrator looks), so that a forgotten volume shows up where people
//! already look.
//!
//! Deduplicated: an orphan gets one Event, named after the object and the
//! reason (so a driver restart finds it again instead of making another),
//! and it is announced again (the same Event's `lastTimestamp` patched, or
//! made anew once the API server has expired it) at most every
//! [`REPEAT_EVERY`], not on every scan.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sha2::{Digest, Sha256};

use super::{Kube, KubeError};
use crate::orphans::{Cluster, Orphan};

/// How often an orphan that stays one is announced again. The API server
/// keeps Events for an hour by default (`--event-ttl`), so this keeps one
/// visible without a new Event per scan.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30 * 60);

/// The Event's `reason`.
pub const REASON: &str = "OrphanVolume";

/// Posts the orphans' Events, remembering what it posted.
#[derive(Debug)]
pub struct Recorder {
    kube: Kube,
    /// The node this driver serves (the Event's source host).
    node: String,
    /// Event key to when it was last announced.
    posted: HashMap<String, Instant>,
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    kind: &'static str,
    namespace: Option<String>,
    name: String,
    uid: String,
}

impl Recorder {
    /// A recorder for the driver on `node`.
    pub fn new(kube: Kube, node: &str) -> Recorder {
        Recorder {
            kube,
            node: node.to_string(),
            posted: HashMap::new(),
        }
    }

    /// The connection it posts through.
    pub fn kube(&self) -> &Kube {
        &self.kube
    }

    /// Posts an Event for every orphan with a claim or PV to post it on,
    /// unless it was announced less than [`REPEAT_EVERY`] ago. Returns how
    /// many were posted; stops at the first refusal (RBAC), which the
    /// caller logs.
    pub async fn post(
        &mut self,
        orphans: &[Orphan],
        cluster: &Cluster,
    ) -> Result<usize, KubeError> {
        let mut n = 0;
        for o in orphans {
            let Some(target) = target(o, cluster) else {
                continue;
            };
            let name = event_name(&target, o);
            let key = format!(
                "{}/{name}",
                target.namespace.as_deref().unwrap_or("default")
            );
            if self
                .posted
                .get(&key)
                .is_some_and(|t| t.elapsed() < REPEAT_EVERY)
            {
                continue;
            }
            self.announce(&target, &name, o).await?;
            self.posted.insert(key, Instant::now());
            n += 1;
        }
        Ok(n)
    }

    /// Creates the Event, or brings an existing one of that name up to
    /// date (a restarted driver, or the next announcement).
    async fn announce(&self, target: &Target, name: &str, o: &Orphan) -> Result<(), KubeError> {
        // Events about cluster-scoped objects (a PV) live in `default`,
        // where client-go's recorder puts them and kubectl looks.
        let ns = target.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.kube.client(), &ns);
        let now = Time(Timestamp::now());
        let message = message(o);
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(ns.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some(target.kind.into()),
                namespace: target.namespace.clone(),
                name: Some(target.name.clone()),
                uid: Some(target.uid.clone()).filter(|u| !u.is_empty()),
                ..ObjectReference::default()
            },
            reason: Some(REASON.into()),
            message: Some(message.clone()),
            type_: Some("Warning".into()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now.clone()),
            source: Some(EventSource {
                component: Some("hostpath-csi".into()),
                host: Some(self.node.clone()),
            }),
            reporting_component: Some("hostpath-csi".into()),
            reporting_instance: Some(self.node.clone()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let patch = serde_json::json!({
                    "lastTimestamp": now,
                    "message": message,
                });
                api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.kube.error("patch events", e))
            }
            Err(e) => Err(self.kube.error("create events", e)),
        }
    }
}

/// The claim if it exists, else the PV if it exists.
fn target(o: &Orphan, cluster: &Cluster) -> Option<Target> {
    if let Some(claim) = &o.claim
        && let Some(uid) = cluster.claims.get(claim)
        && let Some((ns, name)) = claim.split_once('/')
    {
        return Some(Target {
            kind: "PersistentVolumeClaim",
            namespace: Some(ns.to_string()),
            name: name.to_string(),
            uid: uid.clone(),
        });
    }
    let pv = cluster
        .pvs
        .iter()
        .find(|p| Some(&p.name) == o.pv.as_ref() && p.handle == o.volume_id)?;
    Some(Target {
        kind: "PersistentVolume",
        namespace: None,
        name: pv.name.clone(),
        uid: pv.uid.clone(),
    })
}

/// A stable name: the object's name (cut to fit), then a hash of what
/// makes the Event unique (object, volume, reason). Names must be DNS
/// subdomains: lowercase, `-` and `.`, at most 253 characters.
fn event_name(t: &Target, o: &Orphan) -> String {
    let digest = Sha256::digest(format!(
        "{}\0{}\0{}\0{}",
        t.kind,
        t.uid,
        o.volume_id,
        o.reason.as_str()
    ));
    let short: String = t.name.chars().take(200).collect();
    format!(
        "{short}.orphan-{}-{}",
        o.reason.as_str().replace('_', "-"),
        &hex::encode(digest)[..12]
    )
}

/// What the Event says.
fn message(o: &Orphan) -> String {
    format!(
        "volume {} on node {} ({} bytes, {}) is an orphan: {}. See `hostpath-csi orphans` on that node{}",
        o.volume_id,
        o.node,
        o.bytes,
        match o.idle_seconds {
            Some(s) => format!("idle {s}s"),
            None => "idle time unknown".to_string(),
        },
        o.reason.explain(),
        match &o.keep {
            Some(why) => format!("; reclaim leaves it alone: {why}"),
            None => "; `hostpath-csi orphans --reclaim` can reclaim it".to_string(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orphans::{ClusterPv, Reason};
    use crate::volume::inventory::Origin;

    fn orphan(reason: Reason, claim: Option<&str>) -> Orphan {
        Orphan {
            reason,
            volume_id: "hdd:abc".into(),
            pv: Some("pvc-1".into()),
            claim: claim.map(String::from),
            node: "n1".into(),
            bytes: 1,
            idle_seconds: Some(5),
            origin: Origin::Driver,
            problem: None,
            keep: None,
        }
    }

    #[test]
    fn on_the_claim_if_it_exists_else_the_pv_else_nowhere() {
        let mut cluster = Cluster::default();
        cluster.claims.insert("shop/db".into(), "c-uid".into());
        cluster.pvs.push(ClusterPv {
            name: "pvc-1".into(),
            uid: "pv-uid".into(),
            handle: "hdd:abc".into(),
            phase: "Released".into(),
            claim: Some("shop/gone".into()),
            node: None,
            bytes: 1,
            created_unix: 0,
        });
        let t = target(&orphan(Reason::Unused, Some("shop/db")), &cluster).unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref()),
            ("PersistentVolumeClaim", Some("shop"))
        );
        let t = target(&orphan(Reason::Released, Some("shop/gone")), &cluster).unwrap();
        assert_eq!((t.kind, t.name.as_str()), ("PersistentVolume", "pvc-1"));
        cluster.pvs.clear();
        assert_eq!(
            target(&orphan(Reason::NoPv, Some("shop/gone")), &cluster),
            None
        );
    }

    #[test]
    fn names_are_stable_dns_subdomains() {
        let t = Target {
            kind: "PersistentVolume",
            namespace: None,
            name: "x".repeat(300),
            uid: "u".into(),
        };
        let a = event_name(&t, &orphan(Reason::NoPv, None));
        assert_eq!(a, event_name(&t, &orphan(Reason::NoPv, None)));
        assert_ne!(a, event_name(&t, &orphan(Reason::Released, None)));
        assert!(a.len() <= 253, "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
            "{a}"
        );
    }
}
