//! Whether this process may mount at all. Without CAP_SYS_ADMIN in its
//! effective set (not root, or root with the capability dropped) every
//! publish would fail with EPERM; the driver says so once at start and
//! stays not ready instead.

/// Bit of CAP_SYS_ADMIN in the capability sets (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// Why this process cannot mount, or `None` when it can (or when the
/// kernel does not say: then publishing will tell).
pub(crate) fn mount_privilege_missing() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    let eff = u64::from_str_radix(hex, 16).ok()?;
    (eff & (1 << CAP_SYS_ADMIN) == 0).then(|| {
        format!(
            "CAP_SYS_ADMIN is not in the effective capability set (uid {}, CapEff {hex}): cannot mount volumes; run as root with CAP_SYS_ADMIN (privileged container)",
            nix::unistd::geteuid()
        )
    })
}
