//! The `hostpath-csi` binary: parse flags, start logging, serve.

use std::process::ExitCode;

use clap::Parser;
use hostpath_csi::config::{Cli, Command};
use hostpath_csi::{init_logging, server};

/// How long in-flight calls may run on after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        // The load generator runs on one thread: a sequential caller gains
        // nothing from more, and every hop between threads (on a VM, a
        // wake-up of an idle vCPU) would be added to the driver's figures.
        // Measured here: +0.2 ms on each CreateVolume with a multi-thread
        // client. Concurrent scenarios stay concurrent (tasks, not threads).
        Some(Command::Bench(args)) => {
            return runtime(tokio::runtime::Builder::new_current_thread())
                .block_on(hostpath_csi::bench::run(args));
        }
        None => cli.serve,
    };
    runtime(tokio::runtime::Builder::new_multi_thread()).block_on(serve(args))
}

fn runtime(mut builder: tokio::runtime::Builder) -> tokio::runtime::Runtime {
    builder
        .enable_all()
        .build()
        .expect("starting the tokio runtime")
}

async fn serve(args: hostpath_csi::config::ServeArgs) -> ExitCode {
    init_logging(args.log_format, &args.log_level);
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match server::bind(&config.socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.socket.display());
            return ExitCode::FAILURE;
        }
    };
    let socket = config.socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = server::run(config, listener, async {
        let _ = stopped.await;
    });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        () = shutdown_signal() => {
            let _ = stop.send(());
            // Calls in flight get a grace period; a client that keeps its
            // connection open must not keep the driver from stopping.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting");
                    Ok(())
                }
            }
        }
    };
    let _ = std::fs::remove_file(&socket);
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (what Kubernetes sends) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
