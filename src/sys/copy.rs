//! Copies for snapshots and clones, and the filesystem freeze that makes a
//! copy of a mounted image consistent.
//!
//! Copies run GNU `cp` rather than a copy loop of our own: `--reflink=auto`
//! shares extents where the filesystem can (btrfs, xfs with reflink: the
//! copy is instant and costs no space until either side changes) and falls
//! back to `copy_file_range` otherwise, `--sparse=always` keeps holes in
//! images as holes, and `-a` keeps modes, owners, timestamps, links and
//! extended attributes, which a volume's data needs as much as its bytes.
//! `cp` does not flush, so callers flush with [`sync_fs`] before they record
//! the copy as made.

use std::io;
use std::path::Path;

use super::cmd::{self, CmdError};

/// Copies the directory tree `src` to `dest` (which must not exist),
/// keeping everything `cp -a` keeps, without crossing into filesystems
/// mounted inside it.
pub(crate) fn copy_tree(src: &Path, dest: &Path) -> Result<(), CmdError> {
    cmd::run(
        "cp",
        [
            "-a".as_ref(),
            "-x".as_ref(),
            "--reflink=auto".as_ref(),
            "-T".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ],
    )
    .map(drop)
}

/// Copies the file `src` to `dest` (replaced if it exists): shared extents
/// where the filesystem can, holes kept as holes otherwise.
pub(crate) fn copy_file(src: &Path, dest: &Path) -> Result<(), CmdError> {
    cmd::run(
        "cp",
        [
            "--reflink=auto".as_ref(),
            "--sparse=always".as_ref(),
            "-T".as_ref(),
            src.as_os_str(),
            dest.as_os_str(),
        ],
    )
    .map(drop)
}

/// Flushes the whole filesystem holding `path` (`syncfs`): a tree copied by
/// `cp` is on disk afterwards, however many files it has.
pub(crate) fn sync_fs(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}

/// Freezes the filesystem mounted at `mnt` (`fsfreeze -f`): writes block,
/// and what was written is on disk with a clean log, so a copy of its
/// device is a consistent filesystem. Thaw it with [`thaw`].
pub(crate) fn freeze(mnt: &Path) -> Result<(), CmdError> {
    cmd::run("fsfreeze", ["-f".as_ref(), mnt.as_os_str()]).map(drop)
}

/// Thaws a filesystem frozen by [`freeze`]; one that is not frozen is left
/// as it is (the kernel answers EINVAL, which is not an error here: a
/// startup thaws whatever a killed call may have left frozen).
pub(crate) fn thaw(mnt: &Path) -> Result<(), CmdError> {
    match cmd::run_raw("fsfreeze", ["-u".as_ref(), mnt.as_os_str()])? {
        Ok(_) => Ok(()),
        Err(f) if f.stderr.contains("Invalid argument") => Ok(()),
        Err(f) => Err(f.into()),
    }
}
