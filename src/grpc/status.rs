//! The one place errors become gRPC status codes.
//!
//! Every module names its errors by cause; here each cause gets the code
//! the CSI spec asks for, so a code is chosen once, with the spec at hand,
//! and the message the CO sees is the error's own text. The spec's rules
//! this follows (CSI v1.13.0, "Error Scheme" and each RPC's error table):
//! a malformed or missing field is INVALID_ARGUMENT; an id that names no
//! volume is NOT_FOUND; a volume (or target) in a state that forbids the
//! call is FAILED_PRECONDITION; a name or target already used otherwise is
//! ALREADY_EXISTS; an operation pending on the volume is ABORTED (the CO
//! retries); an unsupported capacity is OUT_OF_RANGE; not enough space, or
//! topology this node cannot satisfy, is RESOURCE_EXHAUSTED; a capability
//! not offered is UNIMPLEMENTED; everything else is INTERNAL, except a full
//! disk, which the CO must hear as RESOURCE_EXHAUSTED.

use std::io;

use tonic::{Code, Status};

use super::CallError;
use crate::backend::BackendError;
use crate::sys::btrfs::BtrfsError;
use crate::sys::cmd::CmdError;
use crate::validate::RequestError;
use crate::volume::{CapacityError, LockError, PoolError, TargetError, VolumeError};

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::new(request_code(&e), e.to_string())
    }
}

impl From<CallError> for Status {
    fn from(e: CallError) -> Self {
        let code = match &e {
            // Probe says not ready meanwhile; the CO retries.
            CallError::NotReady => Code::Unavailable,
            CallError::Worker(_) => Code::Internal,
            CallError::Volume(v) => volume_code(v),
            // Not an advertised capability (CSI: UNIMPLEMENTED).
            CallError::ExpansionOnNode => Code::Unimplemented,
        };
        Status::new(code, e.to_string())
    }
}

fn request_code(e: &RequestError) -> Code {
    match e {
        RequestError::UnknownVolume(_)
        | RequestError::UnknownSnapshot(_)
        | RequestError::UnknownGroupSnapshot(_) => Code::NotFound,
        // NodeGetVolumeStats, NodeExpandVolume: "volume not found at path".
        RequestError::NotAPath(_) => Code::NotFound,
        // ListVolumes: "invalid starting_token".
        RequestError::ForeignToken(_) => Code::Aborted,
        RequestError::Missing(_)
        | RequestError::NameTooLong(_)
        | RequestError::NameHasNul
        | RequestError::IdTooLong(_)
        | RequestError::NegativeCapacity
        | RequestError::RequiredAboveLimit { .. }
        | RequestError::NoCapacityRange
        | RequestError::NoAccessMode
        | RequestError::UnknownAccessMode(_)
        | RequestError::NoAccessType
        | RequestError::NoCapabilities
        | RequestError::MountFlag(_)
        | RequestError::Unsupported(_)
        | RequestError::BadPath { .. }
        | RequestError::EmptyContentSource
        | RequestError::MixedAccess
        | RequestError::ReadOnlyBlock
        | RequestError::MutableParameters
        | RequestError::StagingPath
        | RequestError::NegativeMaxEntries
        | RequestError::EphemeralIdForm(_)
        | RequestError::EphemeralBlock
        | RequestError::EphemeralSize(_)
        | RequestError::EphemeralAttribute(_)
        | RequestError::OnDelete(_)
        | RequestError::DuplicateSource(_)
        | RequestError::RootAccess(_) => Code::InvalidArgument,
    }
}

fn volume_code(e: &VolumeError) -> Code {
    match e {
        VolumeError::UnknownPool { .. }
        | VolumeError::PoolRequired { .. }
        // Inline ephemeral volumes: what the pod spec asks for is not
        // offered; no retry changes that, the pod spec must.
        | VolumeError::EphemeralNotOffered { .. }
        | VolumeError::EphemeralTooLarge { .. }
        | VolumeError::WrongAccess { .. }
        | VolumeError::SourceAccess { .. } => Code::InvalidArgument,
        VolumeError::NoSuchPool(_)
        | VolumeError::NotFound(_)
        | VolumeError::Missing(_)
        | VolumeError::NotADirectory { .. }
        | VolumeError::NoTargetParent(_)
        | VolumeError::NoVolumePath(_)
        | VolumeError::NotPublishedAt { .. }
        | VolumeError::NotAtVolumePath { .. }
        | VolumeError::NoSuchVolume(_)
        | VolumeError::SnapshotNotFound(_)
        | VolumeError::GroupSnapshotNotFound(_) => Code::NotFound,
        // CreateVolume: "volume already exists but is incompatible";
        // NodePublishVolume: "published with incompatible capability".
        VolumeError::NameInOtherPool { .. }
        | VolumeError::OtherName { .. }
        | VolumeError::OtherSize { .. }
        | VolumeError::PublishedOtherwise { .. }
        // CreateSnapshot: "snapshot already exists but is incompatible".
        | VolumeError::SnapshotNameTaken { .. }
        | VolumeError::OtherSource { .. }
        | VolumeError::OtherAccess { .. }
        | VolumeError::OtherRoot { .. }
        // CreateVolumeGroupSnapshot: "group snapshot already exists but is
        // incompatible".
        | VolumeError::GroupNameTaken { .. }
        // One name, two kinds of volume.
        | VolumeError::NotEphemeral { .. }
        | VolumeError::EphemeralName(_) => Code::AlreadyExists,
        // CreateVolumeGroupSnapshot: "cannot snapshot multiple volumes
        // together".
        VolumeError::GroupAcrossPools { .. } | VolumeError::GroupBlockMember(_) => {
            Code::FailedPrecondition
        }
        // Delete/GetVolumeGroupSnapshot: "snapshot list mismatch".
        VolumeError::GroupMembersMismatch { .. } => Code::InvalidArgument,
        // A source in another pool: the StorageClass must change, which no
        // retry or rescheduling fixes.
        VolumeError::SourceInOtherPool { .. } => Code::InvalidArgument,
        // CreateVolume: "unsupported capacity_range".
        VolumeError::SmallerThanSource { .. } => Code::OutOfRange,
        // CreateVolume: "unable to provision in accessible_topology"; the
        // external-provisioner gives a claim on such an answer back to the
        // scheduler, which may pick the node the snapshot is on.
        VolumeError::SourceOnOtherNode { .. } => Code::ResourceExhausted,
        // The same for a clone's source, which a node cannot tell from a
        // volume that is gone: NOT_FOUND would leave the claim on this node
        // (the provisioner keeps the scheduler's choice on any other
        // answer), retried forever even once its pod is moved.
        VolumeError::SourceVolumeNotHere { .. } => Code::ResourceExhausted,
        VolumeError::OverlappingPools { .. }
        | VolumeError::StillMounted { .. }
        | VolumeError::DirectoryMissing { .. }
        | VolumeError::SingleWriter { .. }
        | VolumeError::ForeignMount { .. } => Code::FailedPrecondition,
        // CreateVolume: "unsupported accessible_topology".
        VolumeError::OtherNode { .. } => Code::ResourceExhausted,
        // CreateSnapshot: "the `accessibility_requirements` field is valid
        // but a snapshot cannot be created with the specified topology
        // constraints".
        VolumeError::SnapshotOtherNode { .. } => Code::ResourceExhausted,
        VolumeError::NotExpandable { .. } => Code::Unimplemented,
        VolumeError::Io { source, .. } => io_code(source),
        VolumeError::Busy(LockError::Busy(_)) => Code::Aborted,
        // As for a call in flight: something else still works in the
        // target, and the CO's retry (a kubelet retries an unpublish
        // until it succeeds) is what finishes it once that goes.
        VolumeError::TargetBusy { .. } => Code::Aborted,
        VolumeError::Pool(e) => pool_code(e),
        VolumeError::Capacity(e) => capacity_code(e),
        VolumeError::Target(e) => target_code(e),
    }
}

fn pool_code(e: &PoolError) -> Code {
    match e {
        PoolError::Io { source, .. } => io_code(source),
        PoolError::CorruptRecord { .. } | PoolError::EncodeRecord(_) => Code::Internal,
        PoolError::Backend(e) => backend_code(e),
        // Only at start (calls wait for the pools): the CO should retry.
        PoolError::Held { .. } => Code::Unavailable,
    }
}

fn capacity_code(e: &CapacityError) -> Code {
    match e {
        // CreateVolume, ControllerExpandVolume: "unsupported capacity_range".
        CapacityError::BelowSmallest { .. }
        | CapacityError::WouldShrink { .. }
        | CapacityError::RoundedAboveLimit { .. }
        | CapacityError::AboveMaximum { .. }
        | CapacityError::AboveFilesystem { .. } => Code::OutOfRange,
        CapacityError::CannotPromise { .. } | CapacityError::Unreliable { .. } => {
            Code::ResourceExhausted
        }
        CapacityError::Pool(e) => pool_code(e),
    }
}

fn target_code(e: &TargetError) -> Code {
    match e {
        TargetError::Io { source, .. } => io_code(source),
        TargetError::InsidePool { .. }
        | TargetError::Symlink(_)
        | TargetError::NotDirectory(_)
        | TargetError::NotFile(_) => Code::InvalidArgument,
        TargetError::OtherMount(_) | TargetError::NotEmpty(_) => Code::FailedPrecondition,
    }
}

fn backend_code(e: &BackendError) -> Code {
    match e {
        BackendError::Io { source, .. } => io_code(source),
        BackendError::Tool(e) => tool_code(e),
        BackendError::Occupied { .. } => Code::AlreadyExists,
        BackendError::NotBtrfs { .. }
        | BackendError::QuotasOff { .. }
        | BackendError::SimpleQuotasOff { .. }
        | BackendError::QuotasStillOff { .. }
        | BackendError::NestedSubvolumes(_)
        | BackendError::NotSubvolume { .. }
        | BackendError::ImageMissing { .. }
        | BackendError::BlockFileMissing { .. }
        | BackendError::ImageInUse { .. }
        | BackendError::Busy { .. }
        | BackendError::NeedsCapSysResource { .. } => Code::FailedPrecondition,
        BackendError::NoQgroup { .. } | BackendError::NotMounted { .. } => Code::Internal,
        BackendError::Btrfs(BtrfsError::Tool(e)) => tool_code(e),
        BackendError::Btrfs(_) => Code::Internal,
        BackendError::CannotExpand { .. } => Code::Unimplemented,
        // CreateVolumeGroupSnapshot: "cannot snapshot multiple volumes
        // together".
        BackendError::NoGroupSnapshots { .. } => Code::FailedPrecondition,
        // Nothing is wrong but the moment: the CO retries.
        BackendError::WrittenDuringGroup { .. } => Code::Aborted,
        BackendError::NotOfKind { .. } => Code::FailedPrecondition,
        // A copy that ran out of space is what CreateSnapshot's
        // RESOURCE_EXHAUSTED ("not enough space") is for.
        BackendError::Copy { source, .. } => match source {
            CmdError::Failed(f) if f.stderr.contains("No space left") => Code::ResourceExhausted,
            e => tool_code(e),
        },
    }
}

fn tool_code(e: &CmdError) -> Code {
    match e {
        // The node lacks a package: fixable, and the message names it.
        CmdError::NotInstalled { .. } => Code::FailedPrecondition,
        CmdError::Start { source, .. } => io_code(source),
        CmdError::Failed(_) => Code::Internal,
    }
}

/// ENOSPC and EDQUOT mean "the disk is full", which the CO should hear as
/// RESOURCE_EXHAUSTED rather than an internal failure.
fn io_code(e: &io::Error) -> Code {
    match e.raw_os_error() {
        Some(c)
            if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32 =>
        {
            Code::ResourceExhausted
        }
        _ => Code::Internal,
    }
}
