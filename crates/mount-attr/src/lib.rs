//! A bind mount that carries its per-mount flags (read-only, noexec, ...)
//! from the moment it is attached.
//!
//! # Why this crate exists
//!
//! The classic way to make a read-only bind mount is two `mount(2)` calls:
//! `MS_BIND`, then `MS_BIND|MS_REMOUNT|MS_RDONLY`. The second call changes
//! only the mount in the caller's namespace. Under a shared mount (the
//! kubelet's directory, which the node plugin's container mounts with
//! `mountPropagation: Bidirectional`) the kernel has already copied the
//! writable bind into the host's namespace at the first call, and the
//! remount never reaches that copy: the pod got a writable volume where
//! read-only was asked. Linux's new mount API makes the bind detached
//! (`open_tree(OPEN_TREE_CLONE)`), sets its flags (`mount_setattr`), and
//! only then attaches it (`move_mount`): every copy propagation makes is a
//! clone of the mount as attached, flags included.
//!
//! Neither nix nor rustix wraps `mount_setattr`; these are raw syscalls,
//! `unsafe` in Rust, and the driver crate forbids `unsafe_code`. This
//! crate is the smallest place they can live: one function, a safe
//! signature.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

/// The per-mount flags to set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    /// `MOUNT_ATTR_RDONLY`.
    pub read_only: bool,
    /// `MOUNT_ATTR_NOSUID`.
    pub nosuid: bool,
    /// `MOUNT_ATTR_NODEV`.
    pub nodev: bool,
    /// `MOUNT_ATTR_NOEXEC`.
    pub noexec: bool,
    /// `MOUNT_ATTR_NOATIME`.
    pub noatime: bool,
}

// The kernel's constants (include/uapi/linux/mount.h and fcntl.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_EMPTY_PATH: libc::c_uint = 0x1000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
/// The atime mode field; setting a mode means clearing the field too.
const MOUNT_ATTR_ATIME: u64 = 0x70;
const MOUNT_ATTR_NOATIME: u64 = 0x10;

/// `struct mount_attr`, MOUNT_ATTR_SIZE_VER0 (32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Bind-mounts the directory open as `src` (not recursively, as `MS_BIND`)
/// onto the directory open as `dst` (both may be `O_PATH` handles), with
/// `attrs` set before the mount is attached.
///
/// ENOSYS on kernels before 5.12 (no `mount_setattr`), and then nothing is
/// mounted. On any error nothing is left mounted: the detached clone goes
/// with its descriptor.
pub fn bind_with_attrs(src: &impl AsFd, dst: &impl AsFd, attrs: Attrs) -> io::Result<()> {
    let empty = c"";
    let mut attr = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    for (on, bit) in [
        (attrs.read_only, MOUNT_ATTR_RDONLY),
        (attrs.nosuid, MOUNT_ATTR_NOSUID),
        (attrs.nodev, MOUNT_ATTR_NODEV),
        (attrs.noexec, MOUNT_ATTR_NOEXEC),
    ] {
        if on {
            attr.attr_set |= bit;
        }
    }
    if attrs.noatime {
        attr.attr_clr |= MOUNT_ATTR_ATIME;
        attr.attr_set |= MOUNT_ATTR_NOATIME;
    }
    // SAFETY: open_tree takes a descriptor we borrow, a NUL-terminated
    // path and flags; the descriptor it returns is new and owned by `tree`
    // from here on.
    let tree = unsafe {
        let fd = check(libc::syscall(
            libc::SYS_open_tree,
            src.as_fd().as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | AT_EMPTY_PATH,
        ))?;
        OwnedFd::from_raw_fd(fd as libc::c_int)
    };
    // SAFETY: `attr` lives across the call and its size is passed with
    // it; the descriptor and path are valid as above.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    // SAFETY: two descriptors we hold and NUL-terminated paths.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            dst.as_fd().as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })?;
    // Closing `tree` leaves the attached mount in place.
    Ok(())
}
