//! Safe reclaim: which orphans may go, and removing them through the
//! driver's own DeleteVolume on its socket.
//!
//! Going through the running driver rather than touching the pools here
//! means a reclaim takes the volume's lock (a publish at that moment
//! answers ABORTED rather than racing the removal), refuses a volume that
//! is mounted, follows the StorageClass's `onDelete` (removed, or archived
//! to the pool's trash) and is exactly as crash-safe as DeleteVolume: a
//! kill at any point leaves either the volume whole or its removal to be
//! finished by the retry (or the driver's start-up sweep).

use std::path::Path;
use std::time::Duration;

use csi_proto as csi;
use serde::Serialize;

use super::{Orphan, Reason, idle_for_at_least};
use crate::volume::inventory::Origin;

/// Why reclaim could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// The driver's socket did not answer.
    #[error(
        "cannot reach the driver at {socket}: {detail} (reclaim goes through its DeleteVolume; run it where the driver runs, e.g. in its container)"
    )]
    Driver {
        /// The socket.
        socket: String,
        /// What failed.
        detail: String,
    },
}

/// What happened to one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The volume.
    pub volume_id: String,
    /// Why it was an orphan.
    pub reason: Reason,
    /// `None`: reclaimed (removed, or archived if its StorageClass says
    /// so); otherwise why not.
    pub error: Option<String>,
}

/// How long one removal is retried while the driver answers ABORTED.
const BUSY_FOR: Duration = Duration::from_secs(30);

/// The orphans reclaim may remove: made by the driver, on this node,
/// `no_pv` or `released`, nothing keeping them (published, a PV that
/// could bind), idle for at least `grace_s` seconds.
pub fn candidates(orphans: &[Orphan], node: &str, grace_s: u64) -> Vec<Orphan> {
    orphans
        .iter()
        .filter(|o| {
            o.keep.is_none()
                && o.origin == Origin::Driver
                && o.node == node
                && matches!(o.reason, Reason::NoPv | Reason::Released)
                && idle_for_at_least(o.idle_seconds, grace_s)
        })
        .cloned()
        .collect()
}

/// The candidates of `first` that `again` (a report made just now) still
/// finds reclaimable for the same reason: what changed in between (a claim
/// bound the PV again, a pod mounted it) is left alone.
pub fn still(first: &[Orphan], again: &[Orphan]) -> Vec<Orphan> {
    first
        .iter()
        .filter(|o| {
            again
                .iter()
                .any(|a| a.volume_id == o.volume_id && a.reason == o.reason)
        })
        .cloned()
        .collect()
}

/// Calls DeleteVolume for each volume, one at a time, on the driver
/// serving `socket`.
pub async fn delete(socket: &Path, orphans: &[Orphan]) -> Result<Vec<Outcome>, ReclaimError> {
    let unreachable = |detail: String| ReclaimError::Driver {
        socket: socket.display().to_string(),
        detail,
    };
    let channel = csi::connect(socket)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    // Fail before touching anything when the driver is not ready (its
    // pools not open yet): every DeleteVolume would be UNAVAILABLE.
    let probe = csi::identity_client::IdentityClient::new(channel.clone())
        .probe(csi::ProbeRequest {})
        .await
        .map_err(|s| unreachable(s.message().to_string()))?;
    if probe.into_inner().ready == Some(false) {
        return Err(unreachable("the driver is not ready".into()));
    }
    let mut controller = csi::controller_client::ControllerClient::new(channel);
    let mut out = Vec::new();
    for o in orphans {
        let r = delete_one(&mut controller, &o.volume_id).await;
        match &r {
            Ok(_) => {
                tracing::info!(volume_id = %o.volume_id, reason = o.reason.as_str(), "orphan reclaimed")
            }
            Err(s) => {
                tracing::warn!(volume_id = %o.volume_id, error = %s.message(), "orphan not reclaimed")
            }
        }
        out.push(Outcome {
            volume_id: o.volume_id.clone(),
            reason: o.reason,
            error: r.err().map(|s| format!("{:?}: {}", s.code(), s.message())),
        });
    }
    Ok(out)
}

/// DeleteVolume, retried while the volume is busy. ABORTED means another
/// operation holds the volume's lock: a removal that an earlier, killed
/// run of this command started is still finishing in the driver, say. A CO
/// retries such a call; so does the command, rather than failing a reclaim
/// that is about to be done (the retry finds the volume gone: OK).
async fn delete_one(
    controller: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    volume_id: &str,
) -> Result<(), tonic::Status> {
    let until = tokio::time::Instant::now() + BUSY_FOR;
    let mut pause = Duration::from_millis(100);
    loop {
        let r = controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume_id.to_string(),
                secrets: Default::default(),
            })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::Aborted && tokio::time::Instant::now() < until => {
                tracing::info!(volume_id, error = %s.message(), "volume busy; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            r => return r.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(id: &str, reason: Reason, idle: u64) -> Orphan {
        Orphan {
            reason,
            volume_id: id.into(),
            pv: None,
            claim: None,
            node: "n1".into(),
            bytes: 1,
            idle_seconds: Some(idle),
            origin: Origin::Driver,
            problem: None,
            keep: None,
        }
    }

    #[test]
    fn only_idle_driver_volumes_of_this_node_without_a_bindable_pv() {
        let mut kept = o("p:kept", Reason::NoPv, 100);
        kept.keep = Some("published".into());
        let mut stat = o("p:static", Reason::NoPv, 100);
        stat.origin = Origin::Static;
        let mut elsewhere = o("p:else", Reason::Released, 100);
        elsewhere.node = "n2".into();
        // Made by a driver from before times were recorded: older than
        // any grace period.
        let mut old = o("p:old", Reason::NoPv, 0);
        old.idle_seconds = None;
        let all = [
            o("p:nopv", Reason::NoPv, 100),
            o("p:rel", Reason::Released, 100),
            old,
            o("p:young", Reason::NoPv, 5),
            o("p:unused", Reason::Unused, 100),
            o("p:gone", Reason::NodeGone, 100),
            kept,
            stat,
            elsewhere,
        ];
        let ids: Vec<String> = candidates(&all, "n1", 10)
            .into_iter()
            .map(|o| o.volume_id)
            .collect();
        assert_eq!(ids, ["p:nopv", "p:rel", "p:old"]);
        // A second look that no longer finds p:rel Released keeps it.
        let again = [o("p:nopv", Reason::NoPv, 101)];
        let left = still(&candidates(&all, "n1", 10)[..2], &again);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].volume_id, "p:nopv");
    }
}
