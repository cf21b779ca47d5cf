//! A row of a table, the request it sends, and the one runner.

use csi_proto as csi;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

use crate::common::Harness;

/// One row: what is sent, the code that must come back, and the words the
/// message must contain (all of them). `Code::Ok` rows are hostile
/// requests the spec answers with success (deleting an unknown id, say);
/// for ValidateVolumeCapabilities, a declined capability is `Code::Ok`
/// with the reason as its message.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the row is about, unique across the tables.
    pub name: String,
    /// The request.
    pub request: Req,
    /// The status code the spec asks for.
    pub want_code: Code,
    /// Words the message must contain.
    pub want_message_parts: Vec<String>,
}

impl Case {
    /// A row.
    pub fn new(name: impl Into<String>, request: Req, want_code: Code, parts: &[&str]) -> Self {
        Case {
            name: name.into(),
            request,
            want_code,
            want_message_parts: parts.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// One request of a table.
#[derive(Debug, Clone)]
pub enum Req {
    Create(csi::CreateVolumeRequest),
    Delete(String),
    Validate(csi::ValidateVolumeCapabilitiesRequest),
    List(csi::ListVolumesRequest),
    Capacity(csi::GetCapacityRequest),
    CtrlPublish(csi::ControllerPublishVolumeRequest),
    CtrlUnpublish(csi::ControllerUnpublishVolumeRequest),
    CtrlExpand(csi::ControllerExpandVolumeRequest),
    CtrlGetVolume(csi::ControllerGetVolumeRequest),
    CtrlModify(csi::ControllerModifyVolumeRequest),
    CreateSnapshot(csi::CreateSnapshotRequest),
    DeleteSnapshot(csi::DeleteSnapshotRequest),
    ListSnapshots(csi::ListSnapshotsRequest),
    GetSnapshot(csi::GetSnapshotRequest),
    CreateGroup(csi::CreateVolumeGroupSnapshotRequest),
    DeleteGroup(csi::DeleteVolumeGroupSnapshotRequest),
    GetGroup(csi::GetVolumeGroupSnapshotRequest),
    NodeStage(csi::NodeStageVolumeRequest),
    NodeUnstage(csi::NodeUnstageVolumeRequest),
    Publish(csi::NodePublishVolumeRequest),
    /// Volume id, target path.
    Unpublish(String, String),
    /// Volume id, volume path.
    Stats(String, String),
    NodeExpand(csi::NodeExpandVolumeRequest),
    CtrlHealth(csi::ControllerGetVolumeHealthRequest),
    ListHealth(csi::ControllerListVolumeHealthRequest),
    NodeHealth(csi::NodeGetVolumeHealthRequest),
    StorageHealth(csi::NodeGetStorageHealthRequest),
    /// Hand-encoded bytes sent to a method: for what prost would never
    /// encode itself, like invalid UTF-8 in a string field.
    Raw(&'static str, Vec<u8>),
}

/// Runs every row in order and returns a line per row that did not go as
/// the table says: another code, an empty message for an error, or a
/// message without one of the words.
pub async fn run_table(h: &Harness, table: &[Case]) -> Vec<String> {
    let ch = csi_proto::connect(&h.socket).await.unwrap();
    let mut failures = Vec::new();
    for c in table {
        let (code, msg) = match send(ch.clone(), c.request.clone()).await {
            Ok(()) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        if code != c.want_code {
            failures.push(format!(
                "{}: expected {:?}, got {code:?}: {msg}",
                c.name, c.want_code
            ));
            continue;
        }
        if code != Code::Ok && code != Code::Unimplemented && msg.trim().is_empty() {
            failures.push(format!("{}: empty message", c.name));
        }
        let missing: Vec<&String> = c
            .want_message_parts
            .iter()
            .filter(|m| !msg.contains(m.as_str()))
            .collect();
        if !missing.is_empty() {
            failures.push(format!(
                "{}: message {msg:?} does not mention {missing:?}",
                c.name
            ));
        }
    }
    failures
}

/// Sends one request; a declined ValidateVolumeCapabilities comes back as
/// `Code::Ok` with its reason, so the rows can check the reason.
async fn send(ch: Channel, req: Req) -> Result<(), tonic::Status> {
    use csi::controller_client::ControllerClient as C;
    use csi::group_controller_client::GroupControllerClient as G;
    use csi::node_client::NodeClient as N;
    let (mut c, mut n, mut g) = (C::new(ch.clone()), N::new(ch.clone()), G::new(ch.clone()));
    match req {
        Req::Create(r) => c.create_volume(r).await.map(drop),
        Req::Delete(id) => c
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            })
            .await
            .map(drop),
        Req::Validate(r) => c.validate_volume_capabilities(r).await.and_then(|r| {
            let r = r.into_inner();
            match r.confirmed {
                Some(_) => Ok(()),
                None => Err(tonic::Status::new(Code::Ok, r.message)),
            }
        }),
        Req::List(r) => c.list_volumes(r).await.map(drop),
        Req::Capacity(r) => c.get_capacity(r).await.map(drop),
        Req::CtrlPublish(r) => c.controller_publish_volume(r).await.map(drop),
        Req::CtrlUnpublish(r) => c.controller_unpublish_volume(r).await.map(drop),
        Req::CtrlExpand(r) => c.controller_expand_volume(r).await.map(drop),
        Req::CtrlGetVolume(r) => c.controller_get_volume(r).await.map(drop),
        Req::CtrlModify(r) => c.controller_modify_volume(r).await.map(drop),
        Req::CreateSnapshot(r) => c.create_snapshot(r).await.map(drop),
        Req::DeleteSnapshot(r) => c.delete_snapshot(r).await.map(drop),
        Req::ListSnapshots(r) => c.list_snapshots(r).await.map(drop),
        Req::GetSnapshot(r) => c.get_snapshot(r).await.map(drop),
        Req::CreateGroup(r) => g.create_volume_group_snapshot(r).await.map(drop),
        Req::DeleteGroup(r) => g.delete_volume_group_snapshot(r).await.map(drop),
        Req::GetGroup(r) => g.get_volume_group_snapshot(r).await.map(drop),
        Req::NodeStage(r) => n.node_stage_volume(r).await.map(drop),
        Req::NodeUnstage(r) => n.node_unstage_volume(r).await.map(drop),
        Req::Publish(r) => n.node_publish_volume(r).await.map(drop),
        Req::Unpublish(volume_id, target_path) => n
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id,
                target_path,
            })
            .await
            .map(drop),
        Req::Stats(volume_id, volume_path) => n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id,
                volume_path,
                staging_target_path: String::new(),
            })
            .await
            .map(drop),
        Req::NodeExpand(r) => n.node_expand_volume(r).await.map(drop),
        Req::CtrlHealth(r) => c.controller_get_volume_health(r).await.map(drop),
        Req::ListHealth(r) => c.controller_list_volume_health(r).await.map(drop),
        Req::NodeHealth(r) => n.node_get_volume_health(r).await.map(drop),
        Req::StorageHealth(r) => n.node_get_storage_health(r).await.map(drop),
        Req::Raw(method, bytes) => raw_call(ch, method, bytes).await,
    }
}

/// Sends `bytes` as the body of a unary call to `method` and ignores the
/// answer's body.
async fn raw_call(ch: Channel, method: &'static str, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(RawBytes(bytes)),
        PathAndQuery::from_static(method),
        tonic_prost::ProstCodec::<RawBytes, Empty>::default(),
    )
    .await
    .map(drop)
}

/// A message that encodes as exactly the bytes it holds.
#[derive(Debug, Clone, Default)]
struct RawBytes(Vec<u8>);

impl prost::Message for RawBytes {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Any answer, its fields skipped.
#[derive(Debug, Clone, Default)]
struct Empty;

impl prost::Message for Empty {
    fn encode_raw(&self, _buf: &mut impl prost::bytes::BufMut) {}
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        0
    }
    fn clear(&mut self) {}
}
