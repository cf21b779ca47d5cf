//! CSI Node service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Shared, blocking};
use crate::error::Error;
use crate::validate;
use crate::volume::PublishRequest;
use csi_proto as csi;
use csi_proto::node_service_capability::{self, rpc};
use csi_proto::volume_usage::Unit;

/// Node service.
#[derive(Debug, Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// New service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Node { shared }
    }
}

fn usage(available: u64, total: u64, used: u64, unit: Unit) -> csi::VolumeUsage {
    csi::VolumeUsage {
        available: available as i64,
        total: total as i64,
        used: used as i64,
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?.to_string();
        let target = validate::node_path(&r.target_path, "target_path")?;
        let capability = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
        let req = PublishRequest {
            volume_id,
            target,
            capability: validate::capability(capability)?,
            read_only: r.readonly,
        };
        blocking(&self.shared, move |v| v.publish(&req)).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?.to_string();
        let target = validate::node_path(&r.target_path, "target_path")?;
        blocking(&self.shared, move |v| v.unpublish(&volume_id, &target)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?.to_string();
        validate::required(&r.volume_path, "volume_path")?;
        // A path that cannot be valid cannot hold the volume either: the
        // spec's answer for "not at that path" is NOT_FOUND.
        let path = validate::node_path(&r.volume_path, "volume_path")
            .map_err(|e| Error::NotFound(e.to_string()))?;
        let s = blocking(&self.shared, move |v| v.stats(&volume_id, &path)).await?;
        let u = s.usage;
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage: vec![
                usage(u.available_bytes, u.total_bytes, u.used_bytes, Unit::Bytes),
                usage(
                    u.available_inodes,
                    u.total_inodes,
                    u.used_inodes,
                    Unit::Inodes,
                ),
            ],
            volume_condition: Some(csi::VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume_id = validate::volume_id(&r.volume_id)?.to_string();
        validate::required(&r.volume_path, "volume_path")?;
        // As for stats: a path that cannot be valid cannot hold the volume.
        let path = validate::node_path(&r.volume_path, "volume_path")
            .map_err(|e| Error::NotFound(e.to_string()))?;
        validate::capacity_range(r.capacity_range.as_ref())?;
        let capacity = blocking(&self.shared, move |v| v.node_expand(&volume_id, &path)).await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: capacity as i64,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let mut types = vec![
            rpc::Type::GetVolumeStats,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
        ];
        if self.shared.config.expansion_supported() {
            types.push(rpc::Type::ExpandVolume);
        }
        let capabilities = types
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(
                    node_service_capability::Rpc { r#type: t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let c = &self.shared.config;
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            max_volumes_per_node: c.max_volumes_per_node,
            accessible_topology: Some(csi::Topology {
                segments: [(crate::volume::TOPOLOGY_KEY.to_string(), c.node_id.clone())]
                    .into_iter()
                    .collect(),
            }),
        }))
    }
}
