//! The StorageClass parameters that choose a filesystem volume's root
//! directory mode and owner (`directoryPerms`, `uid`, `gid`), parsed into
//! a [`RootAccess`].
//!
//! The names are those of the AWS EFS driver, whose dynamically made
//! directories are the closest thing to ours: `directoryPerms` is the
//! mode given to the new root directory once, at creation (csi-driver-nfs'
//! `mountPermissions` is applied at every mount instead, which would undo
//! a pod's `fsGroup` change each time). Owners are numbers only: a name
//! would be looked up in the driver container's `/etc/passwd`, which says
//! nothing about the users of the pod's image.

use std::collections::BTreeMap;

use crate::volume::record::{Access, DIRECTORY_PERMS, GID, RootAccess, UID};

/// A root mode or owner parameter that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootAccessError {
    /// `directoryPerms` is not 3 or 4 octal digits.
    #[error(
        "parameter \"directoryPerms\" is {0:?}; it must be an octal mode of 3 or 4 digits such \
         as \"0770\" or \"700\""
    )]
    NotOctal(String),
    /// `directoryPerms` asks for setuid, which Linux ignores on directories.
    #[error(
        "parameter \"directoryPerms\" is {0:?}: the setuid bit (4000) means nothing on a \
         directory; use the permission bits, setgid (2000) or sticky (1000)"
    )]
    Setuid(String),
    /// `uid` or `gid` is not a decimal number in range.
    #[error(
        "parameter {param:?} is {value:?}; it must be a number from 0 to 4294967294 (names are \
         not accepted: the driver's /etc/passwd is not the pod's)"
    )]
    NotAnId {
        /// The parameter.
        param: &'static str,
        /// Its value.
        value: String,
    },
    /// The parameters were given for a raw block volume.
    #[error(
        "parameters \"directoryPerms\", \"uid\" and \"gid\" set the root directory of a \
         filesystem volume; a raw block volume has none (use a StorageClass without them for \
         volumeMode: Block)"
    )]
    Block,
}

/// The root mode and owner the parameters ask for (0777 owned by root
/// where they say nothing), for a volume of `access`.
pub(crate) fn root_access(
    p: &BTreeMap<String, String>,
    access: Access,
) -> Result<RootAccess, RootAccessError> {
    let given = [DIRECTORY_PERMS, UID, GID]
        .iter()
        .any(|k| p.contains_key(*k));
    if given && access == Access::Block {
        return Err(RootAccessError::Block);
    }
    let default = RootAccess::default();
    Ok(RootAccess {
        mode: p
            .get(DIRECTORY_PERMS)
            .map_or(Ok(default.mode), |m| mode(m))?,
        uid: p.get(UID).map_or(Ok(default.uid), |v| id(UID, v))?,
        gid: p.get(GID).map_or(Ok(default.gid), |v| id(GID, v))?,
    })
}

fn mode(text: &str) -> Result<u32, RootAccessError> {
    let octal = (3..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    let mode = u32::from_str_radix(text, 8)
        .ok()
        .filter(|_| octal)
        .ok_or_else(|| RootAccessError::NotOctal(text.to_string()))?;
    if mode & 0o4000 != 0 {
        return Err(RootAccessError::Setuid(text.to_string()));
    }
    Ok(mode)
}

fn id(param: &'static str, text: &str) -> Result<u32, RootAccessError> {
    // Digits only: u32's parser takes a leading '+'. u32::MAX is chown's
    // "leave unchanged", not an id.
    text.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| text.parse::<u32>().ok())
        .flatten()
        .filter(|n| *n != u32::MAX)
        .ok_or_else(|| RootAccessError::NotAnId {
            param,
            value: text.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_good_values() {
        let none = root_access(&params(&[("pool", "a")]), Access::Mount).unwrap();
        assert_eq!(none, RootAccess::default());
        assert_eq!(root_access(&params(&[]), Access::Block).unwrap(), none);
        let r = root_access(
            &params(&[("directoryPerms", "2770"), ("uid", "999"), ("gid", "0")]),
            Access::Mount,
        )
        .unwrap();
        assert_eq!((r.mode, r.uid, r.gid), (0o2770, 999, 0));
        let r = root_access(&params(&[("directoryPerms", "700")]), Access::Mount).unwrap();
        assert_eq!((r.mode, r.uid, r.gid), (0o700, 0, 0));
        let r = root_access(&params(&[("gid", "4294967294")]), Access::Mount).unwrap();
        assert_eq!((r.mode, r.gid), (0o777, u32::MAX - 1));
    }

    #[test]
    fn bad_values() {
        for m in [
            "", "0", "77", "0o770", "0x1ff", "0789", "17777", "07777 ", "-770", "rwx", "00770",
        ] {
            let e = root_access(&params(&[("directoryPerms", m)]), Access::Mount);
            assert!(
                matches!(e, Err(RootAccessError::NotOctal(_))),
                "{m:?}: {e:?}"
            );
        }
        for m in ["4770", "6777", "4000"] {
            let e = root_access(&params(&[("directoryPerms", m)]), Access::Mount);
            assert!(matches!(e, Err(RootAccessError::Setuid(_))), "{m:?}: {e:?}");
        }
        for v in [
            "",
            "postgres",
            "-1",
            "+5",
            "1.0",
            " 5",
            "4294967295",
            "99999999999",
        ] {
            for k in ["uid", "gid"] {
                let e = root_access(&params(&[(k, v)]), Access::Mount);
                assert!(
                    matches!(e, Err(RootAccessError::NotAnId { .. })),
                    "{k}={v:?}: {e:?}"
                );
            }
        }
        let e = root_access(&params(&[("uid", "5")]), Access::Block);
        assert!(matches!(e, Err(RootAccessError::Block)), "{e:?}");
    }
}
