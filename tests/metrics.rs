//! Prometheus metrics of the real binary, scraped over HTTP on loopback:
//! per-RPC counts and latencies by method and code, per pool figures and
//! per volume used bytes match what the test made; a non-loopback address
//! is refused unless allowed. The text is parsed here line by line (the
//! OpenMetrics text format); checking it with promtool is still to come.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    body.to_string()
}

/// Samples by `name{labels}` (labels as printed).
fn samples(text: &str) -> BTreeMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse::<f64>().unwrap())
        })
        .collect()
}

fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test]
async fn a_scrape_counts_calls_and_shows_pools_and_volumes() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("csi.sock");
    let pool = root.path().join("pool");
    let port = free_port();
    let _d = Driver(
        Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
            .args(["--node-id", "n1", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--pool")
            .arg(format!("hdd={}", pool.display()))
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{port}"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if let Ok(c) = csi::connect(&socket).await {
            let ready = csi::identity_client::IdentityClient::new(c.clone())
                .probe(csi::ProbeRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready == Some(true));
            if ready {
                break c;
            }
        }
        assert!(Instant::now() < deadline, "driver not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut ctl = csi::controller_client::ControllerClient::new(channel);
    let mut req = csi::CreateVolumeRequest {
        name: "pvc-m".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 8 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        ..Default::default()
    };
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "db".into());
    req.parameters
        .insert("csi.storage.k8s.io/pvc/namespace".into(), "shop".into());
    ctl.create_volume(req.clone()).await.unwrap();
    ctl.create_volume(req).await.unwrap();
    let missing = ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "no-such-pool:x".into(),
            secrets: Default::default(),
        })
        .await;
    assert!(missing.is_ok());
    std::fs::write(pool.join("pvc-m/data"), vec![3u8; 1 << 20]).unwrap();

    let text = scrape(port);
    let s = samples(&text);
    let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(
        get(r#"hostpath_csi_rpc_requests_total{method="Controller/CreateVolume",code="OK"}"#),
        2.0
    );
    assert_eq!(
        get(
            r#"hostpath_csi_rpc_duration_seconds_count{method="Controller/CreateVolume",code="OK"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            r#"hostpath_csi_rpc_duration_seconds_bucket{le="+Inf",method="Controller/CreateVolume",code="OK"}"#
        ),
        2.0
    );
    assert_eq!(
        get(r#"hostpath_csi_pool_volumes{pool="hdd",kind="dir"}"#),
        1.0
    );
    assert_eq!(
        get(r#"hostpath_csi_pool_promised_bytes{pool="hdd",kind="dir"}"#),
        (8 << 20) as f64
    );
    let used = get(
        r#"hostpath_csi_volume_used_bytes{pool="hdd",volume="hdd:pvc-m",namespace="shop",persistentvolumeclaim="db"}"#,
    );
    assert!(used >= (1 << 20) as f64, "{used}");
    assert!(get(r#"hostpath_csi_pool_used_bytes{pool="hdd",kind="dir"}"#) >= used);
    assert!(get(r#"hostpath_csi_pool_capacity_bytes{pool="hdd",kind="dir"}"#) > 0.0);
    assert_eq!(
        get(r#"hostpath_csi_pool_trash_bytes{pool="hdd",kind="dir"}"#),
        0.0
    );
}

#[test]
fn a_remote_address_is_refused_unless_allowed() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .args(["--node-id", "n1", "--endpoint"])
        .arg(format!("unix://{}", root.path().join("csi.sock").display()))
        .arg("--pool")
        .arg(format!("hdd={}", root.path().join("pool").display()))
        .args(["--metrics-address", "0.0.0.0:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-allow-remote"), "{err}");
}
