//! Reading `/proc/self/mountinfo`.
//!
//! The driver answers "is this path a mount point?" and "is this volume
//! mounted anywhere?" from the kernel's own table instead of keeping a list
//! of its own, so the answers stay right after a crash or a manual unmount.

use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number (`major:minor`) of the mounted filesystem.
    pub device: (u32, u32),
    /// Directory inside that filesystem that forms the root of this mount
    /// (for bind mounts, the bound directory).
    pub root: PathBuf,
    /// Where the mount is attached, as seen by this process.
    pub mount_point: PathBuf,
    /// Per-mount options such as `ro` or `rw`.
    pub options: String,
    /// Filesystem type, e.g. `ext4` or `btrfs`.
    pub fs_type: String,
    /// Mount source, e.g. `/dev/loop3`.
    pub source: String,
}

impl MountEntry {
    /// True when the per-mount options say read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Reads and parses the mount table of this process's mount namespace.
pub fn read() -> io::Result<Vec<MountEntry>> {
    use std::io::Read;
    // procfs reports a size of 0, so size the buffer for a busy node up
    // front instead of growing it read by read.
    let mut text = String::with_capacity(64 * 1024);
    std::fs::File::open("/proc/self/mountinfo")?.read_to_string(&mut text)?;
    Ok(parse(&text))
}

/// Parses mountinfo text; lines that do not have the documented shape are
/// skipped rather than failing the whole table.
pub(crate) fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // Format (proc(5)): id parent major:minor root mount_point options
    // [optional fields...] - fs_type source super_options
    let mut fields = line.split(' ');
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let options = fields.next()?.to_string();
    for f in fields.by_ref() {
        if f == "-" {
            break;
        }
    }
    let fs_type = fields.next()?.to_string();
    let source = unescape(fields.next().unwrap_or(""))
        .to_string_lossy()
        .into_owned();
    Some(MountEntry {
        device: (major.parse().ok()?, minor.parse().ok()?),
        root,
        mount_point,
        options,
        fs_type,
        source,
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The entry mounted last at exactly `path` (the one a lookup would see).
pub fn mounted_at<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|e| e.mount_point == path)
}

/// The entry whose mount point is the longest prefix of `path`: the
/// filesystem that holds `path`.
pub(crate) fn containing<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    table
        .iter()
        .rev()
        .filter(|e| path.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
}

/// Mount points whose source is `dir` (or something below it): where a
/// volume directory is bind-mounted, found by device and filesystem-relative
/// path so that it works whatever the mount points are called.
pub(crate) fn binds_of(table: &[MountEntry], dir: &Path) -> Vec<PathBuf> {
    let Some(holder) = containing(table, dir) else {
        return Vec::new();
    };
    let Ok(rel) = dir.strip_prefix(&holder.mount_point) else {
        return Vec::new();
    };
    let in_fs = holder.root.join(rel);
    table
        .iter()
        .filter(|e| e.device == holder.device && e.root.starts_with(&in_fs))
        .filter(|e| e.mount_point != holder.mount_point)
        .map(|e| e.mount_point.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 254:0 /var/lib/pool/pvc-1 /mnt/target\\040one rw,relatime shared:1 - ext4 /dev/vda rw
31 22 0:40 / /tmp rw,nosuid - tmpfs tmpfs rw
32 22 254:0 /var/lib/pool/pvc-1 /mnt/ro ro,relatime - ext4 /dev/vda rw
";

    #[test]
    fn parses_escaped_mount_points_and_options() {
        let t = parse(SAMPLE);
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].mount_point, PathBuf::from("/mnt/target one"));
        assert_eq!(t[1].root, PathBuf::from("/var/lib/pool/pvc-1"));
        assert_eq!(t[2].fs_type, "tmpfs");
        assert!(t[3].read_only());
        assert!(!t[1].read_only());
    }

    #[test]
    fn finds_bind_mounts_of_a_directory_by_device() {
        let t = parse(SAMPLE);
        let binds = binds_of(&t, Path::new("/var/lib/pool/pvc-1"));
        assert_eq!(
            binds,
            vec![PathBuf::from("/mnt/target one"), PathBuf::from("/mnt/ro")]
        );
        assert!(binds_of(&t, Path::new("/var/lib/pool/pvc-2")).is_empty());
        assert_eq!(
            containing(&t, Path::new("/tmp/x")).unwrap().fs_type,
            "tmpfs"
        );
    }
}
