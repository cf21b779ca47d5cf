//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Shared;
use csi_proto as csi;
use csi_proto::plugin_capability::{self, service, volume_expansion};

/// Identity service.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    shared: Arc<Shared>,
}

impl Identity {
    /// New service over the shared state.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Identity { shared }
    }
}

fn service_cap(t: service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.shared.config.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![
            service_cap(service::Type::ControllerService),
            service_cap(service::Type::VolumeAccessibilityConstraints),
            service_cap(service::Type::GroupControllerService),
            // Snapshots are copies on their volume's node, usable there
            // only; each Snapshot says so in its accessible_topology.
            service_cap(service::Type::SnapshotAccessibilityConstraints),
        ];
        let c = &self.shared.config;
        if c.controller_expands() || c.node_expands() {
            capabilities.push(csi::PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            });
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    #[tracing::instrument(level = "trace", skip_all)]
    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse {
            ready: Some(self.shared.volumes.get().is_some()),
        }))
    }
}
