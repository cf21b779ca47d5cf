//! CSI Controller service. Under the external-provisioner's
//! `--node-deployment` mode every node runs it for its own volumes.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{Shared, blocking};
use crate::error::Error;
use crate::validate;
use crate::volume::CreateRequest;
use crate::volume::Volume;
use csi_proto as csi;
use csi_proto::controller_service_capability::{self, rpc};

/// Controller service.
#[derive(Debug, Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

impl Controller {
    /// New service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Controller { shared }
    }
}

fn to_csi(v: Volume, topology: BTreeMap<String, String>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: v.capacity_bytes as i64,
        volume_id: v.id,
        volume_context: v.context.into_iter().collect(),
        content_source: None,
        accessible_topology: vec![csi::Topology {
            segments: topology.into_iter().collect(),
        }],
    }
}

fn segments(t: &csi::Topology) -> BTreeMap<String, String> {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name), err(level = "warn"))]
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = validate::volume_name(&r.name)?.to_string();
        let capabilities = validate::capabilities(&r.volume_capabilities)?;
        let capacity = validate::capacity_range(r.capacity_range.as_ref())?;
        if r.volume_content_source.is_some() {
            return Err(Error::InvalidArgument(
                "volume_content_source: creating volumes from snapshots or other volumes is not supported"
                    .into(),
            )
            .into());
        }
        if !r.mutable_parameters.is_empty() {
            return Err(Error::InvalidArgument(
                "mutable_parameters are not supported: this driver does not offer MODIFY_VOLUME"
                    .into(),
            )
            .into());
        }
        let requisite = r
            .accessibility_requirements
            .as_ref()
            .map(|a| a.requisite.iter().map(segments).collect())
            .unwrap_or_default();
        let req = CreateRequest {
            name,
            capacity,
            capabilities,
            parameters: validate::parameters(&r.parameters),
            requisite,
        };
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
        let id = validate::volume_id(&request.get_ref().volume_id)?.to_string();
        blocking(&self.shared, move |v| v.delete(&id)).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume_id = %request.get_ref().volume_id), err(level = "warn"))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = validate::volume_id(&r.volume_id)?.to_string();
        let caps = validate::capabilities(&r.volume_capabilities)?;
        let verdict = blocking(&self.shared, move |v| v.validate(&id, &caps)).await?;
        Ok(Response::new(match verdict {
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
                message: why,
            },
        }))
    }

    #[tracing::instrument(skip_all, err(level = "warn"))]
    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let (volumes, next_token, topology) = blocking(&self.shared, move |v| {
            let (vols, next) = v.list(&r.starting_token, r.max_entries)?;
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

    #[tracing::instrument(skip_all, err(level = "warn"))]
    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let caps = r
            .volume_capabilities
            .iter()
            .map(validate::capability)
            .collect::<Result<Vec<_>, _>>()?;
        let params = validate::parameters(&r.parameters);
        let topology = r.accessible_topology.as_ref().map(segments);
        let c = blocking(&self.shared, move |v| {
            v.capacity(&params, &caps, topology.as_ref())
        })
        .await?;
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
        let r = request.into_inner();
        let id = validate::volume_id(&r.volume_id)?.to_string();
        let range = validate::capacity_range(r.capacity_range.as_ref())?;
        if let Some(c) = r.volume_capability.as_ref() {
            validate::capability(c)?;
        }
        let e = blocking(&self.shared, move |v| v.expand(&id, range)).await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: e.capacity_bytes as i64,
            node_expansion_required: e.node_expansion_required,
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
        ];
        if self.shared.config.expansion_supported() {
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
