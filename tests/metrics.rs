//! Prometheus metrics of the real binary, scraped over HTTP on loopback and
//! parsed by Prometheus's own OpenMetrics parser (the Python client's,
//! installed by scripts/setup.sh; `tests/metrics/openmetrics.py`), which
//! rejects text the format does not allow. The values must match what the
//! test made: calls by method and code, each pool's volumes, promised and
//! used bytes, what its trash holds, each volume's used bytes with its
//! claim; `--no-volume-metrics` leaves the per-volume series out; a
//! non-loopback address is refused unless allowed.
//!
//! The driver needs CAP_SYS_ADMIN to become ready: root.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{create_request, for_claim};
use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use serde_json::Value;
use tonic::transport::Channel;

const PROMETHEUS_CLIENT_VERSION: &str = "0.26.0";
const MIB: u64 = 1 << 20;

/// The driver binary, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts the driver with pools `hdd` and `ssd` under `root`, metrics on
    /// a free loopback port, and `extra` flags; returns it with a
    /// controller client once Probe says ready.
    async fn start(root: &Path, extra: &[&str]) -> (Self, ControllerClient<Channel>) {
        let socket = root.join("csi.sock");
        let port = free_port();
        let log = root.join("driver.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"));
        cmd.args(["--node-id", "n1", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{port}"));
        for pool in ["hdd", "ssd"] {
            cmd.arg("--pool")
                .arg(format!("{pool}={}", root.join(pool).display()));
        }
        let child = cmd
            .args(extra)
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        let d = Driver { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = csi::connect(&socket).await {
                let ready = csi::identity_client::IdentityClient::new(c.clone())
                    .probe(csi::ProbeRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().ready == Some(true));
                if ready {
                    return (d, ControllerClient::new(c));
                }
            }
            assert!(Instant::now() < deadline, "driver not ready:\n{}", d.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics`: the body, after checking status and content type.
    fn scrape(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("application/openmetrics-text"), "{head}");
        body.to_string()
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

/// The Python with prometheus-client that setup.sh installs, if it is.
fn parser() -> Option<PathBuf> {
    let python = common::setup_cache().join(format!(
        "prometheus-client-{PROMETHEUS_CLIENT_VERSION}/bin/python"
    ));
    common::installed(
        &format!("prometheus-client {PROMETHEUS_CLIENT_VERSION}"),
        &python,
    )
    .then_some(python)
}

/// Metric families as Prometheus's parser reads them, by family name.
struct Scrape(BTreeMap<String, Value>);

impl Scrape {
    /// Parses `text` with the OpenMetrics parser; fails the test, showing
    /// the parser's error and the text, if the parser refuses it.
    fn parse(python: &Path, text: &str) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metrics/openmetrics.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "Prometheus's parser refused the scrape: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let families: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        Scrape(
            families
                .into_iter()
                .map(|f| (f["name"].as_str().unwrap().to_string(), f))
                .collect(),
        )
    }

    /// The type of a family (`counter`, `gauge`, `histogram`).
    fn kind(&self, family: &str) -> &str {
        self.0
            .get(family)
            .unwrap_or_else(|| panic!("no family {family}"))["type"]
            .as_str()
            .unwrap()
    }

    /// Samples named `sample` whose labels are exactly `labels`.
    fn find(&self, sample: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
        self.0
            .values()
            .flat_map(|f| f["samples"].as_array().unwrap())
            .filter(|s| s["name"] == sample)
            .filter(|s| {
                let got: BTreeMap<&str, &str> = s["labels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                    .collect();
                got == want
            })
            .map(|s| s["value"].as_f64().unwrap())
            .collect()
    }

    /// The one sample named `sample` with exactly `labels`.
    fn get(&self, sample: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(sample, labels)[..] {
            [v] => v,
            ref other => panic!("{sample}{labels:?}: {other:?} in {:#?}", self.0.keys()),
        }
    }

    /// How many samples are named `sample`, whatever their labels.
    fn count(&self, sample: &str) -> usize {
        self.0
            .values()
            .flat_map(|f| f["samples"].as_array().unwrap())
            .filter(|s| s["name"] == sample)
            .count()
    }
}

/// CreateVolume of a dir volume; its id.
async fn create(c: &mut ControllerClient<Channel>, req: csi::CreateVolumeRequest) -> String {
    c.create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

fn can_run() -> Option<PathBuf> {
    if !common::root_or_skip("the driver is ready only with CAP_SYS_ADMIN") {
        return None;
    }
    parser()
}

#[tokio::test]
async fn a_scrape_parsed_by_prometheus_holds_what_the_test_made() {
    let Some(python) = can_run() else { return };
    let root = tempfile::tempdir().unwrap();
    let (d, mut c) = Driver::start(root.path(), &[]).await;

    // hdd: a claim's volume holding 1 MiB, and an archived one whose 3 MiB
    // went to the trash; ssd: a volume with no claim, empty.
    let db = for_claim(create_request("pvc-db", "hdd", 8 << 20), "shop", "db");
    create(&mut c, db.clone()).await;
    create(&mut c, db).await; // the CO's retry: OK again, nothing new
    let mut cache = for_claim(create_request("pvc-cache", "hdd", 4 << 20), "shop", "cache");
    cache.parameters.insert("onDelete".into(), "archive".into());
    let cache_id = create(&mut c, cache).await;
    create(&mut c, create_request("pvc-tmp", "ssd", 16 << 20)).await;
    let hdd = root.path().join("hdd");
    common::write_file(&hdd.join("pvc-db/data"), MIB).unwrap();
    common::write_file(&hdd.join("pvc-cache/data"), 3 * MIB).unwrap();
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: cache_id,
        secrets: Default::default(),
    })
    .await
    .unwrap();
    let e = c
        .create_volume(create_request("pvc-x", "nvme", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    let s = Scrape::parse(&python, &d.scrape());

    // (The orphan gauges have no series until the orphan report runs.)
    assert_eq!(s.kind("hostpath_csi_rpc_requests"), "counter");
    assert_eq!(s.kind("hostpath_csi_rpc_duration_seconds"), "histogram");
    for gauge in [
        "hostpath_csi_pool_capacity_bytes",
        "hostpath_csi_pool_free_bytes",
        "hostpath_csi_pool_promised_bytes",
        "hostpath_csi_pool_used_bytes",
        "hostpath_csi_pool_volumes",
        "hostpath_csi_pool_trash_bytes",
        "hostpath_csi_volume_used_bytes",
    ] {
        assert_eq!(s.kind(gauge), "gauge", "{gauge}");
    }

    // Calls, by method and code.
    let create_ok = [("method", "Controller/CreateVolume"), ("code", "OK")];
    assert_eq!(s.get("hostpath_csi_rpc_requests_total", &create_ok), 4.0);
    assert_eq!(
        s.get(
            "hostpath_csi_rpc_requests_total",
            &[
                ("method", "Controller/CreateVolume"),
                ("code", "InvalidArgument")
            ]
        ),
        1.0
    );
    assert_eq!(
        s.get(
            "hostpath_csi_rpc_requests_total",
            &[("method", "Controller/DeleteVolume"), ("code", "OK")]
        ),
        1.0
    );
    assert_eq!(
        s.get("hostpath_csi_rpc_duration_seconds_count", &create_ok),
        4.0
    );
    let inf = [create_ok[0], create_ok[1], ("le", "+Inf")];
    assert_eq!(s.get("hostpath_csi_rpc_duration_seconds_bucket", &inf), 4.0);

    // Pools.
    let pool = |name| [("pool", name), ("kind", "dir")];
    assert_eq!(s.get("hostpath_csi_pool_volumes", &pool("hdd")), 1.0);
    assert_eq!(s.get("hostpath_csi_pool_volumes", &pool("ssd")), 1.0);
    assert_eq!(
        s.get("hostpath_csi_pool_promised_bytes", &pool("hdd")),
        (8 << 20) as f64
    );
    assert_eq!(
        s.get("hostpath_csi_pool_promised_bytes", &pool("ssd")),
        (16 << 20) as f64
    );
    let capacity = s.get("hostpath_csi_pool_capacity_bytes", &pool("hdd"));
    let free = s.get("hostpath_csi_pool_free_bytes", &pool("hdd"));
    assert!(
        capacity > 0.0 && free > 0.0 && free <= capacity,
        "{free} of {capacity}"
    );

    // The trash holds the archived volume's 3 MiB (and its directory's
    // blocks), in its own pool only.
    let trash = s.get("hostpath_csi_pool_trash_bytes", &pool("hdd"));
    assert!(
        trash >= (3 * MIB) as f64 && trash < (4 * MIB) as f64,
        "trash {trash}"
    );
    assert_eq!(s.get("hostpath_csi_pool_trash_bytes", &pool("ssd")), 0.0);

    // Volumes, with their claims; the archived one is gone.
    let db_used = s.get(
        "hostpath_csi_volume_used_bytes",
        &[
            ("pool", "hdd"),
            ("volume", "hdd:pvc-db"),
            ("namespace", "shop"),
            ("persistentvolumeclaim", "db"),
        ],
    );
    assert!(
        db_used >= MIB as f64 && db_used < (2 * MIB) as f64,
        "{db_used}"
    );
    assert_eq!(
        s.get("hostpath_csi_pool_used_bytes", &pool("hdd")),
        db_used,
        "the pool's used bytes are its volumes', not the trash's"
    );
    let tmp_used = s.get(
        "hostpath_csi_volume_used_bytes",
        &[
            ("pool", "ssd"),
            ("volume", "ssd:pvc-tmp"),
            ("namespace", ""),
            ("persistentvolumeclaim", ""),
        ],
    );
    assert!(tmp_used < MIB as f64, "{tmp_used}");
    assert_eq!(s.count("hostpath_csi_volume_used_bytes"), 2);
}

#[tokio::test]
async fn no_volume_metrics_leaves_out_only_the_per_volume_series() {
    let Some(python) = can_run() else { return };
    let root = tempfile::tempdir().unwrap();
    let (d, mut c) = Driver::start(root.path(), &["--no-volume-metrics"]).await;
    create(&mut c, create_request("pvc-1", "hdd", 8 << 20)).await;
    create(&mut c, create_request("pvc-2", "ssd", 8 << 20)).await;

    let s = Scrape::parse(&python, &d.scrape());
    assert_eq!(s.count("hostpath_csi_volume_used_bytes"), 0);
    for pool in ["hdd", "ssd"] {
        let l = [("pool", pool), ("kind", "dir")];
        assert_eq!(s.get("hostpath_csi_pool_volumes", &l), 1.0, "{pool}");
        assert_eq!(
            s.get("hostpath_csi_pool_promised_bytes", &l),
            (8 << 20) as f64
        );
    }
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
