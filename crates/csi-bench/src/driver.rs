//! The driver under test: its CSI clients, what it advertises, and (when
//! the tool starts it) its process: start, time to first Probe, stop, RSS.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

use csi_proto as csi;
use csi_proto::controller_client::ControllerClient;
use csi_proto::identity_client::IdentityClient;
use csi_proto::node_client::NodeClient;

use crate::error::Error;

/// The three CSI clients over one connection.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Identity service.
    pub identity: IdentityClient<Channel>,
    /// Controller service.
    pub controller: ControllerClient<Channel>,
    /// Node service.
    pub node: NodeClient<Channel>,
}

impl Clients {
    /// Clients over an open channel.
    pub fn new(channel: Channel) -> Self {
        Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }
}

/// What the driver advertises, and so what the bench may ask of it.
#[derive(Debug, Clone, Default)]
pub struct Caps {
    /// GetPluginInfo name.
    pub name: String,
    /// GetPluginInfo vendor_version.
    pub version: String,
    /// CONTROLLER_SERVICE plugin capability.
    pub controller_service: bool,
    /// CREATE_DELETE_VOLUME.
    pub create_delete: bool,
    /// LIST_VOLUMES.
    pub list_volumes: bool,
    /// PUBLISH_UNPUBLISH_VOLUME (ControllerPublish before staging).
    pub controller_publish: bool,
    /// CREATE_DELETE_SNAPSHOT.
    pub snapshots: bool,
    /// Whether NodeGetCapabilities answered (a node service exists).
    pub node_service: bool,
    /// STAGE_UNSTAGE_VOLUME.
    pub stage: bool,
    /// GET_VOLUME_STATS.
    pub stats: bool,
    /// NodeGetInfo node_id.
    pub node_id: String,
    /// NodeGetInfo accessible_topology segments.
    pub topology: Option<HashMap<String, String>>,
}

impl Caps {
    /// Whether the driver makes and removes volumes (CONTROLLER_SERVICE
    /// with CREATE_DELETE_VOLUME).
    pub fn creates_volumes(&self) -> bool {
        self.controller_service && self.create_delete
    }

    /// Asks the driver. Only GetPluginInfo must answer; a service that does
    /// not answer counts as absent.
    pub async fn discover(c: &Clients, timeout: Duration) -> Result<Caps, Error> {
        use csi::controller_service_capability::{Type as CType, rpc::Type as CRpc};
        use csi::node_service_capability::{Type as NType, rpc::Type as NRpc};
        use csi::plugin_capability::{Type as PType, service::Type as PService};

        let mut caps = Caps::default();
        let info = bounded(
            timeout,
            c.identity
                .clone()
                .get_plugin_info(csi::GetPluginInfoRequest {}),
        )
        .await
        .map_err(|e| Error::PluginInfo(Box::new(e)))?;
        caps.name = info.name;
        caps.version = info.vendor_version;

        if let Ok(r) = bounded(
            timeout,
            c.identity
                .clone()
                .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}),
        )
        .await
        {
            caps.controller_service = r.capabilities.iter().any(|p| {
                matches!(&p.r#type, Some(PType::Service(s)) if s.r#type == PService::ControllerService as i32)
            });
        }
        if caps.controller_service
            && let Ok(r) = bounded(
                timeout,
                c.controller
                    .clone()
                    .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
            )
            .await
        {
            let has = |t: CRpc| {
                r.capabilities
                    .iter()
                    .any(|c| matches!(&c.r#type, Some(CType::Rpc(r)) if r.r#type == t as i32))
            };
            caps.create_delete = has(CRpc::CreateDeleteVolume);
            caps.list_volumes = has(CRpc::ListVolumes);
            caps.controller_publish = has(CRpc::PublishUnpublishVolume);
            caps.snapshots = has(CRpc::CreateDeleteSnapshot);
        }
        if let Ok(r) = bounded(
            timeout,
            c.node
                .clone()
                .node_get_capabilities(csi::NodeGetCapabilitiesRequest {}),
        )
        .await
        {
            let has = |t: NRpc| {
                r.capabilities
                    .iter()
                    .any(|c| matches!(&c.r#type, Some(NType::Rpc(r)) if r.r#type == t as i32))
            };
            caps.node_service = true;
            caps.stage = has(NRpc::StageUnstageVolume);
            caps.stats = has(NRpc::GetVolumeStats);
        }
        if caps.node_service
            && let Ok(r) = bounded(
                timeout,
                c.node.clone().node_get_info(csi::NodeGetInfoRequest {}),
            )
            .await
        {
            caps.node_id = r.node_id;
            caps.topology = r.accessible_topology.map(|t| t.segments);
        }
        Ok(caps)
    }
}

/// Runs one RPC with a time limit.
pub async fn bounded<T>(
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(Error::Status(s)),
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

/// Opens a connection, bounded in time.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, Error> {
    match tokio::time::timeout(timeout, csi::connect(endpoint)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(source)) => Err(Error::Connect {
            endpoint: endpoint.to_string(),
            source,
        }),
        Err(_) => Err(Error::ConnectTimeout {
            endpoint: endpoint.to_string(),
            timeout,
        }),
    }
}

/// A driver process the bench started from `--driver-cmd`.
#[derive(Debug)]
pub struct Managed {
    cmd: String,
    log: Option<PathBuf>,
    child: Option<Child>,
}

/// How often Probe is retried while waiting for a starting driver.
const PROBE_POLL: Duration = Duration::from_millis(1);

impl Managed {
    /// A driver to be started with `sh -c "exec CMD"`; its output goes to
    /// `log` (or nowhere).
    pub fn new(cmd: &str, log: Option<&Path>) -> Self {
        Managed {
            cmd: cmd.to_string(),
            log: log.map(Path::to_path_buf),
            child: None,
        }
    }

    /// The running driver's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the driver and polls Probe on `endpoint` until it answers
    /// ready, returning the time from spawn to that answer and a channel.
    pub async fn start(
        &mut self,
        endpoint: &str,
        limit: Duration,
    ) -> Result<(Duration, Channel), Error> {
        if self.child.is_some() {
            return Err(Error::AlreadyRunning);
        }
        let (out, err) = match &self.log {
            Some(p) => {
                let log_error = |source| Error::DriverLog {
                    path: p.clone(),
                    source,
                };
                let f = File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(log_error)?;
                let f2 = f.try_clone().map_err(log_error)?;
                (Stdio::from(f), Stdio::from(f2))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let started = Instant::now();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {}", self.cmd))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C at the terminal reaches the
            // bench, which still needs the driver to clean up.
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: self.cmd.clone(),
                source,
            })?;
        self.child = Some(child);
        let deadline = started + limit;
        let mut channel = None;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(Error::ExitedAtStartup(status));
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady(limit));
            }
            if channel.is_none() {
                channel = csi::connect(endpoint).await.ok();
            }
            if let Some(ch) = &channel {
                let mut id = IdentityClient::new(ch.clone());
                match tokio::time::timeout(Duration::from_secs(1), id.probe(csi::ProbeRequest {}))
                    .await
                {
                    // An unset `ready` means ready (CSI spec, Probe).
                    Ok(Ok(r)) if r.get_ref().ready != Some(false) => {
                        return Ok((started.elapsed(), ch.clone()));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) | Err(_) => channel = None,
                }
            }
            tokio::time::sleep(PROBE_POLL).await;
        }
    }

    /// Stops the driver: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Result<(), Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().map_err(Error::Wait)?.is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(Error::IgnoredSigterm(grace))
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // Last resort (a panic, say): never leave the driver running.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Resident and peak resident memory of a process, in KiB, from
/// /proc/PID/status.
pub fn memory_kib(pid: u32) -> io::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(parse_memory(&status))
}

fn parse_memory(status: &str) -> (u64, u64) {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrss_and_vmhwm() {
        let s = "Name:\tx\nVmHWM:\t    9000 kB\nVmRSS:\t    7000 kB\nThreads:\t3\n";
        assert_eq!(parse_memory(s), (7000, 9000));
        assert_eq!(parse_memory(""), (0, 0));
    }
}
