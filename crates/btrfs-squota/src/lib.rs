//! Switches a btrfs filesystem to *simple quotas* (`squota`, Linux 6.7
//! and later) with the `BTRFS_IOC_QUOTA_CTL` ioctl.
//!
//! # Why this crate exists
//!
//! `hostpath-csi` enforces the size of a btrfs volume with a qgroup limit.
//! Full qgroup accounting can become inconsistent (after a crash during a
//! rescan, a large subvolume drop, an offline change to the filesystem),
//! and while it is, the kernel stops counting and limits are no longer
//! enforced. Simple quotas count each extent once, against the subvolume
//! that wrote it, and never need a rescan, so they cannot drift that way.
//!
//! Enabling them is one ioctl, but the btrfs-progs of Debian 12 (6.2) and
//! other distributions of that age cannot issue it (`btrfs quota enable
//! --simple` arrived in btrfs-progs 6.7). Rather than require a newer
//! btrfs-progs on every node, the driver issues the ioctl itself. An ioctl
//! on a raw descriptor is `unsafe` in Rust, and the driver crate forbids
//! `unsafe_code`; this crate is the smallest place that call can live: one
//! function, one `unsafe` block, a safe signature.
//!
//! Everything else the driver does with quotas (limits, rescans, reading
//! usage) goes through btrfs-progs and sysfs, which need no `unsafe`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `struct btrfs_ioctl_quota_ctl_args` from `<linux/btrfs.h>`.
#[repr(C)]
struct QuotaCtlArgs {
    /// One of the `BTRFS_QUOTA_CTL_*` commands.
    cmd: u64,
    /// Unused by the kernel; part of the ABI.
    status: u64,
}

/// `BTRFS_IOCTL_MAGIC`.
const BTRFS_IOCTL_MAGIC: u8 = 0x94;
/// Request number of `BTRFS_IOC_QUOTA_CTL`.
const BTRFS_IOC_QUOTA_CTL_NR: u8 = 40;
/// `BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA` (Linux 6.7).
const BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;

nix::ioctl_readwrite!(
    /// `BTRFS_IOC_QUOTA_CTL`: `_IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args)`.
    quota_ctl,
    BTRFS_IOCTL_MAGIC,
    BTRFS_IOC_QUOTA_CTL_NR,
    QuotaCtlArgs
);

/// Enables simple quotas on the btrfs filesystem holding `dir` (an open
/// file or directory on it).
///
/// What the kernel answers, as measured on Linux 6.18:
/// - quotas already enabled, in either mode: success, and the mode is left
///   as it was (read `/sys/fs/btrfs/<fsid>/qgroups/mode` to know it);
/// - `ENOTTY`: `dir` is not on btrfs;
/// - `EINVAL`: a kernel without simple quotas (before 6.7);
/// - `EPERM`: the caller lacks `CAP_SYS_ADMIN`;
/// - `EROFS`: the filesystem is mounted read-only.
///
/// Enabling sets the filesystem's `SIMPLE_QUOTA` incompatible feature:
/// kernels before 6.7 and btrfs-progs before 6.7 can no longer open it
/// (until quotas are disabled again).
pub fn enable_simple_quotas(dir: impl AsFd) -> io::Result<()> {
    let mut args = QuotaCtlArgs {
        cmd: BTRFS_QUOTA_CTL_ENABLE_SIMPLE_QUOTA,
        status: 0,
    };
    // SAFETY: the descriptor is borrowed (open) for the whole call, and
    // `args` is a live, properly aligned `struct btrfs_ioctl_quota_ctl_args`
    // that the kernel reads and writes only during the call; the request
    // number encodes exactly that struct's size and direction.
    unsafe { quota_ctl(dir.as_fd().as_raw_fd(), &mut args) }
        .map(drop)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_number_matches_the_kernel_header() {
        // _IOWR(0x94, 40, 16 bytes), as <linux/btrfs.h> defines it.
        assert_eq!(std::mem::size_of::<QuotaCtlArgs>(), 16);
        assert_eq!(
            nix::request_code_readwrite!(
                BTRFS_IOCTL_MAGIC,
                BTRFS_IOC_QUOTA_CTL_NR,
                std::mem::size_of::<QuotaCtlArgs>()
            ) as u64,
            0xC010_9428
        );
    }

    #[test]
    fn refuses_a_directory_that_is_not_on_btrfs() {
        // /proc is never btrfs; the kernel answers ENOTTY for an ioctl the
        // filesystem does not know.
        let dir = std::fs::File::open("/proc").unwrap();
        let err = enable_simple_quotas(&dir).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTTY), "{err}");
    }
}
