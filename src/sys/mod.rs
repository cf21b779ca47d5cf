//! The only place the driver talks to the kernel about mounts, durable
//! file writes and btrfs quotas, and runs external storage tools (`cmd`);
//! also the locks that keep a pool to one driver (`lock`) and the look at
//! an existing socket (`socket`).
//! Everything here is blocking; callers run it inside
//! `tokio::task::spawn_blocking`.

pub mod btrfs;
pub(crate) mod caps;
pub mod cmd;
pub(crate) mod copy;
pub(crate) mod fs;
pub mod lock;
pub(crate) mod loopdev;
pub mod mount;
pub mod mountinfo;
pub(crate) mod socket;
