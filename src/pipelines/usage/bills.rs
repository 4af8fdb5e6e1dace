//! `GET /bills?org=...&from=...&to=...`: an organization's closed bills from the ledger, each with its
//! price periods, as of the last checkpoint (one SQLite read transaction, so never half a checkpoint).
//! `from`/`to` are RFC 3339 instants or `YYYY-MM-DD` days (UTC) and select bills by when they ended,
//! `from <= ended < to`.

use std::path::PathBuf;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::value::RawValue;

use crate::http::{Reply, Request};
use crate::runtime::clock::rfc3339;
use crate::sources::debezium::logical::rfc3339_ms;

/// Most bills one answer lists unless `limit` asks for fewer.
const MAX_BILLS: i64 = 100_000;

/// The ledger endpoint over the state file.
pub struct Bills {
    /// The `--state` file.
    pub path: PathBuf,
}

fn instant(text: &str) -> Option<i64> {
    if let Ok(day) = text.parse::<jiff::civil::Date>() {
        if text.len() == 10 {
            return day
                .to_zoned(jiff::tz::TimeZone::UTC)
                .ok()
                .map(|z| z.timestamp().as_millisecond());
        }
    }
    rfc3339_ms(text)
}

/// A stored value that does not read back, as the error rusqlite would give.
fn corrupt(column: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, what.into())
}

impl Bills {
    fn query(&self, org: &str, from: i64, to: i64, limit: i64) -> Result<(Option<i64>, String), rusqlite::Error> {
        let mut conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let tx = conn.transaction()?;
        let as_of: Option<i64> = tx
            .query_row("SELECT as_of FROM usage_checkpoint WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        let mut stmt = tx.prepare(
            "SELECT instance, key, started_ms, ended_ms, amount, periods FROM usage_bills \
             WHERE org = ?1 AND ended_ms >= ?2 AND ended_ms < ?3 ORDER BY ended_ms, id LIMIT ?4",
        )?;
        let mut rows = stmt.query(rusqlite::params![org, from, to, limit + 1])?;
        let mut bills = Vec::new();
        let mut total = dataflows::money::Money::default();
        let mut truncated = false;
        while let Some(r) = rows.next()? {
            if bills.len() as i64 == limit {
                truncated = true;
                break;
            }
            let amount: String = r.get(4)?;
            total +=
                dataflows::money::Money::parse(&amount).map_err(|e| corrupt(4, format!("amount {amount:?}: {e:?}")))?;
            let periods: String = r.get(5)?;
            let periods: Vec<dataflows::usage::Period> =
                serde_json::from_str(&periods).map_err(|e| corrupt(5, format!("periods: {e}")))?;
            let periods: Vec<String> = periods
                .iter()
                .map(|p| {
                    format!(
                        "{{\"price\":{},\"from\":\"{}\",\"to\":\"{}\",\"seconds\":{},\"amount\":{}}}",
                        p.price,
                        rfc3339(p.from_ms),
                        rfc3339(p.to_ms),
                        p.seconds,
                        p.amount
                    )
                })
                .collect();
            let instance: String = r.get(0)?;
            let key: String = r.get(1)?;
            bills.push(format!(
                "{{\"instance\":{},\"key\":{},\"started\":\"{}\",\"ended\":\"{}\",\"amount\":{amount},\"periods\":[{}]}}",
                serde_json::to_string(&instance).expect("strings serialize"),
                serde_json::to_string(&key).expect("strings serialize"),
                rfc3339(r.get(2)?),
                rfc3339(r.get(3)?),
                periods.join(",")
            ));
        }
        let body = format!(
            "{{\"org\":{},\"bills\":[{}],\"count\":{},\"total\":{total},\"truncated\":{truncated}}}",
            serde_json::to_string(org).expect("strings serialize"),
            bills.join(","),
            bills.len()
        );
        debug_assert!(serde_json::from_str::<&RawValue>(&body).is_ok());
        Ok((as_of, body))
    }

    /// Answers one request.
    pub fn respond(&self, request: &Request<'_>) -> Reply {
        let Some(org) = request.param("org").filter(|o| !o.is_empty()) else {
            return Reply::error(400, "org is required: /bills?org=<organization_uuid>[&from=...&to=...]");
        };
        let bound = |name: &str, default: i64| match request.param(name) {
            None => Ok(default),
            Some(text) => instant(&text).ok_or_else(|| {
                format!("{name}={text:?} is not an RFC 3339 instant (2024-05-01T12:00:00Z) or a day (2024-05-01)")
            }),
        };
        let (from, to) = match (bound("from", i64::MIN), bound("to", i64::MAX)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return Reply::error(400, &e),
        };
        let limit = match request.param("limit").map(|l| l.parse::<i64>()) {
            None => MAX_BILLS,
            Some(Ok(l)) if (1..=MAX_BILLS).contains(&l) => l,
            Some(_) => return Reply::error(400, &format!("limit must be 1..={MAX_BILLS}")),
        };
        match self.query(&org, from, to, limit) {
            Ok((as_of, body)) => Reply::json(200, body).with_header("X-Tally-As-Of", as_of.unwrap_or(0).to_string()),
            Err(e) => {
                tracing::warn!(state = %self.path.display(), error = %e, "bill ledger read failed");
                Reply::error(503, &format!("bill ledger unavailable: {e}"))
            }
        }
    }
}
