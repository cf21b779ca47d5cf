//! Snapshots, group snapshots, restores and clones survive `kill -9` at
//! any moment: the real binary is killed while it takes, deletes or
//! restores a snapshot, takes or deletes a group snapshot of two volumes
//! (btrfs and image pools; dir pools refuse groups), or clones a volume,
//! restarted, and the interrupted call is retried (or, now and then,
//! abandoned, as a CO that gave up would). At the end no snapshot or volume
//! is half-made (every one on disk is complete and recorded, or gone), no
//! group is half-made (every member on disk belongs to a group with a
//! record, every group the driver reports has both members), nothing
//! acknowledged is lost, every restored or cloned volume holds its
//! source's data, no filesystem is left frozen, and after deleting
//! everything no mount, loop device or file is left.
//!
//! Needs root (loop mounts); btrfs-progs, e2fsprogs. Rounds per pool kind:
//! `HOSTPATH_CSI_SNAPSHOT_CRASH_ROUNDS` (default 12), seed
//! `HOSTPATH_CSI_CRASH_SEED`.

mod common;
mod robust_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::group_controller_client::GroupControllerClient;
use csi_proto::node_client::NodeClient;
use robust_support::*;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

struct Ctx {
    root: PathBuf,
    pools: Vec<PoolSpec>,
    pool: PathBuf,
    driver: Driver,
    ch: Channel,
    size: i64,
}

impl Ctx {
    async fn restart(&mut self) {
        self.driver.kill();
        self.driver = Driver::start(&self.root, &self.pools).await;
        self.ch = connect_once(&self.driver.socket).await.unwrap();
    }
    fn ctl(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.ch.clone())
    }
    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.ch.clone())
    }
    fn groups(&self) -> GroupControllerClient<Channel> {
        GroupControllerClient::new(self.ch.clone())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Snapshot(String),
    DeleteSnapshot(String),
    Restore {
        name: String,
        snapshot: String,
    },
    Clone(String),
    /// A group snapshot of both source volumes.
    Group(String),
    DeleteGroup(String),
}

fn create_req(
    name: &str,
    size: i64,
    source: Option<csi::volume_content_source::Type>,
) -> csi::CreateVolumeRequest {
    let mut r = common::create_request(name, "p", size);
    r.volume_content_source = source.map(|t| csi::VolumeContentSource { r#type: Some(t) });
    r
}

/// Runs `op` once on the sources `srcs` (the first for single snapshots
/// and clones); the id it made (snapshot, group or volume) on success.
async fn run(ch: Channel, op: &Op, srcs: &[String], size: i64) -> Result<String, tonic::Status> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let mut ctl = ControllerClient::new(ch.clone());
    let src = srcs[0].as_str();
    match op {
        Op::Snapshot(name) => ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: src.into(),
                name: name.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap().snapshot_id),
        Op::DeleteSnapshot(id) => ctl
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| id.clone()),
        Op::Restore { name, snapshot } => ctl
            .create_volume(create_req(
                name,
                size,
                Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: snapshot.clone(),
                })),
            ))
            .await
            .map(|r| r.into_inner().volume.unwrap().volume_id),
        Op::Clone(name) => ctl
            .create_volume(create_req(
                name,
                size,
                Some(Type::Volume(VolumeSource {
                    volume_id: src.into(),
                })),
            ))
            .await
            .map(|r| r.into_inner().volume.unwrap().volume_id),
        Op::Group(name) => GroupControllerClient::new(ch)
            .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: name.clone(),
                source_volume_ids: srcs.to_vec(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().group_snapshot.unwrap().group_snapshot_id),
        Op::DeleteGroup(id) => GroupControllerClient::new(ch)
            .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| id.clone()),
    }
}

/// The member snapshot ids of group `id`, or the error of
/// GetVolumeGroupSnapshot.
async fn members(c: &Ctx, id: &str) -> Result<Vec<String>, tonic::Status> {
    c.groups()
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|r| {
            r.into_inner()
                .group_snapshot
                .unwrap()
                .snapshots
                .into_iter()
                .map(|s| s.snapshot_id)
                .collect()
        })
}

/// Retries `op` until it succeeds (ABORTED and UNAVAILABLE are what a CO
/// retries), panicking on any other error.
async fn retry(c: &Ctx, op: &Op, srcs: &[String]) -> String {
    for _ in 0..200 {
        match run(c.ch.clone(), op, srcs, c.size).await {
            Ok(id) => return id,
            Err(e) if matches!(e.code(), Code::Aborted | Code::Unavailable) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!(
                "{op:?} failed after a restart: {e:?}\nlog:\n{}",
                c.driver.log_tail()
            ),
        }
    }
    panic!("{op:?} kept being refused");
}

fn seeded(i: usize) -> u8 {
    (i * 37 % 251) as u8
}

/// The user's data: files whose contents derive from their index, enough
/// of them that a copy takes a moment to be killed in.
fn write_data(dir: &Path) {
    for i in 0..64 {
        std::fs::write(dir.join(format!("f{i}")), vec![seeded(i); 64 << 10]).unwrap();
    }
}

fn check_data(dir: &Path, what: &str) {
    for i in 0..64 {
        let got = std::fs::read(dir.join(format!("f{i}")))
            .unwrap_or_else(|e| panic!("{what}: f{i}: {e}"));
        assert!(
            got.len() == 64 << 10 && got.iter().all(|b| *b == seeded(i)),
            "{what}: f{i} differs"
        );
    }
}

/// A volume of the test's size named `name`, published at
/// `targets/<name>` with the test's data written into it: its id and target.
async fn source(c: &Ctx, targets: &Path, name: &str) -> (String, PathBuf) {
    let id = c
        .ctl()
        .create_volume(common::create_request(name, "p", c.size))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let target = targets.join(name);
    publish(c, &id, &target).await;
    write_data(&target);
    (id, target)
}

async fn publish(c: &Ctx, id: &str, target: &Path) {
    c.node()
        .node_publish_volume(common::publish_request(id, target, false))
        .await
        .unwrap_or_else(|e| panic!("publish {id}: {e:?}"));
}

async fn unpublish(c: &Ctx, id: &str, target: &Path) {
    c.node()
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
}

/// Entries of the pool directory and its snapshot directory that are
/// neither a recorded volume or snapshot nor the record of one.
fn half_made(pool: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let names = common::entries(pool);
    for n in &names {
        let ok = n == ".snapshots"
            || (n.starts_with('.') && n.ends_with(".meta") && !n.ends_with(".tmp"))
            || (!n.starts_with('.') && names.contains(&format!(".{n}.meta")))
            // An image, or the mark of a published volume, of a recorded one.
            || [".img", ".published"].iter().any(|suffix| {
                n.strip_suffix(suffix)
                    .is_some_and(|t| names.contains(&format!("{t}.meta")))
            });
        if !ok {
            bad.push(n.clone());
        }
    }
    let snaps = pool.join(".snapshots");
    if snaps.exists() {
        let names = common::entries(&snaps);
        let groups = snaps.join(".groups");
        for n in &names {
            let ok = n == ".groups"
                || (n.starts_with('.')
                    && n.ends_with(".meta")
                    && names.contains(n.trim_start_matches('.').trim_end_matches(".meta")))
                || (!n.starts_with('.') && names.contains(&format!(".{n}.meta")));
            if !ok {
                bad.push(format!(".snapshots/{n}"));
            }
            // A member of a group exists only with its group's record.
            if let Some(group) = n
                .starts_with('.')
                .then(|| std::fs::read(snaps.join(n)).ok())
                .flatten()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v.get("group")?.as_str().map(str::to_string))
                && !groups.join(format!(".{group}.meta")).exists()
            {
                bad.push(format!(
                    ".snapshots/{n} (a member of group {group}, which has no record)"
                ));
            }
        }
        if groups.exists() {
            for n in common::entries(&groups) {
                if !(n.starts_with('.') && n.ends_with(".meta")) {
                    bad.push(format!(".snapshots/.groups/{n}"));
                }
            }
        }
    }
    bad
}

/// Thaws a filesystem when dropped, before the work directory's cleanup
/// unmounts it: a test failing while the driver had frozen an image volume
/// would otherwise leave it frozen, and a frozen filesystem cannot go away,
/// keeping its loop device (and the pool's) attached.
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        if !mounts_below(&self.0).is_empty() {
            let _ = std::process::Command::new("fsfreeze")
                .arg("-u")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn crash_snapshots(spec: PoolSpec, size: i64, groups: bool) {
    if !common::root_or_skip("snapshot crash tests mount filesystems") {
        return;
    }
    let work = Workdir::new("hostpath-csi-snapcrash");
    let root = work.path().to_path_buf();
    let _fs = spec
        .own_fs()
        .map(|(kind, bytes)| LoopFs::new(&root, spec.name, kind, bytes));
    let pools = vec![spec.clone()];
    let pool = spec.dir_in(&root);
    std::fs::create_dir_all(&pool).unwrap();
    let targets = root.join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let driver = Driver::start(&root, &pools).await;
    let ch = connect_once(&driver.socket).await.unwrap();
    let _thaw = ["src", "src2"].map(|v| Thaw(std::fs::canonicalize(&pool).unwrap().join(v)));
    let mut c = Ctx {
        root: root.clone(),
        pools,
        pool: std::fs::canonicalize(&pool).unwrap(),
        driver,
        ch,
        size,
    };

    let (src, src_target) = source(&c, &targets, "src").await;
    // The second volume of the group snapshots, holding the same data.
    let (src2, src2_target) = source(&c, &targets, "src2").await;
    let srcs = [src.clone(), src2.clone()];

    let rounds = env_u64("HOSTPATH_CSI_SNAPSHOT_CRASH_ROUNDS", 12) as usize;
    let seed = env_u64("HOSTPATH_CSI_CRASH_SEED", 13);
    let mut rng = Rng::new(seed);
    // Acknowledged snapshots (name -> id) and volumes (id), and what an
    // abandoned call may or may not have made.
    let mut snaps: BTreeMap<String, String> = BTreeMap::new();
    // Acknowledged group snapshots (name -> id) and their members (to
    // restore from).
    let mut group_ids: BTreeMap<String, String> = BTreeMap::new();
    let mut group_members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut volumes: BTreeSet<String> = BTreeSet::new();
    let mut maybe: BTreeSet<String> = BTreeSet::new();
    for i in 0..rounds {
        let restorable: Vec<&String> = snaps
            .values()
            .chain(group_members.values().flatten())
            .collect();
        let op = match rng.below(if groups { 6 } else { 4 }) {
            1 if !snaps.is_empty() => {
                let k = snaps
                    .keys()
                    .nth(rng.below(snaps.len() as u64) as usize)
                    .unwrap()
                    .clone();
                Op::DeleteSnapshot(snaps[&k].clone())
            }
            2 if !restorable.is_empty() => Op::Restore {
                name: format!("r{i}"),
                snapshot: restorable[rng.below(restorable.len() as u64) as usize].clone(),
            },
            3 => Op::Clone(format!("c{i}")),
            4 => Op::Group(format!("g{i}")),
            5 if !group_ids.is_empty() => Op::DeleteGroup(
                group_ids
                    .values()
                    .nth(rng.below(group_ids.len() as u64) as usize)
                    .unwrap()
                    .clone(),
            ),
            _ => Op::Snapshot(format!("s{i}")),
        };
        let delay = Duration::from_millis(rng.below(120));
        let (ch, op2, srcs2) = (c.ch.clone(), op.clone(), srcs.clone());
        let call = tokio::spawn(async move { run(ch, &op2, &srcs2, size).await });
        tokio::time::sleep(delay).await;
        c.driver.kill();
        let finished = call.await.unwrap();
        c.restart().await;
        let abandon = finished.is_err()
            && !matches!(op, Op::DeleteSnapshot(_) | Op::DeleteGroup(_))
            && rng.chance(1, 4);
        let outcome = match (&finished, abandon) {
            (Ok(id), _) => Some(id.clone()),
            (Err(_), true) => None,
            (Err(_), false) => Some(retry(&c, &op, &srcs).await),
        };
        eprintln!(
            "round {i}: {op:?} after {delay:?}: {}",
            match (&finished, &outcome) {
                (Ok(_), _) => "done before the kill",
                (Err(_), Some(_)) => "retried after the restart",
                (Err(_), None) => "abandoned",
            }
        );
        match (&op, outcome) {
            (Op::Snapshot(name), Some(id)) => {
                snaps.insert(name.clone(), id);
            }
            (Op::Snapshot(name), None) => {
                maybe.insert(name.clone());
            }
            (Op::DeleteSnapshot(id), _) => snaps.retain(|_, v| v != id),
            (Op::Restore { name, .. } | Op::Clone(name), Some(id)) => {
                volumes.insert(id);
                let _ = name;
            }
            (Op::Restore { name, .. } | Op::Clone(name), None) => {
                maybe.insert(name.clone());
            }
            (Op::Group(name), Some(id)) => {
                let m = members(&c, &id).await.unwrap();
                assert_eq!(m.len(), 2, "group {id} acknowledged with members {m:?}");
                group_ids.insert(name.clone(), id.clone());
                group_members.insert(id, m);
            }
            (Op::Group(name), None) => {
                maybe.insert(name.clone());
            }
            (Op::DeleteGroup(id), _) => {
                group_ids.retain(|_, v| v != id);
                group_members.remove(id);
            }
        }
    }

    // The startup sweep runs once the driver is ready: give it a moment.
    let mut bad = half_made(&c.pool);
    for _ in 0..100 {
        if bad.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        bad = half_made(&c.pool);
    }
    assert!(bad.is_empty(), "half-made leftovers: {bad:?}");

    // Nothing acknowledged lost, nothing unexplained.
    // Snapshot id -> the group it belongs to ("" for none).
    let listed: BTreeMap<String, String> = c
        .ctl()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap())
        .map(|s| (s.snapshot_id, s.group_snapshot_id))
        .collect();
    for id in snaps.values().chain(group_members.values().flatten()) {
        assert!(listed.contains_key(id), "acknowledged snapshot {id} lost");
    }
    let mut listed_groups = BTreeSet::new();
    for (id, group) in &listed {
        if !group.is_empty() {
            listed_groups.insert(group.clone());
            continue;
        }
        let name = id.split('@').nth(1).unwrap();
        assert!(
            snaps.values().any(|v| v == id) || maybe.contains(name),
            "snapshot {id} nobody made"
        );
    }
    // Every group the driver shows is whole, and someone made it.
    for g in &listed_groups {
        let m = members(&c, g).await.unwrap();
        assert_eq!(m.len(), 2, "group {g} has members {m:?}");
        assert!(
            m.iter().all(|s| listed.get(s) == Some(g)),
            "group {g}: {m:?}"
        );
        let name = g.split('@').nth(2).unwrap();
        assert!(
            group_members.contains_key(g) || maybe.contains(name),
            "group {g} nobody made"
        );
    }
    for g in group_members.keys() {
        assert!(listed_groups.contains(g), "acknowledged group {g} lost");
    }
    let listed_vols: BTreeSet<String> = c
        .ctl()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    for v in &volumes {
        assert!(listed_vols.contains(v), "acknowledged volume {v} lost");
    }
    for v in &listed_vols {
        let name = v.split(':').nth(1).unwrap();
        assert!(
            srcs.contains(v) || volumes.contains(v) || maybe.contains(name),
            "volume {v} nobody made"
        );
    }

    // The source is not frozen: a write finishes.
    let probe = src_target.join("after");
    let wrote = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || std::fs::write(probe, b"x")),
    )
    .await;
    assert!(
        matches!(wrote, Ok(Ok(Ok(())))),
        "the source volume cannot be written (left frozen?)"
    );

    // Every restored or cloned volume holds the data; then all goes.
    for v in &listed_vols {
        if srcs.contains(v) {
            continue;
        }
        let t = targets.join(v.replace(':', "-"));
        publish(&c, v, &t).await;
        check_data(&t, v);
        unpublish(&c, v, &t).await;
        c.ctl()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for g in &listed_groups {
        run(c.ch.clone(), &Op::DeleteGroup(g.clone()), &srcs, size)
            .await
            .unwrap();
    }
    for (id, group) in &listed {
        if !group.is_empty() {
            continue;
        }
        c.ctl()
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for (v, t) in [(&src, &src_target), (&src2, &src2_target)] {
        unpublish(&c, v, t).await;
        c.ctl()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let left: Vec<String> = common::entries(&c.pool)
        .into_iter()
        .filter(|n| n != ".snapshots")
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
    let snapshots_left: Vec<String> = common::entries(&c.pool.join(".snapshots"))
        .into_iter()
        .filter(|n| n != ".groups")
        .collect();
    assert!(
        snapshots_left.is_empty(),
        "left in .snapshots: {snapshots_left:?}"
    );
    let groups_dir = c.pool.join(".snapshots/.groups");
    assert!(!groups_dir.exists() || common::entries(&groups_dir).is_empty());
    assert!(
        mounts_below(&c.pool).is_empty(),
        "mounts left: {:?}",
        mounts_below(&c.pool)
    );
    assert!(
        loops_below(&c.pool).is_empty(),
        "loop devices left: {:?}",
        loops_below(&c.pool)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_snapshots_survive_kill_9() {
    crash_snapshots(PoolSpec::dir("p"), 32 * MIB, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_snapshots_survive_kill_9() {
    if have("btrfs") {
        crash_snapshots(PoolSpec::btrfs("p"), 32 * MIB, true).await;
    } else {
        common::skip("btrfs-progs is not installed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_snapshots_survive_kill_9() {
    crash_snapshots(PoolSpec::image("p", "ext4"), 32 * MIB, true).await;
}
