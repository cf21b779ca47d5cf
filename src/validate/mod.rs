//! Requests parsed once, at the edge, into typed values.
//!
//! Each CSI call that carries arguments has a function here that turns its
//! message into a request type of the volume layer: the volume id parsed
//! into a [`VolumeId`], paths into [`NodePath`]s, capabilities checked and
//! reduced to what the call needs, every field the spec requires present.
//! The volume logic then works with values that cannot be wrong and does
//! not check them again; what it still checks depends on this node's
//! state (which pools exist, what is on disk).
//!
//! The checks run in the order the CO gets to hear about them: missing or
//! malformed fields (INVALID_ARGUMENT) first, then ids that cannot name a
//! volume of this driver (NOT_FOUND), except where the spec asks
//! otherwise (DeleteVolume succeeds, a foreign paging token is ABORTED).

mod fields;
mod group;
mod root;

use std::collections::BTreeMap;

use csi_proto as csi;

use crate::sys::mount::MountFlags;
use crate::volume::id::VolumeId;
use crate::volume::record::{self, Access, RootAccess};
use crate::volume::snapshot::SnapshotId;
pub use fields::{
    AccessMode, AccessType, Capability, CapacityRange, MAX_NAME_LEN, NodePath, Unsupported,
    capability, capacity_range, mount_flags, node_path, volume_name,
};
use fields::{capabilities, parameters, parse_volume_id, required, volume_id};
pub(crate) use group::{CreateGroupSnapshot, create_group_snapshot, group_ref};
pub use root::RootAccessError;

/// What is wrong with a request, found before the volume logic sees it.
/// All of it is INVALID_ARGUMENT but where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A field the spec requires is empty or absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A CreateVolume name longer than [`MAX_NAME_LEN`] bytes.
    #[error("name is {0} bytes long; at most {MAX_NAME_LEN} are accepted")]
    NameTooLong(usize),
    /// A CreateVolume name with a NUL byte.
    #[error("name must not contain NUL bytes")]
    NameHasNul,
    /// A volume id longer than any this driver hands out.
    #[error("volume_id is {0} bytes long; no volume of this driver has an id that long")]
    IdTooLong(usize),
    /// A volume id that cannot name a volume of this driver (NOT_FOUND, as
    /// the spec asks for unknown ids).
    #[error("volume {0:?} does not exist")]
    UnknownVolume(String),
    /// A negative `required_bytes` or `limit_bytes`.
    #[error("capacity_range: required_bytes and limit_bytes must not be negative")]
    NegativeCapacity,
    /// `required_bytes` above `limit_bytes`.
    #[error("capacity_range: required_bytes {required} exceeds limit_bytes {limit}")]
    RequiredAboveLimit {
        /// `required_bytes`.
        required: u64,
        /// `limit_bytes`.
        limit: u64,
    },
    /// An expansion without a size to grow to.
    #[error("capacity_range with required_bytes or limit_bytes is required")]
    NoCapacityRange,
    /// A capability without an access mode.
    #[error("volume_capability: access_mode is required")]
    NoAccessMode,
    /// An access mode the spec does not define (or UNKNOWN).
    #[error("volume_capability: access mode {0} is unknown")]
    UnknownAccessMode(i32),
    /// A capability without an access type.
    #[error("volume_capability: access_type (mount or block) is required")]
    NoAccessType,
    /// An empty list of capabilities.
    #[error("volume_capabilities are required")]
    NoCapabilities,
    /// A mount flag a bind mount cannot apply (none is silently ignored).
    #[error("mount flag {0:?} is not supported; supported: ro, rw, nosuid, nodev, noexec, noatime")]
    MountFlag(String),
    /// A well-formed capability this driver cannot serve.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// A path that is not a clean absolute path.
    #[error("{field} {path:?} {why}")]
    BadPath {
        /// The field.
        field: &'static str,
        /// The path as sent.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A `volume_path` that cannot be a path: the volume cannot be there
    /// (NOT_FOUND, as the spec asks when the volume is not at the path).
    #[error("{0}")]
    NotAPath(Box<RequestError>),
    /// A content source of neither kind the spec defines.
    #[error("volume_content_source: a snapshot or a volume is required")]
    EmptyContentSource,
    /// A snapshot id that cannot name a snapshot of this driver (NOT_FOUND,
    /// as the spec asks for unknown ids).
    #[error("snapshot {0:?} does not exist")]
    UnknownSnapshot(String),
    /// CreateVolume capabilities asking for both a filesystem and a raw
    /// block device: a volume is one or the other.
    #[error(
        "volume_capabilities ask for both mount and block access; a volume is either a \
         filesystem or a raw block device"
    )]
    MixedAccess,
    /// A read-only publication of a raw block volume: a read-only mount
    /// of a device node does not stop writes to the device.
    #[error(
        "raw block volumes cannot be published read-only: a read-only bind of a device node \
         does not stop writes to the device"
    )]
    ReadOnlyBlock,
    /// Mutable parameters (MODIFY_VOLUME is not offered).
    #[error("mutable_parameters are not supported: this driver does not offer MODIFY_VOLUME")]
    MutableParameters,
    /// A negative `max_entries`.
    #[error("max_entries must not be negative")]
    NegativeMaxEntries,
    /// `onDelete` or `archiveRetention` that cannot be used.
    #[error(transparent)]
    OnDelete(#[from] crate::volume::OnDeleteError),
    /// `directoryPerms`, `uid` or `gid` that cannot be used.
    #[error(transparent)]
    RootAccess(#[from] RootAccessError),
    /// A volume listed twice in a group snapshot's `source_volume_ids`.
    #[error("source_volume_ids lists volume {0:?} twice")]
    DuplicateSource(String),
    /// A group snapshot id that cannot name one of this driver's (NOT_FOUND,
    /// as the spec asks for unknown ids).
    #[error("group snapshot {0:?} does not exist")]
    UnknownGroupSnapshot(String),
    /// An inline ephemeral volume whose id has the form of this driver's
    /// own ids, which NodeUnpublishVolume could not tell apart.
    #[error(
        "volume_id {0:?} has the form <pool>:<name> of a persistent volume; an inline ephemeral \
         volume's id is the one the kubelet makes (csi-<sha256>)"
    )]
    EphemeralIdForm(String),
    /// An inline ephemeral volume with block access.
    #[error("inline ephemeral volumes are filesystems; block access is not offered for them")]
    EphemeralBlock,
    /// An inline ephemeral volume's `size` attribute that is not a size.
    #[error(
        "volume attribute size {0:?} is not a size; write bytes (1048576) or a quantity like \
         \"512Mi\" or \"1Gi\" (suffixes Ki Mi Gi Ti, k M G T), above 0"
    )]
    EphemeralSize(String),
    /// An attribute inline ephemeral volumes do not take.
    #[error(
        "volume attribute {0:?} is not known; inline ephemeral volumes take \"pool\", \"size\", \
         \"directoryPerms\", \"uid\" and \"gid\""
    )]
    EphemeralAttribute(String),
    /// A staging path for a driver that does not stage volumes.
    #[error(
        "staging_target_path must be empty: this driver does not stage volumes (no \
         STAGE_UNSTAGE_VOLUME)"
    )]
    StagingPath,
    /// A paging token this driver did not issue (ABORTED, as the spec
    /// asks: the CO lists again from the start).
    #[error("starting_token {0:?} was not issued by this driver; list again from the start")]
    ForeignToken(String),
}

/// Results of request checks.
pub(crate) type Result<T, E = RequestError> = std::result::Result<T, E>;

/// Topology segments: key to value.
pub(crate) type Segments = BTreeMap<String, String>;

/// A checked CreateVolume.
#[derive(Debug, Clone)]
pub(crate) struct CreateVolume {
    /// The CO-chosen name, the key for idempotency: non-empty, at most
    /// [`MAX_NAME_LEN`] bytes, no NUL.
    pub(crate) name: String,
    /// The size range.
    pub(crate) capacity: CapacityRange,
    /// StorageClass parameters plus what the provisioner adds.
    pub(crate) parameters: BTreeMap<String, String>,
    /// Topology segments of which the volume must be in one (empty: any).
    pub(crate) requisite: Vec<Segments>,
    /// What the volume is made from, if anything.
    pub(crate) source: Option<ContentSource>,
    /// A filesystem or a raw block device.
    pub(crate) access: Access,
    /// Mode and owner of a filesystem volume's root directory.
    pub(crate) root: RootAccess,
}

/// The source of a new volume's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ContentSource {
    /// A snapshot.
    Snapshot(SnapshotId),
    /// Another volume (a clone).
    Volume(VolumeId),
}

/// CreateVolume: a name, capabilities this driver can serve, a sane size
/// range; no content source or mutable parameters (not offered).
pub(crate) fn create_volume(r: &csi::CreateVolumeRequest) -> Result<CreateVolume> {
    let name = volume_name(&r.name)?.to_string();
    let caps = capabilities(&r.volume_capabilities)?;
    let capacity = capacity_range(r.capacity_range.as_ref())?;
    let source = r
        .volume_content_source
        .as_ref()
        .map(content_source)
        .transpose()?;
    if !r.mutable_parameters.is_empty() {
        return Err(RequestError::MutableParameters);
    }
    if let Some(why) = caps.iter().find_map(Capability::unsupported) {
        return Err(why.into());
    }
    let access = caps[0].access();
    if caps.iter().any(|c| c.access() != access) {
        return Err(RequestError::MixedAccess);
    }
    let requisite = requisite(r.accessibility_requirements.as_ref());
    let parameters = parameters(&r.parameters);
    // Checked now, so a StorageClass with a typo fails at its first claim,
    // not when its first volume is deleted.
    crate::volume::OnDelete::from_parameters(&parameters)?;
    let root = root::root_access(&parameters, access)?;
    Ok(CreateVolume {
        name,
        capacity,
        parameters,
        requisite,
        source,
        access,
        root,
    })
}

/// A content source: a snapshot or a volume id this driver could have
/// handed out (NOT_FOUND otherwise).
fn content_source(s: &csi::VolumeContentSource) -> Result<ContentSource> {
    use csi::volume_content_source::Type;
    match &s.r#type {
        Some(Type::Snapshot(snap)) => Ok(ContentSource::Snapshot(parse_snapshot_id(required(
            &snap.snapshot_id,
            "volume_content_source.snapshot.snapshot_id",
        )?)?)),
        Some(Type::Volume(v)) => Ok(ContentSource::Volume(parse_volume_id(required(
            &v.volume_id,
            "volume_content_source.volume.volume_id",
        )?)?)),
        None => Err(RequestError::EmptyContentSource),
    }
}

/// Parses a snapshot id; one that cannot name a snapshot of this driver is
/// NOT_FOUND.
fn parse_snapshot_id(id: &str) -> Result<SnapshotId> {
    SnapshotId::parse(id).ok_or_else(|| RequestError::UnknownSnapshot(id.to_string()))
}

/// A checked CreateSnapshot.
#[derive(Debug, Clone)]
pub(crate) struct CreateSnapshot {
    /// The CO-chosen name, the key for idempotency.
    pub(crate) name: String,
    /// The volume to snapshot.
    pub(crate) source: VolumeId,
    /// Topology segments of which the snapshot must be usable from one
    /// (`accessibility_requirements.requisite`; empty: anywhere).
    pub(crate) requisite: Vec<Segments>,
}

/// CreateSnapshot: a name, the volume to take it of, and where it must be
/// usable from.
pub(crate) fn create_snapshot(r: &csi::CreateSnapshotRequest) -> Result<CreateSnapshot> {
    let name = volume_name(&r.name)?.to_string();
    required(&r.source_volume_id, "source_volume_id")?;
    Ok(CreateSnapshot {
        name,
        source: parse_volume_id(&r.source_volume_id)?,
        requisite: requisite(r.accessibility_requirements.as_ref()),
    })
}

/// DeleteSnapshot: the snapshot, or `None` when the id cannot name one of
/// this driver's, which the spec answers with success.
pub(crate) fn delete_snapshot(r: &csi::DeleteSnapshotRequest) -> Result<Option<SnapshotId>> {
    Ok(SnapshotId::parse(required(&r.snapshot_id, "snapshot_id")?))
}

/// GetSnapshot: the snapshot (NOT_FOUND when the id cannot name one).
pub(crate) fn get_snapshot(r: &csi::GetSnapshotRequest) -> Result<SnapshotId> {
    parse_snapshot_id(required(&r.snapshot_id, "snapshot_id")?)
}

/// A checked ListSnapshots.
#[derive(Debug, Clone)]
pub(crate) struct ListSnapshots {
    /// Only this snapshot (an id that cannot name one lists nothing).
    pub(crate) snapshot: Option<SnapshotId>,
    /// Only snapshots of this volume id.
    pub(crate) source_volume: Option<String>,
    /// The first snapshot of the page (`None`: from the start).
    pub(crate) start: Option<SnapshotId>,
    /// The most entries to return (`max_entries` 0: all).
    pub(crate) max_entries: usize,
    /// A filter no snapshot can match (an id of no snapshot of ours).
    pub(crate) matches_none: bool,
}

/// ListSnapshots: filters, a paging token this driver issued (ABORTED
/// otherwise) and a non-negative page size.
pub(crate) fn list_snapshots(r: &csi::ListSnapshotsRequest) -> Result<ListSnapshots> {
    if r.max_entries < 0 {
        return Err(RequestError::NegativeMaxEntries);
    }
    let start = match r.starting_token.as_str() {
        "" => None,
        token => Some(
            SnapshotId::parse(token)
                .ok_or_else(|| RequestError::ForeignToken(token.to_string()))?,
        ),
    };
    let snapshot = (!r.snapshot_id.is_empty())
        .then(|| SnapshotId::parse(&r.snapshot_id))
        .flatten();
    Ok(ListSnapshots {
        matches_none: !r.snapshot_id.is_empty() && snapshot.is_none(),
        snapshot,
        source_volume: (!r.source_volume_id.is_empty()).then(|| r.source_volume_id.clone()),
        start,
        max_entries: match r.max_entries {
            0 => usize::MAX,
            n => n as usize,
        },
    })
}

/// DeleteVolume: the volume to delete, or `None` when the id cannot name a
/// volume of this driver, which the spec answers with success.
pub(crate) fn delete_volume(r: &csi::DeleteVolumeRequest) -> Result<Option<VolumeId>> {
    Ok(VolumeId::parse(volume_id(&r.volume_id)?))
}

/// A checked ValidateVolumeCapabilities.
#[derive(Debug, Clone)]
pub(crate) struct ValidateVolume {
    /// The volume asked about.
    pub(crate) id: VolumeId,
    /// Why the capabilities are declined whatever the volume, if they are
    /// (the answer carries it; it is not an error).
    pub(crate) declined: Option<Unsupported>,
    /// The access types asked for.
    pub(crate) accesses: Vec<Access>,
}

impl ValidateVolume {
    /// Why the capabilities are declined for a volume of `access`, if
    /// they are.
    pub(crate) fn verdict(&self, access: Access) -> Option<Unsupported> {
        self.declined.or_else(|| {
            self.accesses
                .iter()
                .any(|a| *a != access)
                .then_some(Unsupported::OtherAccess(access))
        })
    }
}

/// ValidateVolumeCapabilities: the volume and the verdict on the
/// capabilities, which must be well-formed.
pub(crate) fn validate_volume_capabilities(
    r: &csi::ValidateVolumeCapabilitiesRequest,
) -> Result<ValidateVolume> {
    let raw = volume_id(&r.volume_id)?;
    let caps = capabilities(&r.volume_capabilities)?;
    Ok(ValidateVolume {
        id: parse_volume_id(raw)?,
        declined: caps.iter().find_map(Capability::unsupported),
        accesses: caps.iter().map(Capability::access).collect(),
    })
}

/// A checked ListVolumes.
#[derive(Debug, Clone)]
pub(crate) struct ListVolumes {
    /// The first volume of the page (`None`: from the start).
    pub(crate) start: Option<VolumeId>,
    /// The most entries to return (`max_entries` 0: all).
    pub(crate) max_entries: usize,
}

/// ListVolumes: a paging token this driver issued (a volume id; anything
/// else is ABORTED, as the spec asks) and a non-negative page size.
pub(crate) fn list_volumes(r: &csi::ListVolumesRequest) -> Result<ListVolumes> {
    paging(r.max_entries, &r.starting_token)
}

/// ControllerListVolumeHealth: paged as ListVolumes, with the same tokens.
pub(crate) fn list_volume_health(
    r: &csi::ControllerListVolumeHealthRequest,
) -> Result<ListVolumes> {
    paging(r.max_entries, &r.starting_token)
}

/// A page size (not negative) and a token this driver issued.
fn paging(max_entries: i32, starting_token: &str) -> Result<ListVolumes> {
    if max_entries < 0 {
        return Err(RequestError::NegativeMaxEntries);
    }
    let start = match starting_token {
        "" => None,
        token => Some(
            VolumeId::parse(token).ok_or_else(|| RequestError::ForeignToken(token.to_string()))?,
        ),
    };
    Ok(ListVolumes {
        start,
        max_entries: match max_entries {
            0 => usize::MAX,
            n => n as usize,
        },
    })
}

/// A checked ControllerGetVolumeHealth or NodeGetVolumeHealth.
#[derive(Debug, Clone)]
pub(crate) struct VolumeHealthAt {
    /// The volume (on the node, an inline ephemeral volume's id is the
    /// kubelet's).
    pub(crate) volume: VolumeRef,
    /// Where the CO published it (or tried to), if it says.
    pub(crate) at: Option<NodePath>,
}

/// ControllerGetVolumeHealth: a volume id (one that cannot name a volume
/// of this driver is NOT_FOUND).
pub(crate) fn controller_get_volume_health(
    r: &csi::ControllerGetVolumeHealthRequest,
) -> Result<VolumeHealthAt> {
    Ok(VolumeHealthAt {
        volume: VolumeRef::Volume(parse_volume_id(volume_id(&r.volume_id)?)?),
        at: None,
    })
}

/// NodeGetVolumeHealth: a volume id and, optionally, a clean absolute
/// publish path; no staging path (the driver does not stage).
pub(crate) fn node_get_volume_health(
    r: &csi::NodeGetVolumeHealthRequest,
) -> Result<VolumeHealthAt> {
    let raw = volume_id(&r.volume_id)?;
    if !r.staging_target_path.is_empty() {
        return Err(RequestError::StagingPath);
    }
    let at = (!r.volume_publish_path.is_empty())
        .then(|| node_path(&r.volume_publish_path, "volume_publish_path"))
        .transpose()?;
    Ok(VolumeHealthAt {
        volume: volume_ref(raw),
        at,
    })
}

/// A checked GetCapacity.
#[derive(Debug, Clone)]
pub(crate) struct GetCapacity {
    /// The parameters, which select the pool.
    pub(crate) parameters: BTreeMap<String, String>,
    /// Whether the driver can serve every capability asked about.
    pub(crate) servable: bool,
    /// The topology asked about, if any.
    pub(crate) topology: Option<Segments>,
}

/// GetCapacity: well-formed capabilities (ones the driver cannot serve
/// make the answer 0, not an error), the parameters and the topology.
pub(crate) fn get_capacity(r: &csi::GetCapacityRequest) -> Result<GetCapacity> {
    let caps = r
        .volume_capabilities
        .iter()
        .map(capability)
        .collect::<Result<Vec<_>>>()?;
    Ok(GetCapacity {
        parameters: parameters(&r.parameters),
        servable: caps.iter().all(|c| c.unsupported().is_none()),
        topology: r.accessible_topology.as_ref().map(segments),
    })
}

/// A checked ControllerExpandVolume.
#[derive(Debug, Clone)]
pub(crate) struct ExpandVolume {
    /// The volume to grow.
    pub(crate) id: VolumeId,
    /// The size range; at least one bound is set.
    pub(crate) capacity: CapacityRange,
}

/// ControllerExpandVolume: the volume, and a capacity range with at least
/// one bound (the spec requires the field).
pub(crate) fn controller_expand_volume(
    r: &csi::ControllerExpandVolumeRequest,
) -> Result<ExpandVolume> {
    let raw = volume_id(&r.volume_id)?;
    let capacity = capacity_range(r.capacity_range.as_ref())?;
    if let Some(c) = r.volume_capability.as_ref() {
        capability(c)?;
    }
    let id = parse_volume_id(raw)?;
    if capacity.required == 0 && capacity.limit == 0 {
        return Err(RequestError::NoCapacityRange);
    }
    Ok(ExpandVolume { id, capacity })
}

/// A checked NodePublishVolume.
#[derive(Debug, Clone)]
pub(crate) struct PublishVolume {
    /// The volume to publish.
    pub(crate) volume: PublishOf,
    /// Where to mount it.
    pub(crate) target: NodePath,
    /// The mount's flags, read-only folded in (asked for with `readonly`,
    /// the `ro` flag, or the SINGLE_NODE_READER_ONLY mode).
    pub(crate) flags: MountFlags,
    /// SINGLE_NODE_SINGLE_WRITER: one publication at a time.
    pub(crate) single_writer: bool,
    /// A filesystem or a raw block device.
    pub(crate) access: Access,
}

/// What a NodePublishVolume publishes.
#[derive(Debug, Clone)]
pub(crate) enum PublishOf {
    /// A volume with an id of this driver: made by CreateVolume, or a
    /// static directory.
    Volume(VolumeId),
    /// A CSI inline ephemeral volume, made by the publication itself.
    Ephemeral(EphemeralVolume),
}

/// A checked request for an inline ephemeral volume (volume context
/// `csi.storage.k8s.io/ephemeral: "true"`).
#[derive(Debug, Clone)]
pub(crate) struct EphemeralVolume {
    /// The CO's volume id (the kubelet's `csi-<sha256 of pod uid and
    /// volume name>`): the volume's name, from which its token derives.
    pub(crate) name: String,
    /// The size asked for with the attribute `size`, if any.
    pub(crate) size: Option<u64>,
    /// The root directory's mode and owner (attributes `directoryPerms`,
    /// `uid`, `gid`, as a StorageClass's parameters).
    pub(crate) root: RootAccess,
    /// What is kept in the volume's record: the attributes `pool` and
    /// `size` and the pod the kubelet names (`podInfoOnMount`). Nothing
    /// else: the context may carry service account tokens.
    pub(crate) parameters: BTreeMap<String, String>,
}

/// Volume attributes an inline ephemeral volume takes, besides the keys
/// the kubelet adds (`csi.storage.k8s.io/...`).
pub(crate) const EPHEMERAL_ATTRIBUTES: [&str; 5] = [
    "pool",
    "size",
    record::DIRECTORY_PERMS,
    record::UID,
    record::GID,
];

/// NodePublishVolume: the volume, a target path, and a capability this
/// driver can serve (a mount with flags a bind mount can apply). With the
/// volume context key `csi.storage.k8s.io/ephemeral: "true"` the volume is
/// an inline ephemeral one, described by its attributes.
pub(crate) fn node_publish_volume(r: &csi::NodePublishVolumeRequest) -> Result<PublishVolume> {
    let raw = volume_id(&r.volume_id)?;
    let target = node_path(&r.target_path, "target_path")?;
    let capability = capability(
        r.volume_capability
            .as_ref()
            .ok_or(RequestError::Missing("volume_capability"))?,
    )?;
    let ephemeral = r.volume_context.get(record::EPHEMERAL).map(String::as_str) == Some("true");
    let volume = if ephemeral {
        PublishOf::Ephemeral(ephemeral_volume(raw, &r.volume_context)?)
    } else {
        PublishOf::Volume(parse_volume_id(raw)?)
    };
    if let Some(why) = capability.unsupported() {
        return Err(why.into());
    }
    let flags = capability.mount_flags();
    let read_only =
        r.readonly || flags.read_only || capability.mode == AccessMode::SingleNodeReaderOnly;
    let access = capability.access();
    if access == Access::Block && read_only {
        return Err(RequestError::ReadOnlyBlock);
    }
    if ephemeral && access == Access::Block {
        return Err(RequestError::EphemeralBlock);
    }
    Ok(PublishVolume {
        volume,
        target,
        flags: MountFlags { read_only, ..flags },
        single_writer: capability.mode == AccessMode::SingleNodeSingleWriter,
        access,
    })
}

/// An inline ephemeral volume's id and attributes. Its id must not have
/// the form of this driver's ids (`<pool>:<name>`): NodeUnpublishVolume,
/// which carries only the id, tells the two kinds apart by it.
fn ephemeral_volume(
    id: &str,
    context: &std::collections::HashMap<String, String>,
) -> Result<EphemeralVolume> {
    if VolumeId::parse(id).is_some() {
        return Err(RequestError::EphemeralIdForm(id.to_string()));
    }
    let mut parameters = BTreeMap::new();
    for (k, v) in context {
        if EPHEMERAL_ATTRIBUTES.contains(&k.as_str()) || POD_KEYS.contains(&k.as_str()) {
            parameters.insert(k.clone(), v.clone());
        } else if !k.starts_with(KUBELET_PREFIX) {
            // Not kept, and not ignored either: a typo (`sise: 1Gi`) would
            // otherwise give the pod a volume of the default size.
            return Err(RequestError::EphemeralAttribute(k.clone()));
        }
    }
    let size = match context.get("size") {
        None => None,
        Some(s) => match crate::config::ByteSize::parse(s) {
            Some(b) if b.0 > 0 => Some(b.0),
            _ => return Err(RequestError::EphemeralSize(s.clone())),
        },
    };
    Ok(EphemeralVolume {
        name: id.to_string(),
        size,
        root: root::root_access(&parameters, Access::Mount)?,
        parameters,
    })
}

/// The keys of the kubelet's `podInfoOnMount` kept in an inline volume's
/// record (not the service account tokens it may add beside them).
const POD_KEYS: [&str; 4] = [
    record::POD_NAME,
    record::POD_NAMESPACE,
    record::POD_UID,
    record::POD_SERVICE_ACCOUNT,
];

/// The prefix of the volume context keys the kubelet adds.
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// A checked NodeUnpublishVolume.
#[derive(Debug, Clone)]
pub(crate) struct UnpublishVolume {
    /// The volume to unpublish.
    pub(crate) volume: VolumeRef,
    /// Where it is mounted.
    pub(crate) target: NodePath,
}

/// The volume a node call that carries no volume context names
/// (NodeUnpublishVolume, NodeGetVolumeStats).
#[derive(Debug, Clone)]
pub(crate) enum VolumeRef {
    /// A volume id of this driver (`<pool>:<name>`).
    Volume(VolumeId),
    /// Any other id: an inline ephemeral volume's, if one has it (the
    /// call carries no volume context to say so).
    Other(String),
}

/// NodeUnpublishVolume: the volume and its target path.
pub(crate) fn node_unpublish_volume(
    r: &csi::NodeUnpublishVolumeRequest,
) -> Result<UnpublishVolume> {
    let raw = volume_id(&r.volume_id)?;
    let target = node_path(&r.target_path, "target_path")?;
    Ok(UnpublishVolume {
        volume: volume_ref(raw),
        target,
    })
}

fn volume_ref(raw: &str) -> VolumeRef {
    match VolumeId::parse(raw) {
        Some(id) => VolumeRef::Volume(id),
        None => VolumeRef::Other(raw.to_string()),
    }
}

/// A checked NodeGetVolumeStats or NodeExpandVolume: a volume and a path
/// where it is published.
#[derive(Debug, Clone)]
pub(crate) struct VolumeAtPath {
    /// The volume.
    pub(crate) id: VolumeId,
    /// Where the CO says it is published.
    pub(crate) path: NodePath,
}

/// A checked NodeGetVolumeStats.
#[derive(Debug, Clone)]
pub(crate) struct VolumeStats {
    /// The volume (an inline ephemeral volume's id is the kubelet's).
    pub(crate) volume: VolumeRef,
    /// Where the CO says it is published.
    pub(crate) path: NodePath,
}

/// NodeGetVolumeStats: the volume and the path it is published at.
pub(crate) fn node_get_volume_stats(r: &csi::NodeGetVolumeStatsRequest) -> Result<VolumeStats> {
    let raw = volume_id(&r.volume_id)?;
    let path = published_path(&r.volume_path)?;
    Ok(VolumeStats {
        volume: volume_ref(raw),
        path,
    })
}

/// A checked NodeExpandVolume.
#[derive(Debug, Clone)]
pub(crate) struct NodeExpandVolume {
    /// The volume and where it is published.
    pub(crate) at: VolumeAtPath,
    /// The size asked for; optional in CSI (no bound set: grow nothing,
    /// only the filesystem to what the volume already has).
    pub(crate) capacity: CapacityRange,
}

/// NodeExpandVolume: the volume, the path it is published at, and a sane
/// capacity range (used when the driver grows volumes on the node).
pub(crate) fn node_expand_volume(r: &csi::NodeExpandVolumeRequest) -> Result<NodeExpandVolume> {
    let raw = volume_id(&r.volume_id)?;
    let path = published_path(&r.volume_path)?;
    let capacity = capacity_range(r.capacity_range.as_ref())?;
    Ok(NodeExpandVolume {
        at: VolumeAtPath {
            id: parse_volume_id(raw)?,
            path,
        },
        capacity,
    })
}

/// A `volume_path`: required (INVALID_ARGUMENT), and a path that cannot be
/// valid cannot hold the volume either, which the spec answers NOT_FOUND.
fn published_path(volume_path: &str) -> Result<NodePath> {
    required(volume_path, "volume_path")?;
    node_path(volume_path, "volume_path").map_err(|e| RequestError::NotAPath(Box::new(e)))
}

/// The requisite segments of a topology requirement (the preferred ones
/// add nothing on a node-local driver: this node is the only choice).
fn requisite(r: Option<&csi::TopologyRequirement>) -> Vec<Segments> {
    r.map(|a| a.requisite.iter().map(segments).collect())
        .unwrap_or_default()
}

fn segments(t: &csi::Topology) -> Segments {
    t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
