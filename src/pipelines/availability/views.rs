//! The live views of `tally availability`: `/availability`, `/availability/incidents`, per-site gauges in
//! `/metrics` and the `/ui` status page, all from [`dataflows::availability`] and published at closed
//! timestamps.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use timely::dataflow::operators::core::Inspect;
use timely::dataflow::{ProbeHandle, Stream};

use dataflows::availability::{
    admit, incidents, site_windows, split, AdmitCounters, Check, Incident, IncidentRule, Input, Outcome, Status,
    Windows, PHASES,
};

use super::writer::CheckRow;
use crate::http::{Routes, Ui, ViewHandle};
use crate::metrics::Metrics;
use crate::runtime::clock::rfc3339;
use crate::runtime::publish::{publish, publish_grouped};
use crate::runtime::StateSize;

/// The views' handles, shared by HTTP and the dataflow.
#[derive(Clone)]
pub struct Views {
    /// `GET /availability`.
    pub sites: ViewHandle,
    /// `GET /availability/incidents`.
    pub incidents: ViewHandle,
}

impl Views {
    /// Empty views.
    pub fn new() -> Self {
        Views {
            sites: ViewHandle::new("{}"),
            incidents: ViewHandle::new("{}"),
        }
    }
}

impl Views {
    /// What `tally availability` serves.
    pub fn routes(&self) -> Routes {
        Routes::new()
            .view("/availability", self.sites.clone())
            .view("/availability/incidents", self.incidents.clone())
            .ui(Ui {
                title: "availability".into(),
                path: "/availability".into(),
                key: "site".into(),
                key_field: None,
                page: Some(PAGE),
            })
    }
}

impl Default for Views {
    fn default() -> Self {
        Views::new()
    }
}

/// A result as the views take it.
pub fn check_of(row: &CheckRow) -> Check {
    let outcome = match row.outcome.as_str() {
        "up" => Outcome::Up,
        "down" => Outcome::Down,
        _ => Outcome::Missed,
    };
    Check {
        url: row.url.clone(),
        scheduled_at_ms: row.scheduled_at_ms,
        interval_ms: row.interval_ms,
        outcome,
        error_class: row.error_class.clone(),
        error_phase: row.error_phase.clone(),
        http_status: row.http_status,
        phases_us: [
            row.dns_us,
            row.connect_us,
            row.tls_us,
            row.ttfb_us,
            row.transfer_us,
            row.total_us,
        ],
        cert_not_after_ms: row.cert_not_after_ms,
    }
}

/// The views' metrics, registered once per process: counters of what the window did not count, and the
/// per-site gauges for Alertmanager (the label is the configured URL: the sites are configuration, so it
/// is bounded).
#[derive(Clone)]
pub struct WindowMetrics {
    counters: [prometheus::IntCounterVec; 3],
    up: prometheus::IntGaugeVec,
    uptime: prometheus::GaugeVec,
    latency: prometheus::IntGaugeVec,
    cert: prometheus::IntGaugeVec,
}

impl WindowMetrics {
    /// Registers them.
    pub fn register(metrics: &Metrics) -> Self {
        WindowMetrics {
            counters: [
                metrics.counter(
                    "tally_availability_duplicates_total",
                    "Check results already counted in the views (same site and slot), by worker",
                    &["worker"],
                ),
                metrics.counter(
                    "tally_availability_out_of_order_total",
                    "Check results older than their site's newest: in the windows, not in the status",
                    &["worker"],
                ),
                metrics.counter(
                    "tally_availability_expired_total",
                    "Check results older than the 7 d window when they arrived: in no view",
                    &["worker"],
                ),
            ],
            up: metrics.gauge(
                "tally_availability_site_up",
                "1 if the site's newest check was up, 0 if down",
                &["url"],
            ),
            uptime: metrics.float_gauge(
                "tally_availability_site_uptime_ratio",
                "up/(up+down) over the window (1h, 24h, 7d), from exact counts",
                &["url", "window"],
            ),
            latency: metrics.gauge(
                "tally_availability_site_latency_us",
                "Total time of the up checks in the last hour, microseconds, by quantile (phases: /availability)",
                &["url", "quantile"],
            ),
            cert: metrics.gauge(
                "tally_availability_site_cert_days_left",
                "Days from the newest check to its certificate's notAfter",
                &["url"],
            ),
        }
    }
}

/// Builds the views over `input` (results and reloaded rollups) on one worker; returns the number of
/// sites the worker holds, for `tally_dataflow_state_records`.
pub fn build<'s>(
    input: Stream<'s, u64, Vec<Input>>,
    rule: IncidentRule,
    views: &Views,
    metrics: &Arc<Metrics>,
    window_metrics: &WindowMetrics,
    done: &ProbeHandle<u64>,
) -> StateSize {
    let counters = AdmitCounters::default();
    let worker = input.scope().index().to_string();
    let admitted = admit(input, rule, counters.clone());
    // After each batch the window handled, what it did not count goes to the counters.
    let (registered, held) = (window_metrics.counters.clone(), counters.clone());
    let mut reported = [0u64; 3];
    let admitted = admitted.inspect_core(move |_| {
        let now = [held.duplicates.get(), held.out_of_order.get(), held.expired.get()];
        for (i, c) in registered.iter().enumerate() {
            c.with_label_values(&[&worker]).inc_by(now[i] - reported[i]);
        }
        reported = now;
    });
    // A site's member is made of its windows (from the reduce) and its status (from the window operator),
    // gathered by the publisher itself: no join, so neither is arranged a second time.
    let admitted = split(admitted);
    let windows = site_windows(admitted.windows).map(|(url, w)| (url, Part::Windows(w)));
    let status = admitted.statuses.map(|(url, s)| (url, Part::Status(Box::new(s))));
    let sites = windows.concat(status).probe_with(done);
    let incidents = incidents(admitted.incidents).probe_with(done);
    let gauges = window_metrics.clone();
    publish_grouped(
        sites,
        "availability",
        views.sites.clone(),
        metrics.clone(),
        site_member,
        move |url, parts| gauges.set(url, site_view(parts)),
    );
    publish(
        incidents,
        "availability_incidents",
        views.incidents.clone(),
        metrics.clone(),
        incidents_member,
    );
    ("availability_sites", counters.sites)
}

fn js(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// `up/(up+down)` to six decimals, rounded down, from the integers; `null` without checks.
pub fn ratio(up: i64, down: i64) -> String {
    if up + down <= 0 {
        return "null".into();
    }
    let micro = up * 1_000_000 / (up + down);
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// One part of a site's member of `/availability`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Part {
    /// Its last hour, from its window's accumulated difference.
    Windows(Windows),
    /// Its status (boxed: with its strip of 50 cells a status is about 1 KB, windows are small).
    Status(Box<Status>),
}

/// A site's windows and status, if it has both.
fn site_view(parts: &[(Part, isize)]) -> Option<(&Windows, &Status)> {
    let windows = parts.iter().find_map(|(p, n)| match p {
        Part::Windows(w) if *n > 0 => Some(w),
        _ => None,
    });
    let status = parts.iter().find_map(|(p, n)| match p {
        Part::Status(s) if *n > 0 => Some(&**s),
        _ => None,
    });
    windows.zip(status)
}

const WINDOWS: [&str; 3] = ["1h", "24h", "7d"];

/// One site's member of `/availability` (none until it has both windows and a status).
#[allow(clippy::ptr_arg)] // the publisher's key is the `String` URL
fn site_member(url: &String, parts: &[(Part, isize)]) -> Option<String> {
    use std::fmt::Write as _;
    let (w, s) = site_view(parts)?;
    let last = &s.last;
    let opt = |v: &Option<String>| v.as_deref().map_or("null".into(), js);
    let mut out = String::with_capacity(512 + 40 * s.strip.len());
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "{}:{{\"state\":\"{}\",\"since\":\"{}\",\"last\":{{\"scheduled_at\":\"{}\",\"outcome\":\"{}\",\"error_class\":{},\"error_phase\":{},\"http_status\":{},\"total_us\":{}}},\"uptime\":{{",
        js(url),
        s.state.as_str(),
        rfc3339(s.since_ms),
        rfc3339(last.scheduled_at_ms),
        last.outcome.as_str(),
        opt(&last.error_class),
        opt(&last.error_phase),
        last.http_status.map_or("null".into(), |c| c.to_string()),
        last.phases_us[5],
    );
    for (i, (name, [up, down, missed])) in WINDOWS.iter().zip(&[w.hour, s.day, s.week]).enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = write!(
            out,
            "{sep}\"{name}\":{{\"up\":{up},\"down\":{down},\"missed\":{missed},\"ratio\":{}}}",
            ratio(*up, *down)
        );
    }
    out.push_str("},\"latency_us\":{");
    // Percentiles of the up checks of the last hour; null without one.
    let timed = w.hour[0] > 0;
    for (i, (phase, [p50, p95, p99])) in PHASES.iter().zip(&w.percentiles).enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let _ = match timed {
            true => write!(out, "{sep}\"{phase}\":{{\"p50\":{p50},\"p95\":{p95},\"p99\":{p99}}}"),
            false => write!(out, "{sep}\"{phase}\":null"),
        };
    }
    let cert_days = s.cert.map_or("null".into(), |(not_after, seen_at)| {
        (not_after - seen_at).div_euclid(86_400_000).to_string()
    });
    let _ = write!(
        out,
        "}},\"latency_since\":\"{}\",\"cert_days_left\":{cert_days},\"strip\":[",
        rfc3339(s.hour_from_ms())
    );
    for (i, c) in s.strip.iter().enumerate() {
        let sep = if i > 0 { "," } else { "" };
        let class = c.error_class().map_or("null".into(), js);
        let _ = write!(out, "{sep}[{},\"{}\",{class}]", c.scheduled_at_ms, c.outcome.as_str());
    }
    out.push_str("]}");
    Some(out)
}

/// One site's member of `/availability/incidents`: its incidents, newest first.
fn incidents_member(key: &(String, Vec<Incident>), _: &isize) -> String {
    let (url, list) = key;
    let items: Vec<String> = list
        .iter()
        .map(|i| {
            json!({
                "started": rfc3339(i.started_ms),
                "ended": i.ended_ms.map(rfc3339),
                "open": i.ended_ms.is_none(),
                "failures": i.failures,
                "error_class": i.error_class,
            })
            .to_string()
        })
        .collect();
    format!("{}:[{}]", js(url), items.join(","))
}

impl WindowMetrics {
    /// Sets a site's gauges from its windows and status (at a closed timestamp, on the publisher), or
    /// removes them once it has left the views. The label is the configured URL: the sites are
    /// configuration, so it is bounded.
    fn set(&self, url: &str, view: Option<(&Windows, &Status)>) {
        let Some((w, s)) = view else {
            let _ = self.up.remove_label_values(&[url]);
            let _ = self.cert.remove_label_values(&[url]);
            for window in WINDOWS {
                let _ = self.uptime.remove_label_values(&[url, window]);
            }
            for q in QUANTILES {
                let _ = self.latency.remove_label_values(&[url, q]);
            }
            return;
        };
        match s.state {
            Outcome::Up => self.up.with_label_values(&[url]).set(1),
            Outcome::Down => self.up.with_label_values(&[url]).set(0),
            Outcome::Missed => {}
        }
        for (window, [u, d, _]) in WINDOWS.iter().zip(&[w.hour, s.day, s.week]) {
            if u + d > 0 {
                self.uptime
                    .with_label_values(&[url, window])
                    .set(*u as f64 / (*u + *d) as f64);
            }
        }
        // Per site 8 series (up, 3 uptimes, 3 quantiles of the total, cert): 18 more for the phases would
        // make /metrics of 10,000 sites 260,000 series, a scrape that takes a core.
        if let Some(total) = w.percentiles.last().filter(|_| w.hour[0] > 0) {
            for (q, v) in QUANTILES.iter().zip(total) {
                self.latency.with_label_values(&[url, q]).set(*v);
            }
        }
        if let Some((not_after, seen_at)) = s.cert {
            self.cert
                .with_label_values(&[url])
                .set((not_after - seen_at).div_euclid(86_400_000));
        }
    }
}

const QUANTILES: [&str; 3] = ["0.5", "0.95", "0.99"];

/// `/ui`: per site its state, the strip of its last 50 checks (hover for the slot and error class), uptime
/// over 24 h and a stacked bar of the phases' p95 in the last hour. Everything from the views is set as
/// text or as a style number, never as markup.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>tally · availability</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}h1{margin-bottom:.2em}#asof{color:#777;margin-top:0}
table{border-collapse:collapse}th,td{padding:.4em .7em;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:middle}
.site{font-family:monospace;max-width:28em;overflow-wrap:anywhere}.state{font-weight:600;padding:.1em .5em;border-radius:3px;color:#fff}
.st-up{background:#2e7d32}.st-down{background:#c62828}.st-missed{background:#888}
.strip{display:flex;gap:1px}.strip span{display:inline-block;width:5px;height:18px;border-radius:1px}
.c-up{background:#43a047}.c-down{background:#e53935}.c-missed{background:#bdbdbd}
.bar{display:flex;width:16em;height:14px;background:#f0f0f0}.bar span{height:100%}
.p-dns{background:#8e24aa}.p-connect{background:#1e88e5}.p-tls{background:#00897b}.p-ttfb{background:#fb8c00}.p-transfer{background:#6d4c41}
.legend span{display:inline-block;width:.8em;height:.8em;margin:0 .2em 0 .8em}.num{text-align:right;font-variant-numeric:tabular-nums}
</style></head><body>
<h1>Availability</h1><p id="asof">loading…</p>
<p class="legend">p95 per phase, last hour:<span class="p-dns"></span>dns<span class="p-connect"></span>connect<span class="p-tls"></span>tls<span class="p-ttfb"></span>first byte<span class="p-transfer"></span>transfer</p>
<table><thead><tr><th>site</th><th>state</th><th>since</th><th>last 50 checks</th><th>uptime 24 h</th><th>p95 by phase</th><th>p95 total</th></tr></thead><tbody id="sites"></tbody></table>
<script>
const TOKEN=new URLSearchParams(location.hash.slice(1)).get('token');
const PHASES=['dns','connect','tls','ttfb','transfer'];
function el(tag,cls,text){const e=document.createElement(tag);if(cls)e.className=cls;if(text!==undefined)e.textContent=String(text);return e;}
function ms(us){return (us/1000).toFixed(us<10000?2:0)+' ms';}
function row(url,s){
  const tr=document.createElement('tr');
  tr.appendChild(el('td','site',url));
  const st=el('td');st.appendChild(el('span','state st-'+s.state,s.state));tr.appendChild(st);
  tr.appendChild(el('td','',s.since.replace('T',' ').replace('Z',' UTC')));
  const strip=el('div','strip');
  for(const [at,outcome,cls] of s.strip){
    const c=el('span','c-'+outcome);
    c.title=new Date(at).toISOString()+' '+outcome+(cls?' · '+cls:'');
    strip.appendChild(c);
  }
  const td=el('td');td.appendChild(strip);tr.appendChild(td);
  const u=s.uptime['24h'];
  tr.appendChild(el('td','num',u.ratio===null?'–':(u.ratio*100).toFixed(3)+'% ('+u.up+'/'+(u.up+u.down)+')'));
  const p95=p=>s.latency_us[p]?s.latency_us[p].p95:0;
  const bar=el('div','bar');const sum=PHASES.reduce((a,p)=>a+p95(p),0);
  for(const p of PHASES){const v=p95(p);if(!sum||!v)continue;
    const seg=el('span','p-'+p);seg.style.width=(100*v/sum)+'%';seg.title=p+' p95 '+ms(v);bar.appendChild(seg);}
  const tb=el('td');tb.appendChild(bar);tr.appendChild(tb);
  tr.appendChild(el('td','num',s.latency_us.total?ms(s.latency_us.total.p95):'–'));
  return tr;
}
async function tick(){
  try{
    const r=await fetch('/availability',{headers:TOKEN?{Authorization:'Bearer '+TOKEN}:{}});
    if(r.status===503){document.getElementById('asof').textContent='catching up: '+(await r.json()).behind+' messages behind';return;}
    const data=await r.json();const sites=Object.entries(data);
    document.getElementById('sites').replaceChildren(...sites.map(([u,s])=>row(u,s)));
    const down=sites.filter(([,s])=>s.state==='down').length;
    document.getElementById('asof').textContent=sites.length+' sites, '+down+' down · as of '+new Date(Number(r.headers.get('X-Tally-As-Of'))).toISOString();
  }catch(e){document.getElementById('asof').textContent='error: '+e;}
}
tick();setInterval(tick,2000);
</script></body></html>
"#;
