//! `csi-bench` against a driver that stages and attaches, which
//! ours does not: does the bench follow what a driver advertises?
//!
//! TEST DOUBLE: the driver here is a small in-test CSI server, not a real
//! driver, because no real staging driver can run on this machine: the Go
//! module proxy refuses `csi-driver-host-path/cmd/hostpathplugin`
//! (v1.14.1-v1.17.0: "403 Forbidden, This module version is not
//! available"), and csi-test v3.1.1, v4.4.0 and v5.6.0 ship no mock driver
//! command. It keeps no storage; it holds every volume's state and refuses,
//! as a strict driver would, any call out of the CSI order (stage before
//! attach, publish before stage, unstage while published, detach while
//! staged, delete while attached), so a bench that gets the order wrong
//! sees errors and exits non-zero.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use csi_proto as csi;
use csi_proto::controller_service_capability::rpc::Type as CRpc;
use csi_proto::node_service_capability::rpc::Type as NRpc;
use serde_json::Value;
use tonic::{Request, Response, Status};

const BIN: &str = env!("CARGO_BIN_EXE_csi-bench");
const NODE: &str = "double-node";

#[derive(Debug, Default)]
struct Vol {
    attached: bool,
    staged_at: Option<String>,
    published_at: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    vols: HashMap<String, Vol>,
    /// (call, volume id) in the order they arrived.
    log: Vec<(&'static str, String)>,
    /// Topology requirements CreateVolume carried.
    requisite: Vec<HashMap<String, String>>,
}

#[derive(Debug, Clone, Default)]
struct Double(Arc<Mutex<State>>);

fn refuse(why: impl Into<String>) -> Status {
    Status::failed_precondition(why.into())
}

impl Double {
    /// Runs `f` on a known volume, logging the call.
    fn with<T>(
        &self,
        call: &'static str,
        id: &str,
        f: impl FnOnce(&mut Vol) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let mut s = self.0.lock().unwrap();
        s.log.push((call, id.to_string()));
        let v = s
            .vols
            .get_mut(id)
            .ok_or_else(|| Status::not_found(id.to_string()))?;
        f(v).map(Response::new)
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Double {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: "staging.double.test".into(),
            vendor_version: "0".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{Service, Type, service};
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Double {
    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type};
        let capabilities = [CRpc::CreateDeleteVolume, CRpc::PublishUnpublishVolume]
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = format!("vol-{}", r.name);
        let mut s = self.0.lock().unwrap();
        s.log.push(("CreateVolume", id.clone()));
        if let Some(a) = r.accessibility_requirements {
            s.requisite
                .extend(a.requisite.into_iter().map(|t| t.segments));
        }
        s.vols.entry(id.clone()).or_default();
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(csi::Volume {
                volume_id: id,
                capacity_bytes: r.capacity_range.map_or(0, |c| c.required_bytes),
                ..Default::default()
            }),
        }))
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = r.into_inner().volume_id;
        let mut s = self.0.lock().unwrap();
        s.log.push(("DeleteVolume", id.clone()));
        if s.vols.get(&id).is_some_and(|v| v.attached) {
            return Err(refuse("delete of a volume still attached"));
        }
        s.vols.remove(&id);
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = r.into_inner();
        if r.node_id != NODE {
            return Err(Status::not_found(format!("node {:?}", r.node_id)));
        }
        self.with("ControllerPublishVolume", &r.volume_id, |v| {
            v.attached = true;
            Ok(csi::ControllerPublishVolumeResponse {
                publish_context: [("device".to_string(), r.volume_id.clone())].into(),
            })
        })
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        self.with("ControllerUnpublishVolume", &r.volume_id, |v| {
            if v.staged_at.is_some() {
                return Err(refuse("detach of a volume still staged"));
            }
            v.attached = false;
            Ok(csi::ControllerUnpublishVolumeResponse {})
        })
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Double {
    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type};
        let capabilities = [NRpc::StageUnstageVolume, NRpc::GetVolumeStats]
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: NODE.into(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: [("zone".to_string(), "z1".to_string())].into(),
            }),
        }))
    }

    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        self.with("NodeStageVolume", &r.volume_id, |v| {
            if !v.attached {
                return Err(refuse("stage before attach"));
            }
            if r.publish_context.get("device") != Some(&r.volume_id) {
                return Err(refuse("stage without the attach's publish context"));
            }
            // The CO makes the staging directory.
            if !PathBuf::from(&r.staging_target_path).is_dir() {
                return Err(refuse("staging directory missing"));
            }
            v.staged_at = Some(r.staging_target_path.clone());
            Ok(csi::NodeStageVolumeResponse {})
        })
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        self.with("NodeUnstageVolume", &r.volume_id, |v| {
            if v.published_at.is_some() {
                return Err(refuse("unstage of a volume still published"));
            }
            if v.staged_at.as_deref() != Some(r.staging_target_path.as_str()) {
                return Err(refuse("unstage at another path than the stage"));
            }
            v.staged_at = None;
            Ok(csi::NodeUnstageVolumeResponse {})
        })
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        self.with("NodePublishVolume", &r.volume_id, |v| {
            if v.staged_at.as_deref() != Some(r.staging_target_path.as_str()) {
                return Err(refuse("publish without the staging path of the stage"));
            }
            if r.publish_context.get("device") != Some(&r.volume_id) {
                return Err(refuse("publish without the attach's publish context"));
            }
            v.published_at = Some(r.target_path.clone());
            Ok(csi::NodePublishVolumeResponse {})
        })
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        self.with("NodeUnpublishVolume", &r.volume_id, |v| {
            if v.published_at.as_deref() != Some(r.target_path.as_str()) {
                return Err(refuse("unpublish of a target that was not published"));
            }
            v.published_at = None;
            Ok(csi::NodeUnpublishVolumeResponse {})
        })
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        self.with("NodeGetVolumeStats", &r.volume_id, |v| {
            if v.published_at.as_deref() != Some(r.volume_path.as_str()) {
                return Err(refuse("stats at a path the volume is not published at"));
            }
            Ok(csi::NodeGetVolumeStatsResponse::default())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_attaches_and_stages_in_csi_order_where_the_driver_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("double.sock");
    let double = Double::default();
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::identity_server::IdentityServer::new(double.clone()))
            .add_service(csi::controller_server::ControllerServer::new(
                double.clone(),
            ))
            .add_service(csi::node_server::NodeServer::new(double.clone()))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    let endpoint = format!("unix://{}", sock.display());
    let work = dir.path().join("work");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["--endpoint", &endpoint, "--format", "json"])
            .args(["--scenario", "publish,stats", "--count", "4"])
            .args(["--publish-count", "3", "--stats-rounds", "2"])
            .arg("--workdir")
            .arg(&work)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{}\n{lines:#?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let caps = &lines[0]["info"]["capabilities"];
    assert_eq!(caps["stage_unstage"], true, "{caps}");
    assert_eq!(caps["controller_publish"], true, "{caps}");
    for (op, count) in [
        ("ControllerPublishVolume", 3),
        ("NodeStageVolume", 3),
        ("NodePublishVolume", 3),
        ("NodeGetVolumeStats", 6),
        ("NodeUnpublishVolume", 3),
        ("NodeUnstageVolume", 3),
        ("ControllerUnpublishVolume", 3),
    ] {
        let row = lines
            .iter()
            .find(|v| v["type"] == "op" && v["op"] == op)
            .unwrap_or_else(|| panic!("no row {op}: {lines:#?}"));
        assert_eq!(
            (row["count"].clone(), row["errors"].clone()),
            (count.into(), 0.into()),
            "{row}"
        );
    }

    let s = double.0.lock().unwrap();
    // Everything undone: no volume left, so none attached, staged or
    // published either.
    assert!(s.vols.is_empty(), "{:?}", s.vols);
    // Each published volume went through the whole CSI order, once.
    let order = [
        "CreateVolume",
        "ControllerPublishVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "ControllerUnpublishVolume",
        "DeleteVolume",
    ];
    let mut full = 0;
    let ids: std::collections::BTreeSet<&String> = s.log.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 4, "{:?}", s.log);
    for id in ids {
        let calls: Vec<&str> = s
            .log
            .iter()
            .filter(|(c, i)| i == id && *c != "NodeGetVolumeStats")
            .map(|(c, _)| *c)
            .collect();
        if calls.len() == order.len() {
            assert_eq!(calls, order, "{id}");
            full += 1;
        } else {
            assert_eq!(calls, ["CreateVolume", "DeleteVolume"], "{id}");
        }
    }
    assert_eq!(full, 3, "{:?}", s.log);
    // Creates carried the node's topology from NodeGetInfo.
    assert_eq!(s.requisite.len(), 4, "{:?}", s.requisite);
    assert!(
        s.requisite
            .iter()
            .all(|t| t.get("zone").map(String::as_str) == Some("z1"))
    );
    // The staging and target directories the bench made are gone.
    assert!(!dir.path().join("work").exists());
}
