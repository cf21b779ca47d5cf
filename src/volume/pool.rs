//! A pool: a directory holding volumes, their records, and a backend that
//! knows how to make storage of the pool's kind. [`Pool`] keeps all of it
//! behind its methods: the directory, the backend, the records, the
//! listing index, what its volumes were promised, and its directory
//! flushes.
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
//!                       (`.deleting` for dir, `.img.new` for image,
//!                       `.blk.new` for a raw block volume of any kind)
//! .trash/               archived volumes (`trash`), removed after their
//!                       retention
//! ```
//!
//! The record is the commit point of CreateVolume and the last thing
//! DeleteVolume removes: storage without a record was never acknowledged,
//! and a record without complete storage marks a call that must be retried.
//! Each change writes one small file and flushes one directory, so a call
//! costs the same with ten volumes or ten thousand.
//!
//! Every method that takes a token expects the caller to hold that token's
//! lock (`volume::inflight`); the pool's own locks only guard its in-memory
//! index and promises.

mod groups;
mod snapshots;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::backend::{self, Backend, BackendError, VolumeUsage};
use crate::config::{Overcommit, PoolConfig, PoolKind};
use crate::sys;
use crate::sys::mountinfo::MountEntry;
use crate::volume::id::valid_token;
use crate::volume::record::{self, Access, Record, Use};

mod trash;
pub use trash::{OnDelete, OnDeleteError, TrashMeta, parse_duration};
pub(crate) use trash::{TrashItem, now_unix};

/// What can go wrong with a pool's directory and records.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A file operation on the pool directory or a record failed.
    #[error("{context}: {source}")]
    Io {
        /// What the pool was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A record cannot be read as one (edited by hand, or a bug).
    #[error("record {} is corrupt: {source}", path.display())]
    CorruptRecord {
        /// The record's file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// A record could not be encoded (a bug).
    #[error("encoding record: {0}")]
    EncodeRecord(serde_json::Error),
    /// The pool's backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Another driver serves the pool (holds the lock on its directory):
    /// two drivers on one pool would race on its volumes. Retried until
    /// that driver stops; `kill -9` frees the lock too.
    #[error(
        "pool {pool}: {} is served by {}; this driver takes it over once that one stops",
        dir.display(),
        crate::endpoint::describe(holders)
    )]
    Held {
        /// The pool's name.
        pool: String,
        /// Its directory.
        dir: PathBuf,
        /// The processes holding its lock.
        holders: Vec<sys::lock::Holder>,
    },
}

impl PoolError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        PoolError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Results of pool operations.
pub(crate) type Result<T, E = PoolError> = std::result::Result<T, E>;

/// Size given to a volume whose request names none, unless the pool's
/// `default_volume_size` says otherwise.
pub(crate) const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

/// A pool's size settings, from its configuration (the capacity policy in
/// `volume::capacity` applies them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SizeLimits {
    /// Smallest volume (0: none beyond the backend's own minimum).
    pub(crate) min: u64,
    /// Largest volume, if limited.
    pub(crate) max: Option<u64>,
    /// Size of a volume whose request names none.
    pub(crate) default: u64,
    /// How much may be promised.
    pub(crate) overcommit: Overcommit,
    /// Largest inline ephemeral volume; `None`: the pool serves none.
    pub(crate) ephemeral: Option<u64>,
}

impl SizeLimits {
    fn from_config(p: &PoolConfig) -> Self {
        SizeLimits {
            min: p.min_volume_size.map_or(0, |b| b.0),
            max: p.max_volume_size.map(|b| b.0),
            default: p.default_volume_size.map_or(DEFAULT_VOLUME_SIZE, |b| b.0),
            overcommit: p.overcommit(),
            ephemeral: p.ephemeral_limit(),
        }
    }
}

/// A configured, opened pool.
#[derive(Debug)]
pub(crate) struct Pool {
    /// Name StorageClasses use.
    name: String,
    /// Canonical directory.
    dir: PathBuf,
    /// Storage backend for the pool's kind.
    backend: Box<dyn Backend>,
    /// Size settings.
    limits: SizeLimits,
    /// Directory flushes shared between concurrent calls.
    flusher: sys::fs::DirFlush,
    /// Device and inode of the directory when the driver opened it; none
    /// for a pool opened only to be read. A path that later shows another
    /// (the disk mounted there was unmounted) no longer holds the volumes.
    opened_as: Option<(u64, u64)>,
    /// The lock on the directory that keeps the pool to this driver, held
    /// for the process's lifetime (`sys::lock`); none for a pool opened
    /// only to be read ([`Pool::inspect`]), which may run beside the driver.
    _lock: Option<sys::lock::DirLock>,
    /// Sorted tokens of the pool's volumes for ListVolumes: read from the
    /// directory on first use, then kept up to date by create and delete,
    /// so a page costs its own size, not the pool's.
    index: Mutex<Option<BTreeSet<String>>>,
    /// The capacity promised to each volume (by token), including creates
    /// and expansions in progress. `None` until first needed, then built
    /// from the records; only a ratio policy counts promises, so with
    /// `none` it stays empty and nothing reads every record.
    ///
    /// A std mutex: held only for in-memory changes and the few statfs and
    /// qgroup reads that decide whether a reservation fits, never across
    /// an await.
    promises: Mutex<Option<HashMap<String, u64>>>,
}

/// Space figures of a pool, and what it can still promise under its
/// overcommit setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Room {
    /// Size of the pool's filesystem.
    pub(crate) total: u64,
    /// Bytes free on it.
    pub(crate) free: u64,
    /// What can still be promised: with `none`, what is free; with a
    /// ratio `r`, `r` times (free + what the volumes hold) minus the
    /// promises; 0 while the pool's size limits cannot be trusted.
    pub(crate) promisable: u64,
    /// Why the pool promises nothing now: its size limits cannot be
    /// trusted (btrfs quota accounting inconsistent or rebuilding, quotas
    /// off). A promise is only worth what enforces it.
    pub(crate) unreliable: Option<String>,
}

/// Bytes reserved for a create or expand in progress; given back when
/// dropped unless [`Reservation::commit`] was called.
#[must_use]
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    pool: &'a Pool,
    token: String,
    previous: Option<u64>,
    committed: bool,
}

impl Reservation<'_> {
    /// Keeps the reserved bytes as the volume's promise.
    pub(crate) fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Some(map) = lock(&self.pool.promises).as_mut() {
            match self.previous {
                Some(p) => map.insert(self.token.clone(), p),
                None => map.remove(&self.token),
            };
        }
    }
}

/// Locks an in-memory table of the pool. A panic elsewhere cannot leave
/// it half-changed (each change is one insert or remove), so a poisoned
/// lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    /// Opens a configured pool: creates its directory if needed, checks
    /// that it takes a durable write, resolves its canonical path and lets
    /// the backend check the directory suits its kind.
    pub(crate) fn open(config: &PoolConfig) -> Result<Pool> {
        let name = &config.name;
        let ctx = |what: &str, dir: &Path| format!("pool {name}: {what} {}", dir.display());
        std::fs::create_dir_all(&config.path)
            .map_err(|e| PoolError::io(ctx("creating", &config.path), e))?;
        let dir = std::fs::canonicalize(&config.path)
            .map_err(|e| PoolError::io(ctx("resolving", &config.path), e))?;
        // Before anything is written: a second driver must not touch a
        // pool that another serves.
        let lock = sys::lock::try_lock_dir(&dir)
            .map_err(|e| PoolError::io(ctx("locking", &dir), e))?
            .ok_or_else(|| PoolError::Held {
                pool: name.clone(),
                holders: sys::lock::holders(&dir),
                dir: dir.clone(),
            })?;
        sys::fs::write_atomic(&dir, ".probe", b"ok")
            .and_then(|()| std::fs::remove_file(dir.join(".probe")))
            .and_then(|()| sys::fs::sync_dir(&dir))
            .map_err(|e| PoolError::io(ctx("is not writable:", &dir), e))?;
        let backend = backend::for_pool(config);
        backend.prepare(&dir)?;
        let opened_as =
            sys::fs::identity(&dir).map_err(|e| PoolError::io(ctx("inspecting", &dir), e))?;
        let pool = Pool {
            name: name.clone(),
            dir,
            opened_as: Some(opened_as),
            backend,
            limits: SizeLimits::from_config(config),
            flusher: Default::default(),
            _lock: Some(lock),
            index: Default::default(),
            promises: Default::default(),
        };
        pool.restore_limits()?;
        Ok(pool)
    }

    /// A configured pool for reading only (`volume::inventory`): resolves
    /// its directory but creates nothing, writes nothing and does not
    /// prepare the backend (no quotas turned on, no rescan started).
    pub(crate) fn inspect(config: &PoolConfig) -> Result<Pool> {
        let dir = std::fs::canonicalize(&config.path).map_err(|e| {
            PoolError::io(
                format!("pool {}: resolving {}", config.name, config.path.display()),
                e,
            )
        })?;
        Ok(Pool {
            name: config.name.clone(),
            dir,
            opened_as: None,
            backend: backend::for_pool(config),
            limits: SizeLimits::from_config(config),
            flusher: Default::default(),
            _lock: None,
            index: Default::default(),
            promises: Default::default(),
        })
    }

    /// A pool directory that is no longer configured, seen for one of its
    /// volumes: the pool (called `name`, read-only, as [`Pool::inspect`])
    /// of the kind volume `token`'s record says, and that record; `None`
    /// when `dir` holds no readable record of it.
    pub(crate) fn orphan(name: &str, dir: &Path, token: &str) -> Option<(Pool, Record)> {
        let bytes = std::fs::read(dir.join(record::file_name(token))).ok()?;
        let rec = Record::decode(&bytes).ok()?;
        let pool = Pool::inspect(&PoolConfig::of_kind(name, dir.to_path_buf(), rec.kind)).ok()?;
        Some((pool, rec))
    }

    /// Sets the size limit of every volume that lost it (btrfs quotas
    /// turned off and on again) back from its record. At every open, so an
    /// open killed half-way through is finished by the next; only volumes
    /// without a limit are read, so it costs one look at the backend.
    fn restore_limits(&self) -> Result<()> {
        for token in self.backend.missing_limits(&self.dir)? {
            if let Some(rec) = self.record(&token)? {
                self.backend.expand(&self.dir, &token, rec.capacity_bytes)?;
                tracing::warn!(
                    pool = %self.name,
                    volume = %token,
                    capacity = rec.capacity_bytes,
                    "the volume had no size limit (were quotas turned off?); set it again from its record"
                );
            }
        }
        Ok(())
    }

    /// Why the pool cannot keep its size promises now, if it cannot (see
    /// [`Room::unreliable`]); its volumes report it as their condition.
    pub(crate) fn unreliable(&self) -> Option<String> {
        self.backend.unreliable(&self.dir)
    }

    /// Device and inode of the pool's directory when the driver opened it
    /// (none for a pool opened only to be read).
    pub(crate) fn opened_as(&self) -> Option<(u64, u64)> {
        self.opened_as
    }

    /// The file holding a filesystem volume's data, where it is not the
    /// volume's path itself (an image pool's image).
    pub(crate) fn storage_file(&self, token: &str) -> Option<PathBuf> {
        self.backend.storage_file(&self.dir, token)
    }

    /// Name StorageClasses use.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Canonical directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pool's kind.
    pub(crate) fn kind(&self) -> PoolKind {
        self.backend.kind()
    }

    /// Whether volumes of this pool are held to their size.
    pub(crate) fn enforces_size(&self) -> bool {
        self.backend.enforces_size()
    }

    /// The pool's size settings.
    pub(crate) fn limits(&self) -> &SizeLimits {
        &self.limits
    }

    /// Smallest volume the pool's kind can make.
    pub(crate) fn kind_min_volume_size(&self) -> u64 {
        self.backend.min_volume_size()
    }

    /// Volume sizes are rounded up to a multiple of this.
    pub(crate) fn granularity(&self) -> u64 {
        self.backend.granularity()
    }

    /// Whether the node must grow the filesystem after an expansion.
    pub(crate) fn needs_node_expand(&self) -> bool {
        self.backend.needs_node_expand()
    }

    /// Whether `path` lies inside this pool or contains it.
    pub(crate) fn overlaps(&self, path: &Path) -> bool {
        path.starts_with(&self.dir) || self.dir.starts_with(path)
    }

    /// Where a volume's data lives.
    pub(crate) fn volume_path(&self, token: &str) -> PathBuf {
        self.dir.join(token)
    }

    // --- Records -----------------------------------------------------------

    /// Reads a volume's record; `None` when there is none.
    pub(crate) fn record(&self, token: &str) -> Result<Option<Record>> {
        let path = self.dir.join(record::file_name(token));
        match std::fs::read(&path) {
            Ok(bytes) => Record::decode(&bytes)
                .map(Some)
                .map_err(|source| PoolError::CorruptRecord { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PoolError::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Remembers that volume `token` was just published or unpublished
    /// (the time of a marker file, see `record::marker_name`). Only volumes
    /// with a record: a static directory gets no files of the driver
    /// beside it, which nothing would ever remove.
    pub(crate) fn mark(&self, token: &str, what: Use) -> Result<()> {
        if std::fs::symlink_metadata(self.dir.join(record::file_name(token))).is_err() {
            return Ok(());
        }
        sys::fs::touch(&self.dir, &record::marker_name(token, what)).map_err(|e| {
            PoolError::io(
                format!("recording the use of {token} in pool {}", self.name),
                e,
            )
        })
    }

    /// When volume `token` was last published or unpublished, if known.
    pub(crate) fn last(&self, token: &str, what: Use) -> Option<std::time::SystemTime> {
        sys::fs::modified(&self.dir, &record::marker_name(token, what))
            .ok()
            .flatten()
    }

    /// Size and free bytes of the pool's filesystem (one statfs).
    pub(crate) fn fs_space(&self) -> Result<(u64, u64)> {
        let s = self.backend.space(&self.dir)?;
        Ok((s.total_bytes, s.available_bytes))
    }

    /// Bytes each of the volumes `tokens` holds, measured without changing
    /// anything; a volume that cannot be measured is left out.
    pub(crate) fn held(&self, tokens: &[&str]) -> Result<BTreeMap<String, u64>> {
        Ok(self.backend.held(&self.dir, tokens)?)
    }

    /// Up to `limit` tokens with records, in order, starting at `from`.
    pub(crate) fn page(&self, from: Bound<&str>, limit: usize) -> Result<Vec<String>> {
        let mut index = lock(&self.index);
        if index.is_none() {
            *index = Some(self.tokens()?.into_iter().collect());
        }
        Ok(index
            .get_or_insert_default()
            .range::<str, _>((from, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
    }

    // --- Volumes -----------------------------------------------------------

    /// Makes a new volume: its storage, then its record (the commit
    /// point), then one flush of the pool directory. A failure after the
    /// storage was made takes it back, so nothing is left that no record
    /// explains. Called only while no record exists for `token`.
    pub(crate) fn create(&self, token: &str, record: &Record) -> Result<()> {
        self.make_storage(token, record.access, record.capacity_bytes)?;
        if let Err(e) = self
            .set_root(token, record)
            .and_then(|()| self.create_record(token, record))
            .and_then(|()| self.sync())
        {
            // Not acknowledged, so not a volume: take the storage back
            // rather than leave a directory no record explains.
            let _ = self.remove_record(token);
            if let Err(undo) = self.delete_storage(token, record.access) {
                tracing::warn!(pool = %self.name, token, error = %undo, "cannot undo a failed create");
            }
            let _ = self.sync();
            return Err(e);
        }
        if let Some(set) = lock(&self.index).as_mut() {
            set.insert(token.to_string());
        }
        Ok(())
    }

    /// Remakes the storage of a volume that has a record but no storage:
    /// an earlier CreateVolume was killed between writing the record and
    /// flushing it, and its retry must not hand out a volume that cannot
    /// be published.
    pub(crate) fn ensure_storage(&self, token: &str, record: &Record) -> Result<()> {
        if std::fs::symlink_metadata(self.volume_path(token)).is_ok() {
            return Ok(());
        }
        self.make_storage(token, record.access, record.capacity_bytes)?;
        self.set_root(token, record)?;
        self.sync()
    }

    /// Gives a filesystem volume's root directory the mode and owner its
    /// record holds (the StorageClass's choice, 0777 root by default);
    /// nothing for a raw block volume. Made before the record on every
    /// path that makes storage, and again by a CreateVolume retry while
    /// the volume was never published ([`Pool::never_published`]), which
    /// finishes an ensure_storage killed half-way. Never on publish: the
    /// kubelet's fsGroup change and the pod's own chmod must stay.
    pub(crate) fn set_root(&self, token: &str, record: &Record) -> Result<()> {
        if record.access == Access::Block {
            return Ok(());
        }
        // An image volume's root is its mounted filesystem's.
        let root = self.make_available(token)?;
        let r = record.root;
        sys::fs::set_owner_and_mode(&root, r.uid, r.gid, r.mode)
            .map_err(|e| PoolError::io(format!("setting {r} on the root of volume {token}"), e))
    }

    /// Whether volume `token` was never published (no publish marker).
    pub(crate) fn never_published(&self, token: &str) -> bool {
        self.last(token, Use::Published).is_none()
    }

    fn make_storage(&self, token: &str, access: Access, capacity: u64) -> Result<()> {
        match access {
            Access::Mount => self.backend.create(&self.dir, token, capacity)?,
            Access::Block => backend::block::create(&self.dir, token, capacity)?,
        }
        Ok(())
    }

    fn delete_storage(&self, token: &str, access: Access) -> Result<(), BackendError> {
        match access {
            Access::Mount => self.backend.delete(&self.dir, token),
            Access::Block => backend::block::delete(&self.dir, token),
        }
    }

    /// Removes a volume: its storage, then its record (last, so a delete
    /// killed half-way is finished by its retry), then one flush; it leaves
    /// the listing and gives its promise back.
    pub(crate) fn remove(&self, token: &str, access: Access) -> Result<()> {
        self.delete_storage(token, access)?;
        for what in [Use::Published, Use::Unpublished] {
            sys::fs::remove_if_present(&self.dir, &record::marker_name(token, what))
                .map_err(|e| PoolError::io(format!("removing the use markers of {token}"), e))?;
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

    /// Grows a volume to `capacity` bytes (the controller half: raise the
    /// limit, grow the image) and records the new size.
    pub(crate) fn expand(&self, token: &str, record: &mut Record, capacity: u64) -> Result<()> {
        match record.access {
            Access::Mount => self.backend.expand(&self.dir, token, capacity)?,
            Access::Block => backend::block::expand(&self.dir, token, capacity)?,
        }
        record.capacity_bytes = capacity;
        sys::fs::write_atomic(
            &self.dir,
            &record::file_name(token),
            &record.encode().map_err(PoolError::EncodeRecord)?,
        )
        .map_err(|e| self.write_error(token, e))?;
        self.sync()
    }

    /// Makes the volume's data reachable at its path and returns that
    /// path, the directory to bind-mount (an image volume's filesystem is
    /// mounted there first, after a reboot say).
    pub(crate) fn make_available(&self, token: &str) -> Result<PathBuf> {
        Ok(self.backend.make_available(&self.dir, token)?)
    }

    /// Tidies up after an unpublish of the volume.
    pub(crate) fn unpublished(&self, token: &str) -> Result<()> {
        Ok(self.backend.unpublished(&self.dir, token)?)
    }

    /// What the volume uses; `capacity` is the size promised to the CO.
    pub(crate) fn usage(&self, token: &str, capacity: u64) -> Result<VolumeUsage> {
        Ok(self.backend.usage(&self.dir, token, capacity)?)
    }

    /// The node half of an expansion: grows the mounted filesystem.
    pub(crate) fn node_expand(&self, token: &str) -> Result<()> {
        Ok(self.backend.node_expand(&self.dir, token)?)
    }

    // --- Raw block volumes (`backend::block`) -------------------------------

    /// The loop device of block volume `token`, attached now if it is not.
    pub(crate) fn attach_block(&self, token: &str) -> Result<PathBuf> {
        Ok(backend::block::attach(&self.dir, token)?)
    }

    /// The loop device of block volume `token`, if one is attached.
    pub(crate) fn block_device(&self, token: &str) -> Result<Option<PathBuf>> {
        Ok(backend::block::attached(&self.dir, token)?)
    }

    /// Detaches the loop devices of block volume `token` that no target
    /// shows any more.
    pub(crate) fn release_block(&self, token: &str, table: &[MountEntry]) -> Result<()> {
        Ok(backend::block::release_unused(&self.dir, token, table)?)
    }

    /// Releases what volume `token` (accessed as `access`) holds on the
    /// node when no target shows it (`table`): a raw block volume's loop
    /// device, an image volume's loop mount; nothing for the other kinds.
    /// For a pool gone from the configuration, whose volumes nothing else
    /// would ever release (a configured pool keeps an image mounted until
    /// the volume is deleted).
    pub(crate) fn release_unshown(
        &self,
        token: &str,
        access: Access,
        table: &[MountEntry],
    ) -> Result<()> {
        match access {
            Access::Block => self.release_block(token, table),
            Access::Mount => Ok(self.backend.release_unshown(&self.dir, token, table)?),
        }
    }

    /// Block volumes with a loop device attached now, as (token, device).
    pub(crate) fn attached_blocks(&self) -> Vec<(String, PathBuf)> {
        backend::block::attached_in(&self.dir)
    }

    /// Detaches block volume `token`'s loop device if nothing shows it;
    /// returns whether it did. The caller holds the volume's token.
    pub(crate) fn release_block_device(
        &self,
        token: &str,
        device: &Path,
        table: &[MountEntry],
    ) -> bool {
        backend::block::release_device_of(&self.dir, token, device, table)
    }

    /// Whether a mount shows block volume `token` (or a detached loop
    /// device, which hides nothing).
    pub(crate) fn block_shown_by(&self, token: &str, entry: &MountEntry) -> Result<bool> {
        Ok(backend::block::shows_volume(&self.dir, token, entry)?)
    }

    /// The node half of a block volume's expansion: the loop device takes
    /// the file's new size.
    pub(crate) fn refresh_block(&self, token: &str) -> Result<()> {
        Ok(backend::block::refresh(&self.dir, token)?)
    }

    /// A block volume's size and what its file holds.
    pub(crate) fn block_usage(&self, token: &str) -> Result<VolumeUsage> {
        Ok(backend::block::usage(&self.dir, token)?)
    }

    // --- Promises ----------------------------------------------------------

    /// The pool's room now: its filesystem's size and free space, and what
    /// it can still promise.
    pub(crate) fn room(&self) -> Result<Room> {
        self.with_promises(|promises| self.measure(promises, None))
    }

    /// Reserves `bytes` for volume `token` (replacing its promise of
    /// `previous` bytes, for an expansion) if `fits` accepts the pool's
    /// room, measured with the promises locked (and `token`'s own left
    /// out), so two concurrent reservations cannot both take the last
    /// free bytes.
    pub(crate) fn reserve<E: From<PoolError>>(
        &self,
        token: &str,
        bytes: u64,
        previous: Option<u64>,
        fits: impl FnOnce(&Room) -> Result<(), E>,
    ) -> Result<Reservation<'_>, E> {
        self.with_promises(|promises| -> Result<(), E> {
            fits(&self.measure(promises, Some(token))?)?;
            promises.insert(token.to_string(), bytes);
            Ok(())
        })?;
        Ok(Reservation {
            pool: self,
            token: token.to_string(),
            previous,
            committed: false,
        })
    }

    /// Runs `f` with the promises locked, building them from the records
    /// on first use.
    fn with_promises<T, E: From<PoolError>>(
        &self,
        f: impl FnOnce(&mut HashMap<String, u64>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = lock(&self.promises);
        if guard.is_none() {
            let mut map = HashMap::new();
            if let Overcommit::Ratio(_) = self.limits.overcommit {
                // The listing index already holds the tokens: one scan of
                // the pool directory serves both.
                for token in self.page(Bound::Unbounded, usize::MAX)? {
                    if let Some(rec) = self.record(&token)? {
                        map.insert(token, rec.capacity_bytes);
                    }
                }
            }
            *guard = Some(map);
        }
        f(guard.get_or_insert_default())
    }

    /// Measures the pool against `promises`; `except` leaves one volume's
    /// promise out (an expansion's own).
    fn measure(&self, promises: &HashMap<String, u64>, except: Option<&str>) -> Result<Room> {
        let space = self.backend.space(&self.dir)?;
        let (total, free) = (space.total_bytes, space.available_bytes);
        let unreliable = self.backend.unreliable(&self.dir);
        let promisable = match self.limits.overcommit {
            _ if unreliable.is_some() => 0,
            Overcommit::None => free,
            Overcommit::Ratio(r) => {
                let tokens: Vec<&str> = promises.keys().map(String::as_str).collect();
                let used = self.backend.used_by(&self.dir, &tokens)?;
                let promised: u64 = promises
                    .iter()
                    .filter(|(t, _)| Some(t.as_str()) != except)
                    .map(|(_, c)| *c)
                    .sum();
                let usable = free.saturating_add(used) as f64 * r;
                (usable as u64).saturating_sub(promised)
            }
        };
        Ok(Room {
            total,
            free,
            promisable,
            unreliable,
        })
    }

    // --- Leftovers ---------------------------------------------------------

    /// Leftovers of interrupted calls that no record refers to any more:
    /// half-written records and the backend's scratch files (a parked dir
    /// volume, an image being made), with the token each belongs to.
    /// Removing one is safe while no call holds that token's lock.
    pub(crate) fn leftovers(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| PoolError::io(format!("listing pool {}", self.name), e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix('.') else {
                continue;
            };
            let token = rest
                .strip_suffix(record::TEMP_SUFFIX)
                .or_else(|| rest.strip_suffix(backend::block::SCRATCH_SUFFIX))
                .or_else(|| {
                    self.backend
                        .scratch_suffixes()
                        .iter()
                        .find_map(|s| rest.strip_suffix(s))
                });
            if let Some(token) = token
                && valid_token(token)
            {
                out.push((token.to_string(), entry.path()));
            }
        }
        Ok(out)
    }

    /// Removes one leftover found by [`Pool::leftovers`], unless it is gone
    /// already (the call that held its token may have finished with it);
    /// returns whether it removed something. The caller holds the token.
    pub(crate) fn remove_leftover(&self, path: &Path) -> Result<bool> {
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(false);
        }
        // The backend removes it: a btrfs scratch copy is a subvolume, an
        // image's freeze marker thaws its volume first.
        self.backend.discard(path)?;
        Ok(true)
    }

    // --- Internals ---------------------------------------------------------

    /// Writes the record of a new volume: it appears complete or not at
    /// all (the caller flushes the pool).
    fn create_record(&self, token: &str, record: &Record) -> Result<()> {
        let name = record::file_name(token);
        sys::fs::create_durably(
            &self.dir,
            &name,
            &record.encode().map_err(PoolError::EncodeRecord)?,
        )
        .map_err(|e| self.write_error(token, e))?;
        // A temp record left by an interrupted earlier attempt (or an
        // older driver) is ours to remove: the caller holds the token.
        match std::fs::remove_file(self.dir.join(format!("{name}.tmp"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PoolError::io(
                format!("removing the old temp record of {token}"),
                e,
            )),
            _ => Ok(()),
        }
    }

    fn write_error(&self, token: &str, e: io::Error) -> PoolError {
        PoolError::io(
            format!("writing the record of {token} in pool {}", self.name),
            e,
        )
    }

    /// Removes a record (the caller flushes the pool).
    fn remove_record(&self, token: &str) -> Result<()> {
        match std::fs::remove_file(self.dir.join(record::file_name(token))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(PoolError::io(format!("removing the record of {token}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Flushes the pool directory: makes preceding creates, renames and
    /// removals in it durable.
    fn sync(&self) -> Result<()> {
        self.flusher
            .flush(&self.dir)
            .map_err(|e| PoolError::io(format!("flushing pool {}", self.name), e))
    }

    /// Tokens of all volumes with a record, unsorted.
    fn tokens(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let listing = |e| PoolError::io(format!("listing pool {}", self.name), e);
        for entry in std::fs::read_dir(&self.dir).map_err(listing)? {
            let name = entry.map_err(listing)?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(token) = record::token_of(name)
                && valid_token(token)
            {
                out.push(token.to_string());
            }
        }
        Ok(out)
    }
}
