//! Snapshots are usable only on their node (CSI 1.13's
//! SNAPSHOT_ACCESSIBILITY_CONSTRAINTS): the plugin says so, every snapshot
//! the driver hands out (CreateSnapshot, ListSnapshots, GetSnapshot, a
//! group snapshot's members) carries this node's topology segment, the same
//! as NodeGetInfo's, and a CreateSnapshot whose requisite names only other
//! places is refused with RESOURCE_EXHAUSTED before anything is made. A
//! dir pool for the plain snapshots and an ext4 image pool for the group
//! (a dir pool refuses group snapshots); needs root for the image's loop
//! mount.

mod common;
mod pools;

use std::collections::HashMap;

use common::{Harness, assert_refused, create_request};
use csi_proto as csi;
use hostpath_csi::config::{PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

fn topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([("topology.hostpath-csi.dev/node".into(), node.into())]),
    }
}

fn snapshot_request(name: &str, source: &str, requisite: &[&str]) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        accessibility_requirements: (!requisite.is_empty()).then(|| csi::TopologyRequirement {
            requisite: requisite.iter().map(|n| topology(n)).collect(),
            preferred: vec![],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn snapshots_are_usable_on_their_node_only() {
    if !common::root_or_skip("the group snapshot's image pool is loop-mounted") {
        return;
    }
    let (root, _cleanup) = root();
    let pools = vec![
        PoolConfig::of_kind("d", root.path().join("pools/d"), PoolKind::Dir),
        PoolConfig::of_kind("i", root.path().join("pools/i"), PoolKind::Image),
    ];
    let h = Harness::with_pool_configs(root, pools).await;

    let caps = h
        .identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::plugin_capability::{Type, service};
    assert!(
        caps.iter()
            .any(|c| matches!(&c.r#type, Some(Type::Service(s))
            if s.r#type == service::Type::SnapshotAccessibilityConstraints as i32)),
        "{caps:?}"
    );
    let ours = h
        .node()
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .accessible_topology
        .unwrap();
    assert_eq!(ours, topology(common::NODE));

    let vol = h.create_volume(create_request("v", "d", MIB)).await;
    std::fs::write(h.pool_dir("d").join("v/data"), b"kept").unwrap();
    let snapshots = h.pool_dir("d").join(".snapshots");
    let before = std::fs::read_dir(&snapshots).map_or(0, |d| d.count());

    // A requisite of other nodes only: refused, nothing made.
    let e = h
        .controller()
        .create_snapshot(snapshot_request(
            "s-elsewhere",
            &vol.volume_id,
            &["node-b", "node-c"],
        ))
        .await
        .unwrap_err();
    assert_refused(&e, Code::ResourceExhausted, "usable only there");
    assert!(e.message().contains(common::NODE), "{e:?}");
    assert_eq!(
        std::fs::read_dir(&snapshots).map_or(0, |d| d.count()),
        before,
        "a refused snapshot left something in {}",
        snapshots.display()
    );
    let listed = all_snapshots(&h).await;
    assert!(listed.is_empty(), "{listed:?}");

    // A requisite that includes this node (among others), and none at all.
    for (name, requisite) in [("s-here", vec!["node-b", common::NODE]), ("s-any", vec![])] {
        let s = h
            .controller()
            .create_snapshot(snapshot_request(name, &vol.volume_id, &requisite))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(s.accessible_topology, vec![ours.clone()], "{name}");
    }
    // The same name again, now asking for another node: not usable there.
    let e = h
        .controller()
        .create_snapshot(snapshot_request("s-here", &vol.volume_id, &["node-b"]))
        .await
        .unwrap_err();
    assert_refused(&e, Code::ResourceExhausted, "usable only there");

    let listed = all_snapshots(&h).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for e in &listed {
        assert_eq!(
            e.snapshot.as_ref().unwrap().accessible_topology,
            vec![ours.clone()]
        );
    }
    let got = h
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: listed[0].snapshot.as_ref().unwrap().snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.accessible_topology, vec![ours.clone()]);

    // A group snapshot's members are snapshots of this node too.
    let a = h.create_volume(create_request("ga", "i", 16 * MIB)).await;
    let b = h.create_volume(create_request("gb", "i", 16 * MIB)).await;
    let group = h
        .group_controller()
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "g".into(),
            source_volume_ids: vec![a.volume_id.clone(), b.volume_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    for s in &group.snapshots {
        assert_eq!(s.accessible_topology, vec![ours.clone()], "{s:?}");
    }

    // The data of the snapshot taken with a requisite is this node's copy.
    let restored = h
        .create_volume(csi::CreateVolumeRequest {
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: listed
                            .iter()
                            .map(|e| e.snapshot.as_ref().unwrap())
                            .find(|s| s.source_volume_id == vol.volume_id)
                            .unwrap()
                            .snapshot_id
                            .clone(),
                    },
                )),
            }),
            ..create_request("r", "d", MIB)
        })
        .await;
    let token = restored.volume_id.split_once(':').unwrap().1;
    assert_eq!(
        std::fs::read(h.pool_dir("d").join(token).join("data")).unwrap(),
        b"kept"
    );
}

/// Every snapshot ListSnapshots returns (one page: the tests make few).
async fn all_snapshots(h: &Harness) -> Vec<csi::list_snapshots_response::Entry> {
    h.controller()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}
