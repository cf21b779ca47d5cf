//! What can go wrong in a bench run, named by cause.
//!
//! A failed call is not the end of a run: its message goes into the
//! report (the first few per operation) and the run goes on, so every
//! variant's text says what was asked and what the driver or the system
//! answered.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// An error of the bench.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver answered a call with an error status.
    #[error("{:?}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// A call got no answer within `--rpc-timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// CreateVolume succeeded but its answer carried no volume.
    #[error("CreateVolume answered without a volume")]
    NoVolume,
    /// CreateSnapshot succeeded but its answer carried no snapshot.
    #[error("CreateSnapshot answered without a snapshot")]
    NoSnapshot,
    /// GetPluginInfo, the one call every driver must answer, failed.
    #[error("GetPluginInfo: {0}")]
    PluginInfo(Box<Error>),
    /// No connection could be opened to the endpoint.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// Why not.
        source: tonic::transport::Error,
    },
    /// Opening the connection took longer than `--rpc-timeout`.
    #[error("connecting to {endpoint}: no answer within {timeout:?}")]
    ConnectTimeout {
        /// The endpoint as given.
        endpoint: String,
        /// The limit.
        timeout: Duration,
    },
    /// `start` was called while the driver the bench started still runs.
    #[error("the driver is already running")]
    AlreadyRunning,
    /// The `--driver-log` file could not be opened.
    #[error("opening {path}: {source}")]
    DriverLog {
        /// The file.
        path: PathBuf,
        /// Why not.
        source: io::Error,
    },
    /// The `--driver-cmd` could not be started.
    #[error("starting {command:?}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why not.
        source: io::Error,
    },
    /// The started driver exited before it answered Probe ready.
    #[error("the driver exited during startup: {0}")]
    ExitedAtStartup(ExitStatus),
    /// The started driver did not answer Probe ready within
    /// `--startup-timeout`.
    #[error("the driver did not answer Probe ready within {0:?}")]
    NotReady(Duration),
    /// Waiting for the stopped driver to exit failed.
    #[error("waiting for the driver to exit: {0}")]
    Wait(io::Error),
    /// The driver did not exit on SIGTERM within the grace time and was
    /// killed.
    #[error("the driver ignored SIGTERM for {0:?}; killed it")]
    IgnoredSigterm(Duration),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(s)
    }
}
