//! A client of the crash test: works through its volume slots (create,
//! publish, write, unpublish, delete; expand where offered), retrying every
//! call until it succeeds, as a CO does, and keeps the model of what the
//! driver acknowledged.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::Code;
use tonic::transport::Channel;

use crate::MIB;
use crate::common::mount_cap;
use crate::model::*;
use crate::robust_support::{
    self, PeerPid, Rng, Rpc, error_chain, is_transport_error, mounts_below,
};

pub struct Client {
    pub shared: Arc<Shared>,
    pub rng: Rng,
    /// The connection calls go through until one fails or a kill passes.
    pub conn: Option<Conn>,
    pub slots: Vec<Slot>,
    pub deleted: Vec<(String, String)>,
}

/// A client's connection, and what the explanation of its failures needs.
#[derive(Clone)]
pub struct Conn {
    /// The generation it was opened in.
    generation: u64,
    /// The socket file's inode just before it was opened.
    inode: u64,
    /// Which driver process accepted it.
    peer: PeerPid,
    channel: Channel,
}

/// A connection that a process accepted and that broke before any call.
pub struct BrokenConnect {
    peer: u32,
    file_replaced: bool,
    chain: String,
}

impl Client {
    /// Runs one call until it succeeds, reconnecting after crashes.
    /// Errors that no crash explains are recorded and retried too (a CO
    /// would), but a call that keeps failing that way fails the test.
    /// `subject` (the volume, if any) goes into messages.
    async fn call<R: Rpc>(&mut self, subject: &str, req: R) -> R::Reply {
        let what = format!("{} {subject}", R::NAME);
        let what = what.trim_end();
        let sh = Arc::clone(&self.shared);
        sh.counts.calls.fetch_add(1, SeqCst);
        let started = Instant::now();
        let mut failed = 0u32;
        let mut unexplained = 0u32;
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{what}: no success within 120 s"
            );
            let generation = sh.generation.load(SeqCst);
            let conn = match self.connection(generation).await {
                Ok(conn) => conn,
                Err(Some(broken)) => {
                    // A process accepted the connection, which then broke
                    // before a call could go out: judged like a call's.
                    failed += 1;
                    sh.counts.failed_attempts.fetch_add(1, SeqCst);
                    let kill = sh.kill_explains(generation, Some(broken.peer));
                    let chain = format!("connecting: {}", broken.chain);
                    sh.transport_error(what, kill, Some(broken.peer), broken.file_replaced, &chain);
                    if kill.is_none() {
                        unexplained += 1;
                        sh.unexpected(format!("{what}: {chain}"));
                        assert!(
                            unexplained < 20,
                            "{what}: connections keep breaking: {chain}"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // Nobody listens (the driver is being restarted).
                Err(None) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            sh.attempt(R::NAME, 1);
            let result = req.clone().send(conn.channel.clone()).await;
            sh.attempt(R::NAME, -1);
            let s = match result {
                Ok(r) => {
                    if failed > 0 {
                        sh.counts.calls_retried.fetch_add(1, SeqCst);
                    }
                    return r.into_inner();
                }
                Err(s) => s,
            };
            failed += 1;
            sh.counts.failed_attempts.fetch_add(1, SeqCst);
            self.conn = None;
            let kill = sh.kill_explains(generation, conn.peer.get());
            if is_transport_error(&s) {
                // A connection that broke under the call with no kill
                // behind it is a violation: a kubelet would see a failed
                // mount (a driver that died by itself is also caught at
                // the next kill).
                let file_replaced = socket_inode(&sh.socket) != conn.inode;
                let chain = error_chain(&s);
                sh.transport_error(what, kill, conn.peer.get(), file_replaced, &chain);
            }
            let retryable = matches!(s.code(), Code::Unavailable | Code::Aborted);
            if kill.is_none() && (!retryable || is_transport_error(&s)) {
                unexplained += 1;
                sh.unexpected(format!("{what}: {}", error_chain(&s)));
                assert!(unexplained < 20, "{what} keeps failing: {s:?}");
            }
            let pause = 2 + self.rng.below(15);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// The connection to use in `generation`: the client's own if it was
    /// opened in it, else a new one. `Err(None)` while nobody listens on
    /// the socket; `Err(Some(..))` when a process accepted the connection
    /// and it broke during the handshake.
    async fn connection(&mut self, generation: u64) -> Result<Conn, Option<BrokenConnect>> {
        if let Some(c) = self.conn.as_ref().filter(|c| c.generation == generation) {
            return Ok(c.clone());
        }
        // Only for the summary: whether the socket file changed between
        // this connect and a failure (the rule before the peer's pid).
        let inode = socket_inode(&self.shared.socket);
        let peer = PeerPid::default();
        match robust_support::connect_noting_peer(&self.shared.socket, &peer).await {
            Ok(channel) => {
                let c = Conn {
                    generation,
                    inode,
                    peer,
                    channel,
                };
                self.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => Err(peer.get().map(|pid| BrokenConnect {
                peer: pid,
                file_replaced: socket_inode(&self.shared.socket) != inode,
                chain: robust_support::causes(&e),
            })),
        }
    }

    pub async fn run(mut self) -> Model {
        while !self.shared.stop.load(SeqCst) {
            self.step().await;
        }
        Model {
            slots: self.slots,
            deleted: self.deleted,
        }
    }

    async fn step(&mut self) {
        if self.rng.chance(1, 10) {
            return self.read_only_call().await;
        }
        let i = self.rng.below(self.slots.len() as u64) as usize;
        let roll = self.rng.below(100);
        match self.slots[i].state {
            State::Absent => self.create(i).await,
            State::Created if roll < 45 => self.publish(i).await,
            State::Created if roll < 85 => self.delete(i).await,
            State::Created if self.shared.controller_expand.load(SeqCst) => self.expand(i).await,
            State::Created => self.validate(i).await,
            State::Published if roll < 50 => self.unpublish(i).await,
            State::Published if roll < 75 => self.stats(i).await,
            State::Published => self.write(i).await,
        }
    }

    async fn create(&mut self, i: usize) {
        let sh = Arc::clone(&self.shared);
        let info = &sh.pools[self.rng.below(sh.pools.len() as u64) as usize];
        let slot = &mut self.slots[i];
        slot.pool = info.name;
        slot.capacity = (1 + self.rng.below(info.max_mib) as i64) * MIB;
        let (name, pool, capacity) = (slot.name(), slot.pool, slot.capacity);
        // Rounded up to the pool's minimum and to whole 4 KiB blocks.
        let most = (capacity.max(info.min_bytes) as u64).next_multiple_of(4096) as i64;
        let req = csi::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: capacity,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            parameters: HashMap::from([("pool".to_string(), pool.to_string())]),
            ..Default::default()
        };
        let r = self.call(&name, req).await;
        let v = r.volume.expect("CreateVolume answered without a volume");
        let slot = &mut self.slots[i];
        if v.volume_id != slot.volume_id() || v.capacity_bytes < capacity || v.capacity_bytes > most
        {
            self.shared.unexpected(format!(
                "CreateVolume {name}: got {} with {} bytes, wanted {} with {capacity} \
                 (at most {most})",
                v.volume_id,
                v.capacity_bytes,
                slot.volume_id()
            ));
        }
        // What was acknowledged is what the volume must have.
        slot.capacity = v.capacity_bytes.max(capacity);
        slot.state = State::Created;
        slot.data = None;
        slot.node_expand_due = false;
        self.shared.counts.creates.fetch_add(1, SeqCst);
    }

    async fn delete(&mut self, i: usize) {
        let id = self.slots[i].volume_id();
        let req = csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: Default::default(),
        };
        self.call(&id, req).await;
        let slot = &mut self.slots[i];
        self.deleted.push((slot.pool.to_string(), slot.name()));
        slot.generation += 1;
        slot.state = State::Absent;
        slot.data = None;
        slot.publications = 0;
        slot.node_expand_due = false;
        self.shared.counts.deletes.fetch_add(1, SeqCst);
    }

    async fn publish(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.publications += 1;
        let target = self.shared.root.join("targets").join(format!(
            "{}-p{}",
            slot.name(),
            slot.publications
        ));
        let id = slot.volume_id();
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        };
        self.call(&id, req).await;
        self.shared.counts.publishes.fetch_add(1, SeqCst);
        let slot = &mut self.slots[i];
        slot.state = State::Published;
        slot.target = Some(target.clone());
        let source = self.shared.pool(slot.pool).dir.join(slot.token());
        if identity(&target) != identity(&source) {
            self.shared.unexpected(format!(
                "NodePublishVolume {id}: {} does not show the volume",
                target.display()
            ));
        }
        if self.slots[i].node_expand_due {
            self.node_expand(i).await;
        }
        self.write(i).await;
    }

    /// Writes new content into the volume through its target (no RPC).
    async fn write(&mut self, i: usize) {
        let n = self.rng.next_u64();
        let slot = &mut self.slots[i];
        let target = slot.target.clone().expect("published");
        let data = format!("{} wrote {n:016x}\n", slot.name()).into_bytes();
        let file = target.join("data");
        let bytes = data.clone();
        tokio::task::spawn_blocking(move || std::fs::write(file, bytes))
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("writing through {}: {e}", target.display()));
        slot.data = Some(data);
    }

    async fn unpublish(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let target = slot.target.clone().expect("published");
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        };
        self.call(&id, req).await;
        self.shared.counts.unpublishes.fetch_add(1, SeqCst);
        if !mounts_below(&target).is_empty() || std::fs::symlink_metadata(&target).is_ok() {
            self.shared.unexpected(format!(
                "NodeUnpublishVolume {id}: {} is still there or mounted",
                target.display()
            ));
        }
        let slot = &mut self.slots[i];
        slot.state = State::Created;
        slot.target = None;
    }

    async fn stats(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: slot.target.as_ref().unwrap().display().to_string(),
            staging_target_path: String::new(),
        };
        let r = self.call(&id, req).await;
        if r.usage.is_empty() || r.volume_condition.is_some_and(|c| c.abnormal) {
            self.shared
                .unexpected(format!("NodeGetVolumeStats {id}: bad answer"));
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
        if self.shared.node_expand.load(SeqCst) && self.rng.chance(1, 2) {
            self.expand(i).await;
        }
    }

    async fn validate(&mut self, i: usize) {
        let id = self.slots[i].volume_id();
        let req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.clone(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
            ..Default::default()
        };
        let r = self.call(&id, req).await;
        if r.confirmed.is_none() {
            self.shared.unexpected(format!(
                "ValidateVolumeCapabilities {id}: not confirmed: {}",
                r.message
            ));
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
    }

    /// ControllerExpandVolume (and NodeExpandVolume when published and
    /// the node asks for it); only reached when the driver advertises it.
    async fn expand(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let want = slot.capacity + MIB;
        let req = csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: want,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        };
        let r = self.call(&id, req).await;
        if r.capacity_bytes < want {
            self.shared.unexpected(format!(
                "ControllerExpandVolume {id}: {} bytes < {want}",
                r.capacity_bytes
            ));
        }
        self.slots[i].capacity = r.capacity_bytes.max(want);
        self.shared.counts.expands.fetch_add(1, SeqCst);
        if r.node_expansion_required {
            self.slots[i].node_expand_due = true;
            if self.slots[i].target.is_some() {
                self.node_expand(i).await;
            }
        }
    }

    /// NodeExpandVolume at the volume's target.
    async fn node_expand(&mut self, i: usize) {
        let slot = &self.slots[i];
        let id = slot.volume_id();
        let want = slot.capacity;
        let req = csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: slot.target.as_ref().unwrap().display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: want,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        };
        let r = self.call(&id, req).await;
        if r.capacity_bytes != 0 && r.capacity_bytes < want {
            self.shared.unexpected(format!(
                "NodeExpandVolume {id}: {} bytes < {want}",
                r.capacity_bytes
            ));
        }
        self.slots[i].node_expand_due = false;
        self.shared.counts.node_expands.fetch_add(1, SeqCst);
    }

    async fn read_only_call(&mut self) {
        let pools: Vec<&'static str> = self.shared.pools.iter().map(|p| p.name).collect();
        match self.rng.below(3) {
            0 => {
                let req = csi::ListVolumesRequest {
                    max_entries: self.rng.below(5) as i32,
                    starting_token: String::new(),
                };
                self.call("", req).await;
            }
            1 => {
                let pool = pools[self.rng.below(pools.len() as u64) as usize];
                let req = csi::GetCapacityRequest {
                    parameters: HashMap::from([("pool".into(), pool.into())]),
                    ..Default::default()
                };
                self.call(pool, req).await;
            }
            _ => {
                self.call("", csi::ProbeRequest {}).await;
            }
        }
        self.shared.counts.reads.fetch_add(1, SeqCst);
    }
}

pub fn identity(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

/// The inode of the socket file now (0 if there is none): it changes each
/// time a driver binds.
fn socket_inode(socket: &std::path::Path) -> u64 {
    std::fs::metadata(socket).map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m))
}
