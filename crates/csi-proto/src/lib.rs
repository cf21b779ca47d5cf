//! The Container Storage Interface, v1.13.0, as Rust: the messages, the
//! Identity/Controller/Node clients and the service traits, generated from
//! `proto/csi.proto` at build time (protox, so no system `protoc`).
//!
//! Shared by the driver (`hostpath-csi`), its tests, and `csi-bench`, the
//! load generator for any CSI driver. Besides the generated code:
//! - `connect`: a channel to a driver's Unix socket, as a CO opens one;
//! - `codec`: the protobuf codec every generated client and server uses,
//!   which answers undecodable requests with INVALID_ARGUMENT;
//! - `pluginregistration`: the kubelet's plugin registration API
//!   (`pluginregistration.Registration`, from the Go module
//!   `k8s.io/kubelet`), which the driver serves so that the kubelet finds
//!   it without the node-driver-registrar sidecar.
//!
//! The generated items sit at the crate root (`csi_proto::CreateVolumeRequest`,
//! `csi_proto::controller_client::ControllerClient`); users usually write
//! `use csi_proto as csi;` and then `csi::CreateVolumeRequest`.

pub mod codec;
mod connect;

pub use connect::connect;

/// The encoded `FileDescriptorSet` of `csi.proto` and its imports, for a
/// gRPC reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/csi_descriptor_set.bin"));
pub use generated::*;

#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod generated {
    tonic::include_proto!("csi.v1");
}

/// The kubelet's plugin registration API (`k8s.io/kubelet`,
/// `pkg/apis/pluginregistration/v1`): the kubelet's plugin watcher calls
/// `GetInfo` on each socket that appears in its `plugins_registry`
/// directory, then reports the outcome with `NotifyRegistrationStatus`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}
