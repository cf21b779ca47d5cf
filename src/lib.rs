//! `hostpath-csi`: a CSI driver for node-local (hostPath) storage.
//!
//! # Layout
//! - `config`: flags, environment and config file into one checked `Config`.
//! - `server`: binds the socket and serves the services until shutdown.
//! - `grpc`: thin CSI Identity, Controller and Node adapters.
//! - `validate`: request fields into typed, checked values.
//! - `volume`: the volume logic (plain Rust): ids, pools and records,
//!   create/delete/list, sizes and promises, expansion,
//!   publish/unpublish/stats, per-volume locks.
//! - `backend`: per pool kind, how storage is made, sized and removed.
//! - `sys`: the only place with mount syscalls, mountinfo and durable writes.
//! - `error`: the error type and its one mapping onto gRPC codes.
//! - `client`: connecting to a CSI socket (benchmarks, tests).
//! - `bench`: `hostpath-csi bench`, a load generator for any CSI driver.

pub mod backend;
pub mod bench;
pub mod client;
pub mod config;
pub mod error;
pub mod grpc;
pub mod server;
pub mod sys;
pub mod validate;
pub mod volume;

/// Code generated from `proto/csi.proto` (CSI spec v1.12.0).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Sets up logging in the chosen format, filtered by `filter`.
pub fn init_logging(format: config::LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Human => builder.init(),
        config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
