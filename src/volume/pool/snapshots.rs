//! A pool's snapshots, and the volumes it makes from a snapshot or from
//! another of its volumes.
//!
//! Layout inside the pool directory:
//!
//! ```text
//! .snapshots/<token>         a snapshot's data: a copied tree (dir), a
//!                            read-only subvolume (btrfs), a copy of the
//!                            image (image)
//! .snapshots/.<token>.meta   its record, the commit point of
//!                            CreateSnapshot; DeleteSnapshot removes it first
//! .<token>.restoring         a volume being made from a source (or an
//!                            inline ephemeral volume being made); marks
//!                            whatever exists at <token> as this driver's,
//!                            until the volume's record is written
//! ```
//!
//! Snapshot data without a record was never acknowledged (a create killed
//! half-way) or is being deleted (the record went first): either way it is
//! the driver's own and the startup sweep removes it. Nobody else puts
//! anything in `.snapshots`, so nothing there is ever someone else's data.

use std::io;
use std::path::PathBuf;

use super::{Pool, PoolError, Result, lock};
use crate::backend::Source;
use crate::sys;
use crate::volume::id::valid_token;
use crate::volume::record::{self, Access, Record};
use crate::volume::snapshot::SnapshotRecord;

/// The directory of a pool's snapshots.
const SNAPSHOTS: &str = ".snapshots";
/// Suffix of the marker of a volume being made from a source.
const RESTORING: &str = ".restoring";

impl Pool {
    fn snapshots_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOTS)
    }

    /// Where a snapshot's data lives.
    pub(crate) fn snapshot_path(&self, token: &str) -> PathBuf {
        self.snapshots_dir().join(token)
    }

    /// Reads a snapshot's record; `None` when there is none.
    pub(crate) fn snapshot_record(&self, token: &str) -> Result<Option<SnapshotRecord>> {
        let path = self.snapshots_dir().join(record::file_name(token));
        match std::fs::read(&path) {
            Ok(bytes) => SnapshotRecord::decode(&bytes)
                .map(Some)
                .map_err(|source| PoolError::CorruptRecord { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PoolError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Tokens of the pool's snapshots (those with a record), sorted.
    pub(crate) fn snapshot_tokens(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .snapshot_entries()?
            .into_iter()
            .filter_map(|name| record::token_of(&name).map(str::to_string))
            .filter(|t| valid_token(t))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Names in the snapshot directory (none when it does not exist yet).
    fn snapshot_entries(&self) -> Result<Vec<String>> {
        let dir = self.snapshots_dir();
        let listing = |e| PoolError::io(format!("listing {}", dir.display()), e);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(listing(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            if let Some(name) = entry.map_err(listing)?.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Takes a snapshot of volume `volume` as snapshot `token`: its data
    /// (any leftover of an earlier attempt is discarded first), its size,
    /// then its record (the commit point) and one flush. A failure takes
    /// the data back. Called only while no record exists for `token`, with
    /// the locks of both held.
    pub(crate) fn take_snapshot(
        &self,
        token: &str,
        volume: &str,
        record: &mut SnapshotRecord,
    ) -> Result<()> {
        let dir = self.snapshots_dir();
        match std::fs::create_dir(&dir) {
            Ok(()) => self.sync()?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(PoolError::io(format!("creating {}", dir.display()), e)),
        }
        let dest = self.snapshot_path(token);
        self.backend.discard(&dest)?;
        let mut made = || -> Result<()> {
            if record.access == Access::Block {
                record.size_bytes = crate::backend::block::snapshot(&self.dir, volume, &dest)?;
            } else {
                self.backend.snapshot(&self.dir, volume, &dest)?;
                record.size_bytes = self.backend.snapshot_size(&dest)?;
            }
            sys::fs::create_durably(
                &dir,
                &record::file_name(token),
                &record.encode().map_err(PoolError::EncodeRecord)?,
            )
            .map_err(|e| PoolError::io(format!("writing the record of snapshot {token}"), e))?;
            sys::fs::sync_dir(&dir)
                .map_err(|e| PoolError::io(format!("flushing {}", dir.display()), e))
        };
        made().inspect_err(|_| {
            let _ = std::fs::remove_file(dir.join(record::file_name(token)));
            let _ = self.backend.discard(&dest);
        })
    }

    /// Removes a snapshot: its record first (so a delete killed half-way
    /// has already taken effect, and the sweep removes the data), one
    /// flush, then its data.
    pub(crate) fn remove_snapshot(&self, token: &str) -> Result<()> {
        let dir = self.snapshots_dir();
        match std::fs::remove_file(dir.join(record::file_name(token))) {
            Ok(()) => sys::fs::sync_dir(&dir)
                .map_err(|e| PoolError::io(format!("flushing {}", dir.display()), e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PoolError::io(
                    format!("removing the record of snapshot {token}"),
                    e,
                ));
            }
        }
        Ok(self.backend.discard(&self.snapshot_path(token))?)
    }

    /// Snapshot data no record explains, and half-written snapshot
    /// records, with the snapshot token each belongs to.
    pub(crate) fn snapshot_leftovers(&self) -> Result<Vec<(String, PathBuf)>> {
        let names = self.snapshot_entries()?;
        let recorded: std::collections::HashSet<&str> =
            names.iter().filter_map(|n| record::token_of(n)).collect();
        let mut out = Vec::new();
        for name in &names {
            let token = match name.strip_prefix('.') {
                None if !recorded.contains(name.as_str()) => name.as_str(),
                None => continue,
                Some(rest) => match rest.strip_suffix(record::TEMP_SUFFIX) {
                    Some(t) => t,
                    None => continue,
                },
            };
            if valid_token(token) {
                out.push((token.to_string(), self.snapshots_dir().join(name)));
            }
        }
        Ok(out)
    }

    /// Removes one leftover found by [`Pool::snapshot_leftovers`] unless its
    /// snapshot has a record by now; the caller holds the snapshot's lock.
    pub(crate) fn remove_snapshot_leftover(
        &self,
        token: &str,
        path: &std::path::Path,
    ) -> Result<bool> {
        if std::fs::symlink_metadata(path).is_err()
            || (path.file_name().is_some_and(|n| n == token)
                && self.snapshot_record(token)?.is_some())
        {
            return Ok(false);
        }
        self.backend.discard(path)?;
        Ok(true)
    }

    /// Makes a new volume holding a copy of `source`: a marker, the copy
    /// (made aside and moved into place by the backend), the record (the
    /// commit point), one flush, and the marker removed. Whatever sits at
    /// the volume's path while its marker exists is the driver's own, so a
    /// call killed after the copy moved into place but before the record is
    /// undone by the sweep or redone by the retry; without a marker the
    /// driver never takes over what it finds there. Called only while no
    /// record exists for `token`.
    pub(crate) fn create_from(
        &self,
        token: &str,
        record: &Record,
        source: Source<'_>,
    ) -> Result<()> {
        self.undo_restore(token)?;
        let path = self.volume_path(token);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(m) if m.is_dir() && sys::fs::is_empty_dir(&path).unwrap_or(false) => {
                // Left by an interrupted plain create of the same name.
                std::fs::remove_dir(&path)
                    .map_err(|e| PoolError::io(format!("removing {}", path.display()), e))?;
            }
            Err(e) => return Err(PoolError::io(format!("inspecting {}", path.display()), e)),
            Ok(_) => {
                return Err(crate::backend::BackendError::Occupied {
                    path,
                    what: "holds data",
                }
                .into());
            }
        }
        let marker = self.restore_marker(token);
        std::fs::write(&marker, b"")
            .map_err(|e| PoolError::io(format!("creating {}", marker.display()), e))?;
        self.sync()?;
        let made = match record.access {
            Access::Mount => {
                self.backend
                    .create_from(&self.dir, token, record.capacity_bytes, source)
            }
            Access::Block => {
                crate::backend::block::create_from(&self.dir, token, record.capacity_bytes, source)
            }
        }
        .map_err(PoolError::from)
        // The class's mode and owner, not the source's: see the README.
        .and_then(|()| self.set_root(token, record))
        .and_then(|()| self.create_record(token, record))
        .and_then(|()| self.sync());
        if let Err(e) = made {
            let _ = std::fs::remove_file(self.dir.join(record::file_name(token)));
            let _ = self.undo_restore(token);
            let _ = self.sync();
            return Err(e);
        }
        // A marker left beside a record is only removed by the sweep.
        let _ = std::fs::remove_file(&marker);
        if let Some(set) = lock(&self.index).as_mut() {
            set.insert(token.to_string());
        }
        Ok(())
    }

    /// Makes a new volume as [`Pool::create`] does, under the marker that
    /// says whatever sits at its path is the driver's own until its record
    /// is written. For an inline ephemeral volume: a publication killed
    /// after making the storage but before the record may never be retried
    /// (its pod was deleted meanwhile), so that storage must be removable
    /// by the sweep and the unpublication, which a plain create's is not
    /// (an empty directory without a record could be an administrator's).
    /// Called only while no record exists for `token`.
    pub(crate) fn create_marked(&self, token: &str, record: &Record) -> Result<()> {
        self.undo_restore(token)?;
        let marker = self.restore_marker(token);
        std::fs::write(&marker, b"")
            .map_err(|e| PoolError::io(format!("creating {}", marker.display()), e))?;
        self.sync()?;
        if let Err(e) = self.create(token, record) {
            let _ = self.undo_restore(token);
            return Err(e);
        }
        // A marker left beside a record is only removed by the sweep.
        let _ = std::fs::remove_file(&marker);
        Ok(())
    }

    fn restore_marker(&self, token: &str) -> PathBuf {
        self.dir.join(format!(".{token}{RESTORING}"))
    }

    /// Tokens with a restore marker: volumes whose making from a source was
    /// interrupted (or finished, where only the marker's removal was).
    pub(crate) fn restore_leftovers(&self) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| PoolError::io(format!("listing pool {}", self.name), e))?;
        Ok(entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let token = name.to_str()?.strip_prefix('.')?.strip_suffix(RESTORING)?;
                valid_token(token).then(|| token.to_string())
            })
            .collect())
    }

    /// Finishes an interrupted making of volume `token` from a source: with
    /// a record the volume is complete and only the marker goes; without
    /// one, what was made is removed. Returns whether anything was undone.
    /// The caller holds the token's lock.
    pub(crate) fn undo_restore(&self, token: &str) -> Result<bool> {
        let marker = self.restore_marker(token);
        if !marker.exists() {
            return Ok(false);
        }
        let undone = self.record(token)?.is_none();
        if undone {
            // A raw block volume's copy is a file; anything else is the
            // backend's kind of storage.
            if self.volume_path(token).is_file() {
                crate::backend::block::delete(&self.dir, token)?;
            } else {
                self.backend.delete(&self.dir, token)?;
            }
        }
        std::fs::remove_file(&marker)
            .map_err(|e| PoolError::io(format!("removing {}", marker.display()), e))?;
        self.sync()?;
        Ok(undone)
    }
}
