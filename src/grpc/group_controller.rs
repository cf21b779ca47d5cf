//! CSI GroupController service: group snapshots (several volumes of one
//! pool snapshotted at one point in time; see `volume::group_snapshot`).
//! Like the Controller service, every node serves it for its own volumes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::snapshot_to_csi;
use super::{Shared, blocking};
use crate::validate;
use crate::volume::group_snapshot::GroupSnapshot;
use csi_proto as csi;
use csi_proto::group_controller_service_capability::{self, rpc};

/// GroupController service.
#[derive(Debug, Clone)]
pub(crate) struct GroupController {
    shared: Arc<Shared>,
}

impl GroupController {
    /// New service over the shared state.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        GroupController { shared }
    }
}

fn group_to_csi(g: GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.id,
        snapshots: g.snapshots.into_iter().map(snapshot_to_csi).collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: g.created.0 as i64,
            nanos: g.created.1 as i32,
        }),
        // Every member is complete when the call answers.
        ready_to_use: true,
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupController {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(group_controller_service_capability::Type::Rpc(
                    group_controller_service_capability::Rpc {
                        r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                    },
                )),
            }],
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name), err(level = "warn"))]
    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = validate::create_group_snapshot(request.get_ref())?;
        let g = blocking(&self.shared, move |v| v.create_group_snapshot(&req)).await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_to_csi(g)),
        }))
    }

    #[tracing::instrument(skip_all, fields(group_snapshot_id = %request.get_ref().group_snapshot_id), err(level = "warn"))]
    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.get_ref();
        let group = validate::group_ref(&r.group_snapshot_id, &r.snapshot_ids)?;
        // An id that cannot name a group of ours names none to delete.
        if let Some(id) = group.id {
            let members = group.snapshot_ids;
            blocking(&self.shared, move |v| {
                v.delete_group_snapshot(&id, &members)
            })
            .await?;
        }
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    #[tracing::instrument(skip_all, fields(group_snapshot_id = %request.get_ref().group_snapshot_id), err(level = "warn"))]
    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.get_ref();
        let (id, members) =
            validate::group_ref(&r.group_snapshot_id, &r.snapshot_ids)?.existing()?;
        let g = blocking(&self.shared, move |v| v.get_group_snapshot(&id, &members)).await?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(group_to_csi(g)),
        }))
    }
}
