//! What every table runs against, the request builders its rows use, and
//! the checks that nothing outside the pools and targets changed.
//!
//! The fixture: volume `alpha` in pool `hdd` (with a file in it) and `beta`
//! in pool `ssd`, published read-write at `targets/busy`; a canary tree
//! beside the pools, and targets that lead to it, to the volumes, into the
//! pools and to `/etc` through symlinks; a regular file, a non-empty
//! directory and a foreign tmpfs mount among the targets.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use csi_proto as csi;
use csi_proto::volume_capability::AccessType as Pa;
use csi_proto::volume_capability::access_mode::Mode;
use hostpath_csi::volume::id::token_for_name;

use crate::case::{Case, Req};
use crate::common::{self, Harness, entries, mount_cap, mounts_below};
use crate::robust_support::{make_canary, tree_digest};

pub const MIB: i64 = 1 << 20;

/// Ids forged to point outside a pool, or at the driver's own files.
pub const FORGED_IDS: &[&str] = &[
    "hdd:../../etc",
    "../x:y",
    "hdd:/etc",
    "hdd:..",
    "hdd:.",
    "hdd:.alpha.meta",
    "hdd:alpha/../../..",
    "hdd:a/b",
    "hdd:alpha\u{0}",
    ":alpha",
    "hdd:",
    "nvme:alpha",
    "HDD:alpha",
    "hdd:alpha:beta",
    "/etc/passwd",
    "hdd:%2e%2e",
];

/// The paths and ids the rows name. Built from the harness's directory
/// alone ([`Fixture::new`]), so a table can be listed without a driver;
/// [`Fixture::make`] puts it on disk.
pub struct Fixture {
    /// The harness's directory, canonical.
    pub root: PathBuf,
    /// Pool `hdd`'s directory.
    pub hdd: PathBuf,
    /// Pool `ssd`'s directory.
    pub ssd: PathBuf,
    /// The directory the targets live in.
    pub targets: PathBuf,
    /// Volume `alpha` (pool `hdd`), not published.
    pub alpha: String,
    /// Volume `beta` (pool `ssd`), published read-write at [`Self::busy`].
    pub beta: String,
    /// Where `beta` is published.
    pub busy: PathBuf,
    /// A target path that does not exist.
    pub free: String,
    /// A directory tree outside the pools that no call may touch.
    pub canary: PathBuf,
    /// Target symlinks: to the canary's non-empty `etc`, to its empty
    /// directory, to `alpha`'s directory, to `beta`'s, to pool `hdd`, to
    /// `/etc`.
    pub to_canary: String,
    pub to_canary_empty: String,
    pub to_volume: String,
    pub to_other_volume: String,
    pub to_pool: String,
    pub to_etc: String,
    /// A target below a symlink into pool `hdd`.
    pub via_pool: String,
    /// A regular file among the targets.
    pub file_target: PathBuf,
    /// A directory with a file in it among the targets.
    pub nonempty: PathBuf,
    /// A tmpfs mounted among the targets by someone else.
    pub foreign: PathBuf,
    /// An empty directory among the targets that nothing is published at.
    pub never_published: PathBuf,
    /// A 2000-byte name, a 2000-byte id and an 8 KiB path.
    pub long_name: String,
    pub long_id: String,
    pub long_path: String,
}

/// What the fixture looked like before a table ran.
pub struct Before {
    outside: String,
    ssd: String,
    hdd: BTreeSet<String>,
}

impl Fixture {
    /// The fixture of a started harness (nothing made yet).
    pub fn new(h: &Harness) -> Self {
        let fixture = Self::unmade(&std::fs::canonicalize(h.root.path()).unwrap());
        assert_eq!(fixture.hdd, h.pool_dir("hdd"));
        assert_eq!(fixture.ssd, h.pool_dir("ssd"));
        fixture
    }

    /// The fixture's paths under `root`, as a harness lays them out.
    pub fn unmade(root: &Path) -> Self {
        let targets = root.join("targets");
        let link = |name: &str| s(&targets.join(name));
        let hdd = root.join("pools/hdd");
        let canary = root.join("canary");
        Fixture {
            root: root.to_path_buf(),
            ssd: root.join("pools/ssd"),
            alpha: "hdd:alpha".into(),
            beta: "ssd:beta".into(),
            busy: targets.join("busy"),
            free: s(&targets.join("free")),
            to_canary: link("to-canary"),
            to_canary_empty: link("to-canary-empty"),
            to_volume: link("to-volume"),
            to_other_volume: link("to-other-volume"),
            to_pool: link("to-pool"),
            to_etc: link("to-etc"),
            via_pool: s(&targets.join("into-pool/newdir")),
            file_target: targets.join("a-file"),
            nonempty: targets.join("nonempty"),
            foreign: targets.join("foreign"),
            never_published: targets.join("never-published"),
            long_name: "n".repeat(2000),
            long_id: format!("hdd:{}", "x".repeat(2000)),
            long_path: format!("/{}", "d/".repeat(2100)),
            hdd,
            canary,
            targets,
        }
    }

    /// Makes the volumes, publishes `beta`, and lays out the canary and
    /// the odd targets (mounting the foreign tmpfs needs root).
    pub async fn make(&self, h: &Harness) {
        assert_eq!(h.create("alpha", "hdd", MIB).await.volume_id, self.alpha);
        assert_eq!(h.create("beta", "ssd", MIB).await.volume_id, self.beta);
        std::fs::write(self.hdd.join("alpha/data"), b"alpha's data").unwrap();
        h.publish(&self.beta, &self.busy, false).await.unwrap();

        make_canary(&self.canary);
        std::fs::create_dir(self.canary.join("empty")).unwrap();
        let link = |at: &str, to: &Path| std::os::unix::fs::symlink(to, at).unwrap();
        link(&self.to_canary, &self.canary.join("etc"));
        link(&self.to_canary_empty, &self.canary.join("empty"));
        link(&self.to_volume, &self.hdd.join("alpha"));
        link(&self.to_other_volume, &self.ssd.join("beta"));
        link(&self.to_pool, &self.hdd);
        link(&s(&self.targets.join("into-pool")), &self.hdd);
        link(&self.to_etc, Path::new("/etc"));
        std::fs::write(&self.file_target, b"not a dir").unwrap();
        std::fs::create_dir(&self.nonempty).unwrap();
        std::fs::write(self.nonempty.join("keep"), b"keep").unwrap();
        std::fs::create_dir(&self.never_published).unwrap();
        std::fs::create_dir(&self.foreign).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &self.foreign,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mounting a tmpfs (tests run as root)");
        std::fs::write(self.foreign.join("theirs"), b"theirs").unwrap();
    }

    /// Digests of everything outside the pools and targets, and of pool
    /// `ssd`; the entries of pool `hdd`.
    pub fn snapshot(&self) -> Before {
        Before {
            outside: tree_digest(&self.root, &["pools", "targets", "csi.sock"]),
            ssd: tree_digest(&self.ssd, &[]),
            hdd: entries(&self.hdd),
        }
    }

    /// After a table: the driver still serves, its volumes and the canary
    /// are intact, nothing is mounted on the canary or `/etc`, the odd
    /// targets hold what they held, pool `ssd` is unchanged, and pool
    /// `hdd` gained exactly the volumes (directory and record) of the
    /// CreateVolume rows that were to succeed.
    pub async fn check_untouched(&self, h: &Harness, before: &Before, rows: &[Case]) {
        h.identity().probe(csi::ProbeRequest {}).await.unwrap();
        assert_eq!(
            std::fs::read(self.hdd.join("alpha/data")).unwrap(),
            b"alpha's data"
        );
        assert_eq!(
            tree_digest(&self.root, &["pools", "targets", "csi.sock"]),
            before.outside,
            "the canary tree changed"
        );
        assert!(
            mounts_below(&self.canary).is_empty(),
            "something was mounted on the canary"
        );
        assert!(common::mounts_at(Path::new("/etc")).is_empty());
        assert_eq!(std::fs::read(self.nonempty.join("keep")).unwrap(), b"keep");
        assert_eq!(
            std::fs::read(self.foreign.join("theirs")).unwrap(),
            b"theirs",
            "a foreign mount was touched"
        );
        assert_eq!(std::fs::read(&self.file_target).unwrap(), b"not a dir");
        assert_eq!(tree_digest(&self.ssd, &[]), before.ssd, "pool ssd changed");
        let mut want = before.hdd.clone();
        for c in rows {
            if let (Req::Create(r), tonic::Code::Ok) = (&c.request, c.want_code) {
                let token = token_for_name(&r.name);
                want.insert(format!(".{token}.meta"));
                want.insert(token);
            }
        }
        assert_eq!(entries(&self.hdd), want, "pool hdd");
    }

    /// Unpublishes `beta` and unmounts the foreign tmpfs (dropping the
    /// harness would detach them too; this checks the unpublish works).
    pub async fn clean_up(&self, h: &Harness) {
        h.unpublish(&self.beta, &self.busy).await.unwrap();
        let _ = nix::mount::umount2(&self.foreign, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A path as the string a request carries.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A capability with any mode number and access type.
pub fn cap(mode: i32, access: Option<Pa>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode }),
        access_type: access,
    }
}

/// A mount access type without flags.
pub fn mount() -> Option<Pa> {
    Some(Pa::Mount(Default::default()))
}

/// A mount access type with these flags.
pub fn mount_flags(flags: &[&str]) -> Option<Pa> {
    Some(Pa::Mount(csi::volume_capability::MountVolume {
        mount_flags: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }))
}

/// A block access type.
pub fn block() -> Option<Pa> {
    Some(Pa::Block(Default::default()))
}

/// A 1 MiB single-node-writer CreateVolume in `pool`.
pub fn create(name: &str, pool: &str) -> csi::CreateVolumeRequest {
    common::create_request(name, pool, MIB)
}

/// A single-node-writer NodePublishVolume.
pub fn publish(id: &str, target: &str) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.to_string(),
        target_path: target.to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

/// A ValidateVolumeCapabilities.
pub fn validate(
    id: &str,
    caps: Vec<csi::VolumeCapability>,
) -> csi::ValidateVolumeCapabilitiesRequest {
    csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_string(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

/// A GetCapacity with these parameters and capabilities.
pub fn capacity(
    params: &[(&str, &str)],
    caps: Vec<csi::VolumeCapability>,
) -> csi::GetCapacityRequest {
    csi::GetCapacityRequest {
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        volume_capabilities: caps,
        ..Default::default()
    }
}

/// A NodeExpandVolume without a capacity range.
pub fn node_expand(id: &str, path: &str) -> Req {
    Req::NodeExpand(csi::NodeExpandVolumeRequest {
        volume_id: id.to_string(),
        volume_path: path.to_string(),
        ..Default::default()
    })
}

/// A string map.
pub fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
