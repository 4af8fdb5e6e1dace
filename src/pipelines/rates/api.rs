//! `GET /rates` in both of its public forms, and `GET /batches/{id}`.
//!
//! - `?date_from=&date_to=&orig_code=&dest_code=`: the original Flask app's answer, byte for byte:
//!   `{"rates":[{"count":3,"day":"2021-01-31","price":1154.3333333333333},...]}` and a newline, compact,
//!   keys sorted, days descending, every day of the range present; `count` and `price` null on a day
//!   without prices, `price` null under 3 prices. The average is PostgreSQL's numeric text made a float
//!   ([`super::numeric`]).
//! - `?date_from=&date_to=&origin=&destination=`: the ratestask form: a port code or a region slug on
//!   either side (regions at any depth), `[{"day":"2016-01-01","average_price":1112},...]` days
//!   ascending, the mean over every expanded pair rounded half away from zero, null under 3 prices.
//!
//! Each answer is computed from one [`Index`] and says its timestamp in `X-Tally-As-Of`.

use std::fmt::Write as _;
use std::sync::Arc;

use dataflows::rates::{format_day, parse_day, Day, PriceSum};
use differential_dataflow::difference::Semigroup;

use super::batch::{Registry, Status};
use super::index::{Index, SharedIndex};
use super::numeric::{flask_average, rounded_mean};
use crate::http::{Reply, Request};

/// Fewest prices a day needs for an average (the original's rule).
const MIN_PRICES: i64 = 3;

/// The `/rates` endpoint.
pub struct Rates {
    /// What it reads.
    pub index: SharedIndex,
    /// Longest range of days one request may ask for.
    pub max_days: i64,
}

fn bad(message: String) -> Reply {
    Reply::error(400, &message)
}

fn day_param(request: &Request<'_>, name: &str) -> Result<Day, Reply> {
    match request.param(name) {
        None => Err(bad(format!("{name} is missing: expected a date as YYYY-MM-DD"))),
        Some(text) => parse_day(&text).ok_or_else(|| {
            bad(format!(
                "{name} is {}: expected a real date as YYYY-MM-DD (ASCII digits)",
                serde_json::Value::String(text)
            ))
        }),
    }
}

/// The ports a ratestask-form side names: a port, or every port under a region.
fn expand(index: &Index, name: &str, code: &str) -> Result<Vec<String>, Reply> {
    if index.ports.contains(code) {
        return Ok(vec![code.to_owned()]);
    }
    if index.regions.contains(code) {
        return Ok(index
            .under
            .get(code)
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default());
    }
    Err(bad(format!(
        "{name} {} is neither a port code nor a region slug",
        serde_json::Value::String(code.to_owned())
    )))
}

impl Rates {
    fn answer(&self, request: &Request<'_>) -> Result<(u64, String), Reply> {
        let from = day_param(request, "date_from")?;
        let to = day_param(request, "date_to")?;
        let days = i64::from(to) - i64::from(from) + 1;
        if days > self.max_days {
            return Err(bad(format!(
                "the range holds {days} days; at most {} per request",
                self.max_days
            )));
        }
        let index = self.index.read();
        let flask = (request.param("orig_code"), request.param("dest_code"));
        let ratestask = (request.param("origin"), request.param("destination"));
        let body = match (flask, ratestask) {
            ((Some(orig), Some(dest)), _) => flask_form(&index, &orig, &dest, from, to),
            (_, (Some(origin), Some(destination))) => {
                let origins = expand(&index, "origin", &origin)?;
                let destinations = expand(&index, "destination", &destination)?;
                ratestask_form(&index, &origins, &destinations, from, to)
            }
            _ => return Err(bad(
                "expected orig_code and dest_code (port codes), or origin and destination (port codes or region slugs)"
                    .to_owned(),
            )),
        };
        Ok((index.as_of, body))
    }
}

impl crate::http::Endpoint for Rates {
    fn respond(&self, request: &Request<'_>) -> Reply {
        match self.answer(request) {
            Ok((as_of, body)) => Reply::json(200, body).with_header("X-Tally-As-Of", as_of.to_string()),
            Err(reply) => reply,
        }
    }
}

/// The original app's body for one port pair.
pub fn flask_form(index: &Index, orig: &str, dest: &str, from: Day, to: Day) -> String {
    let days = index.pairs.get(orig).and_then(|d| d.get(dest));
    let mut out = String::with_capacity(16 + 56 * (to - from + 1).max(0) as usize);
    out.push_str("{\"rates\":[");
    let mut day = to;
    let mut first = true;
    let mut prices = days.map(|d| d.range(from..=to).rev().peekable());
    while day >= from {
        if !first {
            out.push(',');
        }
        first = false;
        let here = prices
            .as_mut()
            .and_then(|p| p.next_if(|(d, _)| **d == day))
            .map(|(_, s)| *s);
        let _ = match here {
            None => write!(out, "{{\"count\":null,\"day\":\"{}\",\"price\":null}}", format_day(day)),
            Some(s) if s.count < MIN_PRICES => write!(
                out,
                "{{\"count\":{},\"day\":\"{}\",\"price\":null}}",
                s.count,
                format_day(day)
            ),
            Some(s) => write!(
                out,
                "{{\"count\":{},\"day\":\"{}\",\"price\":{}}}",
                s.count,
                format_day(day),
                flask_average(s.sum, s.count)
            ),
        };
        day -= 1;
    }
    out.push_str("]}\n");
    out
}

/// The ratestask body: per day, the mean over every (origin, destination) pair.
pub fn ratestask_form(index: &Index, origins: &[String], destinations: &[String], from: Day, to: Day) -> String {
    let n = (i64::from(to) - i64::from(from) + 1).max(0) as usize;
    let mut acc = vec![PriceSum::default(); n];
    let wanted: std::collections::HashSet<&str> = destinations.iter().map(String::as_str).collect();
    let mut add = |days: &super::index::Days| {
        for (day, s) in days.range(from..=to) {
            acc[(day - from) as usize].plus_equals(s);
        }
    };
    for o in origins {
        let Some(dests) = index.pairs.get(o) else { continue };
        // Walk the smaller side: an origin has prices to few destinations, a region has many ports.
        if dests.len() < wanted.len() {
            for (_, days) in dests.iter().filter(|(d, _)| wanted.contains(d.as_str())) {
                add(days);
            }
        } else {
            for days in destinations.iter().filter_map(|d| dests.get(d)) {
                add(days);
            }
        }
    }
    let mut out = String::with_capacity(2 + 48 * n);
    out.push('[');
    for (i, s) in acc.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let day = format_day(from + i as Day);
        let _ = if s.count < MIN_PRICES {
            write!(out, "{{\"day\":\"{day}\",\"average_price\":null}}")
        } else {
            write!(
                out,
                "{{\"day\":\"{day}\",\"average_price\":{}}}",
                rounded_mean(s.sum, s.count)
            )
        };
    }
    out.push(']');
    out
}

/// `GET /batches/{id}`.
pub struct Batches {
    /// Every batch this process knows of.
    pub registry: Arc<Registry>,
    /// Whether it is visible yet.
    pub index: SharedIndex,
}

impl crate::http::Endpoint for Batches {
    fn respond(&self, request: &Request<'_>) -> Reply {
        let Some(id) = request
            .path
            .strip_prefix("/batches/")
            .and_then(|id| crate::http::percent_decode(id).filter(|id| !id.is_empty()))
        else {
            return Reply::error(404, "expected /batches/{id}");
        };
        let Some(status) = self.registry.status(&id) else {
            return Reply::error(404, &format!("no batch {id:?} known to this process"));
        };
        let as_of = self.index.read().as_of;
        let body = match status {
            Status::Pending { parts, items, expected } => serde_json::json!({
                "batch_id": id, "status": "pending", "parts": parts, "items": items,
                "expected_parts": expected.map(|e| e.0), "expected_items": expected.map(|e| e.1),
            }),
            Status::Accepted {
                time,
                items,
                hash,
                stored,
                timing,
            } => {
                let visible = time.is_some_and(|t| t <= as_of);
                let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
                serde_json::json!({
                    "batch_id": id,
                    "status": if visible { "applied" } else { "pending" },
                    "as_of": time.filter(|_| visible),
                    "items": items, "content_hash": hash, "stored": stored,
                    "timing_ms": timing.map(|t| serde_json::json!({
                        "decode": ms(Some(t.decode_us)),
                        "visible_after": ms(t.visible_us),
                        "stored_after": ms(t.stored_us),
                    })),
                })
            }
            Status::Rejected { reasons, errors } => serde_json::json!({
                "batch_id": id, "status": "rejected", "errors": errors, "reasons": reasons,
            }),
            Status::Expired { reasons } => serde_json::json!({
                "batch_id": id, "status": "expired", "reasons": reasons,
            }),
        };
        Reply::json(200, body.to_string()).with_header("X-Tally-As-Of", as_of.to_string())
    }
}
