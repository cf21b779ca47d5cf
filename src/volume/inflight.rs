//! One call at a time per volume.
//!
//! The CSI spec lets a plugin answer ABORTED when an operation on the same
//! volume is already pending, and the CO retries. That is simpler and safer
//! than queueing: two interleaved calls on one volume (say, a delete racing
//! a publish) can never both touch it, while calls on different volumes run
//! in parallel.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Why a volume cannot be worked on now.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another call on the same volume is in flight; the CO retries.
    #[error("another operation on volume {0} is in progress; retry later")]
    Busy(String),
}

/// The set of volume keys with a call in flight.
#[derive(Debug, Default, Clone)]
pub(crate) struct InFlight {
    // A std mutex is right here: it is held only to insert or remove a key,
    // never across an await or a syscall.
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call works on a volume; releases the volume when dropped.
#[derive(Debug)]
pub(crate) struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Claims `key`, or [`LockError::Busy`] if another call holds it.
    pub(crate) fn claim(&self, key: &str) -> Result<Guard, LockError> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if !keys.insert(key.to_string()) {
            return Err(LockError::Busy(key.to_string()));
        }
        Ok(Guard {
            keys: Arc::clone(&self.keys),
            key: key.to_string(),
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_aborts_until_first_is_dropped() {
        let f = InFlight::default();
        let g = f.claim("a").unwrap();
        assert!(matches!(f.claim("a"), Err(LockError::Busy(_))));
        let _other = f.claim("b").unwrap();
        drop(g);
        f.claim("a").unwrap();
    }
}
