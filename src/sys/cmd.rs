//! Running the external storage tools (`btrfs`, `mkfs.*`, `losetup`,
//! `resize2fs`, `xfs_growfs`) with errors that say what was run and what it
//! printed.
//!
//! Volume logic never builds command lines itself: the backends call the
//! small helpers here, so every command runs the same way (no shell, fixed
//! locale, stdin closed) and every failure carries the command and its
//! stderr, which is usually the only useful explanation.

use std::ffi::OsStr;
use std::io;
use std::process::{Command, Stdio};

/// A tool that could not be run, or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program is not on this node's `PATH`.
    #[error("`{program}` is not installed on this node{}", package_hint(program))]
    NotInstalled {
        /// The program's name.
        program: String,
    },
    /// The program exists but could not be started.
    #[error("starting `{command}`: {source}")]
    Start {
        /// The command line.
        command: String,
        /// Why not.
        source: io::Error,
    },
    /// It ran and exited unsuccessfully.
    #[error(transparent)]
    Failed(#[from] Failure),
}

/// What a finished command printed on its standard output, lossily
/// decoded (what it printed on stderr matters only when it fails).
#[derive(Debug, Clone, Default)]
pub(crate) struct Output {
    /// Standard output.
    pub(crate) stdout: String,
}

/// A command that exited unsuccessfully: what was run and what it said.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The command line, for messages.
    pub(crate) command: String,
    /// Exit code, if it exited (rather than being killed by a signal).
    pub(crate) code: Option<i32>,
    /// What it printed on stderr (trimmed).
    pub(crate) stderr: String,
    /// What it printed on stdout (trimmed).
    pub(crate) stdout: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = match self.code {
            Some(c) => format!("exited with {c}"),
            None => "was killed by a signal".to_string(),
        };
        let said = if !self.stderr.is_empty() {
            &self.stderr
        } else {
            &self.stdout
        };
        if said.is_empty() {
            write!(f, "`{}` {status}", self.command)
        } else {
            write!(f, "`{}` {status}: {said}", self.command)
        }
    }
}

impl std::error::Error for Failure {}

/// Runs `program args...` and returns what it printed, or a [`Failure`]
/// (as `Ok(Err(..))`) when it exits non-zero, for callers that look at
/// what it said; `Err` when it cannot be started at all (a missing program:
/// the message names the package).
pub(crate) fn run_raw<I, S>(program: &str, args: I) -> Result<Result<Output, Failure>, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(%command, "running");
    // A tool must not outlive a driver killed while waiting for it: a
    // `losetup` left running would race the retried call and attach a
    // second loop device. `setpriv --pdeathsig KILL` (util-linux) has the
    // kernel kill the tool when the driver dies, without unsafe code here.
    let mut cmd = if has_setpriv() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let not_installed = || CmdError::NotInstalled {
        program: program.to_string(),
    };
    let out = cmd
        .args(&args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => not_installed(),
            _ => CmdError::Start {
                command: command.clone(),
                source: e,
            },
        })?;
    // setpriv's "cannot execute" exit status.
    if out.status.code() == Some(127) && has_setpriv() {
        return Err(not_installed());
    }
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(Ok(Output { stdout }))
    } else {
        Ok(Err(Failure {
            command,
            code: out.status.code(),
            stderr: stderr.trim().to_string(),
            stdout: stdout.trim().to_string(),
        }))
    }
}

/// Runs a command that must succeed; a non-zero exit is a
/// [`CmdError::Failed`] carrying the command line and its stderr.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<Output, CmdError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Ok(run_raw(program, args)??)
}

fn package_hint(program: &str) -> &'static str {
    match program {
        "btrfs" => " (Debian/Ubuntu package btrfs-progs)",
        "mkfs.ext4" | "resize2fs" | "e2fsck" => " (package e2fsprogs)",
        "mkfs.xfs" | "xfs_growfs" => " (package xfsprogs)",
        "losetup" => " (package util-linux, or mount on older releases)",
        _ => "",
    }
}

/// Whether `setpriv` is on the PATH (looked up once).
fn has_setpriv() -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FOUND.get_or_init(|| {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join("setpriv").is_file()))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_carry_the_command_and_its_stderr() {
        let f = run("sh", ["-c", "echo oops >&2; exit 3"]).unwrap_err();
        let msg = f.to_string();
        assert!(
            msg.contains("sh -c") && msg.contains("exited with 3"),
            "{msg}"
        );
        assert!(msg.contains("oops"), "{msg}");
        assert_eq!(run("echo", ["hi"]).unwrap().stdout, "hi\n");
        let missing = run("hostpath-csi-no-such-tool", ["x"]).unwrap_err();
        assert!(
            matches!(missing, CmdError::NotInstalled { .. }),
            "{missing}"
        );
        assert!(
            missing.to_string().contains("is not installed"),
            "{missing}"
        );
    }
}
