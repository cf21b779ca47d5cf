//! The snapshot scenario: a volume of --size gets --snapshot-data bytes of
//! data through a real publish (staged and ControllerPublished first when
//! the driver asks for it), then each round times CreateSnapshot of it, a
//! CreateVolume restoring that snapshot, and both deletes, followed by one
//! round of the copy floor on the --workdir disk (see `copy_floor`), so
//! both see the disk in the same state. The snapshot and the restore are
//! compared with the fastest copy the disk allows.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use csi_proto as csi;

use crate::copy_floor::{self, CopyFloor};
use crate::data;
use crate::ops::Ctx;
use crate::report::{FLOOR_SCENARIO, Floor};
use crate::scenarios::{Env, MAX_ERRORS, remove_empty_dir};
use crate::stats::Samples;

const SCENARIO: &str = "snapshot";

/// Where the source volume is published, to be undone at the end.
struct Attached {
    id: String,
    target: PathBuf,
    staging: Option<PathBuf>,
}

/// Runs the scenario: `bytes` of data, `rounds` snapshots and restores.
pub async fn run(ctx: &Arc<Ctx>, env: &Env<'_>, bytes: u64, rounds: usize) {
    let skip = |why: String| env.report().skip(SCENARIO, why);
    if !ctx.caps.snapshots {
        return skip("the driver does not advertise CREATE_DELETE_SNAPSHOT".into());
    }
    if !ctx.caps.node_service {
        return skip(
            "the data is written through a publish: the driver has no node service".into(),
        );
    }
    if bytes >= ctx.size as u64 {
        return skip(format!(
            "--snapshot-data ({bytes} bytes) must be less than --size ({} bytes)",
            ctx.size
        ));
    }
    let name = format!("{}-snap-source", env.prefix);
    let source = match ctx.create(&name).await {
        (_, Ok(id)) => id,
        (_, Err(e)) => return skip(format!("creating the source volume: {e}")),
    };
    let attached = match attach(ctx, env, &source).await {
        Ok(a) => a,
        Err(why) => {
            skip(why);
            // A failed delete stays in the ledger: cleanup tries again.
            let _ = ctx.delete(&name, &source).await;
            return;
        }
    };
    // The data goes in through the publish, flushed, as a pod would write
    // it; the floor gets the same amount of the same kind of data.
    let mib = bytes >> 20;
    let file = attached.target.join("data");
    let floor_dir = env.run_dir.join("copy-floor");
    let prepared = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        data::write(&file, bytes).map_err(|e| format!("writing {}: {e}", file.display()))?;
        let wrote = t.elapsed();
        let floor = CopyFloor::new(&floor_dir, bytes)
            .map_err(|e| format!("preparing the copy floor in {}: {e}", floor_dir.display()))?;
        Ok::<_, String>((wrote, floor))
    })
    .await
    .unwrap_or_else(|e| Err(format!("panicked: {e}")));
    let mut floor = match prepared {
        Ok((wrote, floor)) => {
            env.report().figure(
                SCENARIO,
                &format!("writing {mib} MiB into the published volume"),
                bytes as f64 / (1 << 20) as f64 / wrote.as_secs_f64(),
                "MiB/s",
            );
            Some(floor)
        }
        Err(why) => {
            skip(why);
            detach(ctx, attached).await;
            // A failed delete stays in the ledger: cleanup tries again.
            let _ = ctx.delete(&name, &source).await;
            return;
        }
    };

    let mut rows = Rows::default();
    for round in 0..rounds {
        if ctx.should_stop() || rows.errors() >= MAX_ERRORS {
            break;
        }
        rows.round(ctx, env, &source, round).await;
        let Some(mut f) = floor.take() else { break };
        floor = tokio::task::spawn_blocking(move || {
            f.round();
            f
        })
        .await
        .ok();
    }
    detach(ctx, attached).await;
    let _ = ctx.delete(&name, &source).await;
    report(env, ctx.size, mib, &rows, floor.as_ref());
    if let Some(f) = floor {
        let _ = tokio::task::spawn_blocking(move || f.finish()).await;
    }
}

/// Records the rounds' rows and the floor's.
fn report(env: &Env<'_>, size: i64, mib: u64, rows: &Rows, floor: Option<&CopyFloor>) {
    let mut r = env.report();
    let size = format!("{} MiB volume, {mib} MiB of data", size >> 20);
    r.op(
        SCENARIO,
        &format!("CreateSnapshot ({size})"),
        &rows.snapshot,
        None,
        Some(Floor::FastestCopy),
    );
    r.op(
        SCENARIO,
        "CreateVolume from the snapshot (restore)",
        &rows.restore,
        None,
        Some(Floor::FastestCopy),
    );
    r.op(
        SCENARIO,
        "DeleteVolume (restored)",
        &rows.delete,
        None,
        None,
    );
    r.op(
        SCENARIO,
        "DeleteSnapshot",
        &rows.delete_snapshot,
        None,
        None,
    );
    if let Some(f) = floor {
        for (row, samples) in [
            (copy_floor::REFLINK, &f.samples.reflink),
            (copy_floor::PLAIN, &f.samples.plain),
            (copy_floor::SUBVOLUME, &f.samples.subvolume),
        ] {
            if samples.len() > 0 || samples.errors > 0 {
                r.op(FLOOR_SCENARIO, row, samples, None, None);
            }
        }
        for (row, why) in f.skipped() {
            r.skip(&format!("floor ({row})"), why);
        }
    }
}

/// What each round measured.
#[derive(Default)]
struct Rows {
    snapshot: Samples,
    restore: Samples,
    delete: Samples,
    delete_snapshot: Samples,
}

impl Rows {
    fn errors(&self) -> u64 {
        self.snapshot.errors
            + self.restore.errors
            + self.delete.errors
            + self.delete_snapshot.errors
    }

    /// A snapshot of `source`, a restore of it, and both deletes.
    async fn round(&mut self, ctx: &Ctx, env: &Env<'_>, source: &str, round: usize) {
        let snap_name = format!("{}-snap-{round}", env.prefix);
        let snap = match ctx.create_snapshot(&snap_name, source).await {
            (d, Ok(id)) => {
                self.snapshot.push(d);
                id
            }
            (_, Err(e)) => return self.snapshot.fail(e),
        };
        let restore_name = format!("{}-restore-{round}", env.prefix);
        let from = csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            },
        );
        match ctx.create_from(&restore_name, Some(from)).await {
            (d, Ok(id)) => {
                self.restore.push(d);
                match ctx.delete(&restore_name, &id).await {
                    (d, Ok(())) => self.delete.push(d),
                    (_, Err(e)) => self.delete.fail(e),
                }
            }
            (_, Err(e)) => self.restore.fail(e),
        }
        match ctx.delete_snapshot(&snap_name, &snap).await {
            (d, Ok(())) => self.delete_snapshot.push(d),
            (_, Err(e)) => self.delete_snapshot.fail(e),
        }
    }
}

/// Publishes the volume at a target of its own (ControllerPublish and
/// NodeStage first when the driver advertises them).
async fn attach(ctx: &Ctx, env: &Env<'_>, id: &str) -> Result<Attached, String> {
    let dir = env.run_dir.join("snapshot");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut context = HashMap::new();
    if ctx.caps.controller_publish {
        context = ctx
            .controller_publish(id)
            .await
            .1
            .map_err(|e| format!("ControllerPublishVolume: {e}"))?;
    }
    let staging = if ctx.caps.stage {
        let p = dir.join("staging");
        std::fs::create_dir(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        ctx.stage(id, &p, &context)
            .await
            .1
            .map_err(|e| format!("NodeStageVolume: {e}"))?;
        Some(p)
    } else {
        None
    };
    let target = dir.join("target");
    ctx.publish(id, &target, staging.as_deref(), &context)
        .await
        .1
        .map_err(|e| format!("NodePublishVolume: {e}"))?;
    Ok(Attached {
        id: id.to_string(),
        target,
        staging,
    })
}

/// Undoes [`attach`]; what fails is left to the ledger's cleanup.
async fn detach(ctx: &Ctx, a: Attached) {
    if ctx.unpublish(&a.id, &a.target).await.1.is_err() {
        return;
    }
    if let Some(p) = &a.staging {
        if ctx.unstage(&a.id, p).await.1.is_err() {
            return;
        }
        remove_empty_dir(p);
    }
    if ctx.caps.controller_publish {
        let _ = ctx.controller_unpublish(&a.id).await;
    }
    if let Some(dir) = a.target.parent() {
        remove_empty_dir(dir);
    }
}
