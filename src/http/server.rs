//! Serving [`Routes`] with hyper on a small tokio runtime of its own, hardened against careless and
//! hostile clients: at most `max_connections` at once, a request head of at most `max_header_bytes` and
//! `max_headers` headers (else 431), a body of at most `max_body_bytes` (else 413, never read), a head
//! read within `header_timeout` (which also closes idle keep-alive connections), and a response that
//! makes no write progress for `write_timeout` is dropped. The accept loop backs off when the process is
//! out of file descriptors instead of dying. tiny_http, used before, could do none of this: it accepts
//! and reads headers inside the crate, unwraps EMFILE on its accept thread and has no write timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{Method, Reply, Request, Routes};
use crate::error::RuntimeError;
use crate::metrics::Metrics;
use crate::runtime::health::Health;

/// Bounds on what one client can hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Bytes of request line plus headers.
    pub max_header_bytes: usize,
    /// Header lines.
    pub max_headers: usize,
    /// Bytes of request body accepted (declared by `Content-Length`); tally's endpoints read none.
    pub max_body_bytes: u64,
    /// To receive a whole request head, and to wait for the next one on a kept-alive connection.
    pub header_timeout: Duration,
    /// Without any progress writing a response.
    pub write_timeout: Duration,
    /// The least time between two view answers on one connection (the tick: a view changes no faster).
    pub view_interval: Duration,
    /// After SIGTERM: how long requests are still served (with /health 503) before the listener closes.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_header_bytes: 16 << 10,
            max_headers: 64,
            max_body_bytes: 64 << 10,
            header_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            view_interval: Duration::from_millis(20),
            shutdown_grace: Duration::ZERO,
        }
    }
}

/// What the server needs besides the routes.
#[derive(Clone)]
pub struct Serving {
    /// Rendered at `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Reported at `/health`, and deciding whether views are served yet.
    pub health: Arc<Health>,
    /// When set, every endpoint but `/health` and `/ui` asks for `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
    /// Serve views before the first catch-up (marked `X-Tally-Partial: true`) instead of 503.
    pub serve_partial: bool,
    /// Bounds per client.
    pub limits: Limits,
}

impl Serving {
    pub(super) fn authorized(&self, request: &Request<'_>) -> bool {
        let Some(token) = &self.auth_token else { return true };
        let given = request
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in time independent of where they differ.
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// A bound HTTP listener, not yet serving.
pub struct Server {
    listener: std::net::TcpListener,
    addr: String,
}

impl Server {
    /// The address it is bound to (with the port the system chose for port 0).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// Binds `listen` (`host:port`; port 0 picks a free one).
pub fn bind(listen: &str) -> Result<Server, RuntimeError> {
    let bind_err = |e: std::io::Error| RuntimeError::Bind {
        addr: listen.to_owned(),
        source: Box::new(e),
    };
    let listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener
        .local_addr()
        .map_or_else(|_| listen.to_owned(), |a| a.to_string());
    Ok(Server { listener, addr })
}

/// Serves `routes` on threads of its own until `shutdown` is set (and the grace period after it); the
/// handle ends once the listener is closed and the requests in flight are answered.
pub fn spawn(
    server: Server,
    routes: Routes,
    serving: Serving,
    shutdown: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tally-http".into())
        .spawn(move || {
            // Readers yield the cores to the dataflow's workers.
            crate::runtime::process::yield_to_workers(HTTP_NICE);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("tally-http-io")
                .on_thread_start(|| crate::runtime::process::yield_to_workers(HTTP_NICE))
                .enable_all()
                .build()
                .expect("starting the HTTP runtime");
            runtime.block_on(accept_loop(server, Arc::new(routes), Arc::new(serving), shutdown));
            runtime.shutdown_background();
        })
        .expect("spawning a thread at startup")
}

/// The niceness of HTTP threads.
const HTTP_NICE: i32 = 10;

/// Is this accept error the process (or system) running out of descriptors or memory?
fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

async fn accept_loop(server: Server, routes: Arc<Routes>, serving: Arc<Serving>, shutdown: Arc<AtomicBool>) {
    let listener = match tokio::net::TcpListener::from_std(server.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "HTTP listener unusable: nothing will be served");
            return;
        }
    };
    let max_connections = serving.limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max_connections));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let tick = Duration::from_millis(200);
    let mut backoff = Duration::from_millis(10);
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        if shutdown.load(Ordering::Relaxed) {
            // Shutting down: /health answers 503 from now on, so a load balancer routes elsewhere, and
            // requests are still served for the grace period before the listener closes.
            let at = *stop_at.get_or_insert_with(|| {
                serving.health.stopping();
                tokio::time::Instant::now() + serving.limits.shutdown_grace
            });
            if tokio::time::Instant::now() >= at {
                break;
            }
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = tokio::time::sleep(tick) => continue,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = tokio::time::sleep(tick) => continue,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                let _ = stream.set_nodelay(true);
                let (routes, serving, stopping) = (routes.clone(), serving.clone(), stopping.clone());
                tokio::spawn(async move {
                    serve_connection(stream, routes, serving, stopping).await;
                    drop(permit);
                });
            }
            Err(e) => {
                serving.metrics.http_accept_errors.inc();
                if is_resource_exhaustion(&e) {
                    warn!(error = %e, retry_in = ?backoff, "HTTP accept: out of descriptors or memory; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                } else {
                    debug!(error = %e, "HTTP accept failed");
                }
            }
        }
    }
    drop(listener);
    // Requests in flight are answered; idle connections close. Bounded: a client that stops reading is
    // dropped by the write timeout anyway.
    let _ = stop.send(true);
    let drained = tokio::time::timeout(
        serving.limits.write_timeout + Duration::from_secs(1),
        permits.acquire_many(max_connections as u32),
    )
    .await;
    if drained.is_err() {
        warn!("HTTP: connections still open at shutdown are dropped");
    }
}

async fn serve_connection(
    stream: TcpStream,
    routes: Arc<Routes>,
    serving: Arc<Serving>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let limits = serving.limits.clone();
    let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout));
    // A view changes at most once per closed timestamp, so a connection gets at most one view answer per
    // `view_interval`: a faster poll waits (without CPU) for the next slot instead of taking the cores
    // from the dataflow to re-send what it already has.
    let next_view = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let (routes, serving, next_view) = (routes.clone(), serving.clone(), next_view.clone());
        async move {
            if routes.is_view(request.uri().path()) {
                let slot = {
                    let mut next = next_view.lock().unwrap_or_else(|p| p.into_inner());
                    let slot = (*next).max(tokio::time::Instant::now());
                    *next = slot + serving.limits.view_interval;
                    slot
                };
                tokio::time::sleep_until(slot).await;
            }
            Ok::<_, Infallible>(handle(&request, &routes, &serving))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let stop = async move {
        loop {
            if *stopping.borrow_and_update() {
                return;
            }
            if stopping.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = stop => {
            // Shutting down: a request in flight is answered, an idle keep-alive connection closes now.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP connection ended");
    }
}

fn handle(request: &hyper::Request<Incoming>, routes: &Routes, serving: &Serving) -> hyper::Response<Full<Bytes>> {
    let method = match *request.method() {
        hyper::Method::GET => Method::Get,
        hyper::Method::HEAD => Method::Head,
        hyper::Method::POST => Method::Post,
        _ => Method::Other,
    };
    let uri = request.uri();
    let declared = request
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let chunked = request.headers().contains_key(hyper::header::TRANSFER_ENCODING);
    let reply = if declared.is_some_and(|n| n > serving.limits.max_body_bytes) || chunked {
        // Never read: the connection closes after the answer.
        Reply::error(413, "request body too large").with_header("Connection", "close".into())
    } else {
        let req = Request {
            method,
            path: uri.path(),
            query: uri.query().unwrap_or(""),
            headers: request.headers(),
        };
        debug!(path = req.path, ?method, "HTTP request");
        routes.answer(&req, serving)
    };
    let accepts_gzip = request
        .headers()
        .get(hyper::header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().split(';').next() == Some("gzip")));
    let mut response = hyper::Response::builder()
        .status(reply.status)
        .header("Content-Type", reply.content_type);
    for (name, value) in &reply.headers {
        response = response.header(*name, value.as_str());
    }
    let body = if accepts_gzip && reply.body.len() >= 1024 {
        response = response
            .header("Content-Encoding", "gzip")
            .header("Vary", "Accept-Encoding");
        match &reply.gzip {
            Some(cached) => cached.get_or_init(|| gzip(&reply.body)).clone(),
            None => gzip(&reply.body),
        }
    } else {
        reply.body
    };
    response.body(Full::new(body)).unwrap_or_else(|e| {
        warn!(error = %e, "HTTP response could not be built");
        hyper::Response::new(Full::new(Bytes::from_static(b"{\"error\":\"internal\"}")))
    })
}

fn gzip(body: &[u8]) -> Bytes {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    encoder.write_all(body).expect("writing to memory");
    encoder.finish().expect("writing to memory").into()
}

/// A connection whose writes fail once they have made no progress for `timeout`: a client that stops
/// reading a response gives up its connection instead of holding it forever.
struct WriteTimeout {
    inner: TcpStream,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl WriteTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// `Pending` from the socket: arm (or check) the stall timer.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
