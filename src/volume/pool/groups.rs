//! A pool's group snapshots: their records, and the making and removing
//! of a group with its members.
//!
//! Layout inside the pool directory, beside the snapshots
//! (`pool/snapshots.rs`):
//!
//! ```text
//! .snapshots/.groups/.<token>.meta   a group's record, the commit point of
//!                                    CreateVolumeGroupSnapshot; a delete
//!                                    removes it first
//! ```
//!
//! The directory's name starts with a dot, so the snapshot listing and its
//! leftover sweep pass it by.

use std::io;
use std::path::PathBuf;

use super::{Pool, PoolError, Result};
use crate::backend::BackendError;
use crate::sys;
use crate::volume::group_snapshot::{GroupRecord, Member};
use crate::volume::id::valid_token;
use crate::volume::record;

/// The directory of a pool's group records, inside its snapshot directory.
const GROUPS: &str = ".groups";

impl Pool {
    fn groups_dir(&self) -> PathBuf {
        self.snapshot_path(GROUPS)
    }

    /// Reads a group's record; `None` when there is none.
    pub(crate) fn group_record(&self, token: &str) -> Result<Option<GroupRecord>> {
        let path = self.groups_dir().join(record::file_name(token));
        match std::fs::read(&path) {
            Ok(bytes) => GroupRecord::decode(&bytes)
                .map(Some)
                .map_err(|source| PoolError::CorruptRecord { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PoolError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Makes group `token`: the members' data in one backend step (at one
    /// point in time, or an error), their sizes and records, one flush,
    /// then the group's record (the commit point) and one more. A failure
    /// takes back every member. Called only while the group has no record
    /// and none of its members a snapshot record, with the locks of the
    /// group, its volumes and its members held.
    pub(crate) fn take_group(
        &self,
        token: &str,
        group: &GroupRecord,
        members: &mut [Member],
    ) -> Result<()> {
        if !self.backend.snapshots_groups() {
            return Err(BackendError::NoGroupSnapshots {
                kind: self.backend.kind(),
            }
            .into());
        }
        let snapshots = self.snapshot_path("");
        let groups = self.groups_dir();
        for dir in [&snapshots, &groups] {
            match std::fs::create_dir(dir) {
                Ok(()) => self.sync()?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(PoolError::io(format!("creating {}", dir.display()), e)),
            }
        }
        let dests: Vec<PathBuf> = members
            .iter()
            .map(|m| self.snapshot_path(&m.token))
            .collect();
        for d in &dests {
            self.backend.discard(d)?;
        }
        let mut made = || -> Result<()> {
            let pairs: Vec<(&str, &std::path::Path)> = members
                .iter()
                .zip(&dests)
                .map(|(m, d)| (m.volume.as_str(), d.as_path()))
                .collect();
            self.backend.snapshot_group(&self.dir, &pairs)?;
            for (m, d) in members.iter_mut().zip(&dests) {
                m.record.size_bytes = self.backend.snapshot_size(d)?;
                let bytes = m.record.encode().map_err(PoolError::EncodeRecord)?;
                write_record(&snapshots, &m.token, &bytes)?;
            }
            sync(&snapshots)?;
            let bytes = group.encode().map_err(PoolError::EncodeRecord)?;
            write_record(&groups, token, &bytes)?;
            sync(&groups)
        };
        made().inspect_err(|_| {
            let _ = std::fs::remove_file(groups.join(record::file_name(token)));
            for (m, d) in members.iter().zip(&dests) {
                let _ = std::fs::remove_file(snapshots.join(record::file_name(&m.token)));
                let _ = self.backend.discard(d);
            }
        })
    }

    /// Removes group `token`: its record first (from then on its members
    /// are a group cut short, which the sweep would finish), one flush,
    /// then each member snapshot.
    pub(crate) fn remove_group(&self, token: &str, group: &GroupRecord) -> Result<()> {
        let groups = self.groups_dir();
        match std::fs::remove_file(groups.join(record::file_name(token))) {
            Ok(()) => sync(&groups)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PoolError::io(
                    format!("removing the record of group snapshot {token}"),
                    e,
                ));
            }
        }
        for m in &group.members {
            self.remove_snapshot(m)?;
        }
        Ok(())
    }

    /// Half-written group records (left where records are written under a
    /// temporary name), with the group token each belongs to.
    pub(crate) fn group_leftovers(&self) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.groups_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PoolError::io(format!("listing {}", dir.display()), e)),
        };
        Ok(entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let token = name
                    .to_str()?
                    .strip_prefix('.')?
                    .strip_suffix(record::TEMP_SUFFIX)?;
                valid_token(token).then(|| (token.to_string(), entry.path()))
            })
            .collect())
    }
}

/// Writes the record of `token` in `dir` durably (the caller flushes
/// `dir`).
fn write_record(dir: &std::path::Path, token: &str, bytes: &[u8]) -> Result<()> {
    sys::fs::create_durably(dir, &record::file_name(token), bytes)
        .map_err(|e| PoolError::io(format!("writing the record of {token}"), e))
}

fn sync(dir: &std::path::Path) -> Result<()> {
    sys::fs::sync_dir(dir).map_err(|e| PoolError::io(format!("flushing {}", dir.display()), e))
}
