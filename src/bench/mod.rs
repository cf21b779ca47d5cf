//! `hostpath-csi bench`: a load generator for any CSI driver's socket.

use std::process::ExitCode;

use clap::Args;

/// Flags of `hostpath-csi bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// CSI endpoint of the driver under test.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> ExitCode {
    let _ = args;
    eprintln!("bench: not implemented yet");
    ExitCode::FAILURE
}
