//! A one-line progress bar on stderr, silent when stderr is not a terminal
//! (logs and CI output stay clean).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Redraws at most this often, so drawing never costs the run anything
/// measurable.
const REDRAW: Duration = Duration::from_millis(100);

/// Progress of one phase.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    done: AtomicU64,
    last: Mutex<Option<Instant>>,
    enabled: bool,
}

impl Progress {
    /// Starts a bar for `total` steps.
    pub fn new(label: &str, total: u64) -> Self {
        Progress {
            label: label.to_string(),
            total,
            done: AtomicU64::new(0),
            last: Mutex::new(None),
            enabled: std::io::stderr().is_terminal(),
        }
    }

    /// One more step done.
    pub fn inc(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        if !self.enabled {
            return;
        }
        // try_lock: a worker never waits on another worker's drawing.
        let Ok(mut last) = self.last.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now - t < REDRAW) && done < self.total {
            return;
        }
        *last = Some(now);
        self.draw(done);
    }

    fn draw(&self, done: u64) {
        const WIDTH: u64 = 30;
        let filled = (done * WIDTH).checked_div(self.total).unwrap_or(WIDTH);
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '.' })
            .collect();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[K{:<28} [{bar}] {done}/{}",
            self.label, self.total
        );
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&self) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
