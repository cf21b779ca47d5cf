//! The driver's error type and its single mapping onto gRPC status codes.
//!
//! Volume logic returns these; the gRPC layer converts them with `?`. Each
//! variant names the CSI status code it stands for, so the choice of code is
//! made once, where the error is raised, with the spec section in mind.

use tonic::{Code, Status};

/// Everything that can go wrong in a CSI call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a value is malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume (or its path) does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// A volume of that name exists with incompatible settings, or it is
    /// already published incompatibly (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// Another call on the same volume is in flight, or a paging token is
    /// not ours (ABORTED; the CO retries).
    #[error("{0}")]
    Aborted(String),
    /// The capacity range cannot be met by this pool (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space, or topology that this node cannot satisfy
    /// (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The call is valid but the volume or target is in a state that
    /// forbids it (FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The driver is not ready to serve yet (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A capability this driver does not offer (UNIMPLEMENTED).
    #[error("{0}")]
    Unimplemented(String),
    /// An operating-system call failed unexpectedly (INTERNAL).
    #[error("{context}: {source}")]
    Io {
        /// What the driver was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A bug or impossible state (INTERNAL).
    #[error("{0}")]
    Internal(String),
}

/// Shorthand for results of volume logic.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what the driver was doing at the time.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Io { source, .. } if is_no_space(source) => Code::ResourceExhausted,
            Error::Io { .. } | Error::Internal(_) => Code::Internal,
        }
    }
}

/// ENOSPC and EDQUOT mean "the disk is full", which the CO should hear as
/// RESOURCE_EXHAUSTED rather than an internal failure.
fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == nix::errno::Errno::ENOSPC as i32 || c == nix::errno::Errno::EDQUOT as i32
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("worker task failed: {e}"))
    }
}
