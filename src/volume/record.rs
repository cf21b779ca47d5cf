//! A volume's record: what the driver remembers about a volume it created,
//! one small JSON file per volume (`.<token>.meta`) beside its data.
//!
//! Fields added later must default (`#[serde(default)]`), so that records
//! written by an older driver still read.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::PoolKind;

/// Suffix of a record's file name (`.<token>.meta`).
const SUFFIX: &str = ".meta";
/// Suffix of a record being written under a temporary name.
pub(crate) const TEMP_SUFFIX: &str = ".meta.tmp";

/// What the driver remembers about a volume it created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The CreateVolume name.
    pub name: String,
    /// Kind of the pool at creation.
    pub kind: PoolKind,
    /// Capacity promised to the CO, in bytes.
    pub capacity_bytes: u64,
    /// CreateVolume parameters, including the claim name and namespace the
    /// external-provisioner adds, so an operator can tell whose it is.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch.
    #[serde(default)]
    pub created_unix: u64,
}

impl Record {
    /// The record of a volume created now.
    pub(crate) fn new(
        name: &str,
        kind: PoolKind,
        capacity_bytes: u64,
        parameters: BTreeMap<String, String>,
    ) -> Self {
        Record {
            name: name.to_string(),
            kind,
            capacity_bytes,
            parameters,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// The bytes of the record's file.
    pub(crate) fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(self)
    }

    /// Reads a record's file.
    pub(crate) fn decode(bytes: &[u8]) -> serde_json::Result<Record> {
        serde_json::from_slice(bytes)
    }
}

/// The file name of the record of volume `token`.
pub(crate) fn file_name(token: &str) -> String {
    format!(".{token}{SUFFIX}")
}

/// The token a record's file name belongs to, if `name` is one.
pub(crate) fn token_of(name: &str) -> Option<&str> {
    name.strip_prefix('.')?.strip_suffix(SUFFIX)
}
