//! The only place the driver talks to the kernel about mounts and durable
//! file writes, and runs external storage tools (`cmd`). Everything here is blocking; callers run it inside
//! `tokio::task::spawn_blocking`.

pub mod cmd;
pub(crate) mod fs;
pub mod mount;
pub mod mountinfo;
