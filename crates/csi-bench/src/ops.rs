//! One CSI call each, timed and bounded, with what it leaves behind noted
//! in the ledger so cleanup can undo it whatever happens next.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};

use crate::driver::{Caps, Clients, bounded};
use crate::error::Error;
use crate::lock;

/// What the bench has made in the driver and not yet undone.
#[derive(Debug, Default)]
pub struct Ledger {
    /// CreateVolume names sent, with the id once known. A name without an
    /// id may or may not exist (the call failed or timed out).
    pub volumes: BTreeMap<String, Option<String>>,
    /// Volume ids ControllerPublished to the node.
    pub controller_published: BTreeMap<String, ()>,
    /// Staging path -> volume id.
    pub staged: BTreeMap<PathBuf, String>,
    /// Target path -> volume id.
    pub published: BTreeMap<PathBuf, String>,
    /// The content source of each volume in `volumes` made from one, for
    /// asking again by name.
    pub sources: BTreeMap<String, csi::volume_content_source::Type>,
    /// CreateSnapshot names sent, with their source volume's id and the
    /// snapshot's id once known.
    pub snapshots: BTreeMap<String, (String, Option<String>)>,
}

/// Everything a call needs: clients, capabilities, limits, the ledger.
#[derive(Debug)]
pub struct Ctx {
    /// The driver's clients.
    pub clients: Mutex<Clients>,
    /// What it advertises.
    pub caps: Caps,
    /// Limit for one call.
    pub rpc_timeout: Duration,
    /// When every scenario must stop.
    pub deadline: Instant,
    /// Set on Ctrl-C.
    pub stop: AtomicBool,
    /// Requested size in bytes.
    pub size: i64,
    /// StorageClass-like parameters.
    pub parameters: HashMap<String, String>,
    /// What is left to undo.
    pub ledger: Mutex<Ledger>,
}

/// A call's latency and its outcome.
pub type Timed<T> = (Duration, Result<T, Error>);

async fn timed<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Timed<T> {
    let t = Instant::now();
    let r = bounded(timeout, fut).await;
    (t.elapsed(), r)
}

/// The capability the bench asks for: a mounted filesystem, one node
/// writing.
pub fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

impl Ctx {
    /// Whether scenarios must stop now (Ctrl-C or the time limit).
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// Replaces the connection (after the driver was restarted).
    pub fn reconnect(&self, clients: Clients) {
        *lock(&self.clients) = clients;
    }

    fn c(&self) -> Clients {
        lock(&self.clients).clone()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Probe.
    pub async fn probe(&self) -> Timed<csi::ProbeResponse> {
        timed(
            self.rpc_timeout,
            self.c().identity.probe(csi::ProbeRequest {}),
        )
        .await
    }

    /// CreateVolume; returns the volume id.
    pub async fn create(&self, name: &str) -> Timed<String> {
        self.create_from(name, None).await
    }

    /// CreateVolume with the data of `source` (a snapshot or a volume);
    /// returns the volume id.
    pub async fn create_from(
        &self,
        name: &str,
        source: Option<csi::volume_content_source::Type>,
    ) -> Timed<String> {
        {
            let mut l = self.ledger();
            l.volumes.entry(name.to_string()).or_insert(None);
            if let Some(t) = &source {
                l.sources.insert(name.to_string(), t.clone());
            }
        }
        let req = csi::CreateVolumeRequest {
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            name: name.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability()],
            parameters: self.parameters.clone(),
            accessibility_requirements: self.caps.topology.as_ref().map(|t| {
                let topo = csi::Topology {
                    segments: t.clone(),
                };
                csi::TopologyRequirement {
                    requisite: vec![topo.clone()],
                    preferred: vec![topo],
                }
            }),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().controller.create_volume(req)).await;
        let r = r.and_then(|resp| resp.volume.map(|v| v.volume_id).ok_or(Error::NoVolume));
        if let Ok(id) = &r {
            self.ledger()
                .volumes
                .insert(name.to_string(), Some(id.clone()));
        }
        (d, r)
    }

    /// DeleteVolume of a volume the bench created as `name`.
    pub async fn delete(&self, name: &str, id: &str) -> Timed<()> {
        let req = csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().controller.delete_volume(req)).await;
        if r.is_ok() {
            self.ledger().volumes.remove(name);
        }
        (d, r.map(|_| ()))
    }

    /// CreateSnapshot of the volume `source`; returns the snapshot id.
    pub async fn create_snapshot(&self, name: &str, source: &str) -> Timed<String> {
        self.ledger()
            .snapshots
            .entry(name.to_string())
            .or_insert((source.to_string(), None));
        let req = csi::CreateSnapshotRequest {
            name: name.to_string(),
            source_volume_id: source.to_string(),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().controller.create_snapshot(req)).await;
        let r = r.and_then(|resp| {
            resp.snapshot
                .map(|s| s.snapshot_id)
                .ok_or(Error::NoSnapshot)
        });
        if let Ok(id) = &r {
            self.ledger()
                .snapshots
                .insert(name.to_string(), (source.to_string(), Some(id.clone())));
        }
        (d, r)
    }

    /// DeleteSnapshot of a snapshot the bench created as `name`.
    pub async fn delete_snapshot(&self, name: &str, id: &str) -> Timed<()> {
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().controller.delete_snapshot(req)).await;
        if r.is_ok() {
            self.ledger().snapshots.remove(name);
        }
        (d, r.map(|_| ()))
    }

    /// ControllerPublishVolume to this node; returns the publish context.
    pub async fn controller_publish(&self, id: &str) -> Timed<HashMap<String, String>> {
        self.ledger()
            .controller_published
            .insert(id.to_string(), ());
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: id.to_string(),
            node_id: self.caps.node_id.clone(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        };
        let (d, r) = timed(
            self.rpc_timeout,
            self.c().controller.controller_publish_volume(req),
        )
        .await;
        (d, r.map(|x| x.publish_context))
    }

    /// ControllerUnpublishVolume from this node.
    pub async fn controller_unpublish(&self, id: &str) -> Timed<()> {
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: id.to_string(),
            node_id: self.caps.node_id.clone(),
            ..Default::default()
        };
        let (d, r) = timed(
            self.rpc_timeout,
            self.c().controller.controller_unpublish_volume(req),
        )
        .await;
        if r.is_ok() {
            self.ledger().controller_published.remove(id);
        }
        (d, r.map(|_| ()))
    }

    /// NodeStageVolume at `staging` (which the caller created, as a CO
    /// does).
    pub async fn stage(
        &self,
        id: &str,
        staging: &Path,
        publish_context: &HashMap<String, String>,
    ) -> Timed<()> {
        self.ledger()
            .staged
            .insert(staging.to_path_buf(), id.to_string());
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.to_string(),
            publish_context: publish_context.clone(),
            staging_target_path: staging.to_string_lossy().into_owned(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().node.node_stage_volume(req)).await;
        (d, r.map(|_| ()))
    }

    /// NodeUnstageVolume.
    pub async fn unstage(&self, id: &str, staging: &Path) -> Timed<()> {
        let req = csi::NodeUnstageVolumeRequest {
            volume_id: id.to_string(),
            staging_target_path: staging.to_string_lossy().into_owned(),
        };
        let (d, r) = timed(self.rpc_timeout, self.c().node.node_unstage_volume(req)).await;
        if r.is_ok() {
            self.ledger().staged.remove(staging);
        }
        (d, r.map(|_| ()))
    }

    /// NodePublishVolume at `target`.
    pub async fn publish(
        &self,
        id: &str,
        target: &Path,
        staging: Option<&Path>,
        publish_context: &HashMap<String, String>,
    ) -> Timed<()> {
        self.ledger()
            .published
            .insert(target.to_path_buf(), id.to_string());
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.to_string(),
            publish_context: publish_context.clone(),
            staging_target_path: staging
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            target_path: target.to_string_lossy().into_owned(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        };
        let (d, r) = timed(self.rpc_timeout, self.c().node.node_publish_volume(req)).await;
        (d, r.map(|_| ()))
    }

    /// NodeUnpublishVolume.
    pub async fn unpublish(&self, id: &str, target: &Path) -> Timed<()> {
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: id.to_string(),
            target_path: target.to_string_lossy().into_owned(),
        };
        let (d, r) = timed(self.rpc_timeout, self.c().node.node_unpublish_volume(req)).await;
        if r.is_ok() {
            self.ledger().published.remove(target);
        }
        (d, r.map(|_| ()))
    }

    /// NodeGetVolumeStats at the path the volume is published at.
    pub async fn stats(&self, id: &str, path: &Path) -> Timed<()> {
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path.to_string_lossy().into_owned(),
            staging_target_path: String::new(),
        };
        let (d, r) = timed(self.rpc_timeout, self.c().node.node_get_volume_stats(req)).await;
        (d, r.map(|_| ()))
    }

    /// One ListVolumes page; returns the entries and the next token.
    pub async fn list_page(&self, token: &str, max: i32) -> Timed<(usize, String)> {
        let req = csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token.to_string(),
        };
        let (d, r) = timed(self.rpc_timeout, self.c().controller.list_volumes(req)).await;
        (d, r.map(|x| (x.entries.len(), x.next_token)))
    }

    /// Undoes everything in the ledger, in the order a CO would: unpublish,
    /// unstage, controller-unpublish, delete volumes and snapshots. Stops at `until`. Returns the
    /// problems met.
    pub async fn undo_all(&self, until: Instant) -> Vec<String> {
        let mut problems = Vec::new();
        let (published, staged, cpub, volumes, sources, snapshots) = {
            let l = self.ledger();
            (
                l.published.clone(),
                l.staged.clone(),
                l.controller_published.keys().cloned().collect::<Vec<_>>(),
                l.volumes.clone(),
                l.sources.clone(),
                l.snapshots.clone(),
            )
        };
        let late = |problems: &mut Vec<String>| {
            if Instant::now() >= until {
                problems.push("cleanup ran out of time; see the ledger above".into());
                true
            } else {
                false
            }
        };
        for (target, id) in &published {
            if late(&mut problems) {
                return problems;
            }
            if let (_, Err(e)) = self.unpublish(id, target).await {
                problems.push(format!(
                    "NodeUnpublishVolume {id} {}: {e}",
                    target.display()
                ));
            }
        }
        for (staging, id) in &staged {
            if late(&mut problems) {
                return problems;
            }
            if let (_, Err(e)) = self.unstage(id, staging).await {
                problems.push(format!("NodeUnstageVolume {id} {}: {e}", staging.display()));
            }
        }
        for id in &cpub {
            if late(&mut problems) {
                return problems;
            }
            if let (_, Err(e)) = self.controller_unpublish(id).await {
                problems.push(format!("ControllerUnpublishVolume {id}: {e}"));
            }
        }
        // A name whose create never answered may exist: creates are
        // idempotent by name, so asking again yields its id. All are asked
        // before anything is deleted, while every source still exists.
        let mut volume_ids = Vec::new();
        for (name, id) in &volumes {
            if late(&mut problems) {
                return problems;
            }
            match id {
                Some(id) => volume_ids.push((name.clone(), id.clone())),
                None => match self.create_from(name, sources.get(name).cloned()).await {
                    (_, Ok(id)) => volume_ids.push((name.clone(), id)),
                    (_, Err(_)) => drop(self.ledger().volumes.remove(name)),
                },
            }
        }
        let mut snapshot_ids = Vec::new();
        for (name, (source, id)) in &snapshots {
            if late(&mut problems) {
                return problems;
            }
            match id {
                Some(id) => snapshot_ids.push((name.clone(), id.clone())),
                None => match self.create_snapshot(name, source).await {
                    (_, Ok(id)) => snapshot_ids.push((name.clone(), id)),
                    (_, Err(_)) => drop(self.ledger().snapshots.remove(name)),
                },
            }
        }
        // Volumes, then snapshots, then the volumes that failed once more:
        // some drivers refuse to delete a volume that has snapshots, others
        // a snapshot that a volume was restored from.
        let mut retry = Vec::new();
        for (name, id) in volume_ids {
            if late(&mut problems) {
                return problems;
            }
            if self.delete(&name, &id).await.1.is_err() {
                retry.push((name, id));
            }
        }
        for (name, id) in &snapshot_ids {
            if late(&mut problems) {
                return problems;
            }
            if let (_, Err(e)) = self.delete_snapshot(name, id).await {
                problems.push(format!("DeleteSnapshot {id} ({name}): {e}"));
            }
        }
        for (name, id) in &retry {
            if late(&mut problems) {
                return problems;
            }
            if let (_, Err(e)) = self.delete(name, id).await {
                problems.push(format!("DeleteVolume {id} ({name}): {e}"));
            }
        }
        problems
    }
}
