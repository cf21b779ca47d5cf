//! CSI Node service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::controller::health_to_csi;
use super::{Shared, blocking};
use crate::config::Expansion;
use crate::validate;
use crate::volume::health::StorageStatus;
use csi_proto as csi;
use csi_proto::node_service_capability::{self, rpc};
use csi_proto::volume_usage::Unit;

/// Node service.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// New service over the shared state.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
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
        let req = validate::node_publish_volume(request.get_ref())?;
        blocking(&self.shared, move |v| v.publish(&req)).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = validate::node_unpublish_volume(request.get_ref())?;
        blocking(&self.shared, move |v| v.unpublish(&req)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = validate::node_get_volume_stats(request.get_ref())?;
        let s = blocking(&self.shared, move |v| v.stats(&req)).await?;
        let u = s.usage;
        let mut figures = vec![usage(
            u.available_bytes,
            u.total_bytes,
            u.used_bytes,
            Unit::Bytes,
        )];
        // A raw block volume has no inodes to count (the spec lets the
        // figure be left out when it is not available).
        if u.total_inodes != 0 {
            figures.push(usage(
                u.available_inodes,
                u.total_inodes,
                u.used_inodes,
                Unit::Inodes,
            ));
        }
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage: figures,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_get_volume_health(
        &self,
        request: Request<csi::NodeGetVolumeHealthRequest>,
    ) -> Result<Response<csi::NodeGetVolumeHealthResponse>, Status> {
        let req = validate::node_get_volume_health(request.get_ref())?;
        let h = blocking(&self.shared, move |v| v.volume_health(&req)).await?;
        Ok(Response::new(csi::NodeGetVolumeHealthResponse {
            volume_health: Some(health_to_csi(h)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, err(level = "warn"))]
    async fn node_get_storage_health(
        &self,
        _request: Request<csi::NodeGetStorageHealthRequest>,
    ) -> Result<Response<csi::NodeGetStorageHealthResponse>, Status> {
        use csi::StorageHealthErrorType as T;
        let problems = blocking(&self.shared, |v| Ok(v.storage_health())).await?;
        Ok(Response::new(csi::NodeGetStorageHealthResponse {
            backend_health: problems
                .into_iter()
                .map(
                    |p| csi::node_get_storage_health_response::StorageBackendHealth {
                        status: match p.status {
                            StorageStatus::Degraded => T::StorageDegraded,
                            StorageStatus::Unreachable => T::StorageUnreachable,
                        } as i32,
                        reason: p.reason.to_string(),
                        message: p.message,
                        // A pool's problem affects its volumes of every access
                        // type, so no one capability is named.
                        volume_capability: None,
                    },
                )
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = validate::node_expand_volume(request.get_ref())?;
        // In node mode this call does the whole growth, as csi-resizer only
        // recorded the new size in the PV.
        let grow = self.shared.config.expansion == Expansion::Node;
        let capacity = blocking(&self.shared, move |v| v.node_expand(&req, grow)).await?;
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
            // Removed from CSI 1.13, asked for by the kubelet before it reads
            // NodeGetVolumeStats' condition (see csi.proto's header).
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::GetVolumeHealth,
            rpc::Type::GetStorageHealth,
        ];
        if self.shared.config.node_expands() {
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
