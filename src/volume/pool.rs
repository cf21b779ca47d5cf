//! A pool: a directory holding volumes, their records, and a backend that
//! knows how to make storage of the pool's kind.
//!
//! Layout inside the pool directory (tokens never start with a dot, so the
//! driver's own files can never be mistaken for a volume):
//!
//! ```text
//! <token>/              the volume's data (what gets bind-mounted)
//! .<token>.meta         the volume's record (JSON); its presence is what
//!                       makes the directory a volume of this driver
//! .<token>.meta.tmp     a record being replaced (expansion), or a new one
//!                       where nameless files cannot be linked
//! .<token><scratch>     the backend's half-made or half-removed storage
//!                       (`.deleting` for dir, `.img.new` for image)
//! ```
//!
//! The record is the commit point of CreateVolume and the last thing
//! DeleteVolume removes: storage without a record was never acknowledged,
//! and a record without complete storage marks a call that must be retried.
//! Each change writes one small file and flushes one directory, so a call
//! costs the same with ten volumes or ten thousand.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::config::PoolKind;
use crate::error::{Error, Result};
use crate::sys;

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
}

/// A configured, prepared pool.
#[derive(Debug)]
pub struct Pool {
    /// Name StorageClasses use.
    pub name: String,
    /// Canonical directory.
    pub dir: PathBuf,
    /// Storage backend for the pool's kind.
    pub backend: Box<dyn Backend>,
    /// Size limits and promise policy (see `volume::control`).
    pub policy: crate::volume::capacity::SizePolicy,
    /// What the pool's volumes were promised, kept in memory.
    pub promises: crate::volume::capacity::Promises,
    /// Directory flushes shared between concurrent calls.
    pub flusher: sys::fs::DirFlush,
    /// Sorted tokens of the pool's volumes for ListVolumes: read from the
    /// directory on first use, then kept up to date by create and delete,
    /// so a page costs its own size, not the pool's.
    pub index: std::sync::Mutex<Option<std::collections::BTreeSet<String>>>,
}

const META: &str = ".meta";

fn encode(record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(record).map_err(|e| Error::Internal(format!("encoding record: {e}")))
}

impl Pool {
    /// Where a volume's data lives.
    pub fn volume_path(&self, token: &str) -> PathBuf {
        self.dir.join(token)
    }

    fn record_name(token: &str) -> String {
        format!(".{token}{META}")
    }

    /// Reads a volume's record; `None` when there is none.
    pub fn read_record(&self, token: &str) -> Result<Option<Record>> {
        let path = self.dir.join(Self::record_name(token));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("record {} is corrupt: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Replaces a record atomically (flush the pool with [`Pool::sync`]).
    pub fn write_record(&self, token: &str, record: &Record) -> Result<()> {
        sys::fs::write_atomic(&self.dir, &Self::record_name(token), &encode(record)?)
            .map_err(|e| self.write_error(token, e))
    }

    fn write_error(&self, token: &str, e: io::Error) -> Error {
        Error::io(
            format!("writing the record of {token} in pool {}", self.name),
            e,
        )
    }

    /// Writes the record of a new volume: it appears complete or not at
    /// all (flush the pool with [`Pool::sync`]).
    pub fn create_record(&self, token: &str, record: &Record) -> Result<()> {
        let name = Self::record_name(token);
        sys::fs::create_durably(&self.dir, &name, &encode(record)?)
            .map_err(|e| self.write_error(token, e))?;
        // A temp record left by an interrupted earlier attempt (or an
        // older driver) is ours to remove: the caller holds the token.
        match std::fs::remove_file(self.dir.join(format!("{name}.tmp"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(
                format!("removing the old temp record of {token}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Removes a record (flush the pool with [`Pool::sync`]).
    pub fn remove_record(&self, token: &str) -> Result<()> {
        match std::fs::remove_file(self.dir.join(Self::record_name(token))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing the record of {token}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Flushes the pool directory: makes preceding creates, renames and
    /// removals in it durable.
    pub fn sync(&self) -> Result<()> {
        self.flusher
            .flush(&self.dir)
            .map_err(|e| Error::io(format!("flushing pool {}", self.name), e))
    }

    /// Up to `limit` tokens with records, in order, starting at `from`.
    pub fn page(&self, from: std::ops::Bound<&str>, limit: usize) -> Result<Vec<String>> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if index.is_none() {
            *index = Some(self.tokens()?.into_iter().collect());
        }
        let set = index.as_ref().expect("filled above");
        Ok(set
            .range::<str, _>((from, std::ops::Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
    }

    /// Notes a committed volume in the listing index.
    pub fn index_insert(&self, token: &str) {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = index.as_mut() {
            set.insert(token.to_string());
        }
    }

    /// Drops a deleted volume from the listing index.
    pub fn index_remove(&self, token: &str) {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = index.as_mut() {
            set.remove(token);
        }
    }

    /// Tokens of all volumes with a record, unsorted.
    fn tokens(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("listing pool {}", self.name), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing pool {}", self.name), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(token) = name.strip_prefix('.').and_then(|n| n.strip_suffix(META))
                && crate::volume::id::valid_token(token)
            {
                out.push(token.to_string());
            }
        }
        Ok(out)
    }

    /// Leftovers of interrupted calls that no record refers to any more:
    /// half-written records and parked volumes, with the token each belongs
    /// to. Removing one is safe while no call holds that token's lock.
    pub fn leftovers(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("listing pool {}", self.name), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix('.') else {
                continue;
            };
            let token = rest
                .strip_suffix(".meta.tmp")
                // The backend's own scratch files (a parked dir volume, an
                // image being made).
                .or_else(|| {
                    self.backend
                        .scratch_suffixes()
                        .iter()
                        .find_map(|s| rest.strip_suffix(s))
                });
            if let Some(token) = token
                && crate::volume::id::valid_token(token)
            {
                out.push((token.to_string(), entry.path()));
            }
        }
        Ok(out)
    }

    /// Checks the pool directory exists (creating it if needed) and takes
    /// a durable write, then canonicalises its path.
    pub fn prepare(&mut self) -> Result<()> {
        let ctx = |what: &str, dir: &Path| format!("pool {}: {what} {}", self.name, dir.display());
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx("creating", &self.dir), e))?;
        let dir = std::fs::canonicalize(&self.dir)
            .map_err(|e| Error::io(ctx("resolving", &self.dir), e))?;
        self.dir = dir;
        sys::fs::write_atomic(&self.dir, ".probe", b"ok")
            .and_then(|()| std::fs::remove_file(self.dir.join(".probe")))
            .and_then(|()| sys::fs::sync_dir(&self.dir))
            .map_err(|e| Error::io(ctx("is not writable:", &self.dir), e))?;
        self.backend.prepare(&self.dir)
    }

    /// Whether `path` lies inside this pool or contains it.
    pub fn overlaps(&self, path: &Path) -> bool {
        path.starts_with(&self.dir) || self.dir.starts_with(path)
    }
}
