//! The Container Storage Interface, v1.12.0, as Rust: the messages, the
//! Identity/Controller/Node clients and the service traits, generated from
//! `proto/csi.proto` at build time (protox, so no system `protoc`).
//!
//! Shared by the driver (`hostpath-csi`), its tests, and `csi-bench`, the
//! load generator for any CSI driver. Besides the generated code:
//! - `connect`: a channel to a driver's Unix socket, as a CO opens one;
//! - `codec`: the protobuf codec every generated client and server uses,
//!   which answers undecodable requests with INVALID_ARGUMENT.
//!
//! The generated items sit at the crate root (`csi_proto::CreateVolumeRequest`,
//! `csi_proto::controller_client::ControllerClient`); users usually write
//! `use csi_proto as csi;` and then `csi::CreateVolumeRequest`.

pub mod codec;
mod connect;

pub use connect::connect;
pub use generated::*;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("csi.v1");
}
