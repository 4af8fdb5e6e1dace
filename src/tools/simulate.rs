//! `tally simulate`: the spec's simulator against a real MariaDB.
//!
//! Creates `cloud.instances` with the spec's DDL if missing, then every interval deploys (probability 2/3:
//! one of the five organizations, a new instance uuid, price 1..=100) or destroys the oldest instance with
//! the spec's `DELETE ... WHERE id=(SELECT MIN(id) ...)`. Optionally it also changes a running instance's
//! price, to exercise billing across updates.
//!
//! Each statement runs with the session clock pinned (`SET TIMESTAMP`) to the current whole second, so the
//! `started` default, the binlog event time (Debezium's `source.ts_ms`) and the audit line all carry the
//! same instant. The audit (JSON lines, written after each commit) is the independent record the
//! end-to-end test bills from.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mysql::prelude::Queryable;
use mysql::{Conn, Opts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tracing::info;

use crate::tools::sim::ORGS;

/// The spec's DDL.
pub const INSTANCES_DDL: &str = "CREATE TABLE IF NOT EXISTS cloud.instances (\
    id INT AUTO_INCREMENT PRIMARY KEY, \
    organization_uuid VARCHAR(255), \
    instance_uuid VARCHAR(255), \
    price_second INT, \
    started TIMESTAMP DEFAULT CURRENT_TIMESTAMP)";

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("MariaDB: {0}")]
    Db(#[from] mysql::Error),
    #[error("MariaDB URL: {0}")]
    Url(#[from] mysql::UrlError),
    #[error("audit file: {0}")]
    Audit(#[from] std::io::Error),
}

/// `tally simulate`: the flags of one simulator run.
#[derive(clap::Args, Clone, Debug)]
pub struct SimulateArgs {
    /// MariaDB URL, mysql://user:password@host:port.
    #[arg(
        long = "mariadb-url",
        env = "TALLY_MARIADB_URL",
        default_value = "mysql://root@127.0.0.1:3306"
    )]
    pub url: String,
    /// Milliseconds between steps (the spec's simulator uses 500).
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Stop after this many steps (default: run until stopped).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Probability that a step changes a running instance's price instead (0 = the spec's behaviour).
    #[arg(long, default_value_t = 0.0)]
    pub price_change: f64,
    /// Append what each step did, with its database time, to this JSON-lines file.
    #[arg(long)]
    pub audit: Option<PathBuf>,
    /// Seed for reproducible choices.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs the simulator; returns the number of steps taken.
pub fn simulate(cfg: &SimulateArgs) -> Result<u64, SimulateError> {
    let interval = Duration::from_millis(cfg.interval_ms);
    let mut conn = Conn::new(Opts::from_url(&cfg.url)?)?;
    conn.query_drop("CREATE DATABASE IF NOT EXISTS cloud")?;
    conn.query_drop(INSTANCES_DDL)?;
    let mut audit = cfg
        .audit
        .as_ref()
        .map(|p| File::options().create(true).append(true).open(p).map(BufWriter::new))
        .transpose()?;
    let seed = cfg.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut rng = StdRng::seed_from_u64(seed);
    info!(url = %redact(&cfg.url), ?interval, steps = ?cfg.steps, "simulator started");
    let mut step = 0u64;
    while cfg.steps.is_none_or(|n| step < n) {
        let ts = now_s();
        conn.query_drop(format!("SET TIMESTAMP = {ts}"))?;
        let line = if rng.random_bool(cfg.price_change.clamp(0.0, 1.0)) {
            change_price(&mut conn, &mut rng, ts)?
        } else if rng.random_range(0..3) < 2 {
            deploy(&mut conn, &mut rng, ts)?
        } else {
            destroy(&mut conn, ts)?
        };
        if let (Some(a), Some(line)) = (audit.as_mut(), line) {
            writeln!(a, "{line}")?;
            a.flush()?;
        }
        step += 1;
        std::thread::sleep(interval);
    }
    Ok(step)
}

fn deploy(conn: &mut Conn, rng: &mut StdRng, ts: i64) -> Result<Option<String>, SimulateError> {
    let org = ORGS[rng.random_range(0..ORGS.len())];
    let price: i64 = rng.random_range(1..=100);
    conn.exec_drop(
        "INSERT INTO cloud.instances (organization_uuid, instance_uuid, price_second) VALUES (?, UUID(), ?)",
        (org, price),
    )?;
    let id = conn.last_insert_id();
    let started: Option<i64> = conn.exec_first(
        "SELECT UNIX_TIMESTAMP(started) FROM cloud.instances WHERE id = ?",
        (id,),
    )?;
    Ok(Some(
        serde_json::json!({"op": "deploy", "id": id, "org": org, "price": price, "started": started, "ts": ts})
            .to_string(),
    ))
}

fn destroy(conn: &mut Conn, ts: i64) -> Result<Option<String>, SimulateError> {
    let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
    let oldest: Option<(i64, String, i64, i64)> = tx.query_first(
        "SELECT id, organization_uuid, price_second, UNIX_TIMESTAMP(started) FROM cloud.instances \
         WHERE id = (SELECT MIN(id) FROM cloud.instances) FOR UPDATE",
    )?;
    tx.query_drop("DELETE FROM cloud.instances WHERE id=(SELECT MIN(id) FROM cloud.instances)")?;
    tx.commit()?;
    Ok(oldest.map(|(id, org, price, started)| {
        serde_json::json!({"op": "destroy", "id": id, "org": org, "price": price, "started": started, "ts": ts})
            .to_string()
    }))
}

fn change_price(conn: &mut Conn, rng: &mut StdRng, ts: i64) -> Result<Option<String>, SimulateError> {
    let Some(id): Option<i64> = conn.query_first("SELECT id FROM cloud.instances ORDER BY RAND() LIMIT 1")? else {
        return Ok(None);
    };
    let price: i64 = rng.random_range(1..=100);
    conn.exec_drop("UPDATE cloud.instances SET price_second = ? WHERE id = ?", (price, id))?;
    Ok(Some(
        serde_json::json!({"op": "price", "id": id, "price": price, "ts": ts}).to_string(),
    ))
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("mysql://tally:secret@127.0.0.1:3306"),
            "mysql://tally:***@127.0.0.1:3306"
        );
        assert_eq!(super::redact("mysql://127.0.0.1:3306"), "mysql://127.0.0.1:3306");
    }
}
