//! This node's volumes for the orphan report, from the read-only pool
//! inventory (`volume::inventory`, the listing behind `hostpath-csi
//! volumes`): it opens no pool and writes nothing, so it works while the
//! driver runs and while it does not.
//!
//! A volume with a record is the driver's; any other entry of a pool (an
//! administrator's directory, a file, a symlink) is listed as static, so
//! the report shows it and reclaim never touches it.

use super::LocalVolume;
use crate::config::PoolConfig;
use crate::volume::VolumeError;
use crate::volume::inventory::{InventoryOptions, inventory};

/// Why this node's volumes could not be read (the mount table).
pub type LocalError = VolumeError;

/// The volumes in `pools`, ordered by id. Static entries are measured (a
/// walk that does not follow symlinks); driver volumes report their size.
pub fn volumes(pools: &[PoolConfig]) -> Result<Vec<LocalVolume>, LocalError> {
    let mut out = Vec::new();
    for pool in inventory(pools, InventoryOptions { measure: true })? {
        if let Some(problem) = &pool.problem {
            tracing::warn!(pool = %pool.name, %problem, "pool not read");
        }
        for v in pool.volumes {
            let last_used = v.last_published_unix.max(v.last_unpublished_unix);
            out.push(LocalVolume {
                claim: match (&v.claim_namespace, &v.claim_name) {
                    (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                    _ => None,
                },
                pv: v.pv_name.clone(),
                bytes: v.capacity_bytes.or(v.used_bytes).unwrap_or(0),
                created_unix: v.created_unix,
                last_used_unix: last_used,
                published: !v.published_at.is_empty(),
                origin: v.origin,
                problem: v.problem.clone(),
                id: v.id,
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::inventory::Origin;

    #[test]
    fn entries_nobody_recorded_are_static_and_symlinks_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let pool = root.path().join("p");
        std::fs::create_dir_all(pool.join("admin-data")).unwrap();
        std::fs::write(pool.join("admin-data/f"), vec![1u8; 8192]).unwrap();
        std::fs::write(pool.join("stray-file"), b"x").unwrap();
        std::os::unix::fs::symlink("/usr", pool.join("evil")).unwrap();
        let got = volumes(&[PoolConfig::dir("p", pool)]).unwrap();
        let ids: Vec<(&str, Origin)> = got.iter().map(|v| (v.id.as_str(), v.origin)).collect();
        assert_eq!(
            ids,
            [
                ("p:admin-data", Origin::Static),
                ("p:evil", Origin::Foreign),
                ("p:stray-file", Origin::Foreign)
            ]
        );
        assert!(got[0].bytes >= 8192, "{got:?}");
        // /usr holds far more than a symlink's few bytes: not walked.
        assert!(got[1].bytes < 1 << 20, "{got:?}");
    }
}
