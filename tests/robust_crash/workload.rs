//! A client of the crash test: works through its volume slots (create,
//! publish, write, unpublish, delete; expand where offered), retrying every
//! call until it succeeds, as a CO does, and keeps the model of what the
//! driver acknowledged.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;
use csi_proto::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::MIB;
use crate::common::mount_cap;
use crate::model::*;
use crate::robust_support::{self, Rng, mounts_below};

pub struct Client {
    pub shared: Arc<Shared>,
    pub rng: Rng,
    /// The generation it was opened in, the socket file's inode just
    /// before it was opened, and the channel.
    pub channel: Option<(u64, u64, Channel)>,
    pub slots: Vec<Slot>,
    pub deleted: Vec<(String, String)>,
}

impl Client {
    /// Runs one call until it succeeds, reconnecting after crashes.
    /// Errors that no crash explains are recorded and retried too (a CO
    /// would), but a call that keeps failing that way fails the test.
    async fn call<T, F, Fut>(&mut self, what: &str, mut f: F) -> T
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
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
            let (socket, ch) = match &self.channel {
                Some((g, i, ch)) if *g == generation => (*i, ch.clone()),
                // Looked at before connecting: a connect that races a new
                // driver's bind counts as made to the old socket.
                _ => match (
                    socket_inode(&sh.socket),
                    robust_support::connect_once(&sh.socket).await,
                ) {
                    (i, Ok(ch)) => {
                        self.channel = Some((generation, i, ch.clone()));
                        (i, ch)
                    }
                    (_, Err(_)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                },
            };
            let rpc = what.split(' ').next().unwrap_or(what);
            sh.attempt(rpc, 1);
            let result = f(ch).await;
            sh.attempt(rpc, -1);
            match result {
                Ok(r) => {
                    if failed > 0 {
                        sh.counts.calls_retried.fetch_add(1, SeqCst);
                    }
                    return r.into_inner();
                }
                Err(s) => {
                    failed += 1;
                    sh.counts.failed_attempts.fetch_add(1, SeqCst);
                    self.channel = None;
                    // Odd: a kill is under way (see `Shared::generation`).
                    let now = sh.generation.load(SeqCst);
                    // Or the connection went to the socket of a driver that
                    // was already dead (the socket file has been replaced
                    // since): a process the killed driver had just forked
                    // keeps its listening socket until it execs, so a
                    // connect can land there and is reset when it does.
                    let to_dead_driver = socket_inode(&sh.socket) != socket;
                    let crashed = now != generation || now % 2 == 1 || to_dead_driver;
                    let retryable = matches!(s.code(), Code::Unavailable | Code::Aborted);
                    // A connection that broke under the call with no kill
                    // around it is a violation too: a kubelet would see a
                    // failed mount (a driver that died by itself is also
                    // caught at the next kill).
                    let transport =
                        s.code() == Code::Unknown && s.message().starts_with("transport error");
                    if transport && to_dead_driver && now == generation && now.is_multiple_of(2) {
                        eprintln!(
                            "{what}: transport error on a connection made to a dead driver's socket"
                        );
                    }
                    if transport && !crashed {
                        sh.counts.transport_errors.fetch_add(1, SeqCst);
                    }
                    if !crashed && !retryable {
                        unexplained += 1;
                        sh.unexpected(format!("{what}: {:?}: {}", s.code(), s.message()));
                        assert!(unexplained < 20, "{what} keeps failing: {s:?}");
                    }
                    let pause = 2 + self.rng.below(15);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
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
        let r = self
            .call(&format!("CreateVolume {name}"), |ch| {
                let req = req.clone();
                async move { ControllerClient::new(ch).create_volume(req).await }
            })
            .await;
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
        self.call(&format!("DeleteVolume {id}"), |ch| {
            let req = req.clone();
            async move { ControllerClient::new(ch).delete_volume(req).await }
        })
        .await;
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
        self.call(&format!("NodePublishVolume {id}"), |ch| {
            let req = req.clone();
            async move { NodeClient::new(ch).node_publish_volume(req).await }
        })
        .await;
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
        self.call(&format!("NodeUnpublishVolume {id}"), |ch| {
            let req = req.clone();
            async move { NodeClient::new(ch).node_unpublish_volume(req).await }
        })
        .await;
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
        let r = self
            .call(&format!("NodeGetVolumeStats {id}"), |ch| {
                let req = req.clone();
                async move { NodeClient::new(ch).node_get_volume_stats(req).await }
            })
            .await;
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
        let r = self
            .call(&format!("ValidateVolumeCapabilities {id}"), |ch| {
                let req = req.clone();
                async move {
                    ControllerClient::new(ch)
                        .validate_volume_capabilities(req)
                        .await
                }
            })
            .await;
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
        let r = self
            .call(&format!("ControllerExpandVolume {id}"), |ch| {
                let req = req.clone();
                async move {
                    ControllerClient::new(ch)
                        .controller_expand_volume(req)
                        .await
                }
            })
            .await;
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
        let r = self
            .call(&format!("NodeExpandVolume {id}"), |ch| {
                let req = req.clone();
                async move { NodeClient::new(ch).node_expand_volume(req).await }
            })
            .await;
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
                let max_entries = self.rng.below(5) as i32;
                self.call("ListVolumes", |ch| async move {
                    ControllerClient::new(ch)
                        .list_volumes(csi::ListVolumesRequest {
                            max_entries,
                            starting_token: String::new(),
                        })
                        .await
                })
                .await;
            }
            1 => {
                let pool = pools[self.rng.below(pools.len() as u64) as usize];
                self.call("GetCapacity", |ch| async move {
                    ControllerClient::new(ch)
                        .get_capacity(csi::GetCapacityRequest {
                            parameters: HashMap::from([("pool".into(), pool.into())]),
                            ..Default::default()
                        })
                        .await
                })
                .await;
            }
            _ => {
                self.call("Probe", |ch| async move {
                    IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
                })
                .await;
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
