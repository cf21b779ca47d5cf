//! The least HTTP/1.1 that the driver's two plain endpoints need
//! (`/healthz` for a livenessProbe, `/metrics` for Prometheus): accept,
//! read one request head, hand its method and path to a handler, write
//! one reply and close the connection.
//!
//! Written here rather than pulling in an HTTP server: both endpoints
//! answer one GET with a small body, their clients (the kubelet's prober,
//! Prometheus) send a head of a few hundred bytes and no body, and
//! `Connection: close` spares keep-alive and pipelining.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read; a probe's or a scraper's is a few
/// hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// The address of an endpoint cannot be listened on (not an address of
/// this host, a port in use, a privileged port without the right).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {endpoint} address {addr}: {source}")]
pub struct BindError {
    /// Which endpoint (`health`, `metrics`), for the message.
    pub endpoint: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// The failure.
    pub source: std::io::Error,
}

/// Listens on `addr` for the endpoint named `endpoint`.
pub async fn bind(endpoint: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError {
        endpoint,
        addr,
        source,
    })
}

/// What a handler is asked: the request line's method and path (the
/// query string cut off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// `/healthz`, without `?...`.
    pub path: String,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Response {
    /// A plain text answer.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// 404 naming the path asked for and the one served.
    pub fn not_found(path: &str, served: &str) -> Self {
        Self::text(404, format!("no such path {path:?}; try {served}\n"))
    }

    /// The reply's bytes: status line, headers, body.
    fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

/// The reason phrase of the status codes the endpoints answer with.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Serves `listener` until `shutdown` completes: each connection's
/// request goes to `handler`, in a task of its own. `endpoint` names the
/// path served, for the log.
pub async fn serve<H, F>(
    listener: TcpListener,
    endpoint: &'static str,
    handler: H,
    shutdown: impl Future<Output = ()> + Send,
) where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving {endpoint}");
    }
    let handler = Arc::new(handler);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, endpoint, Arc::clone(&handler)));
                }
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "{endpoint}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Reads one request, answers it and closes the connection.
async fn answer<H, F>(mut stream: TcpStream, endpoint: &'static str, handler: Arc<H>)
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => handler(parse_request_line(&head)).await,
        Ok(None) => Response::text(400, "bad request\n"),
        Err(_) => Response::text(408, "request timed out\n"),
    };
    if response.status != 200 {
        tracing::debug!(
            status = response.status,
            reason = %response.body.trim_end(),
            "{endpoint}"
        );
    }
    let _ = stream.write_all(&response.to_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads the request head (up to the blank line); None when it is too
/// long, not text, or the client hung up first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// The method and path of a request head's first line; empty strings
/// for what is missing (a handler answers 404 or 405 to those).
fn parse_request_line(head: &str) -> Request {
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    Request { method, path }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_gives_method_and_path_without_query() {
        let r = parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        let r = parse_request_line("\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("", ""));
    }

    #[test]
    fn a_reply_carries_status_reason_length_and_close() {
        let bytes = Response::text(503, "not ready\n").to_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nContent-Length: 10\r\n"), "{text}");
        assert!(
            text.contains("\r\nConnection: close\r\n\r\nnot ready\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_real_connection_is_answered_by_the_handler() {
        let listener = bind("test", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            "/echo",
            |r: Request| async move { Response::text(200, format!("{} {}\n", r.method, r.path)) },
            async {
                let _ = stopped.await;
            },
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"HEAD /echo?q HTTP/1.1\r\n\r\n").await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nHEAD /echo\n"), "{reply}");
        // A head that never ends is refused, not waited on forever.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[b'x'; MAX_HEAD + 1]).await.unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
