//! The gRPC layer: thin adapters from CSI messages to the volume logic.
//!
//! Each handler checks and converts its request (`validate`), runs the
//! volume logic on the blocking pool, and converts the answer back. No
//! handler logs a whole request: CSI requests can carry secrets.

pub mod controller;
pub mod identity;
pub mod node;

use std::sync::{Arc, OnceLock};

use tonic::Status;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::volume::Volumes;

/// State shared by the three services.
#[derive(Debug)]
pub struct Shared {
    /// Resolved configuration.
    pub config: Config,
    /// The volumes, once the pools are open. Until then Probe reports not
    /// ready and other calls answer UNAVAILABLE.
    pub volumes: OnceLock<Volumes>,
}

impl Shared {
    /// New state with pools not yet opened.
    pub fn new(config: Config) -> Arc<Self> {
        Arc::new(Shared {
            config,
            volumes: OnceLock::new(),
        })
    }

    /// The opened volumes, or UNAVAILABLE.
    pub fn volumes(&self) -> Result<&Volumes> {
        self.volumes.get().ok_or_else(|| {
            Error::Unavailable("the driver is still opening its pools; retry shortly".into())
        })
    }
}

/// Runs volume logic on the blocking pool and maps its error to a status.
pub async fn blocking<T, F>(shared: &Arc<Shared>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&Volumes) -> Result<T> + Send + 'static,
{
    let shared = Arc::clone(shared);
    let res = tokio::task::spawn_blocking(move || f(shared.volumes()?))
        .await
        .map_err(Error::from)?;
    res.map_err(Status::from)
}
