//! Every CSI request the robustness tests send, as one trait: its RPC's
//! name and how it is sent. A test's retry loop is then written once, for
//! any request, instead of once per call with its own client and closure.

use std::future::Future;

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::{Response, Status};

/// A CSI request: sent on a channel, answered with `Reply`.
pub trait Rpc: Clone + Send + 'static {
    /// The answer.
    type Reply;
    /// The RPC's name (`CreateVolume`), for messages and counts.
    const NAME: &'static str;
    /// Sends it on `ch`.
    fn send(
        self,
        ch: Channel,
    ) -> impl Future<Output = Result<Response<Self::Reply>, Status>> + Send;
}

macro_rules! rpcs {
    ($($name:ident: $req:ident -> $reply:ident by $client:ident::$method:ident;)*) => {$(
        impl Rpc for csi::$req {
            type Reply = csi::$reply;
            const NAME: &'static str = stringify!($name);
            fn send(
                self,
                ch: Channel,
            ) -> impl Future<Output = Result<Response<Self::Reply>, Status>> + Send {
                async move { $client::new(ch).$method(self).await }
            }
        }
    )*};
}

rpcs! {
    CreateVolume: CreateVolumeRequest -> CreateVolumeResponse
        by ControllerClient::create_volume;
    DeleteVolume: DeleteVolumeRequest -> DeleteVolumeResponse
        by ControllerClient::delete_volume;
    ControllerExpandVolume: ControllerExpandVolumeRequest -> ControllerExpandVolumeResponse
        by ControllerClient::controller_expand_volume;
    ValidateVolumeCapabilities:
        ValidateVolumeCapabilitiesRequest -> ValidateVolumeCapabilitiesResponse
        by ControllerClient::validate_volume_capabilities;
    ListVolumes: ListVolumesRequest -> ListVolumesResponse by ControllerClient::list_volumes;
    GetCapacity: GetCapacityRequest -> GetCapacityResponse by ControllerClient::get_capacity;
    NodePublishVolume: NodePublishVolumeRequest -> NodePublishVolumeResponse
        by NodeClient::node_publish_volume;
    NodeUnpublishVolume: NodeUnpublishVolumeRequest -> NodeUnpublishVolumeResponse
        by NodeClient::node_unpublish_volume;
    NodeGetVolumeStats: NodeGetVolumeStatsRequest -> NodeGetVolumeStatsResponse
        by NodeClient::node_get_volume_stats;
    NodeExpandVolume: NodeExpandVolumeRequest -> NodeExpandVolumeResponse
        by NodeClient::node_expand_volume;
    Probe: ProbeRequest -> ProbeResponse by IdentityClient::probe;
}
