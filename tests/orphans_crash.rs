//! kill -9 in the middle of `hostpath-csi orphans --reclaim --yes`: the
//! driver (which does the removals) or the command itself is killed while
//! orphans are being removed or archived; after a restart the same
//! command finishes the job. Nothing is lost (volumes that are not orphans
//! keep their data, byte for byte; archived orphans are whole in the
//! trash), nothing is half-done (no record, scratch copy or marker of a
//! reclaimed volume is left outside the trash; no trash entry without its
//! data), and nothing that should stay is touched. Against a real API
//! server (`orphans_support`), as the node plugin's ServiceAccount.
//!
//! Where each kill lands is drawn from a seeded generator, as in the other
//! crash tests: while the command makes its report (before any removal),
//! or a random few milliseconds after a random number of the round's
//! orphans have gone, which puts it inside a removal or an archive, or
//! between two. Rounds alternate between killing the driver and the
//! command. `HOSTPATH_CSI_CRASH_SEED` sets the seed (printed),
//! `HOSTPATH_CSI_CRASH_ROUNDS` the rounds (default 8).

mod common;
mod orphans_support;
mod robust_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use csi_proto as csi;
use orphans_support::{ControlPlane, Driver, block_on, create, orphans_cmd};
use robust_support::{Rng, env_u64, tree_digest};

const NODE: &str = "crash-node";
/// Orphans made per round.
const PER_ROUND: usize = 8;
/// Files in each orphan, so that removing one takes a moment.
const FILES: usize = 300;

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

/// Fills a volume: FILES small files and `data` saying whose it is;
/// returns the digest of its tree.
fn fill(pool: &Path, id: &str) -> String {
    let dir = pool.join(token(id));
    for i in 0..FILES {
        std::fs::write(dir.join(format!("f{i}")), format!("{id} {i}")).unwrap();
    }
    std::fs::write(dir.join("data"), id.as_bytes()).unwrap();
    tree_digest(&dir, &[])
}

/// Where a round's kill lands.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after the command starts: while it reads the API server
    /// and the pools, or at its first removal.
    AfterStart(Duration),
    /// This long after this many of the round's orphans have gone from
    /// the pool: inside a removal or an archive, or between two.
    AfterGone(usize, Duration),
}

impl KillAt {
    fn draw(rng: &mut Rng) -> KillAt {
        if rng.chance(1, 4) {
            KillAt::AfterStart(Duration::from_millis(rng.below(400)))
        } else {
            let n = 1 + rng.below(PER_ROUND as u64 - 1) as usize;
            KillAt::AfterGone(n, Duration::from_micros(rng.below(20_000)))
        }
    }
}

/// Where a volume stands: its record, its directory in the pool, its
/// entry in the trash.
fn state(pool: &Path, id: &str) -> &'static str {
    let t = token(id);
    let record = pool.join(format!(".{t}.meta")).exists();
    let dir = pool.join(&t).exists();
    let trashed = std::fs::read_dir(pool.join(".trash")).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{t}@"))
        })
    });
    match (record, dir, trashed) {
        (true, true, false) => "untouched",
        (false, false, _) => "done",
        _ => "half-way",
    }
}

#[test]
fn kill_9_during_reclaim_loses_nothing_and_leaves_nothing_half_done() {
    if !common::root_or_skip("the driver serves pools and needs CAP_SYS_ADMIN") {
        return;
    }
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 0x0fa5);
    let rounds = env_u64("HOSTPATH_CSI_CRASH_ROUNDS", 8) as usize;
    eprintln!("orphans reclaim crash: seed {seed}, {rounds} rounds");
    let mut rng = Rng::new(seed);
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
    let mut keep = BTreeMap::new();
    for name in ["keep-a", "keep-b"] {
        let id = create(&socket, name, &format!("app/{name}"), &[]);
        let digest = fill(&pool, &id);
        cp.pv(
            name,
            &id,
            NODE,
            Some(&format!("app/{name}")),
            "Delete",
            true,
        );
        cp.claim(&format!("app/{name}"), name);
        keep.insert(id, digest);
    }
    for name in ["keep-a", "keep-b"] {
        cp.wait_for(&format!("{name} Bound"), Duration::from_secs(60), |cp| {
            cp.pv_phase(name) == "Bound"
        });
    }

    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut archived: BTreeMap<String, String> = BTreeMap::new();
    let mut every = Vec::new();
    for round in 0..rounds {
        let mut ids = Vec::new();
        for i in 0..PER_ROUND {
            let name = format!("r{round}-v{i}");
            let archive: &[(&str, &str)] = if i % 2 == 1 {
                &[("onDelete", "archive")]
            } else {
                &[]
            };
            let id = create(&socket, &name, &format!("app/{name}"), archive);
            let digest = fill(&pool, &id);
            if i % 2 == 1 {
                archived.insert(id.clone(), digest);
            }
            ids.push(id);
        }
        let gone = |ids: &[String]| {
            ids.iter()
                .filter(|id| !pool.join(token(id)).exists())
                .count()
        };
        let at = KillAt::draw(&mut rng);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
            .arg("orphans")
            .args(&reclaim)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        let wait = match at {
            KillAt::AfterStart(d) => d,
            KillAt::AfterGone(n, d) => {
                while gone(&ids) < n
                    && cmd.try_wait().unwrap().is_none()
                    && t.elapsed() < Duration::from_secs(60)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                d
            }
        };
        std::thread::sleep(wait);
        let driver_killed = round % 2 == 0;
        if driver_killed {
            driver.kill9();
        } else {
            let _ = cmd.kill();
        }
        let finished = cmd.try_wait().unwrap().is_some();
        let _ = cmd.kill();
        let _ = cmd.wait();
        let mut here: BTreeMap<&str, usize> = BTreeMap::new();
        for id in &ids {
            *here.entry(state(&pool, id)).or_insert(0) += 1;
        }
        for (k, n) in &here {
            *states.entry(k).or_insert(0) += n;
        }
        println!(
            "round {round}: killed the {} at {at:?} ({:.1} ms after the start{}): {here:?}",
            if driver_killed { "driver" } else { "command" },
            t.elapsed().as_secs_f64() * 1e3,
            if finished {
                ", the command had exited"
            } else {
                ""
            },
        );
        if driver_killed {
            driver = start(&flags, dir, &socket);
        }
        // The same command again finishes the job.
        let (code, out, err) = orphans_cmd(&reclaim);
        assert_eq!(code, 0, "{err}\n{out}");
        check(&pool, &ids, &archived, &keep, &flags);
        every.extend(ids);
    }
    println!("volumes at the kills, all rounds: {states:?}");
    driver.kill9();
    // A restart (its start-up sweep) changes none of that: the archived
    // orphans of every round are still whole in the trash, the others gone.
    let d = start(&flags, dir, &socket);
    check(&pool, &every, &archived, &keep, &flags);
    drop(d);
}

/// Every orphan of `ids` is gone, the archived ones (in `archived`, with
/// their digests) whole in the trash; nothing of theirs is left elsewhere;
/// the kept volumes are whole.
fn check(
    pool: &Path,
    ids: &[String],
    archived: &BTreeMap<String, String>,
    keep: &BTreeMap<String, String>,
    flags: &[String],
) {
    let entries = common::entries(pool);
    let trash: BTreeSet<String> = if pool.join(".trash").exists() {
        common::entries(&pool.join(".trash"))
    } else {
        BTreeSet::new()
    };
    for id in ids {
        let t = token(id);
        let stray: Vec<&String> = entries.iter().filter(|e| e.contains(&t)).collect();
        assert!(stray.is_empty(), "{id}: left in the pool: {stray:?}");
        let in_trash: Vec<&String> = trash
            .iter()
            .filter(|e| e.starts_with(&format!("{t}@")))
            .collect();
        if let Some(digest) = archived.get(id) {
            assert_eq!(in_trash.len(), 1, "{id}: trash {trash:?}");
            let data: PathBuf = pool.join(".trash").join(in_trash[0]).join("data");
            assert_eq!(
                &tree_digest(&data, &[]),
                digest,
                "{id}: archived data changed"
            );
        } else {
            assert!(in_trash.is_empty(), "{id}: trash {trash:?}");
        }
    }
    for (id, digest) in keep {
        let d = pool.join(token(id));
        assert_eq!(&tree_digest(&d, &[]), digest, "{id}: its data changed");
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
    assert_eq!(listed, keep.keys().cloned().collect::<BTreeSet<_>>());
}
