//! Calls this driver does not offer answer UNIMPLEMENTED, whatever they
//! carry (ids forged to point outside a pool, symlinked paths).

use csi_proto as csi;
use tonic::Code::Unimplemented;

use crate::case::{Case, Req};
use crate::fixture::{Fixture, s};

fn row(call: &str, request: Req) -> Case {
    Case::new(format!("{call}: not offered"), request, Unimplemented, &[])
}

pub fn cases(f: &Fixture) -> Vec<Case> {
    vec![
        row(
            "ControllerPublishVolume",
            Req::CtrlPublish(csi::ControllerPublishVolumeRequest {
                volume_id: f.alpha.clone(),
                node_id: "n".into(),
                ..Default::default()
            }),
        ),
        row(
            "ControllerUnpublishVolume",
            Req::CtrlUnpublish(csi::ControllerUnpublishVolumeRequest {
                volume_id: "hdd:../../etc".into(),
                ..Default::default()
            }),
        ),
        row(
            "ControllerExpandVolume",
            Req::CtrlExpand(csi::ControllerExpandVolumeRequest {
                volume_id: f.alpha.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: i64::MAX,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        ),
        row(
            "ControllerGetVolume",
            Req::CtrlGetVolume(csi::ControllerGetVolumeRequest {
                volume_id: "hdd:..".into(),
            }),
        ),
        row(
            "ControllerModifyVolume",
            Req::CtrlModify(csi::ControllerModifyVolumeRequest {
                volume_id: f.alpha.clone(),
                ..Default::default()
            }),
        ),
        row(
            "NodeStageVolume",
            Req::NodeStage(csi::NodeStageVolumeRequest {
                volume_id: f.alpha.clone(),
                staging_target_path: f.to_canary.clone(),
                ..Default::default()
            }),
        ),
        row(
            "NodeUnstageVolume",
            Req::NodeUnstage(csi::NodeUnstageVolumeRequest {
                volume_id: f.alpha.clone(),
                staging_target_path: s(&f.canary),
            }),
        ),
    ]
}
