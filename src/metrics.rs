//! Prometheus metrics: per-RPC counts and latencies (a tower layer around
//! the gRPC server), per pool space and volume counts, per volume used
//! bytes, and orphan counts (filled by the orphan report), served as
//! OpenMetrics text on `GET /metrics` when `--metrics-address` is given.
//!
//! The RPC figures are counted always (an atomic add per call); the pool
//! and volume figures are read when scraped, from the read-only inventory
//! (`volume::inventory`), so a scrape never changes anything and costs
//! nothing between scrapes. Metric names follow the Prometheus
//! conventions: a `hostpath_csi_` prefix, base units in the name
//! (`_seconds`, `_bytes`), `_total` on counters.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::codegen::http;

use crate::http::{Request, Response};
use crate::volume::Volumes;
use crate::volume::inventory::InventoryOptions;

/// Upper bounds of the latency buckets, in seconds: from a Probe (well
/// under a millisecond) to an image create with mkfs (hundreds of ms) and
/// a slow btrfs delete (seconds).
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Labels of the RPC figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// The gRPC method, `Service/Method` (`Node/NodePublishVolume`).
    method: String,
    /// The gRPC status code's name (`OK`, `NotFound`, ...).
    code: String,
}

/// Labels of the pool figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    kind: String,
}

/// Labels of the per volume figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    pool: String,
    volume: String,
    namespace: String,
    persistentvolumeclaim: String,
}

/// Labels of the orphan figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Orphans of one reason, as the orphan report counts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanCount {
    /// Why they are orphans (`no-pv`, `released`, ...).
    pub reason: String,
    /// How many volumes.
    pub volumes: u64,
    /// How many bytes they hold.
    pub bytes: u64,
}

/// The driver's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_seconds: Family<RpcLabels, Histogram>,
    pool_capacity: Family<PoolLabels, Gauge>,
    pool_free: Family<PoolLabels, Gauge>,
    pool_promised: Family<PoolLabels, Gauge>,
    pool_used: Family<PoolLabels, Gauge>,
    pool_volumes: Family<PoolLabels, Gauge>,
    pool_trash: Family<PoolLabels, Gauge>,
    volume_used: Family<VolumeLabels, Gauge>,
    orphan_volumes: Family<ReasonLabels, Gauge>,
    orphan_bytes: Family<ReasonLabels, Gauge>,
    /// Whether scrapes carry one series per volume.
    per_volume: bool,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Metrics {
    /// New metrics; `per_volume` adds one series per volume (turn it off
    /// on nodes with very many volumes).
    pub fn new(per_volume: bool) -> Arc<Self> {
        let mut registry = Registry::default();
        let m = Metrics {
            rpc_requests: Family::default(),
            rpc_seconds: Family::new_with_constructor(histogram),
            pool_capacity: Family::default(),
            pool_free: Family::default(),
            pool_promised: Family::default(),
            pool_used: Family::default(),
            pool_volumes: Family::default(),
            pool_trash: Family::default(),
            volume_used: Family::default(),
            orphan_volumes: Family::default(),
            orphan_bytes: Family::default(),
            per_volume,
            registry: Registry::default(),
        };
        registry.register(
            "hostpath_csi_rpc_requests",
            "CSI calls answered, by method and gRPC status code",
            m.rpc_requests.clone(),
        );
        registry.register(
            "hostpath_csi_rpc_duration_seconds",
            "Time to answer a CSI call, by method and gRPC status code",
            m.rpc_seconds.clone(),
        );
        for (name, help, family) in [
            (
                "hostpath_csi_pool_capacity_bytes",
                "Size of the filesystem holding the pool",
                &m.pool_capacity,
            ),
            (
                "hostpath_csi_pool_free_bytes",
                "Bytes free on the filesystem holding the pool",
                &m.pool_free,
            ),
            (
                "hostpath_csi_pool_promised_bytes",
                "Sum of the sizes of the pool's volumes",
                &m.pool_promised,
            ),
            (
                "hostpath_csi_pool_used_bytes",
                "Bytes the pool's volumes hold",
                &m.pool_used,
            ),
            (
                "hostpath_csi_pool_volumes",
                "Volumes the driver made in the pool",
                &m.pool_volumes,
            ),
            (
                "hostpath_csi_pool_trash_bytes",
                "Bytes in the pool's trash (archived volumes awaiting removal)",
                &m.pool_trash,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "hostpath_csi_volume_used_bytes",
            "Bytes a volume holds",
            m.volume_used.clone(),
        );
        registry.register(
            "hostpath_csi_orphan_volumes",
            "Volumes the orphan report found, by reason",
            m.orphan_volumes.clone(),
        );
        registry.register(
            "hostpath_csi_orphan_bytes",
            "Bytes held by the volumes the orphan report found, by reason",
            m.orphan_bytes.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts one answered call.
    fn observe(&self, method: &str, code: tonic::Code, took: Duration) {
        // The names gRPC's own libraries print (Go's codes.Code), as
        // other gRPC metrics use them: "OK", "NotFound", ...
        let code = match code {
            tonic::Code::Ok => "OK".to_string(),
            other => format!("{other:?}"),
        };
        let labels = RpcLabels {
            method: method.to_string(),
            code,
        };
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Replaces the orphan figures (the orphan report calls this after
    /// each run).
    pub fn set_orphans(&self, counts: &[OrphanCount]) {
        self.orphan_volumes.clear();
        self.orphan_bytes.clear();
        for c in counts {
            let l = ReasonLabels {
                reason: c.reason.clone(),
            };
            self.orphan_volumes.get_or_create(&l).set(gauge(c.volumes));
            self.orphan_bytes.get_or_create(&l).set(gauge(c.bytes));
        }
    }

    /// Reads the pools and sets the pool and volume figures. Blocks.
    pub fn refresh(&self, volumes: &Volumes) {
        let inventory = match volumes.inventory(InventoryOptions { measure: true }) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the pools");
                return;
            }
        };
        let space = volumes.space();
        // What each pool's trash holds; a trash that cannot be read leaves
        // its pool's series out rather than claim it is empty.
        let trash: std::collections::HashMap<String, u64> = match volumes.trash_usage() {
            Ok(t) => t.into_iter().map(|u| (u.pool, u.bytes)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the trash");
                Default::default()
            }
        };
        for f in [
            &self.pool_capacity,
            &self.pool_free,
            &self.pool_promised,
            &self.pool_used,
            &self.pool_volumes,
            &self.pool_trash,
        ] {
            f.clear();
        }
        self.volume_used.clear();
        for p in &inventory {
            let l = PoolLabels {
                pool: p.name.clone(),
                kind: p.kind.as_str().to_string(),
            };
            let mine = p.volumes.iter().filter(|v| v.origin.has_record());
            let promised: u64 = mine.clone().filter_map(|v| v.capacity_bytes).sum();
            let used: u64 = mine.clone().filter_map(|v| v.used_bytes).sum();
            if let Some((total, free)) = space.get(&p.name).copied().flatten() {
                self.pool_capacity.get_or_create(&l).set(gauge(total));
                self.pool_free.get_or_create(&l).set(gauge(free));
            }
            self.pool_promised.get_or_create(&l).set(gauge(promised));
            self.pool_used.get_or_create(&l).set(gauge(used));
            self.pool_volumes
                .get_or_create(&l)
                .set(gauge(mine.clone().count() as u64));
            if let Some(bytes) = trash.get(&p.name) {
                self.pool_trash.get_or_create(&l).set(gauge(*bytes));
            }
            if self.per_volume {
                for v in mine {
                    let Some(used) = v.used_bytes else { continue };
                    let vl = VolumeLabels {
                        pool: p.name.clone(),
                        volume: v.id.clone(),
                        namespace: v.claim_namespace.clone().unwrap_or_default(),
                        persistentvolumeclaim: v.claim_name.clone().unwrap_or_default(),
                    };
                    self.volume_used.get_or_create(&vl).set(gauge(used));
                }
            }
        }
    }

    /// The metrics as OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A byte count as a gauge value (gauges are signed).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

// --- The tower layer --------------------------------------------------------

/// Counts every gRPC call the server answers: method from the request
/// path, code from the response's `grpc-status` (a unary call that fails
/// answers "trailers only", with the status in the headers; one that
/// succeeds sends it in the trailers, so no header means OK).
#[derive(Debug, Clone)]
pub struct RpcLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service [`RpcLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // "/csi.v1.Node/NodePublishVolume" -> "Node/NodePublishVolume".
        let path = req.uri().path();
        let method = path
            .trim_start_matches('/')
            .trim_start_matches("csi.v1.")
            .to_string();
        let metrics = Arc::clone(&self.metrics);
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.observe(&method, code, start.elapsed());
            res
        })
    }
}

// --- The HTTP endpoint ------------------------------------------------------

/// Listens on `addr`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::http::BindError> {
    crate::http::bind("metrics", addr).await
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes;
/// `volumes` gives the open pools (none yet: pool figures are left out).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    volumes: impl Fn() -> Option<Arc<dyn AsVolumes>> + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send,
) {
    let handler = move |request: Request| {
        let (metrics, volumes) = (Arc::clone(&metrics), volumes());
        async move { answer(&request, metrics, volumes).await }
    };
    crate::http::serve(listener, "/metrics", handler, shutdown).await;
}

/// Something that holds the open pools (the server's shared state).
pub trait AsVolumes: Send + Sync {
    /// The open pools, if they are open.
    fn volumes(&self) -> Option<&Volumes>;
}

/// The answer to a request: the scrape, read from the pools now.
async fn answer(
    request: &Request,
    metrics: Arc<Metrics>,
    volumes: Option<Arc<dyn AsVolumes>>,
) -> Response {
    if request.path != "/metrics" {
        return Response::not_found(&request.path, "/metrics");
    }
    if request.method != "GET" {
        return Response::text(405, "only GET\n");
    }
    // Reading the pools walks directories and runs btrfs tools: blocking.
    let body = tokio::task::spawn_blocking(move || {
        if let Some(v) = volumes.as_ref().and_then(|v| v.volumes()) {
            metrics.refresh(v);
        }
        metrics.encode()
    })
    .await
    .unwrap_or_default();
    Response {
        status: 200,
        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body,
    }
}
