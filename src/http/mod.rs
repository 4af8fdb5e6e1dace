//! The HTTP face, generic over pipelines: a pipeline hands [`Routes`] (its endpoints, each a path or a path
//! prefix with a handler; a published view is one kind of endpoint) and the runtime adds `/metrics`,
//! `/health` and the generic `/ui`. [`bind`] and [`spawn`] are the whole interface to what serves
//! underneath (hyper, see `server.rs`), so it can change without touching a pipeline.
//!
//! Views are published by the dataflow only at closed timestamps ([`ViewHandle::publish`]), as a rendered
//! JSON body plus the timestamp it reflects: a read never sees a half-applied batch. The as-of is returned
//! in the `X-Tally-As-Of` header (epoch milliseconds of the processing-time epoch). Until the process has
//! caught up with its sources once, views answer 503 (see [`crate::runtime::health`]).

mod server;
mod ui;

use std::sync::{Arc, OnceLock, RwLock};

use bytes::Bytes;
pub use http::HeaderMap;
pub use server::{bind, spawn, Limits, Server, Serving};
pub use ui::Ui;

use crate::runtime::health::Health;

/// A view's latest published state.
#[derive(Debug)]
struct View {
    /// Every update at a time `<= as_of` is in `body`, none later. `None` until the first closed timestamp.
    as_of: Option<u64>,
    /// Counts the bodies published: the entity tag of this one (with the process's start time).
    version: u64,
    /// Shared with the responses being written, never copied per request.
    body: Body,
    /// The body gzipped, made on the first request that asks for it.
    gzip: Arc<OnceLock<Bytes>>,
}

/// A published body: made whole by the publisher, or the members of a JSON object joined by the first
/// request that reads them (off the worker: a worker publishing 10,000 members at every closed timestamp
/// hands over pointers instead of copying megabytes nobody may read).
#[derive(Clone, Debug)]
struct Body {
    joined: Arc<OnceLock<Bytes>>,
    members: Arc<[Arc<str>]>,
}

impl Body {
    fn whole(bytes: Bytes) -> Self {
        Body {
            joined: Arc::new(OnceLock::from(bytes)),
            members: Arc::new([]),
        }
    }

    fn get(&self) -> Bytes {
        self.joined
            .get_or_init(|| Bytes::from(crate::runtime::publish::json_object(self.members.iter())))
            .clone()
    }
}

/// A published view: written by the dataflow at closed timestamps, read by HTTP handlers.
#[derive(Clone, Debug)]
pub struct ViewHandle(Arc<RwLock<View>>);

/// One published state of a view, as a request reads it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The closed timestamp it shows (`None` before the first).
    pub as_of: Option<u64>,
    body: Body,
    version: u64,
    gzip: Arc<OnceLock<Bytes>>,
}

impl Snapshot {
    /// The body's entity tag: a new one for every body published, unique across restarts.
    pub fn etag(&self) -> String {
        static STARTED: OnceLock<u64> = OnceLock::new();
        let started = STARTED.get_or_init(|| crate::runtime::clock::epoch_now(1));
        format!("\"{started:x}-{}\"", self.version)
    }

    /// The body (joined here if it was published as members and nobody has read it yet).
    pub fn body(&self) -> Bytes {
        self.body.get()
    }
}

impl ViewHandle {
    /// A view showing `initial_body` until the first publish.
    pub fn new(initial_body: &str) -> Self {
        let view = View {
            as_of: None,
            version: 0,
            body: Body::whole(Bytes::copy_from_slice(initial_body.as_bytes())),
            gzip: Arc::default(),
        };
        ViewHandle(Arc::new(RwLock::new(view)))
    }

    /// Replaces the body (if given) and advances the as-of.
    pub fn publish(&self, as_of: u64, body: Option<String>) {
        self.set(as_of, body.map(|b| Body::whole(Bytes::from(b))));
    }

    /// Replaces the body (if given) with the JSON object of these members, joined when first read, and
    /// advances the as-of.
    pub fn publish_members(&self, as_of: u64, members: Option<Vec<Arc<str>>>) {
        self.set(
            as_of,
            members.map(|m| Body {
                joined: Arc::default(),
                members: m.into(),
            }),
        );
    }

    fn set(&self, as_of: u64, body: Option<Body>) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(body) = body {
            v.body = body;
            v.version += 1;
            v.gzip = Arc::default();
        }
        v.as_of = Some(as_of);
    }

    /// The closed timestamp the body reflects, without touching the body.
    pub fn as_of(&self) -> Option<u64> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).as_of
    }

    /// The as-of and the body it reflects, read together.
    pub fn read(&self) -> Snapshot {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        Snapshot {
            as_of: v.as_of,
            body: v.body.clone(),
            version: v.version,
            gzip: v.gzip.clone(),
        }
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
    /// Its headers.
    pub headers: &'a HeaderMap,
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

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `%XX` and `+` decoded; `None` if malformed or not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
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
    pub body: Bytes,
    /// The body gzipped, kept with a published view so it is compressed once, not per request.
    gzip: Option<Arc<OnceLock<Bytes>>>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Reply {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body: body.into(),
            gzip: None,
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

/// A view answers GET, HEAD and POST with its body as of its closed timestamp, `304 Not Modified` to a
/// client that already holds that body (`If-None-Match`), gzipped when asked.
impl Endpoint for ViewHandle {
    fn respond(&self, request: &Request<'_>) -> Reply {
        if request.method == Method::Other {
            return Reply::error(405, "method not allowed");
        }
        let snap = self.read();
        let etag = snap.etag();
        let as_of = snap.as_of.unwrap_or(0).to_string();
        let held = request
            .header("if-none-match")
            .is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        if held {
            return Reply::json(304, Bytes::new())
                .with_header("ETag", etag)
                .with_header("X-Tally-As-Of", as_of);
        }
        let mut reply = Reply::json(200, snap.body())
            .with_header("ETag", etag)
            .with_header("X-Tally-As-Of", as_of);
        reply.gzip = Some(snap.gzip);
        reply
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
    /// Query endpoints gated on the catch-up like views.
    gated: Vec<String>,
    ui: Option<Ui>,
}

impl Routes {
    /// No endpoints yet.
    pub fn new() -> Self {
        Routes::default()
    }

    /// Serves `view` at `path`; `/health` reports its as-of, and it answers 503 until the first catch-up.
    pub fn view(mut self, path: &str, view: ViewHandle) -> Self {
        self.views.push((path.to_owned(), view.clone()));
        self.at(path, view)
    }

    /// Serves `endpoint` at `path` as a query over the views: 503 until the first catch-up like a view
    /// (or marked partial), but answered at once rather than paced to one answer per tick, since each
    /// request asks something else.
    pub fn query(mut self, path: &str, endpoint: impl Endpoint) -> Self {
        self.gated.push(path.to_owned());
        self.at(path, endpoint)
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

    fn is_view(&self, path: &str) -> bool {
        self.views.iter().any(|(p, _)| p == path)
    }

    fn health(&self, health: &Health) -> crate::runtime::health::Status {
        let as_of: Vec<(&str, Option<u64>)> = self.views.iter().map(|(p, v)| (p.as_str(), v.as_of())).collect();
        health.status(&as_of)
    }

    fn answer(&self, request: &Request<'_>, serving: &Serving) -> Reply {
        let open = matches!(request.path, "/health" | "/ui");
        if !open && !serving.authorized(request) {
            return Reply::error(401, "unauthorized: send Authorization: Bearer <token>")
                .with_header("WWW-Authenticate", "Bearer".into());
        }
        match (request.method, request.path) {
            (Method::Get, "/metrics") => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                headers: Vec::new(),
                body: serving.metrics.render().into(),
                gzip: None,
            },
            (Method::Get | Method::Head, "/health") => {
                let status = self.health(&serving.health);
                let as_of: serde_json::Map<String, serde_json::Value> =
                    self.views.iter().map(|(p, v)| (p.clone(), v.as_of().into())).collect();
                let body = serde_json::json!({
                    "status": status.status,
                    "reasons": status.reasons,
                    "behind": status.behind,
                    "as_of": as_of,
                    "lag_messages": serving.metrics.total_lag(),
                    "dead_letter_failures": serving.health.dead_letter_failures(),
                });
                Reply::json(if status.status == "ok" { 200 } else { 503 }, body.to_string())
            }
            (Method::Get, "/ui") if self.ui.is_some() => Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                headers: Vec::new(),
                body: self.ui.as_ref().map(Ui::page).unwrap_or_default().into(),
                gzip: None,
            },
            (_, path) => {
                let Some((_, endpoint)) = self.endpoints.iter().find(|(route, _)| route.matches(path)) else {
                    return Reply::error(404, "not found");
                };
                if !self.is_view(path) && !self.gated.iter().any(|p| p == path) {
                    return endpoint.respond(request);
                }
                let status = self.health(&serving.health);
                if status.ready {
                    endpoint.respond(request)
                } else if serving.serve_partial {
                    endpoint.respond(request).with_header("X-Tally-Partial", "true".into())
                } else {
                    let body = serde_json::json!({
                        "status": status.status,
                        "behind": status.behind,
                        "reasons": status.reasons,
                        "error": "catching up: the view is not complete yet (--serve-partial serves it anyway)",
                    });
                    Reply::json(503, body.to_string()).with_header("Retry-After", "1".into())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::metrics::Metrics;

    fn serving(limits: Limits) -> Serving {
        Serving {
            metrics: Arc::new(Metrics::new()),
            health: Arc::new(Health::new(Duration::from_secs(60))),
            auth_token: None,
            serve_partial: false,
            limits,
        }
    }

    /// Serves `routes` on an ephemeral port; returns the address and the flag that stops it.
    fn start(routes: Routes, serving: Serving) -> (String, Arc<AtomicBool>) {
        let server = bind("127.0.0.1:0").expect("bind");
        let addr = server.addr().to_owned();
        let shutdown = Arc::new(AtomicBool::new(false));
        spawn(server, routes, serving, shutdown.clone());
        (addr, shutdown)
    }

    /// Sends `request` and reads the whole answer (the server closes HTTP/1.0 connections).
    fn exchange(addr: &str, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(request).expect("request");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    }

    fn get(routes: &Routes, serving: &Serving, path: &'static str, headers: &HeaderMap) -> Reply {
        routes.answer(
            &Request {
                method: Method::Get,
                path,
                query: "",
                headers,
            },
            serving,
        )
    }

    #[test]
    fn query_parameters_are_found_by_name_and_percent_decoded() {
        let headers = HeaderMap::new();
        let r = Request {
            method: Method::Get,
            path: "/rates",
            query: "date_from=2016-01-01&orig_code=CN%53GH&x=a+b&flag&e=%zz",
            headers: &headers,
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
        let view = ViewHandle::new("{}");
        view.publish(1, None);
        let routes = Routes::new().view("/", view).under("/batches/", |r: &Request<'_>| {
            Reply::json(200, format!("{:?}", r.path.trim_start_matches("/batches/")))
        });
        let serving = serving(Limits::default());
        let h = HeaderMap::new();
        assert_eq!(
            (
                get(&routes, &serving, "/", &h).status,
                &get(&routes, &serving, "/", &h).body[..]
            ),
            (200, &b"{}"[..])
        );
        assert_eq!(&get(&routes, &serving, "/batches/b-1", &h).body[..], b"\"b-1\"");
        assert_eq!(get(&routes, &serving, "/nope", &h).status, 404);
        let health: serde_json::Value = serde_json::from_slice(&get(&routes, &serving, "/health", &h).body).unwrap();
        assert_eq!(health["as_of"]["/"], 1, "{health}");
        assert_eq!(get(&routes, &serving, "/ui", &h).status, 404, "no page without a Ui");
    }

    #[test]
    fn views_answer_503_until_the_sources_caught_up_unless_partial_views_are_asked_for() {
        let view = ViewHandle::new("{}");
        let routes = Routes::new().view("/", view.clone());
        let mut serving = serving(Limits::default());
        let source = serving.health.source("t", 0);
        source.heard();
        source.behind(5);
        let h = HeaderMap::new();
        let reply = get(&routes, &serving, "/", &h);
        assert_eq!(reply.status, 503);
        assert!(reply.headers.contains(&("Retry-After", "1".into())));
        assert!(String::from_utf8_lossy(&reply.body).contains("\"behind\":5"));
        assert_eq!(get(&routes, &serving, "/health", &h).status, 503);
        serving.serve_partial = true;
        let partial = get(&routes, &serving, "/", &h);
        assert_eq!(
            (
                partial.status,
                partial.headers.contains(&("X-Tally-Partial", "true".into()))
            ),
            (200, true)
        );
        serving.serve_partial = false;
        source.caught_up(100);
        view.publish(99, None);
        assert_eq!(
            get(&routes, &serving, "/", &h).status,
            503,
            "the view does not show the caught-up time yet"
        );
        view.publish(100, Some("{\"a\":1}".into()));
        assert_eq!(get(&routes, &serving, "/", &h).status, 200);
        assert_eq!(get(&routes, &serving, "/health", &h).status, 200);
    }

    #[test]
    fn an_unchanged_view_is_not_modified_and_a_new_body_has_a_new_tag() {
        let view = ViewHandle::new("{}");
        view.publish(1, Some("{\"a\":1}".into()));
        let routes = Routes::new().view("/", view.clone());
        let serving = serving(Limits::default());
        let first = get(&routes, &serving, "/", &HeaderMap::new());
        let etag = first
            .headers
            .iter()
            .find(|(n, _)| *n == "ETag")
            .map(|(_, v)| v.clone())
            .unwrap();
        let mut held = HeaderMap::new();
        held.insert("if-none-match", etag.parse().unwrap());
        view.publish(2, None);
        let again = get(&routes, &serving, "/", &held);
        assert_eq!((again.status, again.body.len()), (304, 0));
        assert!(
            again.headers.contains(&("X-Tally-As-Of", "2".into())),
            "a 304 still says the as-of"
        );
        view.publish(3, Some("{\"a\":2}".into()));
        assert_eq!(get(&routes, &serving, "/", &held).status, 200);
    }

    #[test]
    fn a_bearer_token_guards_everything_but_health_and_the_page() {
        let view = ViewHandle::new("{}");
        view.publish(1, None);
        let routes = Routes::new().view("/", view).ui(Ui {
            title: "t".into(),
            path: "/".into(),
            key: "k".into(),
            key_field: None,
            page: None,
        });
        let mut serving = serving(Limits::default());
        serving.auth_token = Some("s3cret".into());
        let none = HeaderMap::new();
        let mut wrong = HeaderMap::new();
        wrong.insert("authorization", "Bearer s3creT".parse().unwrap());
        let mut right = HeaderMap::new();
        right.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(get(&routes, &serving, "/", &none).status, 401);
        assert_eq!(get(&routes, &serving, "/", &wrong).status, 401);
        assert_eq!(get(&routes, &serving, "/metrics", &none).status, 401);
        assert_eq!(get(&routes, &serving, "/", &right).status, 200);
        assert_eq!(get(&routes, &serving, "/health", &none).status, 200);
        assert_eq!(get(&routes, &serving, "/ui", &none).status, 200);
    }

    #[test]
    fn gzip_when_asked_and_the_same_bytes_once_inflated() {
        let body = format!(
            "{{{}}}",
            (0..2000)
                .map(|i| format!("\"org-{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let view = ViewHandle::new("{}");
        view.publish(1, Some(body.clone()));
        let (addr, shutdown) = start(Routes::new().view("/", view), serving(Limits::default()));
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
        assert!(head.contains("content-encoding: gzip"), "{head}");
        let mut inflated = String::new();
        flate2::read::GzDecoder::new(&raw[split + 4..])
            .read_to_string(&mut inflated)
            .unwrap();
        assert_eq!(inflated, body);
        assert!(raw.len() - split < body.len() / 2, "compressed");
        shutdown.store(true, Ordering::Relaxed);
    }

    #[test]
    fn one_connection_gets_at_most_one_view_answer_per_interval() {
        let view = ViewHandle::new("{}");
        view.publish(1, None);
        let limits = Limits {
            view_interval: Duration::from_millis(50),
            ..Limits::default()
        };
        let (addr, shutdown) = start(Routes::new().view("/", view), serving(limits));
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        for _ in 0..6 {
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut reply = [0u8; 4096];
            let n = s.read(&mut reply).unwrap();
            assert!(reply[..n].ends_with(b"{}"), "{}", String::from_utf8_lossy(&reply[..n]));
        }
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "six answers within five intervals"
        );
        // Other endpoints are not paced, nor are other connections.
        let started = Instant::now();
        for _ in 0..6 {
            assert!(exchange(&addr, b"GET /health HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200"));
        }
        assert!(exchange(&addr, b"GET / HTTP/1.0\r\n\r\n").ends_with("{}"));
        assert!(started.elapsed() < Duration::from_secs(5));
        shutdown.store(true, Ordering::Relaxed);
    }

    #[test]
    fn requests_past_the_limits_are_refused_without_being_read() {
        let view = ViewHandle::new("{}");
        view.publish(1, None);
        let (addr, shutdown) = start(Routes::new().view("/", view), serving(Limits::default()));
        // A URL of 1 MiB, 100,000 headers: 431 and the connection closed.
        let long_url = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(1 << 20));
        assert!(exchange(&addr, long_url.as_bytes()).starts_with("HTTP/1.1 431"));
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(100_000));
        assert!(exchange(&addr, many.as_bytes()).starts_with("HTTP/1.1 431"));
        // A declared 1 GiB body: 413 at once, nothing of it read.
        let post = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n";
        assert!(exchange(&addr, post).starts_with("HTTP/1.1 413"));
        // One endless header line: the server stops reading and closes long before it ends.
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nX-Endless: ").unwrap();
        let chunk = vec![b'a'; 64 << 10];
        let mut sent = 0usize;
        while sent < 1 << 30 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        assert!(
            sent < 64 << 20,
            "the server kept reading an endless header: {sent} bytes taken"
        );
        // Still serving.
        assert!(exchange(&addr, b"GET /health HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200"));
        shutdown.store(true, Ordering::Relaxed);
    }

    #[test]
    fn clients_that_stop_reading_a_large_view_hold_up_nobody_and_are_dropped() {
        // Larger than the kernel's socket buffers can take in (here at most 32 MiB received + 4 MiB sent).
        let view = ViewHandle::new("{}");
        view.publish(1, Some("x".repeat(64 << 20)));
        let limits = Limits {
            write_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (addr, shutdown) = start(Routes::new().view("/", view), serving(limits));
        // Eight clients ask for the view and never read it.
        let mut stuck: Vec<TcpStream> = (0..8)
            .map(|_| {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").expect("request");
                s
            })
            .collect();
        for _ in 0..3 {
            let reply = exchange(&addr, b"GET /health HTTP/1.0\r\n\r\n");
            assert!(reply.contains("\"status\":\"ok\""), "{reply}");
        }
        // Each stuck response is abandoned once it has made no progress for the write timeout: reading one
        // now ends (the server closed it) short of the whole body, instead of waiting forever.
        std::thread::sleep(Duration::from_millis(1500));
        let started = Instant::now();
        let mut got = Vec::new();
        stuck[0].set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = stuck[0].read_to_end(&mut got);
        assert!(
            got.len() < 64 << 20,
            "the whole body arrived: the connection was not dropped"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "the read hung");
        stuck.clear();
        shutdown.store(true, Ordering::Relaxed);
    }
}
