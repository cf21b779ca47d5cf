//! What the clients and the killer share, and the model of the volumes
//! the clients work through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};

use hostpath_csi::config::PoolKind;
use hostpath_csi::volume::id::token_for_name;

/// Counters printed at the end.
#[derive(Default)]
pub struct Counts {
    pub runs: AtomicU64,
    pub kills: AtomicU64,
    pub calls: AtomicU64,
    pub calls_retried: AtomicU64,
    pub failed_attempts: AtomicU64,
    /// Failed attempts with a broken connection that no kill explains.
    pub transport_errors: AtomicU64,
    pub creates: AtomicU64,
    pub deletes: AtomicU64,
    pub publishes: AtomicU64,
    pub unpublishes: AtomicU64,
    pub expands: AtomicU64,
    pub node_expands: AtomicU64,
    pub reads: AtomicU64,
}

/// What the clients and the checks know about a pool.
#[derive(Debug, Clone)]
pub struct PoolInfo {
    pub name: &'static str,
    pub kind: PoolKind,
    /// Image pools: the images' filesystem.
    pub filesystem: Option<&'static str>,
    /// btrfs pools: on full qgroups rather than the driver's choice.
    pub full_qgroups: bool,
    pub dir: PathBuf,
    /// Creates ask for 1 to this many MiB.
    pub max_mib: u64,
    /// Smallest volume the pool makes (GetCapacity); smaller requests
    /// are rounded up to it.
    pub min_bytes: i64,
}

/// What all clients and the killer share.
pub struct Shared {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub pools: Vec<PoolInfo>,
    /// Bumped just before every kill and again once the process is reaped
    /// (so it is odd while a kill is under way): an attempt that saw it
    /// change or odd may have been interrupted by the crash, whatever error
    /// it got.
    pub generation: AtomicU64,
    pub stop: AtomicBool,
    pub controller_expand: AtomicBool,
    pub node_expand: AtomicBool,
    pub counts: Counts,
    /// Attempts under way, per RPC.
    pub in_flight: Mutex<BTreeMap<String, u64>>,
    /// Attempts under way when the driver was killed, per RPC.
    pub interrupted: Mutex<BTreeMap<String, u64>>,
    /// Answers the driver gave that no crash explains.
    pub unexpected: Mutex<Vec<String>>,
}

impl Shared {
    pub fn unexpected(&self, what: String) {
        eprintln!("UNEXPECTED: {what}");
        self.unexpected.lock().unwrap().push(what);
    }

    pub fn pool(&self, name: &str) -> &PoolInfo {
        self.pools.iter().find(|p| p.name == name).unwrap()
    }

    pub fn in_flight(&self, rpc: &str) -> u64 {
        self.in_flight
            .lock()
            .unwrap()
            .get(rpc)
            .copied()
            .unwrap_or(0)
    }

    pub fn attempt(&self, rpc: &str, delta: i64) {
        let mut m = self.in_flight.lock().unwrap();
        let n = m.entry(rpc.to_string()).or_default();
        *n = n.checked_add_signed(delta).unwrap();
    }

    /// Notes the attempts under way as interrupted (just before a kill).
    pub fn note_interrupted(&self) {
        let now = self.in_flight.lock().unwrap().clone();
        let mut m = self.interrupted.lock().unwrap();
        for (rpc, n) in now.into_iter().filter(|(_, n)| *n > 0) {
            *m.entry(rpc).or_default() += n;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Absent,
    Created,
    Published,
}

/// One volume name a client works through: create, publish, write,
/// unpublish, delete, then on to the next generation's name.
#[derive(Debug, Clone)]
pub struct Slot {
    pub client: usize,
    pub index: usize,
    pub generation: u32,
    pub state: State,
    pub pool: &'static str,
    pub capacity: i64,
    /// What the test last wrote into the volume (through its target).
    pub data: Option<Vec<u8>>,
    pub target: Option<PathBuf>,
    pub publications: u32,
    /// Expanded by the controller while not published: the node half
    /// (growing the filesystem) is due at the next publication.
    pub node_expand_due: bool,
}

impl Slot {
    pub fn name(&self) -> String {
        format!("c{}-s{}-g{}", self.client, self.index, self.generation)
    }

    pub fn token(&self) -> String {
        token_for_name(&self.name())
    }

    pub fn volume_id(&self) -> String {
        format!("{}:{}", self.pool, token_for_name(&self.name()))
    }
}

/// The model a client returns: its live slots and the volumes it deleted.
pub struct Model {
    pub slots: Vec<Slot>,
    pub deleted: Vec<(String, String)>,
}
