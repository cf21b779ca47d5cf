//! gRPC clients that are not written in Go, with their default settings,
//! against the driver: Python's grpcio and grpc-java, the real libraries
//! (`scripts/setup.sh` installs grpcio in a venv and compiles the Java
//! client against grpc-java's jars, both pinned, into its cache). Go's
//! client is csi-sanity (`scripts/conformance.sh`) and the sidecars.
//!
//! Both send the socket path as the HTTP/2 `:authority`, which the HTTP/2
//! layer under tonic refuses unless the driver rewrites it
//! (`grpc::authority`): before that fix every call here failed with
//! "Stream removed". Each client makes a volume's whole life on one
//! channel (so later requests refer to its HPACK table), and a bad request
//! must get the same code and message as a Go client gets.
//!
//! The clients read `<method> <request hex>` lines and print `OK <reply
//! hex>` or `<CODE> <details>`: requests and replies are encoded here with
//! the driver's own generated types, so the clients need no generated code.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use csi_proto as csi;
use prost::Message;

const GRPCIO_VERSION: &str = "1.85.1";

/// What a client got for one call.
#[derive(Debug, PartialEq)]
enum Reply {
    Ok(Vec<u8>),
    Err(String, String),
}

impl Reply {
    fn ok<M: Message + Default>(&self) -> M {
        match self {
            Reply::Ok(b) => M::decode(b.as_slice()).unwrap(),
            Reply::Err(code, msg) => panic!("{code}: {msg}"),
        }
    }
}

/// Runs `client` (a command line that takes the socket last) with `calls`
/// on its stdin; returns one reply per call.
fn call_with(client: &[String], socket: &Path, calls: &[(&str, Vec<u8>)]) -> Vec<Reply> {
    let mut child = Command::new(&client[0])
        .args(&client[1..])
        .arg(socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {client:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    for (method, req) in calls {
        writeln!(stdin, "{method} {}", hex::encode(req)).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().count() == calls.len(),
        "{client:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let (code, rest) = l.split_once(' ').unwrap_or((l, ""));
            if code == "OK" {
                Reply::Ok(hex::decode(rest).unwrap())
            } else {
                Reply::Err(code.to_string(), rest.to_string())
            }
        })
        .collect()
}

/// A volume's whole life and a bad request, through `client`, on a driver
/// served in-process; checks every answer.
async fn a_volume_lifecycle_through(client: Vec<String>, name: &str) {
    let h = common::Harness::start().await;
    let target = h.target(name);
    let id = format!("hdd:{name}");
    let publish = root();
    let mut calls: Vec<(&str, Vec<u8>)> = vec![
        (
            "/csi.v1.Identity/GetPluginInfo",
            csi::GetPluginInfoRequest {}.encode_to_vec(),
        ),
        (
            "/csi.v1.Identity/Probe",
            csi::ProbeRequest {}.encode_to_vec(),
        ),
        (
            "/csi.v1.Controller/CreateVolume",
            common::create_request(name, "hdd", 1 << 20).encode_to_vec(),
        ),
        // A bad request: the same code and message as for a Go client.
        (
            "/csi.v1.Controller/CreateVolume",
            common::create_request("", "hdd", 1 << 20).encode_to_vec(),
        ),
    ];
    if publish {
        calls.extend([
            (
                "/csi.v1.Node/NodePublishVolume",
                common::publish_request(&id, &target, false).encode_to_vec(),
            ),
            (
                "/csi.v1.Node/NodeGetVolumeStats",
                csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: target.to_string_lossy().into_owned(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                "/csi.v1.Node/NodeUnpublishVolume",
                csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.to_string_lossy().into_owned(),
                }
                .encode_to_vec(),
            ),
        ]);
    }
    calls.extend([
        (
            "/csi.v1.Controller/DeleteVolume",
            csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "/csi.v1.Controller/ListVolumes",
            csi::ListVolumesRequest::default().encode_to_vec(),
        ),
    ]);
    let socket = h.config().socket;
    let replies = tokio::task::spawn_blocking(move || call_with(&client, &socket, &calls))
        .await
        .unwrap();
    let mut r = replies.iter();

    let info: csi::GetPluginInfoResponse = r.next().unwrap().ok();
    assert_eq!(info.name, "hostpath-csi.dev");
    let probe: csi::ProbeResponse = r.next().unwrap().ok();
    assert_eq!(probe.ready, Some(true));
    let created: csi::CreateVolumeResponse = r.next().unwrap().ok();
    assert_eq!(created.volume.unwrap().volume_id, id);
    let go = h
        .controller()
        .create_volume(common::create_request("", "hdd", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(
        r.next().unwrap(),
        &Reply::Err("INVALID_ARGUMENT".into(), go.message().to_string())
    );
    if publish {
        let _: csi::NodePublishVolumeResponse = r.next().unwrap().ok();
        let stats: csi::NodeGetVolumeStatsResponse = r.next().unwrap().ok();
        assert!(!stats.usage.is_empty(), "{stats:?}");
        let _: csi::NodeUnpublishVolumeResponse = r.next().unwrap().ok();
        assert!(common::mounts_at(&target).is_empty());
    }
    let _: csi::DeleteVolumeResponse = r.next().unwrap().ok();
    let listed: csi::ListVolumesResponse = r.next().unwrap().ok();
    assert!(listed.entries.is_empty(), "{listed:?}");
    assert!(!h.pool_dir("hdd").join(name).exists());
}

fn root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("publish calls left out: they mount, which needs root");
    }
    root
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_with_its_defaults() {
    let python = common::setup_cache().join(format!("grpcio-{GRPCIO_VERSION}/bin/python"));
    if !common::installed(&format!("grpcio {GRPCIO_VERSION}"), &python) {
        return;
    }
    let client = vec![
        python.to_string_lossy().into_owned(),
        script("grpcio_client.py"),
    ];
    a_volume_lifecycle_through(client, "from-grpcio").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_java_with_its_defaults() {
    let dir = common::setup_cache().join("grpc-java-client");
    if !common::installed("the grpc-java client", &dir.join("classes/CsiClient.class")) {
        return;
    }
    let client = vec![
        "java".to_string(),
        "-cp".to_string(),
        format!("{0}/classes:{0}/lib/*", dir.display()),
        "CsiClient".to_string(),
    ];
    a_volume_lifecycle_through(client, "from-grpc-java").await;
}
