//! Latency samples and what is reported about them: percentiles, rate,
//! and the flatness of a long sequential run.

use std::time::Duration;

/// Latencies of one operation, in the order they were taken.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    nanos: Vec<u64>,
    /// Calls that failed (their latency is not in `nanos`).
    pub errors: u64,
    /// The first few error messages, to show why.
    pub first_errors: Vec<String>,
}

/// How many error messages are kept per operation.
const KEPT_ERRORS: usize = 3;

impl Samples {
    /// A successful call that took `d`.
    pub fn push(&mut self, d: Duration) {
        self.nanos
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A failed call, and why (kept for the report if it is among the
    /// first few).
    pub fn fail(&mut self, why: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_errors.len() < KEPT_ERRORS {
            self.first_errors.push(why.to_string());
        }
    }

    /// Adds another worker's samples.
    pub fn merge(&mut self, other: Samples) {
        self.nanos.extend(other.nanos);
        self.errors += other.errors;
        for e in other.first_errors {
            if self.first_errors.len() < KEPT_ERRORS {
                self.first_errors.push(e);
            }
        }
    }

    /// Number of successful calls.
    pub fn len(&self) -> usize {
        self.nanos.len()
    }

    /// Percentiles of all samples.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.nanos)
    }

    /// p50 of the last tenth of the samples over p50 of the first tenth, in
    /// the order taken: 1.0 means the operation costs as much at the end of
    /// the run as at its start. `None` with fewer than 10 samples.
    pub fn flatness(&self) -> Option<f64> {
        let tenth = self.nanos.len() / 10;
        if tenth == 0 {
            return None;
        }
        let first = Summary::of(&self.nanos[..tenth])?.p50;
        let last = Summary::of(&self.nanos[self.nanos.len() - tenth..])?.p50;
        (first > 0).then(|| last as f64 / first as f64)
    }
}

/// Percentiles of a set of latencies, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Slowest.
    pub max: u64,
}

impl Summary {
    /// Nearest-rank percentiles of `nanos` (any order); `None` when empty.
    pub fn of(nanos: &[u64]) -> Option<Summary> {
        if nanos.is_empty() {
            return None;
        }
        let mut sorted = nanos.to_vec();
        sorted.sort_unstable();
        Some(Summary {
            count: sorted.len(),
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest
/// sample with at least `p` percent of the samples at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Operations per second for `count` operations done in `wall`.
pub fn rate(count: usize, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 50.0), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 99.0), 2);
    }

    #[test]
    fn summary_sorts_and_handles_empty() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&[5, 1, 3, 2, 4]).unwrap();
        assert_eq!((s.count, s.p50, s.max), (5, 3, 5));
    }

    #[test]
    fn flatness_compares_last_tenth_to_first() {
        let mut s = Samples::default();
        for i in 0..100u64 {
            // First tenth around 10 µs, last tenth around 20 µs.
            let us = if i < 10 {
                10
            } else if i >= 90 {
                20
            } else {
                15
            };
            s.push(Duration::from_micros(us));
        }
        assert!((s.flatness().unwrap() - 2.0).abs() < 1e-9);
        let mut short = Samples::default();
        short.push(Duration::from_micros(1));
        assert_eq!(short.flatness(), None);
    }

    #[test]
    fn errors_are_counted_and_a_few_kept() {
        let mut a = Samples::default();
        for i in 0..5 {
            a.fail(format!("e{i}"));
        }
        let mut b = Samples::default();
        b.fail("x");
        a.merge(b);
        assert_eq!(a.errors, 6);
        assert_eq!(a.first_errors.len(), KEPT_ERRORS);
    }

    #[test]
    fn rate_of_zero_time_is_zero() {
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert!((rate(10, Duration::from_secs(2)) - 5.0).abs() < 1e-9);
    }
}
