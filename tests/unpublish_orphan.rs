//! NodeUnpublishVolume for a volume whose pool was removed from the
//! configuration while it was still published: the kubelet retries a
//! failed unpublish forever, so it must succeed when the target holds our
//! bind (told from the mount table), and still refuse a foreign mount.
//! Real bind mounts; needs root.

mod common;

use common::{Harness, mounts_at, run, unmount_below};
use tonic::Code;

const MIB: i64 = 1 << 20;

#[tokio::test]
async fn unpublish_succeeds_after_the_pool_left_the_config_and_foreign_mounts_stay() {
    if !common::root_or_skip("unpublishing takes off real bind mounts") {
        return;
    }
    let mut h = Harness::start().await;
    let v = h.create("orphan", "ssd", MIB).await;
    let target = h.target("pod-a");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    assert_eq!(mounts_at(&target).len(), 1);

    // A foreign bind whose source is a directory with the volume's name
    // but no record of ours beside it.
    let foreign_src = h.root.path().join("elsewhere/orphan");
    std::fs::create_dir_all(&foreign_src).unwrap();
    let foreign = h.target("pod-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    run(
        "mount",
        &[
            "--bind",
            foreign_src.to_str().unwrap(),
            foreign.to_str().unwrap(),
        ],
    );

    // The pool "ssd" leaves the configuration; the driver restarts.
    h.pools.retain(|p| p.name != "ssd");
    h.restart().await;

    let refused = h.unpublish(&v.volume_id, &foreign).await;
    let code = refused.as_ref().map_err(|s| s.code()).err();
    assert_eq!(mounts_at(&foreign).len(), 1, "foreign mount left alone");
    assert_eq!(code, Some(Code::FailedPrecondition), "{refused:?}");

    h.unpublish(&v.volume_id, &target).await.unwrap();
    assert!(mounts_at(&target).is_empty(), "our bind is gone");
    assert!(!target.exists(), "target directory removed");
    // Again (the kubelet retries): still success.
    h.unpublish(&v.volume_id, &target).await.unwrap();

    unmount_below(h.root.path());
}
