//! The gRPC layer: thin adapters from CSI messages to the volume logic.
//!
//! Each handler parses its request into a typed one (`validate`), runs the
//! volume logic on the blocking pool, and converts the answer back; errors
//! become status codes in one place (`status`). No handler logs a whole
//! request: CSI requests can carry secrets.

pub(crate) mod authority;
pub(crate) mod controller;
pub(crate) mod group_controller;
pub(crate) mod identity;
pub(crate) mod node;
mod status;

use std::sync::{Arc, OnceLock};

use tonic::Status;

use crate::config::Config;
use crate::volume::{VolumeError, Volumes};

/// Why a call got no answer from the volume logic.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The pools are not open yet.
    #[error("the driver is still opening its pools; retry shortly")]
    NotReady,
    /// The blocking task running the call panicked.
    #[error("worker task failed: {0}")]
    Worker(#[from] tokio::task::JoinError),
    /// The volume logic failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// ControllerExpandVolume on a driver that grows volumes on their node.
    #[error(
        "this driver runs with --expansion=node: volumes grow in NodeExpandVolume on the node that holds them, and ControllerExpandVolume is not offered"
    )]
    ExpansionOnNode,
}

/// State shared by the three services.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Resolved configuration.
    pub(crate) config: Config,
    /// The volumes, once the pools are open. Until then Probe reports not
    /// ready and other calls answer UNAVAILABLE.
    pub(crate) volumes: OnceLock<Volumes>,
}

impl Shared {
    /// New state with pools not yet opened.
    pub(crate) fn new(config: Config) -> Arc<Self> {
        Arc::new(Shared {
            config,
            volumes: OnceLock::new(),
        })
    }

    /// The opened volumes, or [`CallError::NotReady`].
    pub(crate) fn volumes(&self) -> Result<&Volumes, CallError> {
        self.volumes.get().ok_or(CallError::NotReady)
    }
}

/// Runs volume logic on the blocking pool and maps its error to a status.
pub(crate) async fn blocking<T, F>(shared: &Arc<Shared>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Volumes) -> Result<T, VolumeError> + Send + 'static,
{
    let shared = Arc::clone(shared);
    let res =
        tokio::task::spawn_blocking(move || -> Result<T, CallError> { Ok(f(shared.volumes()?)?) })
            .await
            .map_err(CallError::from)?;
    Ok(res?)
}
