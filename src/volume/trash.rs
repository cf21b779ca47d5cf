//! The trash across pools: the sweep that removes archived volumes whose
//! retention ran out, and what the trash holds per pool (for metrics and
//! the operator's tools). The layout and crash safety of one pool's trash
//! are in `pool::trash`.

use std::time::Duration;

use super::pool::TrashItem;
use super::{Result, Volumes};

/// The longest the trash sweep sleeps: an entry archived meanwhile with a
/// short retention waits at most this long past it.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What one pool's trash holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashUsage {
    /// The pool.
    pub pool: String,
    /// Archived volumes in it.
    pub entries: u64,
    /// Bytes their data takes on the pool's filesystem.
    pub bytes: u64,
}

/// What a sweep of the trash did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Entries removed.
    pub(crate) purged: usize,
    /// Seconds until the next entry expires, if any remains.
    pub(crate) next_in: Option<u64>,
}

impl Volumes {
    /// Removes archived volumes whose retention ran out (and entries left
    /// incomplete by a crash) in every pool, each under its token's lock,
    /// skipping tokens a call is working on (the next sweep gets them).
    pub(crate) fn purge_trash(&self) -> Result<Swept> {
        let mut swept = Swept::default();
        for pool in &self.pools {
            for item in pool.trash()? {
                let now = super::now_unix();
                let (path, token) = match item {
                    TrashItem::Archived { path, meta } if meta.expires_unix <= now => {
                        (path, meta.token)
                    }
                    TrashItem::Archived { meta, .. } => {
                        let left = meta.expires_unix - now;
                        swept.next_in = Some(swept.next_in.map_or(left, |n| n.min(left)));
                        continue;
                    }
                    TrashItem::Incomplete { path, token } => (path, token),
                };
                let Ok(_guard) = self.inflight.claim(&token) else {
                    continue;
                };
                pool.purge(&path)?;
                tracing::info!(pool = %pool.name(), entry = %path.display(), "archived volume purged");
                swept.purged += 1;
            }
        }
        Ok(swept)
    }

    /// What each pool's trash holds. Walks each archived volume's data (a
    /// stat per file), so it costs what the trash holds, not the pool.
    pub fn trash_usage(&self) -> Result<Vec<TrashUsage>> {
        let mut out = Vec::new();
        for pool in &self.pools {
            let mut usage = TrashUsage {
                pool: pool.name().to_string(),
                entries: 0,
                bytes: 0,
            };
            for item in pool.trash()? {
                if let TrashItem::Archived { path, .. } = item {
                    usage.entries += 1;
                    usage.bytes += pool.trash_bytes(&path)?;
                }
            }
            out.push(usage);
        }
        Ok(out)
    }
}
