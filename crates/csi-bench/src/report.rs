//! What a run found: a table for people and JSON lines for tools.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde_json::{Value, json};

use crate::stats::{Samples, Summary};

/// Which floor an operation is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// mkdir + small file written durably (write, fsync, rename, fsync dir).
    DurableCreate,
    /// rmdir + unlink of the file + fsync dir.
    DurableDelete,
    /// A bind mount syscall.
    BindMount,
    /// An unmount syscall.
    Unmount,
    /// `cp --reflink=always` of the snapshot scenario's data + syncfs.
    ReflinkCopy,
    /// `cp --reflink=never` of it + syncfs.
    PlainCopy,
    /// `btrfs subvolume snapshot -r` of a subvolume holding it.
    SubvolumeSnapshot,
    /// The fastest of the three copies on this disk: the least a snapshot
    /// or a restore can cost there.
    FastestCopy,
}

/// The copies [`Floor::FastestCopy`] takes the fastest of.
const COPIES: [Floor; 3] = [
    Floor::ReflinkCopy,
    Floor::PlainCopy,
    Floor::SubvolumeSnapshot,
];

impl Floor {
    /// The floor operation's name in the report.
    pub fn op(self) -> &'static str {
        match self {
            Floor::DurableCreate => "durable create (mkdir+write+fsync+rename+fsync dir)",
            Floor::DurableDelete => "durable delete (rmdir+unlink+fsync dir)",
            Floor::BindMount => "bind mount syscall",
            Floor::Unmount => "umount syscall",
            Floor::ReflinkCopy => crate::copy_floor::REFLINK,
            Floor::PlainCopy => crate::copy_floor::PLAIN,
            Floor::SubvolumeSnapshot => crate::copy_floor::SUBVOLUME,
            Floor::FastestCopy => "the fastest copy floor",
        }
    }
}

/// Scenario name the floor's rows carry.
pub const FLOOR_SCENARIO: &str = "floor";

/// Latencies of one operation in one scenario.
#[derive(Debug, Clone)]
pub struct OpRow {
    /// Scenario name.
    pub scenario: String,
    /// Operation (RPC or syscall sequence).
    pub op: String,
    /// Percentiles of the successful calls.
    pub summary: Option<Summary>,
    /// Failed calls.
    pub errors: u64,
    /// Why some failed.
    pub first_errors: Vec<String>,
    /// Throughput over the phase's wall time, when meaningful.
    pub ops_per_s: Option<f64>,
    /// The floor to compare the p50 with.
    pub floor: Option<Floor>,
}

/// A single figure: a ratio, a size, a time.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Scenario name.
    pub scenario: String,
    /// What was measured.
    pub name: String,
    /// Its value in `unit`.
    pub value: f64,
    /// Unit: "ratio", "MiB", "ms", "count".
    pub unit: &'static str,
}

/// Everything a run reports, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// Facts about the driver and the run.
    pub info: Vec<(String, Value)>,
    /// Latency rows.
    pub ops: Vec<OpRow>,
    /// Single figures.
    pub figures: Vec<Figure>,
    /// Scenarios not run, and why.
    pub skipped: Vec<(String, String)>,
    /// Problems met while cleaning up.
    pub cleanup: Vec<String>,
}

impl Report {
    /// Records a fact.
    pub fn info(&mut self, key: &str, value: impl Into<Value>) {
        self.info.push((key.to_string(), value.into()));
    }

    /// Records an operation's samples.
    pub fn op(
        &mut self,
        scenario: &str,
        op: &str,
        samples: &Samples,
        ops_per_s: Option<f64>,
        floor: Option<Floor>,
    ) {
        self.ops.push(OpRow {
            scenario: scenario.to_string(),
            op: op.to_string(),
            summary: samples.summary(),
            errors: samples.errors,
            first_errors: samples.first_errors.clone(),
            ops_per_s,
            floor,
        });
    }

    /// Records a figure.
    pub fn figure(&mut self, scenario: &str, name: &str, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            scenario: scenario.to_string(),
            name: name.to_string(),
            value,
            unit,
        });
    }

    /// Records a scenario that was not run.
    pub fn skip(&mut self, scenario: &str, why: impl Into<String>) {
        self.skipped.push((scenario.to_string(), why.into()));
    }

    /// The floor's p50 in nanoseconds, if it was measured.
    pub fn floor_p50(&self, floor: Floor) -> Option<u64> {
        if floor == Floor::FastestCopy {
            return COPIES.iter().filter_map(|f| self.floor_p50(*f)).min();
        }
        self.ops
            .iter()
            .find(|r| r.scenario == FLOOR_SCENARIO && r.op == floor.op())
            .and_then(|r| r.summary)
            .map(|s| s.p50)
    }

    /// p50 of a row over its floor's p50.
    pub fn ratio(&self, row: &OpRow) -> Option<f64> {
        let floor = self.floor_p50(row.floor?)?;
        let p50 = row.summary?.p50;
        (floor > 0).then(|| p50 as f64 / floor as f64)
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.info {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{k}: {v}");
        }
        if !self.ops.is_empty() {
            let _ = writeln!(
                out,
                "\n{:<14} {:<52} {:>6} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                "scenario",
                "operation",
                "n",
                "err",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "ops/s",
                "x floor"
            );
        }
        for r in &self.ops {
            let (n, p50, p90, p99, max) = match r.summary {
                Some(s) => (
                    s.count.to_string(),
                    ms(s.p50),
                    ms(s.p90),
                    ms(s.p99),
                    ms(s.max),
                ),
                None => ("0".into(), "-".into(), "-".into(), "-".into(), "-".into()),
            };
            let ops = r.ops_per_s.map_or("-".into(), |x| format!("{x:.0}"));
            let ratio = self.ratio(r).map_or("-".into(), |x| format!("{x:.2}"));
            let _ = writeln!(
                out,
                "{:<14} {:<52} {:>6} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
                r.scenario, r.op, n, r.errors, p50, p90, p99, max, ops, ratio
            );
            for e in &r.first_errors {
                let _ = writeln!(out, "{:<14}   error: {e}", "");
            }
        }
        if !self.figures.is_empty() {
            let _ = writeln!(out, "\n{:<14} {:<52} {:>12}", "scenario", "figure", "value");
        }
        for f in &self.figures {
            let _ = writeln!(
                out,
                "{:<14} {:<52} {:>12}",
                f.scenario,
                f.name,
                format!("{:.2} {}", f.value, f.unit)
            );
        }
        for (s, why) in &self.skipped {
            let _ = writeln!(out, "skipped {s}: {why}");
        }
        for c in &self.cleanup {
            let _ = writeln!(out, "cleanup: {c}");
        }
        out
    }

    /// The report as JSON values, one per line when written.
    pub fn json_lines(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let info: serde_json::Map<String, Value> = self.info.iter().cloned().collect();
        out.push(json!({"type": "info", "info": info}));
        for r in &self.ops {
            let mut v = json!({
                "type": "op",
                "scenario": r.scenario,
                "op": r.op,
                "count": r.summary.map_or(0, |s| s.count),
                "errors": r.errors,
            });
            if let Some(s) = r.summary {
                v["p50_ms"] = json!(nanos_ms(s.p50));
                v["p90_ms"] = json!(nanos_ms(s.p90));
                v["p99_ms"] = json!(nanos_ms(s.p99));
                v["max_ms"] = json!(nanos_ms(s.max));
            }
            if let Some(x) = r.ops_per_s {
                v["ops_per_s"] = json!(x);
            }
            if let Some(f) = r.floor {
                v["floor"] = json!(f.op());
            }
            if let Some(x) = self.ratio(r) {
                v["ratio_to_floor"] = json!(x);
            }
            if !r.first_errors.is_empty() {
                v["first_errors"] = json!(r.first_errors);
            }
            out.push(v);
        }
        for f in &self.figures {
            out.push(json!({
                "type": "figure",
                "scenario": f.scenario,
                "name": f.name,
                "value": f.value,
                "unit": f.unit,
            }));
        }
        for (s, why) in &self.skipped {
            out.push(json!({"type": "skipped", "scenario": s, "reason": why}));
        }
        for c in &self.cleanup {
            out.push(json!({"type": "cleanup", "problem": c}));
        }
        out
    }

    /// Writes the JSON lines to `w`.
    pub fn write_json(&self, mut w: impl Write) -> io::Result<()> {
        for v in self.json_lines() {
            writeln!(w, "{v}")?;
        }
        w.flush()
    }
}

fn nanos_ms(n: u64) -> f64 {
    n as f64 / 1e6
}

fn ms(n: u64) -> String {
    format!("{:.3}", nanos_ms(n))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn samples(us: &[u64]) -> Samples {
        let mut s = Samples::default();
        for &u in us {
            s.push(Duration::from_micros(u));
        }
        s
    }

    #[test]
    fn ratio_uses_the_floor_p50() {
        let mut r = Report::default();
        r.op(
            FLOOR_SCENARIO,
            Floor::DurableCreate.op(),
            &samples(&[500, 500, 500]),
            None,
            None,
        );
        r.op(
            "create-delete",
            "CreateVolume",
            &samples(&[750, 750, 900]),
            Some(1000.0),
            Some(Floor::DurableCreate),
        );
        let row = r.ops[1].clone();
        assert!((r.ratio(&row).unwrap() - 1.5).abs() < 1e-9);
        let t = r.table();
        assert!(t.contains("CreateVolume"), "{t}");
        assert!(t.contains("1.50"), "{t}");
        assert!(t.contains("0.750"), "{t}");
    }

    #[test]
    fn no_floor_no_ratio() {
        let mut r = Report::default();
        r.op(
            "publish",
            "NodePublishVolume",
            &samples(&[10]),
            None,
            Some(Floor::BindMount),
        );
        assert_eq!(r.ratio(&r.ops[0].clone()), None);
        let lines = r.json_lines();
        assert_eq!(lines[1]["op"], "NodePublishVolume");
        assert!(lines[1].get("ratio_to_floor").is_none());
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let mut r = Report::default();
        r.info("driver", "x");
        r.figure("rss", "RSS idle", 5.0, "MiB");
        r.skip("startup", "needs --driver-cmd");
        let mut buf = Vec::new();
        r.write_json(&mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for l in lines {
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v.get("type").is_some());
        }
    }

    #[test]
    fn empty_samples_render_as_dashes() {
        let mut r = Report::default();
        let mut s = Samples::default();
        s.fail("boom");
        r.op("list", "ListVolumes", &s, None, None);
        let t = r.table();
        assert!(t.contains("boom"), "{t}");
        assert!(t.contains(" - "), "{t}");
    }
}
