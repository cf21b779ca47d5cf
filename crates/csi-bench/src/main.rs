//! `csi-bench`: a load generator for the socket of any CSI driver.
//!
//! It asks the driver what it supports and follows that (ControllerPublish
//! and NodeStage before NodePublish when advertised), skips what it does
//! not support (saying so), and measures latency percentiles and rates per
//! operation, next to a floor measured in the same run on the same disk.
//! Everything it makes (volumes, publications, directories) is undone at
//! the end, on Ctrl-C and on errors; every phase is bounded in count and
//! time. BENCHMARKS.md has the figures and how they are taken.
//!
//! # Layout
//! - `args`: the command line.
//! - `run`: one run from start to end, the scenarios in their order.
//! - `scenarios`: the scenarios.
//! - `ops`: one timed CSI call each, and the ledger cleanup undoes.
//! - `driver`: clients, capabilities, the started driver, memory figures.
//! - `snapshot`: the snapshot scenario (snapshot and restore with data).
//! - `floor`: the same operations with no driver.
//! - `copy_floor`: the snapshot scenario's floor: copies with no driver.
//! - `data`: the bytes the snapshot scenario writes.
//! - `sys`: the floor's mount syscalls.
//! - `stats`: samples, percentiles, flatness.
//! - `report`: the table and the JSON lines.
//! - `progress`: the stderr progress bar.
//! - `error`: what can go wrong, by cause.

mod args;
mod copy_floor;
mod data;
mod driver;
mod error;
mod floor;
mod ops;
mod progress;
mod report;
mod run;
mod scenarios;
mod snapshot;
mod stats;
mod sys;

use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard, PoisonError};

use clap::Parser;

fn main() -> ExitCode {
    let args = args::BenchArgs::parse();
    // The load generator runs on one thread: a sequential caller gains
    // nothing from more, and every hop between threads (on a VM, a
    // wake-up of an idle vCPU) would be added to the driver's figures.
    // Measured here: +0.2 ms on each CreateVolume with a multi-thread
    // client. Concurrent scenarios stay concurrent (tasks, not threads).
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run::run(args)),
        Err(e) => {
            eprintln!("csi-bench: starting the tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Locks `m`, also when a panic elsewhere poisoned it: the report and the
/// ledger stay worth reading after one, and cleanup needs the ledger most
/// when something went wrong.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
