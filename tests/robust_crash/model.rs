//! What the clients and the killer share, and the model of the volumes
//! the clients work through.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::Ordering::SeqCst;
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
    /// Failed attempts whose connection broke (explained or not).
    pub transport_errors: AtomicU64,
    /// ... of which the connection had been accepted by a driver killed
    /// before the attempt began, and the socket file was still that
    /// driver's when it broke: the errors the test once could not explain
    /// (it looked only at the socket file; see [`Shared::kill_explains`]).
    pub to_killed_same_file: AtomicU64,
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
    /// Pids of the drivers the killer killed, with the children each had
    /// just before its kill (pid, command name).
    pub killed: Mutex<BTreeMap<u32, Vec<(u32, String)>>>,
    /// Transport errors by what explains them and their chain of causes.
    pub transport: Mutex<BTreeMap<String, u64>>,
}

/// What explains a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// A kill happened while the attempt ran.
    DuringAttempt,
    /// Its connection was accepted by a driver killed before the attempt
    /// began: a listener a killed driver left in a child it had just
    /// forked (the socket file may or may not have been replaced since).
    OfItsDriver,
}

impl Shared {
    pub fn unexpected(&self, what: String) {
        eprintln!("UNEXPECTED: {what}");
        self.unexpected.lock().unwrap().push(what);
    }

    /// Whether a kill explains an attempt made in `generation` on a
    /// connection that process `peer` accepted. Either the killer ran
    /// during the attempt (the generation moved or is odd), or the
    /// connection was accepted by a driver the killer had killed: the
    /// kernel names the listener's owner (SO_PEERCRED) however the
    /// connection got there. The socket file's inode alone (the rule
    /// before) missed a listener that a killed driver's child held until
    /// its exec, when the reset came before the next driver replaced the
    /// file; and it would excuse a connect that raced the new driver's
    /// bind and reached the live one.
    pub fn kill_explains(&self, generation: u64, peer: Option<u32>) -> Option<Kill> {
        let now = self.generation.load(SeqCst);
        if now != generation || now % 2 == 1 {
            Some(Kill::DuringAttempt)
        } else if peer.is_some_and(|p| self.killed.lock().unwrap().contains_key(&p)) {
            Some(Kill::OfItsDriver)
        } else {
            None
        }
    }

    /// Counts a transport error by what explains it and its causes;
    /// `file_replaced`: the socket file changed since the connect.
    pub fn transport_error(
        &self,
        what: &str,
        kill: Option<Kill>,
        peer: Option<u32>,
        file_replaced: bool,
        chain: &str,
    ) {
        self.counts.transport_errors.fetch_add(1, SeqCst);
        if kill == Some(Kill::OfItsDriver) {
            let pid = peer.unwrap_or_default();
            let children = self.killed.lock().unwrap().get(&pid).cloned();
            if !file_replaced {
                self.counts.to_killed_same_file.fetch_add(1, SeqCst);
            }
            eprintln!(
                "{what}: transport error on a connection that driver {pid}'s listener accepted \
                 after its kill (socket file replaced since: {file_replaced}; its children \
                 just before the kill: {children:?}): {chain}"
            );
        }
        let why = match kill {
            Some(Kill::DuringAttempt) => "kill during the attempt",
            Some(Kill::OfItsDriver) => "accepted by a killed driver",
            None => "NO KILL EXPLAINS IT",
        };
        *self
            .transport
            .lock()
            .unwrap()
            .entry(format!("{why}: {chain}"))
            .or_default() += 1;
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
