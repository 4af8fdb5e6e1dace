//! The HTTP face, generic over pipelines: a pipeline hands [`Routes`] (its endpoints, each a path or a path
//! prefix with a handler; a published view is one kind of endpoint) and the runtime adds `/metrics`,
//! `/health` and the generic `/ui`. [`bind`] and [`spawn`] are the whole interface to what serves
//! underneath (tiny_http today), so it can change without touching a pipeline.
//!
//! Views are published by the dataflow only at closed timestamps ([`ViewHandle::publish`]), as a rendered
//! JSON body plus the timestamp it reflects: a read never sees a half-applied batch. The as-of is returned
//! in the `X-Tally-As-Of` header (epoch milliseconds of the processing-time epoch).

mod ui;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::RuntimeError;
use crate::metrics::Metrics;
pub use ui::Ui;

/// A view's latest published state.
#[derive(Debug)]
struct View {
    /// Every update at a time `<= as_of` is in `body`, none later. `None` until the first closed timestamp.
    as_of: Option<u64>,
    /// Shared with the responses being written, never copied per request.
    body: Arc<str>,
}

/// A published view: written by the dataflow at closed timestamps, read by HTTP handlers.
#[derive(Clone, Debug)]
pub struct ViewHandle(Arc<RwLock<View>>);

impl ViewHandle {
    /// A view showing `initial_body` until the first publish.
    pub fn new(initial_body: &str) -> Self {
        ViewHandle(Arc::new(RwLock::new(View {
            as_of: None,
            body: initial_body.into(),
        })))
    }

    /// Replaces the body (if given) and advances the as-of.
    pub fn publish(&self, as_of: u64, body: Option<String>) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(body) = body {
            v.body = body.into();
        }
        v.as_of = Some(as_of);
    }

    /// The closed timestamp the body reflects, without touching the body.
    pub fn as_of(&self) -> Option<u64> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).as_of
    }

    /// The as-of and the body it reflects, read together.
    pub fn read(&self) -> (Option<u64>, Arc<str>) {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        (v.as_of, v.body.clone())
    }
}

/// The request methods tally answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// HEAD.
    Head,
    /// POST.
    Post,
    /// Anything else.
    Other,
}

/// A request as an endpoint sees it.
#[derive(Debug)]
pub struct Request<'a> {
    /// Its method.
    pub method: Method,
    /// The path, without the query string.
    pub path: &'a str,
    /// The query string, without the `?` (empty if none).
    pub query: &'a str,
}

impl Request<'_> {
    /// The first value of query parameter `name`, percent-decoded (`+` is a space); `None` if absent or
    /// not valid UTF-8 once decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find_map(|(k, v)| {
                (percent_decode(k).as_deref() == Some(name))
                    .then(|| percent_decode(v))
                    .flatten()
            })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if b.len() >= i + 3 => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'%' => return None,
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// An endpoint's answer.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The body, shared rather than copied when it is a published view.
    pub body: Arc<str>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: impl Into<Arc<str>>) -> Self {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A JSON error answer: `{"error": message}`.
    pub fn error(status: u16, message: &str) -> Self {
        Reply::json(status, serde_json::json!({ "error": message }).to_string())
    }

    /// The same answer with one more header.
    pub fn with_header(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// Answers requests at a path (or under a path prefix).
pub trait Endpoint: Send + Sync + 'static {
    /// The answer to `request`.
    fn respond(&self, request: &Request<'_>) -> Reply;
}

impl<F: Fn(&Request<'_>) -> Reply + Send + Sync + 'static> Endpoint for F {
    fn respond(&self, request: &Request<'_>) -> Reply {
        self(request)
    }
}

/// A view answers GET, HEAD and POST with its body as of its closed timestamp.
impl Endpoint for ViewHandle {
    fn respond(&self, request: &Request<'_>) -> Reply {
        match request.method {
            Method::Get | Method::Head | Method::Post => {
                let (as_of, body) = self.read();
                Reply::json(200, body).with_header("X-Tally-As-Of", as_of.unwrap_or(0).to_string())
            }
            Method::Other => Reply::error(405, "method not allowed"),
        }
    }
}

enum Route {
    Exact(String),
    Prefix(String),
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self {
            Route::Exact(p) => p == path,
            Route::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// What a server answers, besides `/metrics`, `/health` and `/ui`.
#[derive(Default)]
pub struct Routes {
    endpoints: Vec<(Route, Arc<dyn Endpoint>)>,
    views: Vec<(String, ViewHandle)>,
    ui: Option<Ui>,
}

impl Routes {
    /// No endpoints yet.
    pub fn new() -> Self {
        Routes::default()
    }

    /// Serves `view` at `path`; `/health` reports its as-of.
    pub fn view(mut self, path: &str, view: ViewHandle) -> Self {
        self.views.push((path.to_owned(), view.clone()));
        self.at(path, view)
    }

    /// Serves `endpoint` at exactly `path` (whatever the query string).
    pub fn at(mut self, path: &str, endpoint: impl Endpoint) -> Self {
        self.endpoints.push((Route::Exact(path.to_owned()), Arc::new(endpoint)));
        self
    }

    /// Serves `endpoint` at every path starting with `prefix` (e.g. `/batches/` for `/batches/{id}`).
    pub fn under(mut self, prefix: &str, endpoint: impl Endpoint) -> Self {
        self.endpoints
            .push((Route::Prefix(prefix.to_owned()), Arc::new(endpoint)));
        self
    }

    /// What `/ui` shows.
    pub fn ui(mut self, ui: Ui) -> Self {
        self.ui = Some(ui);
        self
    }

    /// The path to announce at start: the page's view, else the first endpoint's path.
    pub fn home(&self) -> &str {
        self.ui
            .as_ref()
            .map(|u| u.path.as_str())
            .or_else(|| self.views.first().map(|(p, _)| p.as_str()))
            .unwrap_or("/")
    }

    fn answer(&self, request: &Request<'_>, metrics: &Metrics) -> Reply {
        match (request.method, request.path) {
            (Method::Get, "/metrics") => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                headers: Vec::new(),
                body: metrics.render().into(),
            },
            (Method::Get, "/health") => {
                let views: Vec<String> = self
                    .views
                    .iter()
                    .map(|(p, v)| {
                        format!(
                            "{}: {}",
                            serde_json::to_string(p).unwrap_or_default(),
                            v.as_of().map_or("null".into(), |t| t.to_string())
                        )
                    })
                    .collect();
                let lag = metrics.total_lag().map_or("null".into(), |l| l.to_string());
                Reply::json(
                    200,
                    format!(
                        "{{\"status\":\"ok\",\"as_of\":{{{}}},\"lag_messages\":{lag}}}",
                        views.join(",")
                    ),
                )
            }
            (Method::Get, "/ui") if self.ui.is_some() => {
                let page = self.ui.as_ref().map(Ui::page).unwrap_or_default();
                Reply {
                    status: 200,
                    content_type: "text/html; charset=utf-8",
                    headers: Vec::new(),
                    body: page.into(),
                }
            }
            (_, path) => match self.endpoints.iter().find(|(route, _)| route.matches(path)) {
                Some((_, endpoint)) => endpoint.respond(request),
                None => Reply::error(404, "not found"),
            },
        }
    }
}

/// A bound HTTP listener, not yet serving.
pub struct Server {
    inner: tiny_http::Server,
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
    let inner = tiny_http::Server::http(listen).map_err(|source| RuntimeError::Bind {
        addr: listen.to_owned(),
        source,
    })?;
    let addr = inner
        .server_addr()
        .to_ip()
        .map_or_else(|| listen.to_owned(), |a| a.to_string());
    Ok(Server { inner, addr })
}

/// Serves `routes` on a thread of its own until `shutdown` is set.
pub fn spawn(
    server: Server,
    routes: Routes,
    metrics: Arc<Metrics>,
    shutdown: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tally-http".into())
        .spawn(move || serve(server, routes, metrics, shutdown))
        .expect("spawning a thread at startup")
}

/// Threads answering requests. tiny_http writes a response on the thread that answers it, so a client that
/// stops reading a large body holds that thread (tiny_http sets no write timeout): with several, the others
/// keep answering. As many stuck clients at once would still hold them all.
const RESPONDERS: usize = 4;

/// Serves requests until `shutdown` is set, on [`RESPONDERS`] threads; returns once they have all stopped.
pub fn serve(server: Server, routes: Routes, metrics: Arc<Metrics>, shutdown: Arc<AtomicBool>) {
    let server = Arc::new(server.inner);
    let shared = Arc::new((routes, metrics));
    let threads: Vec<_> = (0..RESPONDERS)
        .map(|i| {
            let (server, shared, shutdown) = (server.clone(), shared.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name(format!("tally-http-{i}"))
                .spawn(move || {
                    while !shutdown.load(Ordering::Relaxed) {
                        match server.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(request)) => respond(request, &shared.0, &shared.1),
                            Ok(None) => {}
                            Err(e) => warn!(error = %e, "HTTP accept failed"),
                        }
                    }
                })
                .expect("spawning a thread at startup")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("header names and values here are ASCII")
}

fn respond(request: tiny_http::Request, routes: &Routes, metrics: &Metrics) {
    let url = request.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let method = match request.method() {
        tiny_http::Method::Get => Method::Get,
        tiny_http::Method::Head => Method::Head,
        tiny_http::Method::Post => Method::Post,
        _ => Method::Other,
    };
    debug!(%path, ?method, "HTTP request");
    let reply = routes.answer(
        &Request {
            method,
            path: if path.is_empty() { "/" } else { path },
            query,
        },
        metrics,
    );
    let mut response = tiny_http::Response::new(
        tiny_http::StatusCode(reply.status),
        vec![header("Content-Type", reply.content_type)],
        std::io::Cursor::new(reply.body.as_bytes()),
        Some(reply.body.len()),
        None,
    );
    for (name, value) in &reply.headers {
        response.add_header(header(name, value));
    }
    if let Err(e) = request.respond(response) {
        debug!(error = %e, "HTTP client went away");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn query_parameters_are_found_by_name_and_percent_decoded() {
        let r = Request {
            method: Method::Get,
            path: "/rates",
            query: "date_from=2016-01-01&orig_code=CN%53GH&x=a+b&flag&e=%zz",
        };
        assert_eq!(r.param("date_from").as_deref(), Some("2016-01-01"));
        assert_eq!(r.param("orig_code").as_deref(), Some("CNSGH"));
        assert_eq!(r.param("x").as_deref(), Some("a b"));
        assert_eq!(r.param("flag").as_deref(), Some(""));
        assert_eq!(r.param("e"), None, "a broken escape is no value");
        assert_eq!(r.param("dest_code"), None);
    }

    #[test]
    fn routes_answer_exact_paths_and_prefixes_and_404_otherwise() {
        let routes = Routes::new()
            .view("/", ViewHandle::new("{}"))
            .under("/batches/", |r: &Request<'_>| {
                Reply::json(200, format!("{:?}", r.path.trim_start_matches("/batches/")))
            });
        let metrics = Metrics::new();
        let get = |path: &'static str| {
            routes.answer(
                &Request {
                    method: Method::Get,
                    path,
                    query: "",
                },
                &metrics,
            )
        };
        assert_eq!((get("/").status, &*get("/").body), (200, "{}"));
        assert_eq!(&*get("/batches/b-1").body, "\"b-1\"");
        assert_eq!(get("/nope").status, 404);
        assert!(get("/health").body.contains("\"/\": null"), "{}", get("/health").body);
        assert_eq!(get("/ui").status, 404, "no page without a Ui");
    }

    #[test]
    fn a_client_that_stops_reading_a_large_view_does_not_hold_up_the_others() {
        let server = bind("127.0.0.1:0").expect("bind");
        let addr = server.addr().to_owned();
        // Larger than the kernel's socket buffers can take in (here at most 32 MiB received + 4 MiB sent).
        let view = ViewHandle::new(&"x".repeat(64 << 20));
        let routes = Routes::new().view("/", view);
        let shutdown = Arc::new(AtomicBool::new(false));
        let serving = spawn(server, routes, Arc::new(Metrics::new()), shutdown.clone());
        // Asks for the view and never reads it: the thread answering it blocks in its write.
        let mut stuck = TcpStream::connect(&addr).expect("connect");
        stuck.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").expect("request");
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            let mut other = TcpStream::connect(&addr).expect("connect");
            other.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            other.write_all(b"GET /health HTTP/1.0\r\n\r\n").expect("request");
            let mut reply = String::new();
            other
                .read_to_string(&mut reply)
                .expect("an answer within 5 s while another client is stuck");
            assert!(reply.contains("\"status\":\"ok\""), "{reply}");
        }
        shutdown.store(true, Ordering::Relaxed);
        drop(stuck);
        serving.join().expect("server threads end");
    }
}
