//! A driver started without CAP_SYS_ADMIN (here: root with the capability
//! dropped by `setpriv`) says why at start and Probe answers not ready,
//! instead of failing every publish. Runs the real binary; needs root and
//! `setpriv` (util-linux).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto::identity_client::IdentityClient;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");

#[tokio::test]
async fn without_cap_sys_admin_probe_is_not_ready_and_the_log_says_why() {
    if !common::root_or_skip("dropping a capability needs root") {
        return;
    }
    if !common::have("setpriv") {
        common::skip("setpriv (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-sys_admin", "--"])
        .arg(BIN)
        .arg("--endpoint")
        .arg(&sock)
        .arg("--pool")
        .arg(format!("default={}", dir.path().join("pool").display()))
        .args(["--node-id", "n1"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answer = None;
    while Instant::now() < deadline && answer.is_none() {
        if let Ok(ch) = csi_proto::connect(&sock).await
            && let Ok(r) = IdentityClient::new(ch)
                .probe(csi_proto::ProbeRequest {})
                .await
        {
            answer = Some(r.into_inner().ready);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the pool opener time to have turned ready, were it going to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = match csi_proto::connect(&sock).await {
        Ok(ch) => IdentityClient::new(ch)
            .probe(csi_proto::ProbeRequest {})
            .await
            .map(|r| r.into_inner().ready)
            .ok(),
        Err(_) => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert_eq!(answer, Some(Some(false)), "probe answered; log:\n{text}");
    assert_eq!(later, Some(Some(false)), "still not ready; log:\n{text}");
    assert!(
        text.contains("CAP_SYS_ADMIN"),
        "log names what is missing:\n{text}"
    );
    assert!(!dir.path().join("pool").exists(), "no pool opened");
}
