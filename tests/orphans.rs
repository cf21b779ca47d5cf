//! The orphan report, its metrics, Events and reclaim, against a real
//! etcd + kube-apiserver + PV binder (`orphans_support`) and the real
//! driver binary, as the node plugin's ServiceAccount with the RBAC of
//! `deploy/rbac.yaml`:
//! - a PV deleted by hand with its finalizer stripped: its volume is
//!   `no_pv` in the command, the metrics and an Event on its claim;
//! - a Retain PV released by its claim: `released` (Event on the PV);
//! - a bound claim no pod uses, past `--unused-after`: `unused`; one a pod
//!   uses: not reported;
//! - a PV pinned to a node that is gone: `node_gone`;
//! - a published volume without a PV, a file, a symlink and a directory
//!   without a record in the pool: listed, never reclaimed;
//! - Events are not repeated scan after scan;
//! - reclaim: a dry run changes nothing, the grace period is respected, and
//!   with zero grace only the `no_pv` and `released` driver volumes go
//!   (one archived, as its StorageClass parameter says);
//! - a user without rights, and an API server that is not there: the
//!   command says so, exits non-zero, reclaims nothing.
//!
//! One control plane for all of it (starting one takes tens of seconds),
//! the steps in order.

mod common;
mod orphans_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_proto as csi;
use orphans_support::{ControlPlane, Driver, block_on, cap, create, free_port, orphans_cmd};
use serde_json::Value;

const NODE: &str = "orphans-node";
const GONE_NODE: &str = "lost-node";

/// The node's setup: the driver's flags and where things are.
struct Node {
    dir: PathBuf,
    socket: PathBuf,
    pool: PathBuf,
    metrics_port: u16,
}

impl Node {
    fn new(dir: &Path) -> Node {
        let pool = dir.join("hdd");
        std::fs::create_dir_all(&pool).unwrap();
        Node {
            dir: dir.to_path_buf(),
            socket: dir.join("csi.sock"),
            pool,
            metrics_port: free_port(),
        }
    }

    /// Flags shared by `serve` and `orphans`.
    fn flags(&self, kubeconfig: &Path) -> Vec<String> {
        vec![
            format!("--endpoint=unix://{}", self.socket.display()),
            format!("--node-id={NODE}"),
            format!("--pool=hdd={}", self.pool.display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--unused-after=0s".into(),
            "--orphan-settle=0s".into(),
        ]
    }
}

fn publish(socket: &Path, id: &str, target: &Path) {
    block_on(async {
        let ch = csi::connect(socket).await.unwrap();
        csi::node_client::NodeClient::new(ch)
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap()),
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

fn wait_socket(socket: &Path) {
    for _ in 0..300 {
        let ready = block_on(async {
            let Ok(ch) = csi::connect(socket).await else {
                return false;
            };
            csi::identity_client::IdentityClient::new(ch)
                .probe(csi::ProbeRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready == Some(true))
        });
        if ready {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the driver at {} never became ready", socket.display());
}

/// The report as JSON; panics unless the command succeeds.
fn report(flags: &[String], extra: &[&str]) -> Value {
    let mut args: Vec<String> = flags.to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["-o".into(), "json".into()]);
    let (code, out, err) = orphans_cmd(&args);
    assert_eq!(code, 0, "hostpath-csi orphans {args:?}: {err}\n{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `reason -> volume ids` of a JSON report.
fn by_reason(r: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in r["orphans"].as_array().unwrap() {
        out.entry(o["reason"].as_str().unwrap().into())
            .or_default()
            .insert(o["volume_id"].as_str().unwrap().into());
    }
    out
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return BTreeMap::new();
    };
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// OrphanVolume Events: (kind/namespace/name of the object, count).
fn orphan_events(cp: &ControlPlane) -> Vec<(String, i64)> {
    orphan_events_by(cp, |e| e["count"].as_i64().unwrap_or(0))
}

/// OrphanVolume Events: (kind/namespace/name of the object, lastTimestamp
/// (RFC 3339, so they order as strings)).
fn orphan_event_times(cp: &ControlPlane) -> Vec<(String, String)> {
    orphan_events_by(cp, |e| {
        e["lastTimestamp"].as_str().unwrap_or("").to_string()
    })
}

/// OrphanVolume Events: (kind/namespace/name of the object, `field(event)`),
/// sorted.
fn orphan_events_by<T: Ord>(
    cp: &ControlPlane,
    field: impl Fn(&serde_json::Value) -> T,
) -> Vec<(String, T)> {
    let all = cp.get_json(&["events", "-A", "--field-selector=reason=OrphanVolume"]);
    let mut out: Vec<(String, T)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let o = &e["involvedObject"];
            (
                format!(
                    "{}/{}/{}",
                    o["kind"].as_str().unwrap_or(""),
                    o["namespace"].as_str().unwrap_or(""),
                    o["name"].as_str().unwrap_or("")
                ),
                field(e),
            )
        })
        .collect();
    out.sort();
    out
}

fn set<const N: usize>(ids: [&str; N]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[test]
fn orphans_against_a_real_api_server() {
    if !common::root_or_skip("the driver mounts (publish) and serves its pools") {
        return;
    }
    let Some(cp) = ControlPlane::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let node = Node::new(work.path());
    let sa = cp.kubeconfig_of("sa");
    let flags = node.flags(&sa);
    let mut serve = flags.clone();
    serve.extend([
        format!("--metrics-address=127.0.0.1:{}", node.metrics_port),
        "--orphan-scan-interval=1s".into(),
    ]);
    // Without the scan while the objects are being made: half-way through,
    // a claim whose PV is not made yet would rightly get an Event.
    let mut driver = Driver::start(&flags, &node.dir.join("driver.log"));
    wait_socket(&node.socket);
    cp.node(NODE);
    let target = node.dir.join("target");
    let canary_dir = node.dir.join("outside");
    std::fs::create_dir_all(&canary_dir).unwrap();
    std::fs::write(canary_dir.join("canary"), b"keep me").unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        story(
            &cp,
            &node,
            &flags,
            &target,
            &canary_dir,
            &mut driver,
            &serve,
        );
    }));
    common::unmount_below(&node.dir);
    driver.kill9();
    if let Err(e) = result {
        eprintln!(
            "driver log:\n{}",
            std::fs::read_to_string(node.dir.join("driver.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}

fn story(
    cp: &ControlPlane,
    node: &Node,
    flags: &[String],
    target: &Path,
    outside: &Path,
    driver: &mut Driver,
    serve: &[String],
) {
    let s = &node.socket;
    // Volumes as csi-provisioner makes them, and their PVs and claims.
    let gone = create(s, "pv-gone", "app/gone", &[]);
    let released = create(s, "pv-released", "app/released", &[]);
    let archived = create(s, "pv-archived", "app/archived", &[("onDelete", "archive")]);
    let unused = create(s, "pv-unused", "app/unused", &[]);
    let in_use = create(s, "pv-inuse", "app/inuse", &[]);
    let mounted = create(s, "pv-mounted", "app/mounted", &[]);
    std::fs::write(
        node.pool.join(gone.split_once(':').unwrap().1).join("data"),
        b"gone",
    )
    .unwrap();
    for (pv, id, claim, policy) in [
        ("pv-gone", &gone, "app/gone", "Delete"),
        ("pv-released", &released, "app/released", "Retain"),
        ("pv-archived", &archived, "app/archived", "Retain"),
        ("pv-unused", &unused, "app/unused", "Delete"),
        ("pv-inuse", &in_use, "app/inuse", "Delete"),
    ] {
        cp.pv(pv, id, NODE, Some(claim), policy, true);
        cp.claim(claim, pv);
    }
    // A PV of a node that no longer exists (its volume is not here).
    cp.pv(
        "pv-lost",
        "hdd:on-the-lost-node",
        GONE_NODE,
        None,
        "Retain",
        false,
    );
    // A pod (never run: no kubelet) using app/inuse; admitted once the
    // namespace's default ServiceAccount exists.
    cp.wait_for(
        "ServiceAccount app/default",
        Duration::from_secs(60),
        |cp| {
            cp.try_kubectl("admin", &["get", "serviceaccount", "default", "-n", "app"])
                .is_ok()
        },
    );
    cp.apply(
        "apiVersion: v1
kind: Pod
metadata: {name: db, namespace: app}
spec:
  containers: [{name: c, image: busybox}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: inuse}}]
",
    );
    for pv in [
        "pv-gone",
        "pv-released",
        "pv-archived",
        "pv-unused",
        "pv-inuse",
    ] {
        cp.wait_for(&format!("{pv} Bound"), Duration::from_secs(60), |cp| {
            cp.pv_phase(pv) == "Bound"
        });
    }
    // mounted: published now, and it has no PV at all.
    publish(s, &mounted, target);
    // Entries nobody made through the driver.
    std::fs::write(node.pool.join("stray-file"), b"x").unwrap();
    std::os::unix::fs::symlink(outside, node.pool.join("evil-link")).unwrap();
    std::fs::create_dir(node.pool.join("pvc-not-recorded")).unwrap();
    std::fs::write(node.pool.join("pvc-not-recorded/admin-data"), b"admin").unwrap();

    // Deleted by hand, finalizer stripped: the PV goes, the volume stays.
    cp.kubectl("admin", &["delete", "pv", "pv-gone", "--wait=false"]);
    cp.kubectl(
        "admin",
        &[
            "patch",
            "pv",
            "pv-gone",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    );
    // Retain PVs released by their claims.
    cp.kubectl(
        "admin",
        &["delete", "pvc", "-n", "app", "released", "archived"],
    );
    for pv in ["pv-released", "pv-archived"] {
        cp.wait_for(&format!("{pv} Released"), Duration::from_secs(60), |cp| {
            cp.pv_phase(pv) == "Released"
        });
    }

    // Now with the scan (a restart: a kill -9, as it happens).
    driver.kill9();
    *driver = Driver::start(serve, &node.dir.join("driver.log"));
    wait_socket(s);

    // The command (with no grace, to see what reclaim would take).
    let r = report(flags, &["--grace=0s"]);
    let expect: BTreeMap<String, BTreeSet<String>> = [
        (
            "no_pv",
            set([
                gone.as_str(),
                mounted.as_str(),
                "hdd:evil-link",
                "hdd:pvc-not-recorded",
                "hdd:stray-file",
            ]),
        ),
        ("released", set([archived.as_str(), released.as_str()])),
        ("unused", set([unused.as_str()])),
        ("node_gone", set(["hdd:on-the-lost-node"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(by_reason(&r), expect, "{r:#}");
    let reclaimable: BTreeSet<String> = r["reclaimable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        reclaimable,
        set([gone.as_str(), released.as_str(), archived.as_str()])
    );
    let keep = |id: &str| -> String {
        r["orphans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["volume_id"] == id)
            .unwrap()["keep"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(keep(&mounted).contains("published"), "{r:#}");
    assert!(keep("hdd:evil-link").contains("symlink"), "{r:#}");
    assert!(keep("hdd:stray-file").contains("not the driver's"), "{r:#}");
    assert!(keep("hdd:pvc-not-recorded").contains("static"), "{r:#}");
    assert!(keep(&unused).contains("Bound"), "{r:#}");
    // The table for people says the same.
    let (code, table, err) = orphans_cmd(flags);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "REASON",
        "no_pv",
        "released",
        "unused",
        "node_gone",
        &gone,
        "1 MiB",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }
    println!("hostpath-csi orphans:\n{table}");

    // Metrics: filled by the driver's scan.
    let want = [
        ("no_pv", 5.0),
        ("released", 2.0),
        ("unused", 1.0),
        ("node_gone", 1.0),
    ];
    cp.wait_for("the orphan metrics", Duration::from_secs(60), |_| {
        let m = scrape(node.metrics_port);
        want.iter().all(|(r, n)| {
            m.get(&format!("hostpath_csi_orphan_volumes{{reason=\"{r}\"}}")) == Some(n)
        })
    });
    let m = scrape(node.metrics_port);
    assert_eq!(
        m["hostpath_csi_orphan_bytes{reason=\"released\"}"],
        2.0 * f64::from(1 << 20)
    );
    assert_eq!(
        m["hostpath_csi_orphan_bytes{reason=\"node_gone\"}"],
        f64::from(1 << 20)
    );

    // Events: on the claim where it exists, else the PV; not repeated.
    let expected_events = vec![
        ("PersistentVolume//pv-archived".to_string(), 1),
        ("PersistentVolume//pv-lost".to_string(), 1),
        ("PersistentVolume//pv-released".to_string(), 1),
        ("PersistentVolumeClaim/app/gone".to_string(), 1),
        ("PersistentVolumeClaim/app/unused".to_string(), 1),
    ];
    cp.wait_for("the orphan Events", Duration::from_secs(60), |cp| {
        orphan_events(cp) == expected_events
    });
    // Several more scans (one a second) post nothing new.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(orphan_events(cp), expected_events);
    // A restarted driver has forgotten what it announced: its Events are
    // there already (the create answers 409), and it brings each up to date
    // (lastTimestamp, which has whole seconds) instead of failing or adding
    // another.
    let announced = orphan_event_times(cp);
    std::thread::sleep(Duration::from_millis(1100));
    driver.kill9();
    *driver = Driver::start(serve, &node.dir.join("driver.log"));
    wait_socket(s);
    cp.wait_for(
        "the Events announced again",
        Duration::from_secs(60),
        |cp| {
            let again = orphan_event_times(cp);
            again.len() == announced.len()
                && again
                    .iter()
                    .zip(&announced)
                    .all(|(a, b)| a.0 == b.0 && a.1 > b.1)
        },
    );
    assert_eq!(orphan_events(cp), expected_events);
    let log = std::fs::read_to_string(node.dir.join("driver.log")).unwrap();
    assert!(!log.contains("patch events"), "driver log:\n{log}");

    let entries_before = common::entries(&node.pool);
    // A dry run changes nothing.
    let r = report(flags, &["--reclaim", "--grace=0s"]);
    assert_eq!(r["reclaim"]["dry_run"], true, "{r:#}");
    assert_eq!(common::entries(&node.pool), entries_before);
    // Nothing is idle for a year yet.
    let r = report(flags, &["--reclaim", "--yes", "--grace=365d"]);
    assert_eq!(r["reclaimable"].as_array().unwrap().len(), 0, "{r:#}");
    assert_eq!(common::entries(&node.pool), entries_before);
    // No grace: exactly the three go; archived one to the trash.
    let r = report(flags, &["--reclaim", "--yes", "--grace=0s"]);
    let outcomes = r["reclaim"]["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 3, "{r:#}");
    assert!(outcomes.iter().all(|o| o["error"].is_null()), "{r:#}");
    let token = |id: &str| id.split_once(':').unwrap().1.to_string();
    let mut expected_left = entries_before.clone();
    for id in [&gone, &released, &archived] {
        assert!(expected_left.remove(&token(id)), "{id}");
    }
    let left: BTreeSet<String> = common::entries(&node.pool)
        .into_iter()
        .filter(|e| !e.starts_with('.'))
        .collect();
    let expected_left: BTreeSet<String> = expected_left
        .into_iter()
        .filter(|e| !e.starts_with('.'))
        .collect();
    assert_eq!(left, expected_left);
    // The archived volume's data is in the pool's trash.
    let trash = common::entries(&node.pool.join(".trash"));
    assert_eq!(trash.len(), 1, "{trash:?}");
    assert!(
        trash.iter().next().unwrap().starts_with(&token(&archived)),
        "{trash:?}"
    );
    // What was never the driver's is untouched.
    assert_eq!(std::fs::read(outside.join("canary")).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read(node.pool.join("pvc-not-recorded/admin-data")).unwrap(),
        b"admin"
    );
    assert!(
        std::fs::symlink_metadata(node.pool.join("evil-link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The report now shows what is left.
    let r = report(flags, &[]);
    assert_eq!(by_reason(&r)["no_pv"].len(), 4, "{r:#}");
    assert!(!by_reason(&r).contains_key("released"), "{r:#}");

    refusals(cp, node, flags);
}

/// A user without rights and an API server that is not there: said,
/// non-zero, nothing reclaimed (a reclaimable volume is waiting).
fn refusals(cp: &ControlPlane, node: &Node, flags: &[String]) {
    let waiting = create(&node.socket, "pv-waiting", "app/waiting", &[]);
    let token = waiting.split_once(':').unwrap().1.to_string();
    let with = |kubeconfig: &Path| -> Vec<String> {
        let mut f: Vec<String> = flags
            .iter()
            .filter(|f| !f.starts_with("--kubeconfig="))
            .cloned()
            .collect();
        f.push(format!("--kubeconfig={}", kubeconfig.display()));
        f.extend(["--reclaim".into(), "--yes".into(), "--grace=0s".into()]);
        f
    };
    // Refused by RBAC.
    let (code, out, err) = orphans_cmd(&with(&cp.kubeconfig_of("nobody")));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("refused") && err.contains("403"), "{err}");
    assert!(err.contains("nothing was reclaimed"), "{err}");
    assert!(node.pool.join(&token).is_dir());
    // Nobody listening.
    let dead = node.dir.join("dead.kubeconfig");
    let text = std::fs::read_to_string(cp.kubeconfig_of("nobody"))
        .unwrap()
        .replace(&cp.server, &format!("https://127.0.0.1:{}", free_port()));
    std::fs::write(&dead, text).unwrap();
    let (code, out, err) = orphans_cmd(&with(&dead));
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("unreachable"), "{err}");
    assert!(err.contains("nothing was reclaimed"), "{err}");
    assert!(node.pool.join(&token).is_dir());
    // And with rights, it would have gone.
    let r = report(flags, &["--grace=0s"]);
    assert!(
        r["reclaimable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == waiting.as_str()),
        "{r:#}"
    );
}
