//! The capacity policy through the real server: pool minimum, maximum and
//! default sizes, rounding, overcommit, what GetCapacity reports, which
//! expansion capabilities are advertised, and expansion rules (no
//! shrinking, dir volumes cannot grow). Image pools in a temporary
//! directory (sparse images; needs root and e2fsprogs).

mod common;
mod pools;

use common::{Harness, create_request};
use csi_proto as csi;
use csi_proto::controller_service_capability::rpc::Type as CtrlCap;
use csi_proto::node_service_capability::rpc::Type as NodeCap;
use hostpath_csi::config::{ByteSize, Overcommit, PoolConfig, PoolKind};
use pools::*;
use tonic::Code;

fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

async fn create_with(
    h: &Harness,
    name: &str,
    pool: &str,
    r: Option<csi::CapacityRange>,
) -> Result<csi::Volume, tonic::Status> {
    let mut req = create_request(name, pool, 0);
    req.capacity_range = r;
    h.controller()
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

#[tokio::test]
async fn sizes_follow_the_pool_minimum_maximum_and_default() {
    if !common::root_or_skip("image pools are loop-mounted filesystems") {
        return;
    }
    let (root, _cleanup) = root();
    let pool = PoolConfig {
        min_volume_size: Some(ByteSize(20 << 20)),
        max_volume_size: Some(ByteSize(64 << 20)),
        default_volume_size: Some(ByteSize(32 << 20)),
        ..PoolConfig::of_kind("img", root.path().join("img"), PoolKind::Image)
    };
    let h = Harness::with_pool_configs(root, vec![pool]).await;

    // No size asked: the pool default.
    let v = create_with(&h, "a", "img", None).await.unwrap();
    assert_eq!(v.capacity_bytes, 32 * MIB);
    // Only a limit: the default, capped by the limit (and rounded to whole
    // 4 KiB blocks, downwards never: still >= the minimum).
    let v = create_with(&h, "b", "img", range(0, 24 * MIB))
        .await
        .unwrap();
    assert_eq!(v.capacity_bytes, 24 * MIB);
    // Below the minimum: rounded up to it.
    let v = create_with(&h, "c", "img", range(MIB, 0)).await.unwrap();
    assert_eq!(v.capacity_bytes, 20 * MIB);
    // Odd sizes: rounded up to whole blocks, within the limit.
    let v = create_with(&h, "d", "img", range(30 * MIB + 1, 31 * MIB))
        .await
        .unwrap();
    assert_eq!(v.capacity_bytes, 30 * MIB + 4096);
    // A limit below the minimum, or a size above the maximum: OUT_OF_RANGE.
    let e = create_with(&h, "e", "img", range(MIB, 2 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = create_with(&h, "f", "img", range(65 * MIB, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("at most"), "{}", e.message());

    // GetCapacity tells the scheduler the bounds.
    let (avail, max, min) = capacity(&h, "img").await;
    assert!(avail > 64 * MIB);
    assert_eq!(max, 64 * MIB);
    assert_eq!(min, 20 * MIB);

    // Expansion beyond the maximum is OUT_OF_RANGE too; within it works.
    let a = format!("img:{}", "a");
    let e = expand(&h, &a, 65 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(
        expand(&h, &a, 40 * MIB).await.unwrap().capacity_bytes,
        40 * MIB
    );
    // Already as large: success with the current size; a limit below the
    // current size would mean shrinking: OUT_OF_RANGE.
    assert_eq!(
        expand(&h, &a, 33 * MIB).await.unwrap().capacity_bytes,
        40 * MIB
    );
    let e = h
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: a.clone(),
            capacity_range: range(16 * MIB, 16 * MIB),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = expand(&h, "img:nope", 40 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn overcommit_ratio_scales_what_can_be_promised() {
    if !common::root_or_skip("image pools are loop-mounted filesystems") {
        return;
    }
    let (root, _cleanup) = root();
    let fs = loop_fs(root.path(), "disk", "ext4", 128 << 20);
    let strict = PoolConfig::of_kind("strict", fs.join("strict"), PoolKind::Image);
    let h = Harness::with_pool_configs(root, vec![strict]).await;
    let (a_strict, _, _) = capacity(&h, "strict").await;
    assert!(a_strict > 100 * MIB && a_strict < 128 * MIB, "{a_strict}");
    let e = create_with(&h, "big", "strict", range(a_strict + MIB, 0))
        .await
        .unwrap_err();
    // Larger than what is free but smaller than the filesystem: it cannot
    // be promised now.
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{e:?}"
    );
    drop(h);

    let (root2, _cleanup2) = pools::root();
    let fs = loop_fs(root2.path(), "disk", "ext4", 128 << 20);
    let thin = PoolConfig {
        overcommit: Some(Overcommit::Ratio(3.0)),
        ..PoolConfig::of_kind("thin", fs.join("thin"), PoolKind::Image)
    };
    let h = Harness::with_pool_configs(root2, vec![thin]).await;
    let (a_thin, max_thin, _) = capacity(&h, "thin").await;
    assert!(a_thin > 2 * a_strict, "{a_thin} vs {a_strict}");
    // No single volume larger than the filesystem, though.
    assert!(max_thin < 128 * MIB, "{max_thin}");
    for i in 0..3 {
        create_with(&h, &format!("v{i}"), "thin", range(100 * MIB, 0))
            .await
            .unwrap();
    }
    let (left, _, _) = capacity(&h, "thin").await;
    assert!(left < a_thin - 296 * MIB, "{a_thin} -> {left}");
    let e = create_with(&h, "v3", "thin", range(100 * MIB, 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test]
async fn dir_pools_do_not_enforce_and_cannot_expand() {
    let h = Harness::start().await;
    let v = h.create("d1", "hdd", 4 * MIB).await;
    assert_eq!(v.volume_context["sizeEnforced"], "false");
    let e = expand(&h, &v.volume_id, 8 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    // GetCapacity on a dir pool is the filesystem's free space.
    let (avail, max, min) = capacity(&h, "hdd").await;
    assert!(avail > 0 && max == avail && min == 0, "{avail} {max} {min}");

    // Only dir pools: no expansion capabilities are advertised.
    let caps = h.controller_caps().await;
    assert!(!caps.contains(&CtrlCap::ExpandVolume), "{caps:?}");
    assert!(!h.node_caps().await.contains(&NodeCap::ExpandVolume));
    assert!(!plugin_online_expansion(&h).await);
}

#[tokio::test]
async fn expansion_capabilities_are_advertised_with_an_expandable_pool() {
    if !common::root_or_skip("image pools are loop-mounted filesystems") {
        return;
    }
    let (root, _cleanup) = root();
    let pools = vec![
        PoolConfig::dir("hdd", root.path().join("hdd")),
        PoolConfig::of_kind("img", root.path().join("img"), PoolKind::Image),
    ];
    let h = Harness::with_pool_configs(root, pools).await;
    assert!(h.controller_caps().await.contains(&CtrlCap::ExpandVolume));
    assert!(h.node_caps().await.contains(&NodeCap::ExpandVolume));
    assert!(plugin_online_expansion(&h).await);
}

async fn plugin_online_expansion(h: &Harness) -> bool {
    use csi::plugin_capability::{Type, volume_expansion};
    h.identity()
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .any(|c| {
            matches!(&c.r#type, Some(Type::VolumeExpansion(v))
                if v.r#type == volume_expansion::Type::Online as i32)
        })
}
