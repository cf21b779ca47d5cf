//! The driver's periodic orphan scan (`--orphan-scan-interval`, off by
//! default): every interval, the orphan report for this node fills the
//! orphan metrics and posts Events on the claims and PVs concerned
//! (deduplicated, `kubeapi::events`). It only reports: reclaim stays a
//! decision made by a person (`hostpath-csi orphans --reclaim`).
//!
//! An API server that is down or refuses is logged (once per distinct
//! reason) and the metrics keep their last figures; the next scan tries
//! again.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::report::{self, Options};
use crate::kubeapi::Kube;
use crate::kubeapi::events::Recorder;
use crate::metrics::Metrics;

/// The scan's settings.
#[derive(Debug, Clone)]
pub struct Scan {
    /// How often.
    pub every: Duration,
    /// The kubeconfig, or `None` for the usual lookup (in a pod: its
    /// service account).
    pub kubeconfig: Option<PathBuf>,
    /// What the report is made for.
    pub options: Options,
}

/// Scans until `stop` completes.
pub async fn run(scan: Scan, metrics: Arc<Metrics>, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut recorder: Option<Recorder> = None;
    let mut last_error = String::new();
    loop {
        match once(&scan, &metrics, &mut recorder).await {
            Ok(()) => last_error.clear(),
            Err(e) if e == last_error => tracing::debug!(error = %e, "orphan scan failed again"),
            Err(e) => {
                tracing::warn!(error = %e, "orphan scan failed; retrying every {:?}", scan.every);
                last_error = e;
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(scan.every) => {}
        }
    }
}

/// One scan.
async fn once(
    scan: &Scan,
    metrics: &Metrics,
    recorder: &mut Option<Recorder>,
) -> Result<(), String> {
    if recorder.is_none() {
        let kube = Kube::connect(scan.kubeconfig.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        *recorder = Some(Recorder::new(kube, &scan.options.node));
    }
    let rec = recorder.as_mut().expect("set above");
    let report = report::make(rec.kube(), &scan.options)
        .await
        .map_err(|e| e.to_string())?;
    metrics.set_orphans(&report.metrics());
    let posted = rec
        .post(&report.orphans, &report.cluster)
        .await
        .map_err(|e| format!("posting Events: {e}"))?;
    tracing::info!(
        orphans = report.orphans.len(),
        events = posted,
        "orphan scan"
    );
    Ok(())
}
