//! `hostpath-csi volumes`: every volume of every pool, as a table for
//! people or JSON for scripts, from the read-only inventory
//! (`hostpath_csi::volume::inventory`). It never changes anything, so it is
//! safe to run beside a serving driver, or when the driver is down.

use std::path::Path;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use hostpath_csi::volume::inventory::{self, InventoryOptions, PoolInventory, VolumeInfo};

use crate::cli::{Output, VolumesArgs};

/// Runs `hostpath-csi volumes`.
pub(crate) fn volumes(args: &VolumesArgs) -> ExitCode {
    let config = match args.serve.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hostpath-csi volumes: configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = InventoryOptions {
        measure: !args.no_usage,
    };
    let pools = match inventory::inventory(&config.pools, opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hostpath-csi volumes: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.output {
        Output::Json => {
            let doc = serde_json::json!({ "pools": pools });
            println!("{doc:#}");
        }
        Output::Table => print!("{}", table(&pools, now())),
    }
    for p in &pools {
        if let Some(problem) = &p.problem {
            eprintln!("pool {}: {problem}", p.name);
        }
    }
    ExitCode::SUCCESS
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The columns of the table.
const HEADERS: [&str; 11] = [
    "POOL",
    "KIND",
    "VOLUME",
    "ORIGIN",
    "CLAIM",
    "PV",
    "SIZE",
    "USED",
    "ENFORCED",
    "PUBLISHED AT",
    "LAST PUBLISHED / UNPUBLISHED",
];

/// The table: one row per entry, sorted by pool then volume; entries with
/// a problem are followed by a line saying what it is.
fn table(pools: &[PoolInventory], now: u64) -> String {
    let mut sorted: Vec<&PoolInventory> = pools.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut rows: Vec<[String; 11]> = Vec::new();
    let mut notes = Vec::new();
    for p in sorted {
        for v in &p.volumes {
            rows.push(row(v, now));
            if let Some(problem) = &v.problem {
                notes.push(format!("{}: {problem}", v.id));
            }
        }
    }
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    let mut out = aligned(&HEADERS, &rows);
    if rows.is_empty() {
        out.push_str("(no volumes)\n");
    }
    for n in notes {
        out.push_str(&format!("! {n}\n"));
    }
    out
}

/// Rows under headers, each column as wide as its widest cell, two spaces
/// apart; no trailing spaces.
pub(crate) fn aligned(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
    out
}

fn row(v: &VolumeInfo, now: u64) -> [String; 11] {
    let dash = || "-".to_string();
    let token =
        v.id.split_once(':')
            .map_or(v.id.as_str(), |(_, t)| t)
            .to_string();
    let claim = match (&v.claim_namespace, &v.claim_name, &v.pod) {
        (Some(ns), Some(n), _) => format!("{ns}/{n}"),
        // An inline ephemeral volume has no claim: its pod stands there.
        (_, _, Some(pod)) => format!("pod {pod}"),
        _ => dash(),
    };
    let published = if v.published_at.is_empty() {
        dash()
    } else {
        v.published_at
            .iter()
            .map(|p| short_target(p))
            .collect::<Vec<_>>()
            .join(",")
    };
    let when = match (v.last_published_unix, v.last_unpublished_unix) {
        (None, None) => dash(),
        (p, u) => format!(
            "{} / {}",
            p.map_or_else(dash, |t| ago(t, now)),
            u.map_or_else(dash, |t| ago(t, now))
        ),
    };
    [
        v.pool.clone(),
        v.kind.as_str().to_string(),
        token,
        v.origin.as_str().to_string(),
        claim,
        v.pv_name.clone().unwrap_or_else(dash),
        v.capacity_bytes.map_or_else(dash, human_bytes),
        v.used_bytes.map_or_else(dash, human_bytes),
        if v.origin == inventory::Origin::Foreign {
            dash()
        } else if v.size_enforced {
            "yes".into()
        } else {
            "no".into()
        },
        published,
        when,
    ]
}

/// A kubelet publish target (`/var/lib/kubelet/pods/<uid>/volumes/...`)
/// as `pod <uid>`; any other path as it is.
fn short_target(p: &Path) -> String {
    let mut parts = p.components().map(|c| c.as_os_str().to_string_lossy());
    let kubelet = parts
        .by_ref()
        .skip_while(|c| c != "pods")
        .nth(1)
        .filter(|_| p.to_string_lossy().contains("/volumes/"));
    match kubelet {
        Some(uid) => format!("pod {uid}"),
        None => p.display().to_string(),
    }
}

/// Bytes as people read them: `512 B`, `1.5 KiB`, `10 MiB`, `2.0 GiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A past time as its age: `40s ago`, `5m ago`, `3h ago`, `12d ago`, with
/// the UTC date for anything older than a day.
fn ago(t: u64, now: u64) -> String {
    let d = now.saturating_sub(t);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{} ({}d ago)", date(t), d / 86400),
    }
}

/// The UTC date of a Unix time, `YYYY-MM-DD` (the civil-from-days
/// algorithm of Howard Hinnant's date library).
fn date(t: u64) -> String {
    let z = (t / 86400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_ages_and_dates_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 20), "10 MiB");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes((1 << 30) + (1 << 29)), "1.5 GiB");
        assert_eq!(ago(100, 130), "30s ago");
        assert_eq!(ago(0, 7200), "2h ago");
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_796_169_600), "2026-12-02");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(
            ago(1_796_169_600, 1_796_169_600 + 3 * 86400),
            "2026-12-02 (3d ago)"
        );
    }

    #[test]
    fn kubelet_targets_are_named_by_pod() {
        assert_eq!(
            short_target(Path::new(
                "/var/lib/kubelet/pods/1234-ab/volumes/kubernetes.io~csi/pvc-1/mount"
            )),
            "pod 1234-ab"
        );
        assert_eq!(short_target(Path::new("/mnt/x")), "/mnt/x");
    }
}
