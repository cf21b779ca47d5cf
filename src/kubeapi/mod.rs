//! The API server, for the orphan report: a kube-rs client from a
//! kubeconfig or the pod's in-cluster service account, what the report
//! reads (PersistentVolumes of this driver, claims, pods, nodes) turned
//! into the plain [`Cluster`] the rules take, and the Events it posts
//! (`events`).
//!
//! Errors are named by what the operator must do about them: the server
//! could not be reached, it refused (authentication or RBAC), or it
//! answered something else. The report says which and reclaims nothing.

pub mod events;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::orphans::{Cluster, ClusterPv};

/// The topology key that pins a volume to its node (the driver's
/// NodeGetInfo segment, copied by csi-provisioner into the PV's node
/// affinity).
const TOPOLOGY_KEY: &str = "topology.hostpath-csi.dev/node";

/// How long to wait for a connection: an API server that does not answer
/// within this is reported unreachable rather than hanging the command.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the API server could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No kubeconfig could be read and this is not a pod.
    #[error("no Kubernetes configuration: {0}")]
    Config(String),
    /// The server did not answer (down, wrong address, TLS failure).
    #[error("API server {server} unreachable: {detail}")]
    Unreachable {
        /// The server's URL.
        server: String,
        /// What failed.
        detail: String,
    },
    /// The server refused: who we are is unknown (401) or may not do it
    /// (403, RBAC).
    #[error("API server {server} refused to {what}: {code} {message}")]
    Refused {
        /// The server's URL.
        server: String,
        /// The request (`list persistentvolumes`).
        what: String,
        /// 401 or 403.
        code: u16,
        /// The server's message.
        message: String,
    },
    /// Any other answer.
    #[error("API server {server}: {what}: {detail}")]
    Api {
        /// The server's URL.
        server: String,
        /// The request.
        what: String,
        /// The error.
        detail: String,
    },
}

/// A connection to the API server.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    server: String,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("server", &self.server)
            .finish()
    }
}

impl Kube {
    /// Connects with the kubeconfig at `path`, or else as kubectl would:
    /// `KUBECONFIG`, `~/.kube/config`, then the pod's service account.
    pub async fn connect(path: Option<&Path>) -> Result<Kube, KubeError> {
        let mut config = match path {
            Some(p) => {
                let file = Kubeconfig::read_from(p)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", p.display())))?;
                kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| KubeError::Config(format!("{}: {e}", p.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| KubeError::Unreachable {
            server: server.clone(),
            detail: chain(&e),
        })?;
        Ok(Kube { client, server })
    }

    /// The server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub(crate) fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Sorts a kube-rs error into unreachable, refused, or other.
    pub(crate) fn error(&self, what: &str, e: kube::Error) -> KubeError {
        let server = self.server.clone();
        let what = what.to_string();
        match e {
            kube::Error::Api(s) if s.code == 401 || s.code == 403 => KubeError::Refused {
                server,
                what,
                code: s.code,
                message: s.message,
            },
            kube::Error::Api(s) => KubeError::Api {
                server,
                what,
                detail: format!("{} {}", s.code, s.message),
            },
            e @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => KubeError::Unreachable {
                server,
                detail: chain(&e),
            },
            e => KubeError::Api {
                server,
                what,
                detail: chain(&e),
            },
        }
    }

    /// What the orphan rules need to know: this driver's PVs, the claims,
    /// the claims pods use, the nodes. Four list calls; any failure (RBAC
    /// included) fails the whole read, so the report is never made from
    /// half a picture.
    pub async fn read_cluster(&self, driver: &str) -> Result<Cluster, KubeError> {
        let lp = ListParams::default();
        let pvs = Api::<PersistentVolume>::all(self.client())
            .list(&lp)
            .await
            .map_err(|e| self.error("list persistentvolumes", e))?;
        let claims = Api::<PersistentVolumeClaim>::all(self.client())
            .list(&lp)
            .await
            .map_err(|e| self.error("list persistentvolumeclaims", e))?;
        let pods = Api::<Pod>::all(self.client())
            .list(&lp)
            .await
            .map_err(|e| self.error("list pods", e))?;
        let nodes = Api::<Node>::all(self.client())
            .list(&lp)
            .await
            .map_err(|e| self.error("list nodes", e))?;
        Ok(Cluster {
            pvs: pvs
                .items
                .iter()
                .filter_map(|p| cluster_pv(p, driver))
                .collect(),
            claims: claims
                .items
                .iter()
                .filter_map(|c| {
                    let m = &c.metadata;
                    Some((
                        format!("{}/{}", m.namespace.as_deref()?, m.name.as_deref()?),
                        m.uid.clone().unwrap_or_default(),
                    ))
                })
                .collect::<HashMap<_, _>>(),
            claims_in_use: pods
                .items
                .iter()
                .flat_map(claims_of)
                .collect::<HashSet<_>>(),
            nodes: nodes
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect(),
        })
    }
}

/// A PV of `driver`, as the rules see it; `None` for other drivers' PVs.
fn cluster_pv(pv: &PersistentVolume, driver: &str) -> Option<ClusterPv> {
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
    let node = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .and_then(|r| {
            r.node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .find(|e| e.key == TOPOLOGY_KEY && e.operator == "In")
                .and_then(|e| e.values.as_ref()?.first().cloned())
        });
    Some(ClusterPv {
        name: pv.metadata.name.clone()?,
        uid: pv.metadata.uid.clone().unwrap_or_default(),
        handle: csi.volume_handle.clone(),
        phase: pv
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into()),
        claim: spec.claim_ref.as_ref().and_then(|c| {
            Some(format!(
                "{}/{}",
                c.namespace.as_deref()?,
                c.name.as_deref()?
            ))
        }),
        node,
        bytes: spec
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
            .unwrap_or(0),
        created_unix: pv
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| u64::try_from(t.0.as_second()).unwrap_or(0)),
    })
}

/// The claims (`namespace/name`) a pod that has not finished uses.
fn claims_of(pod: &Pod) -> Vec<String> {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    let (Some(ns), Some(spec)) = (pod.metadata.namespace.as_deref(), pod.spec.as_ref()) else {
        return Vec::new();
    };
    if finished {
        return Vec::new();
    }
    spec.volumes
        .iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| format!("{ns}/{}", c.claim_name))
        .collect()
}

/// A Kubernetes quantity (`1Gi`, `500M`, `1073741824`) in bytes; `None`
/// for forms a storage size does not take (`1e3`, `500m`).
fn quantity_bytes(q: &str) -> Option<u64> {
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (n, suffix) = q.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// An error with its causes, `a: b: c` (kube-rs wraps the one that says
/// what happened several levels down).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("5M"), Some(5_000_000));
        assert_eq!(quantity_bytes("1048576"), Some(1 << 20));
        assert_eq!(quantity_bytes("500m"), None);
        assert_eq!(quantity_bytes("1e3"), None);
    }

    #[test]
    fn a_pv_of_this_driver_pinned_to_a_node() {
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1", "uid": "u1", "creationTimestamp": "2026-12-01T00:00:00Z"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "csi": {"driver": "hostpath-csi.dev", "volumeHandle": "hdd:abc"},
                "claimRef": {"namespace": "shop", "name": "db"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": TOPOLOGY_KEY, "operator": "In", "values": ["n1"]}]}]}}
            },
            "status": {"phase": "Bound"}
        }))
        .unwrap();
        let got = cluster_pv(&pv, "hostpath-csi.dev").unwrap();
        assert_eq!(got.handle, "hdd:abc");
        assert_eq!(got.claim.as_deref(), Some("shop/db"));
        assert_eq!(got.node.as_deref(), Some("n1"));
        assert_eq!(got.bytes, 1 << 30);
        assert_eq!(got.created_unix, 1_796_083_200);
        assert!(cluster_pv(&pv, "other.dev").is_none());
    }
}
