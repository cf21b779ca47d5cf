//! A volume's record: what the driver remembers about a volume it created,
//! one small JSON file per volume (`.<token>.meta`) beside its data.
//!
//! Fields added later must default (`#[serde(default)]`), so that records
//! written by an older driver still read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::PoolKind;

/// Suffix of a record's file name (`.<token>.meta`).
const SUFFIX: &str = ".meta";
/// Suffix of the empty file whose modification time is the volume's last
/// successful NodePublishVolume (`.<token>.published`).
const PUBLISHED_SUFFIX: &str = ".published";
/// Suffix of the empty file whose modification time is the volume's last
/// NodeUnpublishVolume that took a mount off (`.<token>.unpublished`).
const UNPUBLISHED_SUFFIX: &str = ".unpublished";

/// The CreateVolume parameters csi-provisioner adds with
/// `--extra-create-metadata`.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// See [`PVC_NAME`].
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// See [`PVC_NAME`].
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";
/// The volume context keys the kubelet adds at NodePublishVolume when the
/// CSIDriver asks for `podInfoOnMount`.
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// See [`POD_NAME`].
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// See [`POD_NAME`].
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
/// See [`POD_NAME`].
pub const POD_SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
/// The volume context key that marks an inline ephemeral volume
/// (`"true"`); the kubelet sends it with every publication.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Suffix of a record being written under a temporary name.
pub(crate) const TEMP_SUFFIX: &str = ".meta.tmp";

/// What the driver remembers about a volume it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The CreateVolume name.
    pub name: String,
    /// Kind of the pool at creation.
    pub kind: PoolKind,
    /// Capacity promised to the CO, in bytes.
    pub capacity_bytes: u64,
    /// CreateVolume parameters, including the claim name and namespace the
    /// external-provisioner adds, so an operator can tell whose it is.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created_unix: u64,
    /// What the volume was made from (`snapshot <id>` or `volume <id>`),
    /// if it was made from a source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<String>,
    /// How the volume is accessed: a filesystem (a directory, the default
    /// for records of older drivers) or a raw block device.
    #[serde(default, skip_serializing_if = "Access::is_mount")]
    pub access: Access,
    /// Mode and owner given to the root directory of a filesystem volume
    /// (StorageClass parameters `directoryPerms`, `uid`, `gid`). Absent
    /// for the defaults, which are what older drivers made.
    #[serde(default, skip_serializing_if = "RootAccess::is_default")]
    pub root: RootAccess,
    /// Set for a CSI inline ephemeral volume: one a pod's spec asked for,
    /// made by NodePublishVolume and removed by NodeUnpublishVolume (or by
    /// the startup sweep once its target is gone), never by the controller
    /// calls. Its `name` is the kubelet's volume id, its `parameters` the
    /// volume attributes and the pod it was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<Ephemeral>,
}

/// StorageClass parameter: the mode of a volume's root directory, in
/// octal (named as the AWS EFS driver names its parameter of the same
/// meaning).
pub const DIRECTORY_PERMS: &str = "directoryPerms";
/// StorageClass parameter: the numeric owner of a volume's root directory.
pub const UID: &str = "uid";
/// StorageClass parameter: the numeric group of a volume's root directory.
pub const GID: &str = "gid";

/// Mode and owner of a filesystem volume's root directory (the directory,
/// btrfs subvolume or image filesystem root a pod sees), fixed at
/// CreateVolume from the StorageClass. The default, 0777 owned by root,
/// lets a pod of any uid write (see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootAccess {
    /// Permission bits, with setgid and sticky allowed (no setuid, which
    /// Linux ignores on directories); written as an octal string.
    #[serde(with = "octal")]
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl Default for RootAccess {
    fn default() -> Self {
        RootAccess {
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }
}

impl RootAccess {
    pub(crate) fn is_default(&self) -> bool {
        *self == RootAccess::default()
    }
}

impl std::fmt::Display for RootAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mode {:04o}, owner {}:{}", self.mode, self.uid, self.gid)
    }
}

/// A mode as an octal string in the record (`"0770"`), so an operator
/// reading it sees what the StorageClass said rather than 504.
mod octal {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{mode:04o}"))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(&text, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| D::Error::custom(format!("mode {text:?} is not an octal mode")))
    }
}

/// How a volume is accessed, fixed at CreateVolume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A filesystem: the volume is a directory that is bind-mounted.
    #[default]
    Mount,
    /// A raw block device: the volume is a sparse file behind a loop
    /// device, whose device node is bind-mounted onto the target file.
    Block,
}

impl Access {
    pub(crate) fn is_mount(&self) -> bool {
        *self == Access::Mount
    }
}

/// What is remembered about an inline ephemeral volume beyond any volume's
/// record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ephemeral {
    /// The target it was first published at (resolved). Once this path is
    /// gone and no mount shows the volume, neither the kubelet's retry of
    /// the publication nor its unpublication can come any more: the sweep
    /// removes the volume (see `volume::ephemeral`).
    pub target: PathBuf,
}

impl Record {
    /// The record of a volume created now.
    pub(crate) fn new(
        name: &str,
        kind: PoolKind,
        capacity_bytes: u64,
        parameters: BTreeMap<String, String>,
    ) -> Self {
        Record {
            name: name.to_string(),
            kind,
            capacity_bytes,
            parameters,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            content_source: None,
            access: Access::Mount,
            root: RootAccess::default(),
            ephemeral: None,
        }
    }

    /// The pod an inline ephemeral volume was made for, `(namespace,
    /// name)`, when the kubelet passed it (`podInfoOnMount`).
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((
            self.parameters.get(POD_NAMESPACE)?.as_str(),
            self.parameters.get(POD_NAME)?.as_str(),
        ))
    }

    /// The claim the volume was made for, `(namespace, name)`, when the
    /// provisioner passed it (`--extra-create-metadata`).
    pub fn claim(&self) -> Option<(&str, &str)> {
        Some((
            self.parameters.get(PVC_NAMESPACE)?.as_str(),
            self.parameters.get(PVC_NAME)?.as_str(),
        ))
    }

    /// The PersistentVolume's name, when the provisioner passed it.
    pub fn pv_name(&self) -> Option<&str> {
        self.parameters.get(PV_NAME).map(String::as_str)
    }

    /// The bytes of the record's file.
    pub(crate) fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }

    /// Reads a record's file.
    pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<Record> {
        serde_json::from_slice(bytes)
    }
}

/// The file name of the record of volume `token`.
pub(crate) fn file_name(token: &str) -> String {
    format!(".{token}{SUFFIX}")
}

/// Which of a volume's uses a marker file remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// The last successful NodePublishVolume.
    Published,
    /// The last NodeUnpublishVolume that took a mount off.
    Unpublished,
}

/// The file name of the marker of volume `token`'s last `what`.
///
/// Why a marker file's modification time rather than a field of the
/// record: the record is the commit point of the volume and is never
/// rewritten on the publish path; a marker holds no bytes that could be
/// torn, setting its time is one metadata change the filesystem's journal
/// makes atomic (about 10 µs, no flush on the publish path), and a
/// `kill -9` at any moment leaves either the old time or the new one.
pub(crate) fn marker_name(token: &str, what: Use) -> String {
    let suffix = match what {
        Use::Published => PUBLISHED_SUFFIX,
        Use::Unpublished => UNPUBLISHED_SUFFIX,
    };
    format!(".{token}{suffix}")
}

/// The token a record's file name belongs to, if `name` is one.
pub(crate) fn token_of(name: &str) -> Option<&str> {
    name.strip_prefix('.')?.strip_suffix(SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_older_drivers_still_read() {
        // Written before parameters and creation times were kept.
        let old = br#"{"name":"pvc-1","kind":"dir","capacity_bytes":1024}"#;
        let r = Record::decode(old).unwrap();
        assert_eq!((r.name.as_str(), r.capacity_bytes), ("pvc-1", 1024));
        assert_eq!((r.claim(), r.pv_name(), r.created_unix), (None, None, 0));
        assert_eq!(r.root, RootAccess::default());
    }

    #[test]
    fn a_root_mode_is_kept_as_octal_text() {
        let mut r = Record::new("pvc-2", PoolKind::Dir, 1, BTreeMap::new());
        assert!(
            !String::from_utf8(r.encode().unwrap())
                .unwrap()
                .contains("root")
        );
        r.root = RootAccess {
            mode: 0o2770,
            uid: 999,
            gid: 1000,
        };
        let text = String::from_utf8(r.encode().unwrap()).unwrap();
        assert!(text.contains(r#""mode": "2770""#), "{text}");
        assert_eq!(Record::decode(text.as_bytes()).unwrap().root, r.root);
        let bad = text.replace("2770", "98");
        assert!(Record::decode(bad.as_bytes()).is_err());
    }

    #[test]
    fn claim_and_pv_come_from_the_provisioner_parameters() {
        let params = BTreeMap::from([
            (PVC_NAMESPACE.to_string(), "shop".to_string()),
            (PVC_NAME.to_string(), "db".to_string()),
            (PV_NAME.to_string(), "pvc-9".to_string()),
        ]);
        let r = Record::new("pvc-9", PoolKind::Dir, 1, params);
        let back = Record::decode(&r.encode().unwrap()).unwrap();
        assert_eq!(back.claim(), Some(("shop", "db")));
        assert_eq!(back.pv_name(), Some("pvc-9"));
        assert_eq!(marker_name("pvc-9", Use::Published), ".pvc-9.published");
        assert_eq!(token_of(&marker_name("pvc-9", Use::Unpublished)), None);
    }
}
