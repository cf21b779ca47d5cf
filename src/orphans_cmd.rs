//! `hostpath-csi orphans`: the orphan report for this node as a table for
//! people or JSON for scripts, and `--reclaim` (a dry run unless `--yes`).
//! Making the report only reads (the API server, the pools); reclaiming
//! goes through the running driver's DeleteVolume
//! (`hostpath_csi::orphans::reclaim`).

use std::process::ExitCode;

use hostpath_csi::kubeapi::Kube;
use hostpath_csi::orphans::reclaim::{self, Outcome};
use hostpath_csi::orphans::report::{self, Report};
use hostpath_csi::orphans::{Orphan, Reason};

use crate::cli::{OrphansArgs, Output};
use crate::listing::{aligned, human_bytes};

/// Runs `hostpath-csi orphans`.
pub(crate) fn orphans(args: &OrphansArgs) -> ExitCode {
    let config = match args.serve.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hostpath-csi orphans: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime");
    rt.block_on(async {
        let opts = args.serve.orphan_options(&config);
        let made = async {
            let kube = Kube::connect(args.serve.kubeconfig.as_deref()).await?;
            let report = report::make(&kube, &opts).await?;
            Ok::<_, report::ReportError>((kube, report))
        };
        let (kube, report) = match made.await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("hostpath-csi orphans: no report: {e}");
                if args.reclaim {
                    eprintln!("hostpath-csi orphans: nothing was reclaimed");
                }
                return ExitCode::FAILURE;
            }
        };
        let grace = args.grace.as_secs();
        let candidates = reclaim::candidates(&report.orphans, &report.node, grace);
        let mut outcomes: Option<Vec<Outcome>> = None;
        let mut failed = false;
        if args.reclaim && args.yes && !candidates.is_empty() {
            // Look again just before removing anything: a claim may have
            // bound a PV, a pod may have mounted a volume since.
            let again = match report::make(&kube, &opts).await {
                Ok(r) => reclaim::candidates(&r.orphans, &r.node, grace),
                Err(e) => {
                    eprintln!("hostpath-csi orphans: checking again before reclaiming: {e}; nothing was reclaimed");
                    return ExitCode::FAILURE;
                }
            };
            let go = reclaim::still(&candidates, &again);
            match reclaim::delete(&config.socket, &go).await {
                Ok(o) => {
                    failed = o.iter().any(|o| o.error.is_some());
                    outcomes = Some(o);
                }
                Err(e) => {
                    eprintln!("hostpath-csi orphans: {e}; nothing was reclaimed");
                    failed = true;
                }
            }
        }
        match args.output {
            Output::Json => println!("{:#}", json(&report, &candidates, args, outcomes.as_deref())),
            Output::Table => {
                print!("{}", table(&report, grace));
                print!("{}", reclaim_text(&candidates, args, outcomes.as_deref()));
            }
        }
        if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    })
}

/// The report, the ids reclaim may remove, and what it did.
fn json(
    report: &Report,
    candidates: &[Orphan],
    args: &OrphansArgs,
    outcomes: Option<&[Outcome]>,
) -> serde_json::Value {
    let mut doc = serde_json::to_value(report).expect("a report serializes");
    doc["reclaimable"] = candidates.iter().map(|o| o.volume_id.clone()).collect();
    doc["grace_seconds"] = args.grace.as_secs().into();
    doc["reclaim"] = match (args.reclaim, outcomes) {
        (false, _) => serde_json::Value::Null,
        (true, None) if !args.yes => serde_json::json!({"dry_run": true}),
        (true, o) => serde_json::json!({"dry_run": false, "outcomes": o.unwrap_or_default()}),
    };
    doc
}

const HEADERS: [&str; 8] = [
    "REASON", "VOLUME", "PV", "CLAIM", "NODE", "SIZE", "IDLE", "RECLAIM",
];

/// The table: one row per orphan, then what each reason means.
fn table(report: &Report, grace: u64) -> String {
    let mut out = format!(
        "API server {}: {} PVs of this driver; node {}: {} entries in the pools\n",
        report.server, report.pvs, report.node, report.local_volumes
    );
    if report.orphans.is_empty() {
        out.push_str("no orphans\n");
        return out;
    }
    let rows: Vec<Vec<String>> = report.orphans.iter().map(|o| row(o, grace)).collect();
    out.push_str(&aligned(&HEADERS, &rows));
    let mut reasons: Vec<Reason> = report.orphans.iter().map(|o| o.reason).collect();
    reasons.dedup();
    for r in reasons {
        out.push_str(&format!("{}: {}\n", r.as_str(), r.explain()));
    }
    out
}

/// One orphan's cells, under [`HEADERS`]; IDLE is `-` when no time is
/// known.
fn row(o: &Orphan, grace: u64) -> Vec<String> {
    let dash = || "-".to_string();
    let reclaim = match (&o.keep, o.idle_seconds) {
        (Some(why), _) => format!("no: {why}"),
        (None, Some(idle)) if idle < grace => {
            format!("after the grace period (in {})", age(grace - idle))
        }
        (None, _) => "yes".into(),
    };
    vec![
        o.reason.as_str().to_string(),
        o.volume_id.clone(),
        o.pv.clone().unwrap_or_else(dash),
        o.claim.clone().unwrap_or_else(dash),
        o.node.clone(),
        human_bytes(o.bytes),
        o.idle_seconds.map_or_else(dash, age),
        reclaim,
    ]
}

/// What `--reclaim` did, or would do.
fn reclaim_text(candidates: &[Orphan], args: &OrphansArgs, outcomes: Option<&[Outcome]>) -> String {
    if !args.reclaim {
        return String::new();
    }
    if candidates.is_empty() {
        return format!(
            "reclaim: nothing to reclaim (grace {})\n",
            age(args.grace.as_secs())
        );
    }
    let Some(outcomes) = outcomes else {
        if args.yes {
            return String::new(); // the driver was not reached: said on stderr
        }
        let ids: Vec<&str> = candidates.iter().map(|o| o.volume_id.as_str()).collect();
        return format!(
            "reclaim (dry run): would reclaim {} volume(s): {}; add --yes to reclaim them\n",
            ids.len(),
            ids.join(" ")
        );
    };
    let mut out = String::new();
    for c in candidates {
        match outcomes.iter().find(|o| o.volume_id == c.volume_id) {
            Some(Outcome { error: None, .. }) => {
                out.push_str(&format!("reclaimed {}\n", c.volume_id));
            }
            Some(Outcome { error: Some(e), .. }) => {
                out.push_str(&format!("NOT reclaimed {}: {e}\n", c.volume_id));
            }
            None => out.push_str(&format!(
                "left alone {}: no longer an orphan when checked again\n",
                c.volume_id
            )),
        }
    }
    out
}

/// A duration as people read it: `40s`, `5m`, `3h`, `12d`.
fn age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostpath_csi::volume::inventory::Origin;

    fn orphan(idle: Option<u64>) -> Orphan {
        Orphan {
            reason: Reason::NoPv,
            volume_id: "hdd:v".into(),
            pv: None,
            claim: Some("app/data".into()),
            node: "n1".into(),
            bytes: 1 << 20,
            idle_seconds: idle,
            origin: Origin::Driver,
            problem: None,
            keep: None,
        }
    }

    #[test]
    fn idle_shows_a_dash_when_no_time_is_known() {
        const DAY: u64 = 86_400;
        let cells = |idle| row(&orphan(idle), DAY)[6..].join(" | ");
        assert_eq!(cells(Some(90)), "1m | after the grace period (in 23h)");
        assert_eq!(cells(Some(2 * DAY)), "2d | yes");
        // Not "20424d" (since 1970): unknown, and older than any grace.
        assert_eq!(cells(None), "- | yes");
        let mut kept = orphan(None);
        kept.keep = Some("published: mounted in a pod now".into());
        assert_eq!(
            row(&kept, DAY)[6..].join(" | "),
            "- | no: published: mounted in a pod now"
        );
    }
}
