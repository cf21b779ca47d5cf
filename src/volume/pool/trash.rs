//! A pool's trash: where DeleteVolume moves the data of a volume whose
//! StorageClass says `onDelete: archive`, until its retention time runs
//! out and a sweep removes it.
//!
//! Layout inside the pool directory (the name starts with a dot, so it can
//! never be taken for a volume, and lies on the pool's filesystem, so
//! archiving is a rename and costs nothing whatever the volume holds):
//!
//! ```text
//! .trash/<entry>/meta        what was archived and until when (JSON: the
//!                            volume's record, archived_unix, expires_unix)
//! .trash/<entry>/data        the volume's data as its backend moved it:
//!                            the directory, the btrfs subvolume, or the
//!                            image file (unmounted, no loop device)
//! .trash/.new.<entry>/       an entry being made: its meta is written
//!                            here, then the directory is renamed
//! <entry> = <token>@<created_unix of the volume's record>
//! ```
//!
//! Crash safety follows the pool's rule that the record is the commit
//! point. Archiving makes the entry with its meta first (complete or not at
//! all, by the rename), then moves the data into it, then removes the
//! volume's record; purging removes the data first, then the meta, then
//! the entry. So data is always either at the volume's path under its
//! record, or in an entry whose meta says when it may go; an entry without
//! meta holds nothing. A DeleteVolume killed half-way is finished by its
//! retry (the entry's name is derived from the record, so the retry finds
//! it), and a purge killed half-way by the next sweep.
//!
//! The trash is not a volume, so it holds no promise: its bytes are taken
//! from the pool's free space like any file, which is how GetCapacity
//! counts them until they are purged.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Pool, PoolError, Result, lock};
use crate::sys;
use crate::volume::id::valid_token;
use crate::volume::record::{self, Record, Use};

/// The trash directory inside a pool.
pub(crate) const TRASH_DIR: &str = ".trash";
const META: &str = "meta";
const DATA: &str = "data";
const NEW_PREFIX: &str = ".new.";

/// StorageClass parameter choosing what DeleteVolume does.
pub const ON_DELETE: &str = "onDelete";
/// StorageClass parameter: how long archived data is kept.
pub const RETENTION: &str = "archiveRetention";
/// Retention of archived data when `archiveRetention` is not given.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(72 * 3600);

/// What DeleteVolume does with a volume's data, from the StorageClass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    /// Remove it (the default).
    Delete,
    /// Move it to the pool's trash and remove it after `retention`.
    Archive {
        /// How long the data is kept.
        retention: Duration,
    },
}

/// A StorageClass parameter about deletion that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OnDeleteError {
    /// `onDelete` is neither `delete` nor `archive`.
    #[error("parameter \"onDelete\" is {0:?}; it must be \"delete\" or \"archive\"")]
    Mode(String),
    /// `archiveRetention` is not a duration.
    #[error(
        "parameter \"archiveRetention\" is {0:?}; it must be a duration such as \"0s\", \"30m\", \"72h\" or \"7d\""
    )]
    Retention(String),
    /// `archiveRetention` without `onDelete: archive`.
    #[error("parameter \"archiveRetention\" is set but \"onDelete\" is not \"archive\"")]
    RetentionWithoutArchive,
}

impl OnDelete {
    /// Reads the policy from a volume's parameters (the StorageClass's).
    pub fn from_parameters(p: &BTreeMap<String, String>) -> Result<OnDelete, OnDeleteError> {
        let retention = p
            .get(RETENTION)
            .map(|r| parse_duration(r).ok_or_else(|| OnDeleteError::Retention(r.clone())))
            .transpose()?;
        match p.get(ON_DELETE).map(String::as_str) {
            None | Some("delete") if retention.is_some() => {
                Err(OnDeleteError::RetentionWithoutArchive)
            }
            None | Some("delete") => Ok(OnDelete::Delete),
            Some("archive") => Ok(OnDelete::Archive {
                retention: retention.unwrap_or(DEFAULT_RETENTION),
            }),
            Some(other) => Err(OnDeleteError::Mode(other.to_string())),
        }
    }

    /// The policy of a volume being deleted. A record whose parameters do
    /// not read (edited by hand) keeps its data: archived for the default
    /// retention rather than removed.
    pub(crate) fn of_record(record: &Record) -> OnDelete {
        OnDelete::from_parameters(&record.parameters).unwrap_or(OnDelete::Archive {
            retention: DEFAULT_RETENTION,
        })
    }
}

/// Parses durations such as `90s`, `30m`, `72h`, `7d` or `1h30m`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    if s.is_empty() {
        return None;
    }
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return None,
        };
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
    }
    digits.is_empty().then_some(Duration::from_secs(total))
}

/// What an entry's meta says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashMeta {
    /// The volume's token.
    pub token: String,
    /// The volume's record as it was when archived.
    pub record: Record,
    /// When it was archived, seconds since the epoch.
    pub archived_unix: u64,
    /// When the sweep may remove it, seconds since the epoch.
    pub expires_unix: u64,
}

/// One entry of a pool's trash, as listed.
#[derive(Debug, Clone)]
pub(crate) enum TrashItem {
    /// An archived volume.
    Archived {
        /// The entry's directory.
        path: PathBuf,
        /// Its meta.
        meta: TrashMeta,
    },
    /// An entry being made, or one whose purge was interrupted after its
    /// meta went: it holds no data and is removed by the next sweep.
    Incomplete {
        /// The entry's directory.
        path: PathBuf,
        /// The token it belongs to (to be locked while it is removed).
        token: String,
    },
}

/// Seconds since the epoch now.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PoolError {
    let context = context.into();
    move |source| PoolError::Io { context, source }
}

/// Removes an empty directory; a missing one is not an error.
fn remove_dir(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

impl Pool {
    fn trash_dir(&self) -> PathBuf {
        self.dir.join(TRASH_DIR)
    }

    /// Archives a volume: moves its data into a new trash entry kept for
    /// `retention`, then removes its record (see the module doc for the
    /// order). A retry after a crash finishes what the first attempt began.
    /// The caller holds the token's lock and checked nothing is mounted
    /// from the volume.
    pub(crate) fn archive(&self, token: &str, record: &Record, retention: Duration) -> Result<()> {
        let trash = self.trash_dir();
        match std::fs::create_dir(&trash) {
            Ok(()) => self.sync()?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("creating {}", trash.display()))(e)),
        }
        let name = format!("{token}@{}", record.created_unix);
        let entry = trash.join(&name);
        if std::fs::symlink_metadata(entry.join(META)).is_err() {
            // An entry without meta holds no data (module doc): at most the
            // empty directory of an interrupted purge.
            remove_dir(&entry)?;
            let new = trash.join(format!("{NEW_PREFIX}{name}"));
            sys::fs::remove_tree(&new).map_err(io_err(format!("removing {}", new.display())))?;
            std::fs::create_dir(&new).map_err(io_err(format!("creating {}", new.display())))?;
            let now = now_unix();
            let meta = TrashMeta {
                token: token.to_string(),
                record: record.clone(),
                archived_unix: now,
                expires_unix: now.saturating_add(retention.as_secs()),
            };
            let bytes = serde_json::to_vec_pretty(&meta).map_err(PoolError::EncodeRecord)?;
            sys::fs::create_durably(&new, META, &bytes)
                .and_then(|()| sys::fs::sync_dir(&new))
                .and_then(|()| std::fs::rename(&new, &entry))
                .and_then(|()| sys::fs::sync_dir(&trash))
                .map_err(io_err(format!("making trash entry {}", entry.display())))?;
        }
        self.backend.archive(&self.dir, token, &entry.join(DATA))?;
        sys::fs::sync_dir(&entry)
            .and_then(|()| sys::fs::sync_dir(&trash))
            .map_err(io_err(format!("flushing {}", entry.display())))?;
        for what in [Use::Published, Use::Unpublished] {
            sys::fs::remove_if_present(&self.dir, &record::marker_name(token, what))
                .map_err(io_err(format!("removing the use markers of {token}")))?;
        }
        self.remove_record(token)?;
        if let Some(set) = lock(&self.index).as_mut() {
            set.remove(token);
        }
        self.sync()?;
        if let Some(map) = lock(&self.promises).as_mut() {
            map.remove(token);
        }
        Ok(())
    }

    /// The entries of the pool's trash. An entry whose meta cannot be read
    /// is logged and left out: the driver removes nothing it cannot tell
    /// is its own.
    pub(crate) fn trash(&self) -> Result<Vec<TrashItem>> {
        let trash = self.trash_dir();
        let entries = match std::fs::read_dir(&trash) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("listing {}", trash.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", trash.display())))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let token_of = |n: &str| {
                n.rsplit_once('@')
                    .map(|(t, _)| t.to_string())
                    .filter(|t| valid_token(t))
            };
            if let Some(rest) = name.strip_prefix(NEW_PREFIX) {
                if let Some(token) = token_of(rest) {
                    out.push(TrashItem::Incomplete { path, token });
                }
                continue;
            }
            match std::fs::read(path.join(META)) {
                Ok(bytes) => match serde_json::from_slice::<TrashMeta>(&bytes) {
                    Ok(meta) => out.push(TrashItem::Archived { path, meta }),
                    Err(e) => tracing::warn!(
                        entry = %path.display(), error = %e,
                        "trash entry with an unreadable meta; left alone"
                    ),
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if let Some(token) = token_of(&name) {
                        out.push(TrashItem::Incomplete { path, token });
                    }
                }
                Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
            }
        }
        Ok(out)
    }

    /// Removes one trash entry: its data, then its meta, then the entry
    /// (each step durable before the next). The caller holds the token's
    /// lock.
    pub(crate) fn purge(&self, entry: &Path) -> Result<()> {
        let data = entry.join(DATA);
        if std::fs::symlink_metadata(&data).is_ok() {
            self.backend.purge(&data)?;
            sys::fs::sync_dir(entry).map_err(io_err(format!("flushing {}", entry.display())))?;
        }
        match std::fs::remove_file(entry.join(META)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err(format!("removing the meta of {}", entry.display()))(
                    e,
                ));
            }
            _ => {}
        }
        // A `.new.` entry may hold a half-written meta under a temp name.
        sys::fs::remove_tree(entry).map_err(io_err(format!("removing {}", entry.display())))?;
        sys::fs::sync_dir(&self.trash_dir()).map_err(io_err("flushing the trash"))
    }

    /// Bytes the data of a trash entry takes on the pool's filesystem.
    pub(crate) fn trash_bytes(&self, entry: &Path) -> Result<u64> {
        let data = entry.join(DATA);
        match sys::fs::usage(&data) {
            Ok(u) => Ok(u.bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_err(format!("measuring {}", data.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(d("0s"), Some(0));
        assert_eq!(d("90s"), Some(90));
        assert_eq!(d("30m"), Some(1800));
        assert_eq!(d("72h"), Some(259_200));
        assert_eq!(d("7d"), Some(604_800));
        assert_eq!(d("1h30m"), Some(5400));
        for bad in [
            "",
            "5",
            "h",
            "1.5h",
            "-1h",
            "1w",
            "1h 2m",
            "99999999999999999999d",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn policies() {
        let p = |pairs: &[(&str, &str)]| {
            OnDelete::from_parameters(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(p(&[]).unwrap(), OnDelete::Delete);
        assert_eq!(p(&[("onDelete", "delete")]).unwrap(), OnDelete::Delete);
        assert_eq!(
            p(&[("onDelete", "archive")]).unwrap(),
            OnDelete::Archive {
                retention: DEFAULT_RETENTION
            }
        );
        assert_eq!(
            p(&[("onDelete", "archive"), ("archiveRetention", "2h")]).unwrap(),
            OnDelete::Archive {
                retention: Duration::from_secs(7200)
            }
        );
        assert!(matches!(
            p(&[("onDelete", "Archive")]),
            Err(OnDeleteError::Mode(_))
        ));
        assert!(matches!(
            p(&[("onDelete", "archive"), ("archiveRetention", "soon")]),
            Err(OnDeleteError::Retention(_))
        ));
        assert!(matches!(
            p(&[("archiveRetention", "1h")]),
            Err(OnDeleteError::RetentionWithoutArchive)
        ));
    }
}
