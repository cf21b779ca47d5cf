//! The quotas of a btrfs pool's filesystem: which mode a pool turns on,
//! and whether its size limits can be trusted now.
//!
//! Everything is decided from what the kernel says at the time (through
//! `sys::btrfs`); the only memory kept between calls is what was last
//! logged and when this process last started a rescan, so a driver killed
//! at any moment, during a rescan it started included, decides the same
//! way when it starts again.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::super::{BackendError, Result};
use crate::sys;
use crate::sys::btrfs::{Filesystem, QuotaMode};

/// The shortest time between two rescans the driver starts on one pool:
/// a rescan that ends with the accounting still inconsistent (it failed,
/// or something marked it again) is not restarted in a loop.
const RESCAN_INTERVAL: Duration = Duration::from_secs(60);

/// Makes sure quotas are on for the filesystem of a pool directory, in the
/// mode [`enable`] picks if they were off and in the mode they have if
/// they were on (an administrator's choice, or this driver's earlier one),
/// and logs which. Returns the filesystem.
pub(super) fn set_up(pool_dir: &Path) -> Result<Filesystem> {
    let fs = Filesystem::of(pool_dir)?;
    let state = |fs: &Filesystem| {
        fs.quotas().map_err(|e| {
            BackendError::io(
                format!("reading the quota state of {}", fs.sysfs().display()),
                e,
            )
        })
    };
    let mode = match state(&fs)? {
        Some(s) => {
            tracing::info!(
                pool_dir = %pool_dir.display(),
                quota_mode = %s.mode,
                "btrfs pool: volume sizes are enforced by {} quotas (already on for the filesystem)",
                s.mode
            );
            s.mode
        }
        None => {
            let holds_volumes = holds_subvolumes(pool_dir)
                .map_err(|e| BackendError::io(format!("listing {}", pool_dir.display()), e))?;
            let asked = enable(pool_dir, holds_volumes)?;
            let got = state(&fs)?.ok_or_else(|| BackendError::QuotasStillOff {
                dir: pool_dir.to_path_buf(),
            })?;
            if got.mode != asked {
                tracing::warn!(pool_dir = %pool_dir.display(), %asked, got = %got.mode, "btrfs quotas came up in another mode than asked");
            }
            got.mode
        }
    };
    if mode == QuotaMode::Qgroup && sys::btrfs::kernel_has_simple_quotas() {
        tracing::info!(
            pool_dir = %pool_dir.display(),
            "this kernel has simple quotas, which never become inconsistent; this filesystem \
             keeps full qgroup accounting because it had it already or the pool held volumes \
             (the README's btrfs section says how to switch)"
        );
    }
    Ok(fs)
}

/// Turns quotas on for the filesystem of a pool directory whose quotas are
/// off: simple quotas where the kernel has them and the pool holds no
/// volume yet (simple quotas never count data written before they were
/// turned on, so existing volumes would look empty and could grow past
/// their size), full qgroups otherwise. Returns the mode asked for.
fn enable(pool_dir: &Path, holds_volumes: bool) -> Result<QuotaMode> {
    if sys::btrfs::kernel_has_simple_quotas() && !holds_volumes {
        match sys::btrfs::enable_simple_quotas(pool_dir) {
            Ok(()) => {
                tracing::info!(
                    pool_dir = %pool_dir.display(),
                    quota_mode = %QuotaMode::Simple,
                    "btrfs pool: turned on simple quotas for the filesystem; volume sizes are \
                     enforced by them (kernels and btrfs-progs before 6.7 can no longer open it)"
                );
                return Ok(QuotaMode::Simple);
            }
            // A kernel that lists the feature but refuses the command.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                tracing::warn!(pool_dir = %pool_dir.display(), error = %e, "the kernel refused simple quotas; turning on full qgroups instead");
            }
            Err(source) => {
                return Err(BackendError::SimpleQuotasOff {
                    dir: pool_dir.to_path_buf(),
                    source,
                });
            }
        }
    }
    sys::btrfs::enable_qgroups(pool_dir).map_err(|e| match e {
        sys::btrfs::BtrfsError::Tool(source) => BackendError::QuotasOff {
            dir: pool_dir.to_path_buf(),
            source,
        },
        e => e.into(),
    })?;
    tracing::info!(
        pool_dir = %pool_dir.display(),
        quota_mode = %QuotaMode::Qgroup,
        "btrfs pool: turned on full qgroup accounting for the filesystem ({}); volume sizes are \
         enforced by qgroup limits",
        if holds_volumes {
            "the pool already holds subvolumes, which simple quotas would not count"
        } else {
            "this kernel has no simple quotas"
        }
    );
    Ok(QuotaMode::Qgroup)
}

/// The state of a pool's quotas, as far as its size promises go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Health {
    /// Limits hold and usage is counted.
    Sound,
    /// The state cannot be read (the reason says why).
    Unknown(String),
    /// Quotas are off: no limits at all.
    Off,
    /// A rescan is rebuilding consistent accounting from zero.
    Rebuilding,
    /// The kernel marks the accounting inconsistent.
    Inconsistent(Rescan),
}

/// Where the repair of inconsistent accounting stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rescan {
    /// A rescan is running.
    Running,
    /// This call started one.
    Started,
    /// One this process started recently ended, and the accounting is
    /// inconsistent again.
    Again,
    /// Starting one failed (the reason says why).
    Failed(String),
}

impl Health {
    /// Why the pool's limits cannot be trusted, with what is done about it
    /// and how to repair it by hand; `None` when they can.
    pub(super) fn reason(&self, dir: &Path) -> Option<String> {
        let dir = dir.display();
        let broken = "volume sizes are not enforced and usage figures are wrong";
        let progress = format!("progress: `btrfs quota rescan -s {dir}`");
        let by_hand = format!("repair: `btrfs quota rescan -w {dir}`");
        let inconsistent =
            format!("btrfs qgroup accounting of the filesystem holding {dir} is inconsistent");
        Some(match self {
            Health::Sound => return None,
            Health::Unknown(e) => format!(
                "whether volume sizes are enforced is unknown: cannot read the quota state of \
                 the btrfs filesystem holding {dir} ({e})"
            ),
            Health::Off => format!(
                "btrfs quotas are off on the filesystem holding {dir}: volume sizes are not \
                 enforced and their limits are gone; restart the driver, which turns quotas on \
                 again and sets every volume's limit from its record"
            ),
            Health::Rebuilding => format!(
                "a qgroup rescan is rebuilding the quota accounting of the btrfs filesystem \
                 holding {dir}: until it completes usage figures are partial and volume sizes are \
                 not reliably enforced ({progress})"
            ),
            Health::Inconsistent(Rescan::Running) => format!(
                "{inconsistent}: {broken} until the qgroup rescan now running completes ({progress})"
            ),
            Health::Inconsistent(Rescan::Started) => format!(
                "{inconsistent}: {broken} until the qgroup rescan the driver started completes \
                 ({progress})"
            ),
            Health::Inconsistent(Rescan::Again) => format!(
                "{inconsistent} again after the rescan the driver started: {broken} ({by_hand}; \
                 simple quotas, see the README, never need one)"
            ),
            Health::Inconsistent(Rescan::Failed(e)) => {
                format!("{inconsistent}: {broken}, and starting a rescan failed ({e}); {by_hand}")
            }
        })
    }
}

/// What a btrfs backend remembers about its pool's filesystem between
/// calls: a cache and the log's memory, never a decision.
#[derive(Debug, Default)]
pub(super) struct Watch {
    /// The pool's filesystem, found when the pool was prepared.
    pub(super) fs: Option<Filesystem>,
    /// What was last logged: `Some(None)` sound, `Some(Some(reason))` not.
    reported: Option<Option<String>>,
    /// When this process last started a rescan of the filesystem.
    rescan_started: Option<Instant>,
}

impl Watch {
    /// Asks the kernel how the quotas of the pool at `pool_dir` are, and
    /// starts a rescan when the accounting is inconsistent and none runs.
    pub(super) fn assess(&mut self, pool_dir: &Path) -> Health {
        let fs = match &self.fs {
            Some(fs) => fs,
            None => match Filesystem::of(pool_dir) {
                Ok(fs) => self.fs.insert(fs),
                Err(e) => return Health::Unknown(e.to_string()),
            },
        };
        let state = match fs.quotas() {
            Err(e) => return Health::Unknown(e.to_string()),
            Ok(None) => return Health::Off,
            // Simple quotas are never inconsistent and are never rescanned.
            Ok(Some(s)) if s.mode == QuotaMode::Simple => return Health::Sound,
            Ok(Some(s)) => s,
        };
        let running = match sys::btrfs::rescan_running(pool_dir) {
            Ok(r) => r,
            Err(e) => return Health::Unknown(e.to_string()),
        };
        match (state.inconsistent, running) {
            (false, false) => Health::Sound,
            (false, true) => Health::Rebuilding,
            (true, true) => Health::Inconsistent(Rescan::Running),
            (true, false)
                if self
                    .rescan_started
                    .is_some_and(|t| t.elapsed() < RESCAN_INTERVAL) =>
            {
                Health::Inconsistent(Rescan::Again)
            }
            (true, false) => match sys::btrfs::start_rescan(pool_dir) {
                // Another pool on the same filesystem was quicker.
                Ok(false) => Health::Inconsistent(Rescan::Running),
                Ok(true) => {
                    self.rescan_started = Some(Instant::now());
                    tracing::warn!(pool_dir = %pool_dir.display(), "btrfs qgroup accounting is inconsistent; started a qgroup rescan to repair it (the kernel runs it; a driver restart does not stop it)");
                    Health::Inconsistent(Rescan::Started)
                }
                Err(e) => Health::Inconsistent(Rescan::Failed(e.to_string())),
            },
        }
    }

    /// [`Watch::assess`], logging a change: a warning with the reason when
    /// the limits stop being trustworthy, a line when they are again.
    pub(super) fn check(&mut self, pool_dir: &Path) -> Option<String> {
        let reason = self.assess(pool_dir).reason(pool_dir);
        if self.reported.as_ref() != Some(&reason) {
            match &reason {
                Some(r) => tracing::warn!(
                    pool_dir = %pool_dir.display(),
                    reason = %r,
                    "btrfs pool: volume size limits cannot be trusted; the pool promises no \
                     capacity and its volumes report an abnormal condition until this is repaired"
                ),
                None if self.reported.is_some() => tracing::info!(
                    pool_dir = %pool_dir.display(),
                    "btrfs pool: quota accounting is sound again; volume sizes are enforced"
                ),
                None => {}
            }
            self.reported = Some(reason.clone());
        }
        reason
    }
}

/// Whether any entry directly in `dir` is a subvolume.
fn holds_subvolumes(dir: &Path) -> io::Result<bool> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && super::is_subvolume(&entry.metadata()?) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unsound_state_says_what_is_wrong_and_how_it_is_repaired() {
        let dir = Path::new("/pools/fast");
        assert_eq!(Health::Sound.reason(dir), None);
        let r = |h: Health| h.reason(dir).unwrap();
        let off = r(Health::Off);
        assert!(
            off.contains("quotas are off") && off.contains("restart the driver"),
            "{off}"
        );
        let unknown = r(Health::Unknown("no sysfs".into()));
        assert!(
            unknown.contains("unknown") && unknown.contains("no sysfs"),
            "{unknown}"
        );
        let rebuilding = r(Health::Rebuilding);
        assert!(
            rebuilding.contains("btrfs quota rescan -s /pools/fast"),
            "{rebuilding}"
        );
        for (rescan, says) in [
            (Rescan::Running, "rescan now running"),
            (Rescan::Started, "the driver started"),
            (Rescan::Again, "btrfs quota rescan -w /pools/fast"),
            (Rescan::Failed("EPERM".into()), "EPERM"),
        ] {
            let text = r(Health::Inconsistent(rescan));
            assert!(text.contains("is inconsistent"), "{text}");
            assert!(text.contains("not enforced"), "{text}");
            assert!(text.contains(says), "{text}");
        }
    }
}
