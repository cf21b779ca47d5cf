//! CSI Controller service. Under the external-provisioner's
//! `--node-deployment` mode every node runs it for its own volumes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{CallError, Shared, blocking};
use crate::config::Expansion;
use crate::validate;
use crate::volume::Volume;
use crate::volume::health::{VolumeHealth, VolumeStatus};
use crate::volume::snapshot::Snapshot;
use csi_proto as csi;
use csi_proto::controller_service_capability::{self, rpc};

/// Controller service.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    /// New service over the shared state.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Controller { shared }
    }
}

fn to_csi(v: Volume, topology: BTreeMap<String, String>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: v.capacity_bytes as i64,
        volume_id: v.id,
        volume_context: v.context.into_iter().collect(),
        content_source: v.source.map(|(snapshot, id)| csi::VolumeContentSource {
            r#type: Some(if snapshot {
                csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource { snapshot_id: id },
                )
            } else {
                csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                    volume_id: id,
                })
            }),
        }),
        accessible_topology: vec![csi::Topology {
            segments: topology.into_iter().collect(),
        }],
    }
}

/// A volume's health as CSI 1.13 words it (shared with the node service).
pub(crate) fn health_to_csi(h: VolumeHealth) -> csi::VolumeHealth {
    use csi::VolumeHealthErrorType as T;
    csi::VolumeHealth {
        volume_id: h.id,
        health_statuses: h
            .problems
            .into_iter()
            .map(|p| csi::volume_health::VolumeHealthEntry {
                status: match p.status {
                    VolumeStatus::Degraded => T::Degraded,
                    VolumeStatus::Inaccessible => T::Inaccessible,
                } as i32,
                reason: p.reason.to_string(),
                message: p.message,
            })
            .collect(),
    }
}

pub(crate) fn snapshot_to_csi(s: Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id,
        source_volume_id: s.source_volume_id,
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created.0 as i64,
            nanos: s.created.1 as i32,
        }),
        // Snapshots are complete copies when CreateSnapshot answers.
        ready_to_use: true,
        group_snapshot_id: s.group_id.unwrap_or_default(),
        accessible_topology: vec![csi::Topology {
            segments: s.topology.into_iter().collect(),
        }],
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name), err(level = "warn"))]
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = validate::create_volume(request.get_ref())?;
        let (volume, topology) =
            blocking(&self.shared, move |v| Ok((v.create(&req)?, v.topology()))).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(to_csi(volume, topology)),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        // An id that cannot name a volume of ours names none to delete.
        if let Some(id) = validate::delete_volume(request.get_ref())? {
            blocking(&self.shared, move |v| v.delete(&id)).await?;
        }
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = validate::validate_volume_capabilities(request.get_ref())?;
        let id = req.id.clone();
        let access = blocking(&self.shared, move |v| v.check_exists(&id)).await?;
        let r = request.into_inner();
        Ok(Response::new(match req.verdict(access) {
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Some(why) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why.to_string(),
            },
        }))
    }

    #[tracing::instrument(skip_all, err(level = "warn"))]
    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = validate::list_volumes(request.get_ref())?;
        let (volumes, next_token, topology) = blocking(&self.shared, move |v| {
            let (vols, next) = v.list(&req)?;
            Ok((vols, next, v.topology()))
        })
        .await?;
        let entries = volumes
            .into_iter()
            .map(|vol| csi::list_volumes_response::Entry {
                volume: Some(to_csi(vol, topology.clone())),
                status: None,
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn controller_get_volume_health(
        &self,
        request: Request<csi::ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeHealthResponse>, Status> {
        let req = validate::controller_get_volume_health(request.get_ref())?;
        let h = blocking(&self.shared, move |v| v.volume_health(&req)).await?;
        Ok(Response::new(csi::ControllerGetVolumeHealthResponse {
            volume_health: Some(health_to_csi(h)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, err(level = "warn"))]
    async fn controller_list_volume_health(
        &self,
        request: Request<csi::ControllerListVolumeHealthRequest>,
    ) -> Result<Response<csi::ControllerListVolumeHealthResponse>, Status> {
        let req = validate::list_volume_health(request.get_ref())?;
        let (entries, next_token) =
            blocking(&self.shared, move |v| v.list_volume_health(&req)).await?;
        Ok(Response::new(csi::ControllerListVolumeHealthResponse {
            entries: entries.into_iter().map(health_to_csi).collect(),
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, err(level = "warn"))]
    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = validate::get_capacity(request.get_ref())?;
        let c = blocking(&self.shared, move |v| v.capacity(&req)).await?;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: c.available as i64,
            maximum_volume_size: Some(c.maximum_volume_size as i64),
            minimum_volume_size: (c.minimum_volume_size > 0)
                .then_some(c.minimum_volume_size as i64),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = validate::controller_expand_volume(request.get_ref())?;
        if self.shared.config.expansion == Expansion::Node {
            return Err(CallError::ExpansionOnNode.into());
        }
        let e = blocking(&self.shared, move |v| v.expand(&req)).await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: e.capacity_bytes as i64,
            node_expansion_required: e.node_expansion_required,
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name), err(level = "warn"))]
    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = validate::create_snapshot(request.get_ref())?;
        let s = blocking(&self.shared, move |v| v.create_snapshot(&req)).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot_to_csi(s)),
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot_id = %request.get_ref().snapshot_id), err(level = "warn"))]
    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        // An id that cannot name a snapshot of ours names none to delete.
        if let Some(id) = validate::delete_snapshot(request.get_ref())? {
            blocking(&self.shared, move |v| v.delete_snapshot(&id)).await?;
        }
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, err(level = "warn"))]
    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = validate::list_snapshots(request.get_ref())?;
        let (snapshots, next_token) =
            blocking(&self.shared, move |v| v.list_snapshots(&req)).await?;
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: snapshots
                .into_iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_to_csi(s)),
                })
                .collect(),
            next_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(snapshot_id = %request.get_ref().snapshot_id), err(level = "warn"))]
    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let id = validate::get_snapshot(request.get_ref())?;
        let s = blocking(&self.shared, move |v| v.get_snapshot(&id)).await?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(snapshot_to_csi(s)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let mut types = vec![
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::GetSnapshot,
            rpc::Type::CloneVolume,
            rpc::Type::GetVolumeHealth,
            rpc::Type::ListVolumeHealth,
        ];
        if self.shared.config.controller_expands() {
            types.push(rpc::Type::ExpandVolume);
        }
        let capabilities = types
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }
}
