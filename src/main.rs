//! The `hostpath-csi` binary: parse the command line, start logging, bind
//! the socket, serve until SIGTERM; beside the CSI services, the kubelet
//! registration socket, /healthz and the orphan scan when asked for.

mod cli;
mod listing;
mod orphans_cmd;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat, ServeArgs};
use hostpath_csi::{endpoint, healthz, kubelet, server};

/// How long in-flight calls may run on after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Volumes(args)) => return listing::volumes(&args),
        Some(Command::Orphans(args)) => return orphans_cmd::orphans(&args),
        None => cli.serve,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("starting the tokio runtime")
        .block_on(serve(args))
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format, &args.log_level);
    // Catch SIGTERM before anything is bound or served: until the handler
    // is installed, SIGTERM kills the process outright, and the kubelet
    // can be talking to the registration socket (served from another
    // thread) while this task is still setting up the CSI server.
    let shutdown = match ShutdownSignals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("installing the SIGTERM and SIGINT handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let resolved = args.resolve().and_then(|config| {
        let registration = args.registration(&config)?;
        let healthz = args.healthz_address()?;
        Ok((config, registration, healthz))
    });
    let (config, registration, healthz_addr) = match resolved {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let endpoint::Socket { listener, file } = match endpoint::bind(&config.socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.socket.display());
            return ExitCode::FAILURE;
        }
    };
    let socket = config.socket.clone();
    // The kubelet registration socket and /healthz stop with the driver.
    let (stop_extras, extras_stopped) = tokio::sync::watch::channel(false);
    let stopped_signal = || {
        let mut rx = extras_stopped.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut extras = tokio::task::JoinSet::new();
    if let Some(addr) = healthz_addr {
        match healthz::bind(addr).await {
            Ok(l) => {
                extras.spawn(healthz::serve(l, socket.clone(), stopped_signal()));
            }
            Err(e) => {
                tracing::error!("{e}");
                file.remove();
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(registration) = registration {
        match kubelet::bind(&registration) {
            Ok(reg_socket) => {
                let stopped = stopped_signal();
                extras.spawn(async move {
                    if let Err(e) = kubelet::serve(registration, reg_socket, stopped).await {
                        // The CSI services go on; the kubelet just cannot
                        // find the driver until it restarts.
                        tracing::error!("kubelet registration stopped: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("kubelet registration: {e}");
                file.remove();
                return ExitCode::FAILURE;
            }
        }
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = hostpath_csi::metrics::Metrics::new(!args.no_volume_metrics);
    let metrics_listener = match args.metrics_address() {
        Ok(None) => None,
        Ok(Some(addr)) => match hostpath_csi::metrics::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        },
        Err(e) => {
            tracing::error!("configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(scan) = args.orphan_scan(&config) {
        tracing::info!(every = ?scan.every, "orphan scan on");
        extras.spawn(hostpath_csi::orphans::scan::run(
            scan,
            std::sync::Arc::clone(&metrics),
            stopped_signal(),
        ));
    }
    let server = server::run_with_metrics(
        config,
        listener,
        async {
            let _ = stopped.await;
        },
        metrics,
        metrics_listener,
    );
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        () = shutdown.recv() => {
            // Deregister from the kubelet before the CSI socket goes.
            let _ = stop_extras.send(true);
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
    let _ = stop_extras.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, extras.join_all()).await;
    // Only while it is still ours: a driver started meanwhile on a socket
    // it found dead keeps its own.
    file.remove();
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

/// Sets up logging to stderr in the chosen format, filtered by `filter`
/// (tracing's syntax; an unparsable filter falls back to `info`).
fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, a pipe or
    // a container log they are noise that grep trips over.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// SIGTERM (what Kubernetes sends) and SIGINT, caught from the moment
/// [`ShutdownSignals::install`] returns.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Completes when either signal arrives (also one that came before
    /// this was first awaited).
    async fn recv(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}
