//! Volume ids and the on-disk names derived from them.
//!
//! An id is `<pool>:<token>`. The token is the volume's directory name inside
//! the pool: the CreateVolume name itself when it is a plain, short file name
//! (Kubernetes names look like `pvc-<uid>`, so the directory tells an operator
//! which volume it is), and `sha256-<digest>` of the name otherwise. Either
//! way the token is derived from the name alone, so a retried CreateVolume
//! finds the very same directory. Ids from requests are parsed strictly:
//! a token can never be `.`/`..`, contain `/` or start with a dot (dot names
//! are the driver's own bookkeeping files), so no id can name a path outside
//! its pool.

use sha2::{Digest, Sha256};

/// Longest token; keeps ids within the 128 bytes the CSI spec allows.
pub const MAX_TOKEN_LEN: usize = 95;
/// Longest pool name.
pub const MAX_POOL_LEN: usize = 31;
/// Prefix of tokens made by hashing names that are not plain file names.
const HASH_PREFIX: &str = "sha256-";

/// A parsed, safe volume id: a valid pool name and a valid token, so the
/// token can be joined to a pool directory as it is. Made only by
/// [`VolumeId::parse`] (ids from requests) and [`VolumeId::for_name`] (ids
/// the driver hands out), so holding one is proof of both checks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId {
    pool: String,
    token: String,
}

impl VolumeId {
    /// Parses an id from a request. `None` means "cannot name any volume of
    /// ours", which callers answer as NOT_FOUND (or ABORTED for paging
    /// tokens), as the spec asks for unknown ids.
    pub fn parse(id: &str) -> Option<Self> {
        let (pool, token) = id.split_once(':')?;
        (valid_pool_name(pool) && valid_token(token)).then(|| VolumeId {
            pool: pool.to_string(),
            token: token.to_string(),
        })
    }

    /// The id of the volume CreateVolume makes for `name` in `pool` (a
    /// configured pool, so a valid pool name).
    pub fn for_name(pool: &str, name: &str) -> Self {
        VolumeId {
            pool: pool.to_string(),
            token: token_for_name(name),
        }
    }

    /// The id of a volume listed from a pool's own records, whose tokens
    /// were checked with [`valid_token`] when the pool directory was read.
    pub(crate) fn listed(pool: &str, token: &str) -> Self {
        debug_assert!(
            valid_pool_name(pool) && valid_token(token),
            "{pool}:{token}"
        );
        VolumeId {
            pool: pool.to_string(),
            token: token.to_string(),
        }
    }

    /// Pool the volume lives in.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Directory name of the volume inside the pool.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.pool, self.token)
    }
}

/// The token (directory name) for a CreateVolume name.
pub fn token_for_name(name: &str) -> String {
    if valid_token(name) && !name.starts_with(HASH_PREFIX) {
        return name.to_string();
    }
    let digest = Sha256::digest(name.as_bytes());
    format!("{HASH_PREFIX}{}", &hex::encode(digest)[..40])
}

/// Pool names: lowercase letters, digits and inner dashes, like a DNS label.
pub fn valid_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_POOL_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Tokens: a plain file name of letters, digits, `-`, `_` and `.` that
/// starts with a letter or digit.
pub fn valid_token(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TOKEN_LEN
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_kept_readable() {
        let n = "pvc-1b2c3d4e-0000-4000-8000-123456789abc";
        assert_eq!(token_for_name(n), n);
        let id = VolumeId::for_name("ssd", n);
        assert_eq!(id.to_string(), format!("ssd:{n}"));
        assert_eq!(VolumeId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn unsafe_names_are_hashed_deterministically() {
        for name in [
            "..",
            "../../etc",
            "/abs",
            "a/b",
            ".hidden",
            "x\0y",
            "é",
            &"a".repeat(200),
        ] {
            let t = token_for_name(name);
            assert!(t.starts_with("sha256-"), "{name:?} -> {t}");
            assert!(valid_token(&t));
            assert_eq!(t, token_for_name(name));
        }
        assert_ne!(token_for_name(".."), token_for_name("..."));
        // A plain name that looks like a hash is hashed too, so it cannot
        // collide with a hashed one.
        assert!(
            token_for_name("sha256-abc").starts_with("sha256-")
                && token_for_name("sha256-abc") != "sha256-abc"
        );
    }

    #[test]
    fn hostile_ids_do_not_parse() {
        for id in [
            "",
            ":",
            "pool",
            "pool:",
            ":tok",
            "pool:..",
            "pool:.",
            "pool:../x",
            "pool:a/b",
            "pool:.meta",
            "../p:tok",
            "Pool:tok",
            "p/q:tok",
            "pool:tok\0",
            "pool:/etc",
            "-p:tok",
            "pool:a:b",
        ] {
            assert_eq!(VolumeId::parse(id), None, "{id:?}");
        }
        assert!(VolumeId::parse("hdd:static-data").is_some());
    }
}
