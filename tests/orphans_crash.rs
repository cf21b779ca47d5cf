//! kill -9 in the middle of `hostpath-csi orphans --reclaim --yes`: the
//! driver (which does the removals) or the command itself is killed while
//! orphans are being removed or archived; after a restart the same
//! command finishes the job. Nothing is lost (volumes that are not orphans
//! keep their data; archived orphans are whole in the trash), nothing is
//! half-done (no record, scratch copy or marker of a reclaimed volume is
//! left outside the trash; no trash entry without its data), and
//! nothing that should stay is touched. Against a real API server
//! (`orphans_support`), as the node plugin's ServiceAccount.

mod common;
mod orphans_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto as csi;
use orphans_support::{ControlPlane, Driver, block_on, create, orphans_cmd};

const NODE: &str = "crash-node";
/// Orphans made per round.
const PER_ROUND: usize = 8;
/// Files in each orphan, so that removing one takes a moment.
const FILES: usize = 300;
const ROUNDS: usize = 6;

fn ready(socket: &Path) -> bool {
    block_on(async {
        let Ok(ch) = csi::connect(socket).await else {
            return false;
        };
        csi::identity_client::IdentityClient::new(ch)
            .probe(csi::ProbeRequest {})
            .await
            .is_ok_and(|r| r.into_inner().ready == Some(true))
    })
}

fn start(args: &[String], dir: &Path, socket: &Path) -> Driver {
    let d = Driver::start(args, &dir.join("driver.log"));
    let t = Instant::now();
    while !ready(socket) {
        assert!(t.elapsed() < Duration::from_secs(60), "driver not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn token(id: &str) -> String {
    id.split_once(':').unwrap().1.to_string()
}

/// Fills a volume: FILES small files and `data` saying whose it is.
fn fill(pool: &Path, id: &str) {
    let dir = pool.join(token(id));
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i}")), [0u8; 64]).unwrap();
    }
    std::fs::write(dir.join("data"), id.as_bytes()).unwrap();
}

#[test]
fn kill_9_during_reclaim_loses_nothing_and_leaves_nothing_half_done() {
    if !common::root_or_skip("the driver serves pools and needs CAP_SYS_ADMIN") {
        return;
    }
    let Some(cp) = ControlPlane::start() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let pool = dir.join("hdd");
    std::fs::create_dir_all(&pool).unwrap();
    let socket = dir.join("csi.sock");
    let flags: Vec<String> = vec![
        format!("--endpoint=unix://{}", socket.display()),
        format!("--node-id={NODE}"),
        format!("--pool=hdd={}", pool.display()),
        format!("--kubeconfig={}", cp.kubeconfig_of("sa").display()),
        "--orphan-settle=0s".into(),
    ];
    let reclaim: Vec<String> = flags
        .iter()
        .cloned()
        .chain(["--reclaim", "--yes", "--grace=0s", "-o", "json"].map(String::from))
        .collect();
    cp.node(NODE);
    let mut driver = start(&flags, dir, &socket);

    // Volumes that are not orphans: bound PVs. They must keep their data.
    let mut keep = Vec::new();
    for name in ["keep-a", "keep-b"] {
        let id = create(&socket, name, &format!("app/{name}"), &[]);
        fill(&pool, &id);
        cp.pv(
            name,
            &id,
            NODE,
            Some(&format!("app/{name}")),
            "Delete",
            true,
        );
        cp.claim(&format!("app/{name}"), name);
        keep.push(id);
    }
    for name in ["keep-a", "keep-b"] {
        cp.wait_for(&format!("{name} Bound"), Duration::from_secs(60), |cp| {
            cp.pv_phase(name) == "Bound"
        });
    }

    let mut midway = 0;
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for i in 0..PER_ROUND {
            let name = format!("r{round}-v{i}");
            let archive: &[(&str, &str)] = if i % 2 == 1 {
                &[("onDelete", "archive")]
            } else {
                &[]
            };
            let id = create(&socket, &name, &format!("app/{name}"), archive);
            fill(&pool, &id);
            ids.push((id, i % 2 == 1));
        }
        let gone = |ids: &[(String, bool)]| {
            ids.iter()
                .filter(|(id, _)| !pool.join(token(id)).exists())
                .count()
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
            .arg("orphans")
            .args(&reclaim)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill once the first orphan has gone: the others are then being
        // removed (or about to be). Odd rounds kill the command, even
        // rounds the driver doing the work.
        let t = Instant::now();
        while gone(&ids) == 0
            && cmd.try_wait().unwrap().is_none()
            && t.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let victim = if round % 2 == 0 { "driver" } else { "command" };
        if round % 2 == 0 {
            driver.kill9();
        } else {
            let _ = cmd.kill();
        }
        let at_kill = gone(&ids);
        let _ = cmd.kill();
        let _ = cmd.wait();
        if at_kill > 0 && at_kill < PER_ROUND {
            midway += 1;
        }
        println!("round {round}: killed the {victim} with {at_kill} of {PER_ROUND} orphans gone");
        if round % 2 == 0 {
            driver = start(&flags, dir, &socket);
        }
        // The same command again finishes the job.
        let (code, out, err) = orphans_cmd(&reclaim);
        assert_eq!(code, 0, "{err}\n{out}");
        check(&pool, &ids, &keep, &flags);
    }
    println!("{midway} of {ROUNDS} rounds were interrupted with some orphans gone and some not");
    driver.kill9();
    // And a restart (its sweep) changes nothing of that.
    let d = start(&flags, dir, &socket);
    drop(d);
}

/// Every orphan of the round is gone, the archived ones whole in the
/// trash; nothing of theirs is left elsewhere; the kept volumes are whole.
fn check(pool: &Path, ids: &[(String, bool)], keep: &[String], flags: &[String]) {
    let entries = common::entries(pool);
    let trash: BTreeSet<String> = if pool.join(".trash").exists() {
        common::entries(&pool.join(".trash"))
    } else {
        BTreeSet::new()
    };
    for (id, archived) in ids {
        let t = token(id);
        let stray: Vec<&String> = entries.iter().filter(|e| e.contains(&t)).collect();
        assert!(stray.is_empty(), "{id}: left in the pool: {stray:?}");
        let in_trash: Vec<&String> = trash
            .iter()
            .filter(|e| e.starts_with(&format!("{t}@")))
            .collect();
        if *archived {
            assert_eq!(in_trash.len(), 1, "{id}: trash {trash:?}");
            let data: PathBuf = pool.join(".trash").join(in_trash[0]).join("data");
            assert_eq!(
                std::fs::read(data.join("data")).unwrap(),
                id.as_bytes(),
                "{id}"
            );
            assert_eq!(common::entries(&data).len(), FILES + 1, "{id}: files lost");
        } else {
            assert!(in_trash.is_empty(), "{id}: trash {trash:?}");
        }
    }
    for id in keep {
        let d = pool.join(token(id));
        assert_eq!(
            std::fs::read(d.join("data")).unwrap(),
            id.as_bytes(),
            "{id}"
        );
        assert_eq!(common::entries(&d).len(), FILES + 1, "{id}: files lost");
    }
    // The driver's own listing agrees: only the kept volumes, no problems.
    let out = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .arg("volumes")
        .args(
            flags
                .iter()
                .filter(|f| !f.starts_with("--kubeconfig") && !f.starts_with("--orphan")),
        )
        .args(["-o", "json", "--no-usage"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: BTreeSet<String> = v["pools"][0]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["problem"].is_null(), "{e}");
            e["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(listed, keep.iter().cloned().collect::<BTreeSet<_>>());
}
