//! Loop devices as the kernel lists them in sysfs: which are attached, and
//! to which file. Read without running `losetup`, so a look at every
//! device costs a directory listing and one small read per device.

use std::path::{Path, PathBuf};

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoopDevice {
    /// Its node, `/dev/loopN`.
    pub(crate) device: PathBuf,
    /// The file behind it (as it was named when attached, without the
    /// kernel's " (deleted)" mark for a file removed since).
    pub(crate) backing: PathBuf,
}

/// Every loop device that has a file attached now; unreadable entries are
/// left out (a device detached while it was being read).
pub(crate) fn attached() -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = backing_of(&name)?;
            Some(LoopDevice {
                device: Path::new("/dev").join(name),
                backing,
            })
        })
        .collect()
}

/// The file behind loop device `name` (`loop3`), if it is a loop device
/// with one attached.
pub(crate) fn backing_of(name: &str) -> Option<PathBuf> {
    if !name.starts_with("loop") || name.contains('/') {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(
        text.trim_end_matches('\n').trim_end_matches(" (deleted)"),
    ))
}
