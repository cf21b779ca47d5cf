//! What the driver records per volume and the read-only listing built on it
//! (`hostpath_csi::volume::inventory`): the claim and PV from the create
//! metadata, who made each pool entry, where a volume is published now, and
//! when it was last published and unpublished. Real bind mounts: needs root.

mod common;

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Harness, create_request, for_claim};
use hostpath_csi::volume::inventory::{InventoryOptions, Origin, VolumeInfo, inventory};

const MIB: i64 = 1 << 20;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn listed(h: &Harness) -> BTreeMap<String, VolumeInfo> {
    inventory(&h.pools, InventoryOptions::default())
        .unwrap()
        .into_iter()
        .inspect(|p| assert_eq!(p.problem, None, "pool {}", p.name))
        .flat_map(|p| p.volumes)
        .map(|v| (v.id.clone(), v))
        .collect()
}

#[tokio::test]
async fn volumes_carry_their_claim_origin_mounts_and_use_times() {
    if !common::root_or_skip("bind mounts") {
        return;
    }
    let h = Harness::start().await;
    let v = h
        .create_volume(for_claim(create_request("pvc-1", "hdd", MIB), "shop", "db"))
        .await;
    let plain = h.create("plain", "ssd", 2 * MIB).await;
    std::fs::write(h.pool_dir("hdd").join("pvc-1/data"), vec![7u8; 64 << 10]).unwrap();

    // What an administrator or someone else left in the pools.
    std::fs::create_dir(h.pool_dir("hdd").join("static-data")).unwrap();
    std::fs::write(h.pool_dir("hdd").join("static-data/f"), b"kept").unwrap();
    std::fs::write(h.pool_dir("ssd").join("notes.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("/etc", h.pool_dir("ssd").join("etc-link")).unwrap();

    let before = listed(&h);
    let pvc = &before["hdd:pvc-1"];
    assert_eq!(pvc.origin, Origin::Driver);
    assert_eq!(
        (
            pvc.claim_namespace.as_deref(),
            pvc.claim_name.as_deref(),
            pvc.pv_name.as_deref()
        ),
        (Some("shop"), Some("db"), Some("pvc-1"))
    );
    assert_eq!(pvc.capacity_bytes, Some(MIB as u64));
    assert!(!pvc.size_enforced, "dir pools do not enforce sizes");
    assert!(pvc.used_bytes.unwrap() >= 64 << 10, "{:?}", pvc.used_bytes);
    assert!(pvc.created_unix.unwrap() + 60 > now());
    assert_eq!(
        (pvc.last_published_unix, pvc.last_unpublished_unix),
        (None, None)
    );
    assert!(pvc.published_at.is_empty());
    assert_eq!(before["ssd:plain"].claim_name, None);
    assert_eq!(before["ssd:plain"].origin, Origin::Driver);

    let st = &before["hdd:static-data"];
    assert_eq!((st.origin, st.capacity_bytes), (Origin::Static, None));
    assert!(st.used_bytes.is_some());
    for foreign in ["ssd:notes.txt", "ssd:etc-link"] {
        let f = &before[foreign];
        assert_eq!(f.origin, Origin::Foreign, "{foreign}");
        assert!(f.problem.is_some(), "{foreign}");
    }
    assert_eq!(before.len(), 5, "{:?}", before.keys());

    // Publish twice, at two targets, then unpublish one.
    let (a, b) = (h.target("pod-a"), h.target("pod-b"));
    h.publish(&v.volume_id, &a, false).await.unwrap();
    h.publish(&v.volume_id, &b, true).await.unwrap();
    let published = listed(&h);
    let pvc = &published["hdd:pvc-1"];
    let mut at = pvc.published_at.clone();
    at.sort();
    assert_eq!(at, vec![a.clone(), b.clone()]);
    let t_pub = pvc.last_published_unix.expect("publish time recorded");
    assert!(t_pub + 60 > now() && t_pub <= now());
    assert_eq!(pvc.last_unpublished_unix, None);

    h.unpublish(&v.volume_id, &a).await.unwrap();
    let after = listed(&h);
    let pvc = &after["hdd:pvc-1"];
    assert_eq!(pvc.published_at, vec![b.clone()]);
    assert!(pvc.last_unpublished_unix.unwrap() >= t_pub);
    // An unpublish of a target that is gone takes nothing off: no new time
    // would be honest either way, and it must not fail.
    h.unpublish(&v.volume_id, &a).await.unwrap();

    // The times survive a restart (they are on disk, not in memory).
    let mut h = h;
    h.restart().await;
    assert_eq!(
        listed(&h)["hdd:pvc-1"].last_published_unix,
        Some(t_pub),
        "publish time lost by a restart"
    );

    // Static volumes are published too, but get no files of the driver.
    let static_id = "hdd:static-data";
    let c = h.target("pod-c");
    h.publish(static_id, &c, false).await.unwrap();
    let st = &listed(&h)[static_id];
    assert_eq!(st.published_at, vec![c.clone()]);
    assert_eq!(st.last_published_unix, None);
    h.unpublish(static_id, &c).await.unwrap();

    // Deleting removes the markers with the volume: nothing of it is left.
    h.unpublish(&v.volume_id, &b).await.unwrap();
    h.unpublish(&plain.volume_id, &b).await.unwrap();
    for id in [&v.volume_id, &plain.volume_id] {
        h.controller()
            .delete_volume(csi_proto::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }
    assert_eq!(
        common::entries(&h.pool_dir("hdd")),
        ["static-data".to_string()].into()
    );
    let ids: Vec<String> = listed(&h).into_keys().collect();
    assert_eq!(ids, ["hdd:static-data", "ssd:etc-link", "ssd:notes.txt"]);
}

#[tokio::test]
async fn a_record_whose_storage_is_gone_is_listed_with_the_problem() {
    if !common::root_or_skip("bind mounts") {
        return;
    }
    let h = Harness::start().await;
    h.create("lost", "hdd", MIB).await;
    std::fs::remove_dir(h.pool_dir("hdd").join("lost")).unwrap();
    let v = &listed(&h)["hdd:lost"];
    assert_eq!(v.origin, Origin::Driver);
    assert!(
        v.problem.as_deref().unwrap().contains("missing"),
        "{:?}",
        v.problem
    );
}

#[tokio::test]
async fn a_pool_that_is_not_there_is_reported_not_made() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("not-yet");
    let pools = vec![hostpath_csi::config::PoolConfig::dir(
        "late",
        missing.clone(),
    )];
    let inv = inventory(&pools, InventoryOptions::default()).unwrap();
    assert_eq!(inv.len(), 1);
    assert!(inv[0].problem.is_some());
    assert!(!missing.exists(), "listing must not create the pool");
}
