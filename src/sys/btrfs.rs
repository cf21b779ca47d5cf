//! What the kernel says about a btrfs filesystem's quotas, and the quota
//! commands the btrfs backend runs.
//!
//! The kernel is the only source of truth here: the driver keeps no state
//! of its own about quotas, so a driver killed at any moment (during a
//! rescan it started, say) finds the same facts when it starts again.
//!
//! Where each fact comes from, as measured on Linux 6.18 with Debian 12's
//! btrfs-progs 6.2:
//! - whether quotas are on, their mode (`qgroup` or `squota`) and whether
//!   the kernel considers the accounting inconsistent: sysfs,
//!   `/sys/fs/btrfs/<fsid>/qgroups/{enabled,mode,inconsistent}` (the
//!   `qgroups` directory exists only while quotas are on). This is the
//!   kernel's live state. `btrfs qgroup show` reads the on-disk status
//!   instead and printed no warning right after a mount that had marked
//!   the accounting inconsistent.
//! - whether a rescan is running: `btrfs quota rescan -s` (the
//!   `BTRFS_IOC_QUOTA_RESCAN_STATUS` ioctl). sysfs does not say, and
//!   `inconsistent` reads 0 during a rescan started from a consistent
//!   state, although the counts are being rebuilt from zero.
//! - the filesystem's id, which names its sysfs directory: `btrfs
//!   filesystem show <mount point>` (it refuses a directory inside one).
//!
//! Enabling simple quotas is the one thing btrfs-progs 6.2 cannot do; the
//! `btrfs-squota` crate issues that ioctl (see its documentation for why
//! it is a crate of its own).

use std::io;
use std::path::{Path, PathBuf};

use crate::sys::cmd::{self, CmdError};

/// Why the quota state or a quota command could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BtrfsError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("reading the mount table: {0}")]
    MountTable(#[source] io::Error),
    /// No mount holds the directory (the mount table is inconsistent).
    #[error("no mount holds {}", .0.display())]
    NotMounted(PathBuf),
    /// `btrfs` is missing or failed.
    #[error(transparent)]
    Tool(#[from] CmdError),
    /// `btrfs` printed something this driver does not understand.
    #[error("unexpected output of `{command}`: {output}")]
    Unexpected {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
}

type Result<T, E = BtrfsError> = std::result::Result<T, E>;

/// Where the kernel publishes btrfs filesystems.
const SYSFS: &str = "/sys/fs/btrfs";

/// How the kernel accounts a filesystem's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuotaMode {
    /// Simple quotas (`squota`, Linux 6.7+): each extent counts once,
    /// against the subvolume that wrote it; never inconsistent, no rescans.
    Simple,
    /// Full qgroup accounting: shared extents tracked through backrefs;
    /// can become inconsistent, repaired by a rescan.
    Qgroup,
}

impl QuotaMode {
    /// How the docs and the log name the mode.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QuotaMode::Simple => "simple",
            QuotaMode::Qgroup => "qgroup",
        }
    }
}

impl std::fmt::Display for QuotaMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kernel's quota state of one filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuotaState {
    /// The accounting mode.
    pub(crate) mode: QuotaMode,
    /// The kernel marked the accounting inconsistent: counts are wrong
    /// and, for some causes, no longer updated, so limits do not hold.
    pub(crate) inconsistent: bool,
}

/// A mounted btrfs filesystem, by its sysfs directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Filesystem {
    /// `/sys/fs/btrfs/<fsid>`.
    sysfs: PathBuf,
}

impl Filesystem {
    /// The filesystem holding `dir`.
    pub(crate) fn of(dir: &Path) -> Result<Filesystem> {
        // `btrfs filesystem show` wants a mount point (any bind mount of
        // the filesystem will do), not a directory inside one.
        let table = crate::sys::mountinfo::read().map_err(BtrfsError::MountTable)?;
        let mount = crate::sys::mountinfo::containing(&table, dir)
            .ok_or_else(|| BtrfsError::NotMounted(dir.to_path_buf()))?;
        let out = cmd::run(
            "btrfs",
            [
                "filesystem".as_ref(),
                "show".as_ref(),
                mount.mount_point.as_os_str(),
            ],
        )?;
        let fsid = parse_fsid(&out.stdout).ok_or_else(|| BtrfsError::Unexpected {
            command: format!("btrfs filesystem show {}", mount.mount_point.display()),
            output: out.stdout.trim().to_string(),
        })?;
        Ok(Filesystem::at(Path::new(SYSFS).join(fsid)))
    }

    /// A filesystem whose sysfs directory is `sysfs` (tests use a fake).
    pub(crate) fn at(sysfs: PathBuf) -> Filesystem {
        Filesystem { sysfs }
    }

    /// The sysfs directory.
    pub(crate) fn sysfs(&self) -> &Path {
        &self.sysfs
    }

    /// The quota state, or `None` when quotas are off.
    pub(crate) fn quotas(&self) -> io::Result<Option<QuotaState>> {
        let dir = self.sysfs.join("qgroups");
        let read = |name: &str| -> io::Result<Option<String>> {
            match std::fs::read_to_string(dir.join(name)) {
                Ok(s) => Ok(Some(s.trim().to_string())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        if !dir.is_dir() {
            // Quotas off; the filesystem itself must still be there.
            std::fs::metadata(&self.sysfs)?;
            return Ok(None);
        }
        // `enabled` and `mode` came with Linux 6.7 (`mode`) and 6.1; an
        // older kernel has only full qgroups.
        if read("enabled")?.as_deref() == Some("0") {
            return Ok(None);
        }
        let mode = match read("mode")?.as_deref() {
            Some("squota") => QuotaMode::Simple,
            Some("disabled") => return Ok(None),
            _ => QuotaMode::Qgroup,
        };
        let inconsistent = match read("inconsistent")? {
            Some(v) => v != "0",
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "{} does not exist: this kernel does not say whether qgroup \
                         accounting is consistent",
                        dir.join("inconsistent").display()
                    ),
                ));
            }
        };
        Ok(Some(QuotaState { mode, inconsistent }))
    }
}

/// The fsid in the output of `btrfs filesystem show`
/// (`Label: 'x'  uuid: <fsid>`).
fn parse_fsid(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == "uuid:")?;
    let fsid = words.next()?;
    let valid = fsid.len() == 36 && fsid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    valid.then(|| fsid.to_string())
}

/// Whether this kernel offers simple quotas.
pub(crate) fn kernel_has_simple_quotas() -> bool {
    Path::new(SYSFS).join("features/simple_quota").exists()
}

/// Turns on simple quotas for the filesystem holding `dir`. Succeeds
/// without a change when quotas are already on, in either mode.
pub(crate) fn enable_simple_quotas(dir: &Path) -> io::Result<()> {
    let f = std::fs::File::open(dir)?;
    btrfs_squota::enable_simple_quotas(&f)
}

/// Turns on full qgroup accounting for the filesystem holding `dir`; the
/// kernel then rescans it to count what is already there.
pub(crate) fn enable_qgroups(dir: &Path) -> Result<()> {
    cmd::run(
        "btrfs",
        ["quota".as_ref(), "enable".as_ref(), dir.as_os_str()],
    )?;
    Ok(())
}

/// Whether a qgroup rescan is running on the filesystem holding `dir`.
pub(crate) fn rescan_running(dir: &Path) -> Result<bool> {
    let out = cmd::run(
        "btrfs",
        [
            "quota".as_ref(),
            "rescan".as_ref(),
            "-s".as_ref(),
            dir.as_os_str(),
        ],
    )?;
    parse_rescan_status(&out.stdout).ok_or_else(|| BtrfsError::Unexpected {
        command: format!("btrfs quota rescan -s {}", dir.display()),
        output: out.stdout.trim().to_string(),
    })
}

/// `btrfs quota rescan -s` prints `rescan operation running (current key
/// N)` or `no rescan operation in progress`.
fn parse_rescan_status(text: &str) -> Option<bool> {
    let text = text.trim();
    if text.starts_with("rescan operation running") {
        Some(true)
    } else if text.starts_with("no rescan operation") {
        Some(false)
    } else {
        None
    }
}

/// Starts a qgroup rescan of the filesystem holding `dir` and returns at
/// once: the kernel runs it, a killed caller does not stop it, and an
/// unmount pauses it until the next mount resumes it. `false` when one was
/// already running.
pub(crate) fn start_rescan(dir: &Path) -> Result<bool> {
    match cmd::run_raw(
        "btrfs",
        ["quota".as_ref(), "rescan".as_ref(), dir.as_os_str()],
    )? {
        Ok(_) => Ok(true),
        Err(f) if f.stderr.contains("in progress") => Ok(false),
        Err(f) => Err(CmdError::from(f).into()),
    }
}

/// Transaction ids of a subvolume, as `btrfs subvolume show` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generations {
    /// The last transaction that changed the subvolume (`Generation`):
    /// any write, metadata included (an atime update too), once committed.
    pub(crate) last_change: u64,
    /// The transaction that created it (`Gen at creation`); for a snapshot,
    /// the one that cut it.
    pub(crate) created: u64,
}

/// The [`Generations`] of the subvolume at `path`.
pub(crate) fn generations(path: &Path) -> Result<Generations> {
    let out = cmd::run(
        "btrfs",
        ["subvolume".as_ref(), "show".as_ref(), path.as_os_str()],
    )?;
    parse_generations(&out.stdout).ok_or_else(|| BtrfsError::Unexpected {
        command: format!("btrfs subvolume show {}", path.display()),
        output: out.stdout.trim().to_string(),
    })
}

fn parse_generations(text: &str) -> Option<Generations> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    Some(Generations {
        last_change: field("Generation")?,
        created: field("Gen at creation")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fsid_from_filesystem_show() {
        let text = "Label: 'lbl4'  uuid: b2cae2d4-7bdc-4408-86e1-1ca81212b53c\n\
                    \tTotal devices 1 FS bytes used 178.86MiB\n\
                    \tdevid    1 size 4.00GiB used 1.34GiB path /dev/loop0\n";
        assert_eq!(
            parse_fsid(text).as_deref(),
            Some("b2cae2d4-7bdc-4408-86e1-1ca81212b53c")
        );
        assert_eq!(
            parse_fsid("Label: none  uuid: 6493565c-7caa-4973-a31e-df909ff9bafc\n").as_deref(),
            Some("6493565c-7caa-4973-a31e-df909ff9bafc")
        );
        assert_eq!(parse_fsid("Label: none\n"), None);
        assert_eq!(parse_fsid("uuid: ../../etc"), None);
    }

    #[test]
    fn reads_generations_from_subvolume_show() {
        let text = "a\n\tName: \t\t\ta\n\tGeneration: \t\t12\n\tGen at creation: \t7\n\
                    \tParent ID: \t\t5\n";
        assert_eq!(
            parse_generations(text),
            Some(Generations {
                last_change: 12,
                created: 7
            })
        );
        assert_eq!(parse_generations("\tGeneration: \t\t12\n"), None);
        assert_eq!(
            parse_generations("\tGeneration: x\n\tGen at creation: 1\n"),
            None
        );
    }

    #[test]
    fn reads_the_rescan_status() {
        assert_eq!(
            parse_rescan_status("rescan operation running (current key 17031169)\n"),
            Some(true)
        );
        assert_eq!(
            parse_rescan_status("no rescan operation in progress\n"),
            Some(false)
        );
        assert_eq!(parse_rescan_status("ERROR: something"), None);
    }

    fn fake(files: &[(&str, &str)]) -> (tempfile::TempDir, Filesystem) {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, format!("{value}\n")).unwrap();
        }
        let fs = Filesystem::at(dir.path().to_path_buf());
        (dir, fs)
    }

    #[test]
    fn reads_the_quota_state_from_sysfs() {
        let (_d, fs) = fake(&[("label", "")]);
        assert_eq!(fs.quotas().unwrap(), None, "no qgroups directory");

        let (_d, fs) = fake(&[
            ("qgroups/enabled", "1"),
            ("qgroups/mode", "squota"),
            ("qgroups/inconsistent", "0"),
        ]);
        assert_eq!(
            fs.quotas().unwrap(),
            Some(QuotaState {
                mode: QuotaMode::Simple,
                inconsistent: false
            })
        );

        let (_d, fs) = fake(&[
            ("qgroups/enabled", "1"),
            ("qgroups/mode", "qgroup"),
            ("qgroups/inconsistent", "1"),
        ]);
        assert_eq!(
            fs.quotas().unwrap(),
            Some(QuotaState {
                mode: QuotaMode::Qgroup,
                inconsistent: true
            })
        );

        // A kernel before 6.7 has no `mode`: full qgroups.
        let (_d, fs) = fake(&[("qgroups/enabled", "1"), ("qgroups/inconsistent", "0")]);
        assert_eq!(fs.quotas().unwrap().unwrap().mode, QuotaMode::Qgroup);

        // One that cannot say whether accounting holds is an error, not a
        // silent "consistent".
        let (_d, fs) = fake(&[("qgroups/enabled", "1")]);
        let e = fs.quotas().unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");

        // A filesystem that is gone (unmounted) is an error too.
        let fs = Filesystem::at(PathBuf::from("/nonexistent/sysfs/btrfs/x"));
        assert!(fs.quotas().is_err());
    }
}
