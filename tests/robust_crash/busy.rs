//! A target that a process still uses when NodeUnpublishVolume comes: what
//! a driver killed between a `posix_spawn`'s clone and exec leaves behind
//! (a child holding copies of its descriptors until it execs), and what
//! any program that forks while it has a file open in a volume does for a
//! moment. The driver waits a little, then answers ABORTED naming the
//! process, keeps the mount and the data, and the CO's retry succeeds once
//! the process is gone.

use std::process::{Child, Command, Stdio};

use tonic::Code;

use crate::common::{self, Harness, mounts_at};

#[tokio::test]
async fn unpublish_of_a_target_in_use_is_aborted_naming_the_user_then_retried() {
    if !common::root_or_skip("publishing bind-mounts the volume") {
        return;
    }
    let h = Harness::start().await;
    let v = h.create("busy", "hdd", 1 << 20).await;
    let target = h.target("pod-busy");
    h.publish(&v.volume_id, &target, false).await.unwrap();
    std::fs::write(target.join("data"), b"kept").unwrap();

    // A real process holding an inherited descriptor inside the target,
    // as a forked child does (killed however the test ends).
    let mut holder = Holder(
        Command::new("sleep")
            .arg("600")
            .stdin(std::fs::File::open(target.join("data")).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = holder.0.id();

    let refused = h.unpublish(&v.volume_id, &target).await.unwrap_err();
    let msg = refused.message();
    assert_eq!(refused.code(), Code::Aborted, "{msg}");
    assert!(msg.contains("is busy"), "{msg}");
    assert!(
        msg.contains(&format!("process {pid} (`sleep 600`)"))
            && msg.contains(&format!("fd 0 -> {}", target.join("data").display())),
        "the holder and its descriptor are not named: {msg}"
    );
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "the refused unmount kept the mount"
    );
    assert_eq!(std::fs::read(target.join("data")).unwrap(), b"kept");

    holder.stop();
    h.unpublish(&v.volume_id, &target)
        .await
        .unwrap_or_else(|e| panic!("the retry once the holder is gone: {e}"));
    assert!(mounts_at(&target).is_empty());
    assert!(!target.exists(), "target directory removed");
    assert_eq!(
        std::fs::read(h.pool_dir("hdd").join("busy/data")).unwrap(),
        b"kept",
        "the volume's data"
    );
}

/// A process that is killed and reaped when dropped.
struct Holder(Child);

impl Holder {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop();
    }
}
