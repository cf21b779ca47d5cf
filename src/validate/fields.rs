//! The checks of single request fields, and the typed values they give:
//! names, ids, node paths, capacity ranges, capabilities, mount flags.
//! The per-call requests in `validate` are built from these.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use super::{RequestError, Result};
use crate::sys::mount::MountFlags;
use crate::volume::id::VolumeId;
use crate::volume::record::Access;
use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;

/// Longest CreateVolume name accepted. Longer names are not refused by the
/// spec, but nothing legitimate sends kilobytes of name.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest path accepted (PATH_MAX).
pub(crate) const MAX_PATH_LEN: usize = 4096;

/// Access modes as the driver reasons about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Read-write on one node.
    SingleNodeWriter,
    /// Read-only on one node.
    SingleNodeReaderOnly,
    /// Read-write by one workload on one node (ReadWriteOncePod).
    SingleNodeSingleWriter,
    /// Read-write by many workloads on one node.
    SingleNodeMultiWriter,
    /// Any MULTI_NODE_* mode: a node-local disk cannot offer it.
    MultiNode,
}

/// How the volume is to be accessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    /// A mounted directory, with an optional filesystem type.
    Mount {
        /// Requested filesystem type ("" for any).
        fs_type: String,
        /// Requested mount flags.
        flags: MountFlags,
    },
    /// A raw block device.
    Block,
}

/// One checked volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Access mode.
    pub mode: AccessMode,
    /// Access type.
    pub access: AccessType,
}

/// A well-formed capability this driver cannot serve, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// A MULTI_NODE_* access mode: a node-local disk cannot offer it.
    #[error(
        "MULTI_NODE_* access modes are not supported: volumes live on one node's disk; \
         use a SINGLE_NODE_* mode (ReadWriteOnce, ReadOnlyMany on one node, ReadWriteOncePod)"
    )]
    MultiNode,
    /// A capability of the other access type than the volume has (a
    /// volume is made either for a filesystem or as a raw block device).
    #[error(
        "the volume is {}; ask for {} access",
        if *.0 == Access::Block { "a raw block volume, not a filesystem" }
        else { "a filesystem volume, not a raw block device" },
        if *.0 == Access::Block { "block" } else { "mount (filesystem)" }
    )]
    OtherAccess(Access),
}

impl Capability {
    /// Why this driver cannot serve the capability, if it cannot.
    pub fn unsupported(&self) -> Option<Unsupported> {
        match self.mode {
            AccessMode::MultiNode => Some(Unsupported::MultiNode),
            _ => None,
        }
    }

    /// The access a volume needs to serve the capability.
    pub fn access(&self) -> Access {
        match self.access {
            AccessType::Mount { .. } => Access::Mount,
            AccessType::Block => Access::Block,
        }
    }

    /// The mount flags asked for (none for block access).
    pub fn mount_flags(&self) -> MountFlags {
        match &self.access {
            AccessType::Mount { flags, .. } => *flags,
            AccessType::Block => MountFlags::default(),
        }
    }
}

/// A checked capacity range; 0 means "not set".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// At least this many bytes.
    pub required: u64,
    /// At most this many bytes.
    pub limit: u64,
}

impl CapacityRange {
    /// Whether `bytes` lies within the range.
    pub fn contains(&self, bytes: u64) -> bool {
        bytes >= self.required && (self.limit == 0 || bytes <= self.limit)
    }
}

/// Requires a non-empty field.
pub(crate) fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(RequestError::Missing(field));
    }
    Ok(value)
}

/// Checks a CreateVolume name.
pub fn volume_name(name: &str) -> Result<&str> {
    required(name, "name")?;
    if name.len() > MAX_NAME_LEN {
        return Err(RequestError::NameTooLong(name.len()));
    }
    if name.contains('\0') {
        return Err(RequestError::NameHasNul);
    }
    Ok(name)
}

/// Checks a volume id field for presence and plausible size
/// (INVALID_ARGUMENT); whether it can name a volume is [`parse_volume_id`]'s
/// question (NOT_FOUND).
pub(crate) fn volume_id(id: &str) -> Result<&str> {
    required(id, "volume_id")?;
    if id.len() > MAX_NAME_LEN {
        return Err(RequestError::IdTooLong(id.len()));
    }
    Ok(id)
}

/// Parses a volume id; an id that cannot name a volume of this driver is
/// NOT_FOUND, as the spec asks for unknown ids.
pub(crate) fn parse_volume_id(id: &str) -> Result<VolumeId> {
    VolumeId::parse(id).ok_or_else(|| RequestError::UnknownVolume(id.to_string()))
}

/// Checks a capacity range.
pub fn capacity_range(r: Option<&csi::CapacityRange>) -> Result<CapacityRange> {
    let Some(r) = r else {
        return Ok(CapacityRange::default());
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(RequestError::NegativeCapacity);
    }
    let range = CapacityRange {
        required: r.required_bytes as u64,
        limit: r.limit_bytes as u64,
    };
    if range.limit != 0 && range.required > range.limit {
        return Err(RequestError::RequiredAboveLimit {
            required: range.required,
            limit: range.limit,
        });
    }
    Ok(range)
}

/// Checks one capability.
pub fn capability(c: &csi::VolumeCapability) -> Result<Capability> {
    use csi::volume_capability::AccessType as Pa;
    let mode = c.access_mode.as_ref().ok_or(RequestError::NoAccessMode)?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(
            Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter,
        ) => AccessMode::MultiNode,
        Ok(Mode::Unknown) | Err(_) => return Err(RequestError::UnknownAccessMode(mode.mode)),
    };
    let access = match &c.access_type {
        Some(Pa::Mount(m)) => AccessType::Mount {
            fs_type: m.fs_type.clone(),
            flags: mount_flags(&m.mount_flags)?,
        },
        Some(Pa::Block(_)) => AccessType::Block,
        None => return Err(RequestError::NoAccessType),
    };
    Ok(Capability { mode, access })
}

/// Checks a non-empty list of capabilities.
pub(crate) fn capabilities(cs: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if cs.is_empty() {
        return Err(RequestError::NoCapabilities);
    }
    cs.iter().map(capability).collect()
}

/// Parses mount flags; only those a bind mount can apply are accepted, so
/// a flag is never silently ignored.
pub fn mount_flags(flags: &[String]) -> Result<MountFlags> {
    let mut f = MountFlags::default();
    for flag in flags {
        for opt in flag.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match opt {
                "ro" => f.read_only = true,
                "rw" | "defaults" | "relatime" | "bind" | "rbind" => {}
                "nosuid" => f.nosuid = true,
                "nodev" => f.nodev = true,
                "noexec" => f.noexec = true,
                "noatime" => f.noatime = true,
                other => return Err(RequestError::MountFlag(other.to_string())),
            }
        }
    }
    Ok(f)
}

/// A checked target or volume path on the node: absolute, without `.` or
/// `..` components or NUL bytes, not the root directory, no longer than
/// PATH_MAX, without a trailing slash. So it always has a parent directory
/// and a last component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePath(PathBuf);

impl NodePath {
    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The directory holding it.
    pub fn parent(&self) -> &Path {
        self.0.parent().unwrap_or(Path::new("/"))
    }

    /// Its last component.
    pub fn file_name(&self) -> &OsStr {
        self.0.file_name().unwrap_or_default()
    }
}

impl std::ops::Deref for NodePath {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

/// Checks a target or volume path (see [`NodePath`]); a trailing slash is
/// dropped.
pub fn node_path(path: &str, field: &'static str) -> Result<NodePath> {
    required(path, field)?;
    let bad = |why: &'static str| {
        Err(RequestError::BadPath {
            field,
            path: path.to_string(),
            why,
        })
    };
    if path.len() > MAX_PATH_LEN {
        return bad("is too long");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if !path.starts_with('/') {
        return bad("must be an absolute path");
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return bad("must not contain . or .. components");
    }
    let p = Path::new(path);
    if p.components().all(|c| matches!(c, Component::RootDir)) {
        return bad("must not be the root directory");
    }
    Ok(NodePath(p.components().collect()))
}

/// Parameters worth keeping with a volume: everything the CO sent. They
/// never hold secrets (the spec carries those in separate fields), and the
/// external-provisioner adds the claim's name and namespace here.
pub(crate) fn parameters(
    p: &std::collections::HashMap<String, String>,
) -> BTreeMap<String, String> {
    p.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths() {
        let p = node_path("/a/b/", "t").unwrap();
        assert_eq!(p.as_path(), Path::new("/a/b"));
        assert_eq!(
            (p.parent(), p.file_name()),
            (Path::new("/a"), OsStr::new("b"))
        );
        for bad in ["", "rel", "/a/../b", "/a/./b", "/..", "/", "//", "/a\0b"] {
            assert!(node_path(bad, "target_path").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags() {
        let f = mount_flags(&["ro,nosuid".into(), "noexec".into()]).unwrap();
        assert!(f.read_only && f.nosuid && f.noexec && !f.nodev);
        assert!(mount_flags(&["exec".into()]).is_err());
    }

    #[test]
    fn ranges() {
        let r = capacity_range(Some(&csi::CapacityRange {
            required_bytes: 10,
            limit_bytes: 20,
        }))
        .unwrap();
        assert!(r.contains(10) && r.contains(20) && !r.contains(21) && !r.contains(9));
        assert!(
            capacity_range(Some(&csi::CapacityRange {
                required_bytes: 30,
                limit_bytes: 20
            }))
            .is_err()
        );
        assert!(
            capacity_range(Some(&csi::CapacityRange {
                required_bytes: -1,
                limit_bytes: 0
            }))
            .is_err()
        );
    }
}
