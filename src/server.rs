//! Binding the socket and serving the three CSI services until shutdown.
//!
//! [`run`] takes the listener and the shutdown signal from its caller, so
//! the integration tests drive exactly the code path the binary uses, on a
//! socket in a temporary directory.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::endpoint::EndpointError;
use crate::grpc::authority::AuthorityFix;
use crate::grpc::group_controller::GroupController;
use crate::grpc::{Shared, controller::Controller, identity::Identity, node::Node};
use crate::metrics::{AsVolumes, Metrics, RpcLayer};
use crate::volume::Volumes;
use csi_proto as csi;

/// How long to wait before retrying pools that could not be opened (a disk
/// that is mounted late, say).
const OPEN_RETRY: Duration = Duration::from_secs(3);

/// Binds the CSI socket (see [`crate::endpoint::bind`]: a socket a live
/// driver serves is refused, a dead one replaced), for callers that never
/// remove it; the binary uses `endpoint::bind`, whose [`crate::endpoint::SocketFile`]
/// removes the socket at exit only while it is still its own.
pub fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    crate::endpoint::bind(path).map(|s| s.listener)
}

/// Serves Identity, Controller, Node and GroupController on `listener`
/// until `shutdown`
/// completes, then finishes in-flight calls and returns.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    run_with_metrics(config, listener, shutdown, Metrics::new(false), None).await
}

/// [`run`], counting every call in `metrics`, and serving them on
/// `metrics_listener` (`GET /metrics`) when given.
pub async fn run_with_metrics(
    config: Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
    metrics: Arc<Metrics>,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<(), tonic::transport::Error> {
    let shared = Shared::new(config);
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(l) = metrics_listener {
        let s = Arc::clone(&shared);
        tokio::spawn(crate::metrics::serve(
            l,
            Arc::clone(&metrics),
            move || Some(Arc::clone(&s) as Arc<dyn AsVolumes>),
            async {
                let _ = metrics_stopped.await;
            },
        ));
    }
    tokio::spawn(open_pools(Arc::clone(&shared)));
    tracing::info!(
        driver = %shared.config.driver_name,
        node = %shared.config.node_id,
        pools = shared.config.pools.len(),
        socket = %shared.config.socket.display(),
        "serving CSI on {}",
        shared.config.socket.display()
    );
    let (reflection, reflection_alpha) = reflection();
    let served = tonic::transport::Server::builder()
        .layer(RpcLayer(metrics))
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(csi::identity_server::IdentityServer::new(Identity::new(
            Arc::clone(&shared),
        )))
        .add_service(csi::controller_server::ControllerServer::new(
            Controller::new(Arc::clone(&shared)),
        ))
        .add_service(csi::node_server::NodeServer::new(Node::new(Arc::clone(
            &shared,
        ))))
        .add_service(csi::group_controller_server::GroupControllerServer::new(
            GroupController::new(Arc::clone(&shared)),
        ))
        .serve_with_incoming_shutdown(
            // Clients that send their socket path as :authority (grpcio,
            // grpc-java) would be refused by h2 otherwise (grpc::authority).
            UnixListenerStream::new(listener).map(|conn| conn.map(AuthorityFix::new)),
            shutdown,
        )
        .await;
    let _ = stop_metrics.send(());
    served
}

impl AsVolumes for Shared {
    fn volumes(&self) -> Option<&Volumes> {
        self.volumes.get()
    }
}

/// Opens the pools (retrying until it works), then sweeps leftovers of
/// interrupted calls. Probe turns ready as soon as the pools are open.
async fn open_pools(shared: Arc<Shared>) {
    // The same reason again (another driver still holds a pool, say) is
    // logged at debug: once at error says it, every 3 s would bury the log.
    let mut last = String::new();
    loop {
        if let Some(why) = crate::sys::caps::mount_privilege_missing() {
            if why != last {
                tracing::error!("{why}; not ready");
                last = why;
            }
            tokio::time::sleep(OPEN_RETRY).await;
            continue;
        }
        let s = Arc::clone(&shared);
        let res =
            tokio::task::spawn_blocking(move || Volumes::open(&s.config.pools, &s.config.node_id))
                .await;
        let reason = match res {
            Ok(Ok(volumes)) => {
                let _ = shared.volumes.set(volumes);
                break;
            }
            Ok(Err(e)) => format!("cannot open pools: {e}"),
            Err(e) => format!("opening pools panicked: {e}"),
        };
        if reason == last {
            tracing::debug!("{reason}; retrying");
        } else {
            tracing::error!("{reason}; retrying every {OPEN_RETRY:?}, not ready until then");
            last = reason;
        }
        tokio::time::sleep(OPEN_RETRY).await;
    }
    tracing::info!("pools open; ready");
    let s = Arc::clone(&shared);
    let swept = tokio::task::spawn_blocking(move || s.volumes.get().map(Volumes::sweep)).await;
    match swept {
        Ok(None | Some(Ok(0))) => {}
        Ok(Some(Ok(n))) => tracing::info!(count = n, "removed leftovers of interrupted calls"),
        Ok(Some(Err(e))) => tracing::warn!(error = %e, "sweeping leftovers failed"),
        Err(e) => tracing::warn!(error = %e, "sweeping leftovers panicked"),
    }
    let weak = Arc::downgrade(&shared);
    drop(shared);
    sweep_trash(weak).await;
}

/// Removes archived volumes whose retention ran out: at start, then
/// whenever the next one expires (at least every `SWEEP_EVERY`). Holds the
/// driver's state only while sweeping, and stops once the server has
/// stopped (its pools, and their locks, must go with it).
async fn sweep_trash(shared: std::sync::Weak<Shared>) {
    use crate::volume::SWEEP_EVERY;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let swept =
            tokio::task::spawn_blocking(move || s.volumes.get().map(Volumes::purge_trash)).await;
        let wait = match swept {
            Ok(Some(Ok(s))) => s
                .next_in
                .map_or(SWEEP_EVERY, |n| Duration::from_secs(n).min(SWEEP_EVERY)),
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "sweeping the trash failed; retrying");
                SWEEP_EVERY
            }
            Ok(None) => SWEEP_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "sweeping the trash panicked; retrying");
                SWEEP_EVERY
            }
        };
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
    }
}

/// gRPC server reflection of the CSI services (v1, and v1alpha for older
/// clients), so that `grpcurl -unix SOCKET list` and calls by hand work
/// without a copy of `csi.proto`. It describes every service of
/// `csi.proto`, also the one the driver does not serve (SnapshotMetadata:
/// it answers UNIMPLEMENTED); it reads no volume and changes nothing.
fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(csi::FILE_DESCRIPTOR_SET)
    };
    // The descriptor set is generated at build time from csi.proto; a
    // unit test builds both services from it.
    (
        builder()
            .build_v1()
            .expect("the CSI descriptor set built into the driver is valid"),
        builder()
            .build_v1alpha()
            .expect("the CSI descriptor set built into the driver is valid"),
    )
}

#[cfg(test)]
mod reflection_tests {
    #[test]
    fn the_built_in_descriptor_set_makes_a_reflection_service() {
        let _ = super::reflection();
    }
}
