//! The HTTP face: each view at its path, `/metrics`, `/health`, and a small live page at `/ui`.
//!
//! Views are published by the dataflow only at closed timestamps (`View::publish`), as a rendered JSON
//! body plus the timestamp it reflects: a read never sees a half-applied batch. The as-of is returned in
//! the `X-Tally-As-Of` header (epoch milliseconds of the processing-time epoch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server};
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// A view's latest published state.
#[derive(Debug, Default)]
pub struct View {
    /// Every update at a time `<= as_of` is in `body`, none later. `None` until the first closed timestamp.
    pub as_of: Option<u64>,
    pub body: String,
}

#[derive(Clone, Default)]
pub struct ViewHandle(Arc<RwLock<View>>);

impl ViewHandle {
    pub fn new(initial_body: &str) -> Self {
        ViewHandle(Arc::new(RwLock::new(View { as_of: None, body: initial_body.to_owned() })))
    }

    /// Replaces the body (if given) and advances the as-of.
    pub fn publish(&self, as_of: u64, body: Option<String>) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some(body) = body {
            v.body = body;
        }
        v.as_of = Some(as_of);
    }

    /// The closed timestamp the body reflects, without copying the body.
    pub fn as_of(&self) -> Option<u64> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).as_of
    }

    pub fn read(&self) -> (Option<u64>, String) {
        let v = self.0.read().unwrap_or_else(|p| p.into_inner());
        (v.as_of, v.body.clone())
    }
}

/// What the server answers.
pub struct Routes {
    /// `(path, view)`: GET and POST both return the view.
    pub views: Vec<(String, ViewHandle)>,
    pub metrics: Arc<Metrics>,
    /// Title shown by `/ui`, which renders the first view as a table.
    pub ui_title: String,
    /// Heading of that table's first column (what the view is keyed by).
    pub ui_key: String,
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("header names and values here are ASCII")
}

/// Threads answering requests. tiny_http writes a response on the thread that answers it, so a client that
/// stops reading a large body holds that thread (tiny_http sets no write timeout): with several, the others
/// keep answering. As many stuck clients at once would still hold them all.
const RESPONDERS: usize = 4;

/// Serves requests until `shutdown` is set, on [`RESPONDERS`] threads; returns once they have all stopped.
/// Takes a bound server so callers (and tests) choose the port.
pub fn serve(server: Server, routes: Routes, shutdown: Arc<AtomicBool>) {
    let (server, routes) = (Arc::new(server), Arc::new(routes));
    let threads: Vec<_> = (0..RESPONDERS)
        .map(|i| {
            let (server, routes, shutdown) = (server.clone(), routes.clone(), shutdown.clone());
            std::thread::Builder::new()
                .name(format!("tally-http-{i}"))
                .spawn(move || {
                    while !shutdown.load(Ordering::Relaxed) {
                        match server.recv_timeout(Duration::from_millis(200)) {
                            Ok(Some(request)) => respond(request, &routes),
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

fn respond(request: Request, routes: &Routes) {
    let path = request.url().split('?').next().unwrap_or("/").to_owned();
    let method = request.method().clone();
    debug!(%path, %method, "HTTP request");
    let json = header("Content-Type", "application/json");
    let response = match (&method, path.as_str()) {
        (Method::Get, "/metrics") => {
            Response::from_string(routes.metrics.render()).with_header(header("Content-Type", "text/plain; version=0.0.4"))
        }
        (Method::Get, "/health") => {
            let views: Vec<String> = routes
                .views
                .iter()
                .map(|(p, v)| {
                    format!("{}: {}", serde_json::to_string(p).unwrap_or_default(), v.as_of().map_or("null".into(), |t| t.to_string()))
                })
                .collect();
            let lag = routes.metrics.total_lag().map_or("null".into(), |l| l.to_string());
            Response::from_string(format!("{{\"status\":\"ok\",\"as_of\":{{{}}},\"lag_messages\":{lag}}}", views.join(",")))
                .with_header(json)
        }
        (Method::Get, "/ui") => Response::from_string(ui_page(routes)).with_header(header("Content-Type", "text/html; charset=utf-8")),
        (Method::Get | Method::Post | Method::Head, p) => match routes.views.iter().find(|(vp, _)| vp == p) {
            Some((_, view)) => {
                let (as_of, body) = view.read();
                Response::from_string(body).with_header(json).with_header(header("X-Tally-As-Of", &as_of.unwrap_or(0).to_string()))
            }
            None => Response::from_string("{\"error\":\"not found\"}").with_status_code(404).with_header(json),
        },
        _ => Response::from_string("{\"error\":\"method not allowed\"}").with_status_code(405).with_header(json),
    };
    if let Err(e) = request.respond(response) {
        debug!(error = %e, "HTTP client went away");
    }
}

fn ui_page(routes: &Routes) -> String {
    let path = routes.views.first().map_or("/", |(p, _)| p.as_str());
    UI_TEMPLATE.replace("{{TITLE}}", &routes.ui_title).replace("{{KEY}}", &routes.ui_key).replace("{{PATH}}", path)
}

const UI_TEMPLATE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tally · {{TITLE}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;min-width:40em}th,td{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left;font-family:monospace}#asof{color:#777}
</style></head><body>
<h1>{{TITLE}}</h1><p id="asof">loading…</p><table id="t"></table>
<script>
async function tick(){
  try{
    const r=await fetch('{{PATH}}');const asof=r.headers.get('X-Tally-As-Of');const data=await r.json();
    const rows=Array.isArray(data)?data.map(o=>[o.food??'',o]):Object.entries(data);
    const cols=rows.length?Object.keys(rows[0][1]).filter(c=>c!=='food'):[];
    // Keys come from Kafka: cells get text, never markup, so a key like <img onerror=...> stays text.
    const row=(tag,cells)=>{const tr=document.createElement('tr');
      for(const c of cells){const e=document.createElement(tag);e.textContent=String(c);tr.appendChild(e);}return tr;};
    const t=document.getElementById('t');
    t.replaceChildren(row('th',['{{KEY}}',...cols]),...rows.map(([k,v])=>row('td',[k,...cols.map(c=>v[c])])));
    document.getElementById('asof').textContent='as of '+new Date(Number(asof)).toISOString()+' · '+rows.length+' rows';
  }catch(e){document.getElementById('asof').textContent='error: '+e;}
}
tick();setInterval(tick,1000);
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use super::*;

    #[test]
    fn a_client_that_stops_reading_a_large_view_does_not_hold_up_the_others() {
        let server = Server::http("127.0.0.1:0").expect("bind");
        let addr = server.server_addr().to_ip().expect("an IP address");
        // Larger than the kernel's socket buffers can take in (here at most 32 MiB received + 4 MiB sent).
        let view = ViewHandle::new(&"x".repeat(64 << 20));
        let routes =
            Routes { views: vec![("/".into(), view)], metrics: Arc::new(Metrics::new()), ui_title: "t".into(), ui_key: "k".into() };
        let shutdown = Arc::new(AtomicBool::new(false));
        let serving = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || serve(server, routes, shutdown))
        };
        // Asks for the view and never reads it: the thread answering it blocks in its write.
        let mut stuck = TcpStream::connect(addr).expect("connect");
        stuck.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").expect("request");
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..3 {
            let mut other = TcpStream::connect(addr).expect("connect");
            other.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            other.write_all(b"GET /health HTTP/1.0\r\n\r\n").expect("request");
            let mut reply = String::new();
            other.read_to_string(&mut reply).expect("an answer within 5 s while another client is stuck");
            assert!(reply.contains("\"status\":\"ok\""), "{reply}");
        }
        shutdown.store(true, Ordering::Relaxed);
        drop(stuck);
        serving.join().expect("server threads end");
    }
}
