//! `hostpath-csi`: a CSI driver for node-local (hostPath) storage.
//!
//! # Layout
//! - `config`: the checked configuration and its pools (the command line
//!   that fills it lives with the binary, `src/cli.rs`).
//! - `server`: binds the socket and serves the services until shutdown.
//! - `endpoint`: the socket: never one a live driver serves, removed at
//!   exit only while it is still this driver's.
//! - `kubelet`: the kubelet's plugin registration socket, served by the
//!   driver (no node-driver-registrar sidecar needed).
//! - `healthz`: `GET /healthz` for a livenessProbe, answered from the
//!   driver's own Probe (no livenessprobe sidecar needed).
//! - `metrics`: Prometheus metrics on `GET /metrics`.
//! - `http`: the minimal HTTP/1.1 serving both of those.
//! - `grpc`: thin CSI Identity, Controller, Node and GroupController
//!   adapters.
//! - `validate`: request fields into typed, checked values.
//! - `volume`: the volume logic (plain Rust): ids, pools and records,
//!   create/delete/list, sizes and promises, expansion,
//!   publish/unpublish/stats, per-volume locks.
//! - `orphans`: volumes nothing in the cluster will use again, the rules,
//!   the report, safe reclaim (`hostpath-csi orphans`) and the driver's
//!   periodic scan.
//! - `kubeapi`: the API server (kube-rs): what the orphan report reads,
//!   and its Events.
//! - `backend`: per pool kind, how storage is made, sized and removed.
//! - `sys`: the kernel boundary: the only place with mount syscalls and
//!   mountinfo parsing; durable record writes; running storage tools.
//!
//! Each module names its errors by cause (`VolumeError`, `PoolError`,
//! `RequestError`, ...); `grpc::status` is the one place they become gRPC
//! status codes.
//!
//! The CSI messages and services come from the `csi-proto` crate of this
//! workspace; `csi-bench`, a load generator for any CSI driver, is another.

pub mod backend;
pub mod config;
pub mod endpoint;
pub(crate) mod grpc;
pub mod healthz;
pub mod http;
pub mod kubeapi;
pub mod kubelet;
pub mod metrics;
pub mod orphans;
pub mod server;
pub mod sys;
pub mod validate;
pub mod volume;
