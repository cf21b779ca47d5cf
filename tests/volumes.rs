//! Controller behaviour through the real server: creation, idempotency,
//! pools, paging, capacity, deletion and restarts, checked on disk.

mod common;

use std::collections::HashMap;

use common::{Harness, create_request, mount_cap};
use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn create_makes_a_directory_in_the_chosen_pool_and_is_idempotent() {
    let h = Harness::start().await;
    let name = "pvc-0b5c1e9e-7e0c-4f5e-9a51-2f5f3b1a0c11";
    let mut req = create_request(name, "ssd", 64 * MIB);
    req.parameters.extend([
        (
            "csi.storage.k8s.io/pvc/name".to_string(),
            "data-mysql-0".to_string(),
        ),
        (
            "csi.storage.k8s.io/pvc/namespace".to_string(),
            "shop".to_string(),
        ),
        ("csi.storage.k8s.io/pv/name".to_string(), name.to_string()),
    ]);
    let v = h
        .controller()
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, format!("ssd:{name}"));
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert_eq!(
        v.accessible_topology[0].segments["topology.hostpath-csi.dev/node"],
        common::NODE
    );
    assert_eq!(v.volume_context["pvcName"], "data-mysql-0");
    assert!(h.pool_dir("ssd").join(name).is_dir());
    assert!(!h.pool_dir("hdd").join(name).exists());

    // The claim that owns the directory is on record beside it.
    let record = std::fs::read_to_string(h.pool_dir("ssd").join(format!(".{name}.meta"))).unwrap();
    assert!(
        record.contains("data-mysql-0") && record.contains("shop"),
        "{record}"
    );

    // Same name and arguments: same volume, nothing new on disk.
    let again = h
        .controller()
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);
    assert_eq!(std::fs::read_dir(h.pool_dir("ssd")).unwrap().count(), 2);

    // Same name, incompatible size or another pool: ALREADY_EXISTS.
    let mut bigger = req.clone();
    bigger.capacity_range = Some(csi::CapacityRange {
        required_bytes: 128 * MIB,
        limit_bytes: 0,
    });
    let e = h.controller().create_volume(bigger).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = h
        .controller()
        .create_volume(create_request(name, "hdd", 64 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("ssd"), "{}", e.message());
}

#[tokio::test]
async fn unknown_pool_and_unsupported_access_are_refused_with_reasons() {
    let h = Harness::start().await;
    let e = h
        .controller()
        .create_volume(create_request("v1", "nvme", MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("nvme") && e.message().contains("hdd") && e.message().contains("ssd"),
        "{}",
        e.message()
    );

    let mut multi = create_request("v2", "hdd", MIB);
    multi.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    let e = h.controller().create_volume(multi).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("MULTI_NODE"), "{}", e.message());

    // With two pools and no `pool` parameter, the request must say which.
    let mut none = create_request("v4", "hdd", MIB);
    none.parameters.clear();
    let e = h.controller().create_volume(none).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Nothing was made for any of them.
    for pool in ["hdd", "ssd"] {
        assert_eq!(std::fs::read_dir(h.pool_dir(pool)).unwrap().count(), 0);
    }
}

#[tokio::test]
async fn all_single_node_modes_are_accepted() {
    let h = Harness::start().await;
    for (i, mode) in [
        Mode::SingleNodeWriter,
        Mode::SingleNodeReaderOnly,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeMultiWriter,
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = create_request(&format!("mode-{i}"), "hdd", MIB);
        req.volume_capabilities = vec![mount_cap(mode)];
        h.controller().create_volume(req).await.unwrap();
    }
}

#[tokio::test]
async fn capacity_range_is_honoured_or_refused() {
    let h = Harness::start().await;
    let mut req = create_request("range", "hdd", 0);
    req.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 10 * MIB,
    });
    let v = h
        .controller()
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        v.capacity_bytes > 0 && v.capacity_bytes <= 10 * MIB,
        "{}",
        v.capacity_bytes
    );

    let e = h
        .controller()
        .create_volume(create_request("huge", "hdd", i64::MAX))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(!h.pool_dir("hdd").join("huge").exists());
}

#[tokio::test]
async fn topology_requirements_must_include_this_node() {
    let h = Harness::start().await;
    let mut req = create_request("elsewhere", "hdd", MIB);
    let seg = |node: &str| csi::Topology {
        segments: HashMap::from([(
            "topology.hostpath-csi.dev/node".to_string(),
            node.to_string(),
        )]),
    };
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![seg("other")],
        preferred: vec![],
    });
    let e = h.controller().create_volume(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![seg("other"), seg(common::NODE)],
        preferred: vec![],
    });
    h.controller().create_volume(req).await.unwrap();
}

#[tokio::test]
async fn list_volumes_pages_and_rejects_foreign_tokens() {
    let h = Harness::start().await;
    let mut want = Vec::new();
    for i in 0..7 {
        let pool = if i % 2 == 0 { "hdd" } else { "ssd" };
        want.push(h.create(&format!("vol-{i}"), pool, MIB).await.volume_id);
    }
    want.sort();
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = h
            .controller()
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 3);
        got.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        pages += 1;
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(got, want);

    let e = h
        .controller()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let e = h
        .controller()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn get_capacity_is_per_pool_and_zero_off_node() {
    let h = Harness::start().await;
    let cap = |pool: &str, node: Option<&str>| {
        let mut c = h.controller();
        let req = csi::GetCapacityRequest {
            parameters: HashMap::from([("pool".to_string(), pool.to_string())]),
            accessible_topology: node.map(|n| csi::Topology {
                segments: HashMap::from([(
                    "topology.hostpath-csi.dev/node".to_string(),
                    n.to_string(),
                )]),
            }),
            ..Default::default()
        };
        async move { c.get_capacity(req).await.map(|r| r.into_inner()) }
    };
    let r = cap("hdd", Some(common::NODE)).await.unwrap();
    assert!(r.available_capacity > 0);
    assert!(r.maximum_volume_size.unwrap() > 0);
    assert_eq!(
        cap("hdd", Some("other-node"))
            .await
            .unwrap()
            .available_capacity,
        0
    );
    assert_eq!(
        cap("nvme", None).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn delete_removes_data_and_is_idempotent_but_spares_unrecorded_directories() {
    let h = Harness::start().await;
    let v = h.create("doomed", "hdd", MIB).await;
    let dir = h.pool_dir("hdd").join("doomed");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/file"), b"data").unwrap();
    // A symlink inside the volume must not lead the delete outside it.
    let outside = h.root.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();

    let del = |id: &str| {
        let mut c = h.controller();
        let id = id.to_string();
        async move {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: Default::default(),
            })
            .await
        }
    };
    del(&v.volume_id).await.unwrap();
    assert!(!dir.exists());
    assert_eq!(
        std::fs::read_dir(h.pool_dir("hdd")).unwrap().count(),
        0,
        "no record or parked copy left"
    );
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
    del(&v.volume_id).await.unwrap();
    del("hdd:never-existed").await.unwrap();
    del("garbage").await.unwrap();

    // An administrator's directory (no record) is never deleted.
    let admin = h.pool_dir("hdd").join("static-data");
    std::fs::create_dir(&admin).unwrap();
    std::fs::write(admin.join("db"), b"precious").unwrap();
    del("hdd:static-data").await.unwrap();
    assert_eq!(std::fs::read(admin.join("db")).unwrap(), b"precious");
    assert_eq!(del("").await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_name_taken_by_someone_elses_data_is_not_adopted() {
    let h = Harness::start().await;
    let dir = h.pool_dir("hdd").join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("file"), b"theirs").unwrap();
    let e = h
        .controller()
        .create_volume(create_request("taken", "hdd", MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"theirs");
    assert!(!h.pool_dir("hdd").join(".taken.meta").exists());
}

#[tokio::test]
async fn volumes_survive_a_restart_and_can_still_be_published_listed_and_deleted() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let mut h = Harness::start().await;
    let v = h.create("keeper", "ssd", MIB).await;
    std::fs::write(h.pool_dir("ssd").join("keeper/data"), b"hello").unwrap();
    h.restart().await;

    let listed = h
        .controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().volume_id,
        v.volume_id
    );
    assert_eq!(
        h.controller()
            .create_volume(create_request("keeper", "ssd", MIB))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        v
    );
    let target = h.target("after-restart");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"hello");
    h.unpublish(&v.volume_id, &target).await.unwrap();
    h.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
    assert!(!h.pool_dir("ssd").join("keeper").exists());
}

#[tokio::test]
async fn validate_volume_capabilities_confirms_only_what_is_offered() {
    let h = Harness::start().await;
    let v = h.create("val", "hdd", MIB).await;
    let ask = |id: &str, mode: Mode| {
        let mut c = h.controller();
        let req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.to_string(),
            volume_capabilities: vec![mount_cap(mode)],
            ..Default::default()
        };
        async move {
            c.validate_volume_capabilities(req)
                .await
                .map(|r| r.into_inner())
        }
    };
    assert!(
        ask(&v.volume_id, Mode::SingleNodeWriter)
            .await
            .unwrap()
            .confirmed
            .is_some()
    );
    let r = ask(&v.volume_id, Mode::MultiNodeReaderOnly).await.unwrap();
    assert!(r.confirmed.is_none() && !r.message.is_empty());
    assert_eq!(
        ask("hdd:nope", Mode::SingleNodeWriter)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn identity_reports_name_version_and_capabilities() {
    let h = Harness::start().await;
    let info = h
        .identity()
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "hostpath-csi.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = h
        .identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.len() >= 2);
    let node = h
        .node()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, common::NODE);
    assert_eq!(
        node.accessible_topology.unwrap().segments["topology.hostpath-csi.dev/node"],
        common::NODE
    );
}
