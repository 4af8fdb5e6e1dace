//! PostgreSQL, the system of record: the dump's own `ports`, `regions` and `prices`, and tally's table of
//! applied batches and the topic offsets to resume from.
//!
//! At start one REPEATABLE READ transaction reads the ports, the regions, every price and the applied
//! batches, so the snapshot and the offsets agree. Afterwards each closed timestamp's complete batches are
//! written in ONE transaction through the shared transactional sink: per batch, its id into
//! `tally_rates_batches` (`ON CONFLICT DO NOTHING`: a batch another replica already wrote is found and
//! skipped) and, only if that row is new, its items by `COPY` into `prices`; then the offsets. A crash
//! before the commit reads the batches again from Kafka; after it, they are skipped: exactly once across
//! restarts, kill -9 and replicas.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::sync::Arc;

use dataflows::rates::{format_day, parse_day, Price};
use postgres::{Client, IsolationLevel, NoTls};

use super::batch::{Batch, Registry};
use crate::sinks::postgres::{copy_field, load_offsets, offsets_ddl, store_offsets};
use crate::sinks::{Offsets, TxSink};

/// tally's table of applied batches (its offsets table is [`OFFSETS`]), created if missing under an
/// advisory lock, so replicas starting together agree.
const SETUP_BATCHES: &str = "
CREATE TABLE IF NOT EXISTS tally_rates_batches (
    batch_id text PRIMARY KEY,
    content_hash text NOT NULL,
    items bigint NOT NULL,
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    first_offset bigint NOT NULL,
    end_offset bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
";

/// tally's offsets of the batches topic.
const OFFSETS: &str = "tally_rates_offsets";

/// The advisory lock key of the setup (`'tally'` in ASCII).
const SETUP_LOCK: i64 = 0x0074_616c_6c79;

/// What the start reads.
pub struct Snapshot {
    /// `(code, parent_slug)`.
    pub ports: Vec<(String, String)>,
    /// `(slug, parent_slug)`.
    pub regions: Vec<(String, Option<String>)>,
    /// Every price.
    pub prices: Vec<Price>,
    /// Applied batches: id, hash, items.
    pub batches: Vec<(String, String, u64)>,
    /// Where to resume the topic.
    pub offsets: Offsets,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// PostgreSQL said no.
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// A COPY stream failed.
    #[error("copy: {0}")]
    Io(#[from] std::io::Error),
    /// The database does not hold what it should.
    #[error("{0}")]
    Data(String),
}

/// Connects, with the URL's password never logged.
pub fn connect(url: &str) -> Result<Client, StoreError> {
    let mut client = Client::connect(url, NoTls)?;
    client.batch_execute("SET DateStyle = ISO; SET application_name = 'tally rates'")?;
    Ok(client)
}

/// Creates tally's tables if missing and reads the snapshot the views start from.
pub fn load(url: &str, topic: &str) -> Result<Snapshot, StoreError> {
    let mut client = connect(url)?;
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SETUP_LOCK])?;
    tx.batch_execute(SETUP_BATCHES)?;
    tx.batch_execute(&offsets_ddl(OFFSETS))?;
    tx.commit()?;
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let ports = tx
        .query("SELECT code, parent_slug FROM ports", &[])?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let regions = tx
        .query("SELECT slug, parent_slug FROM regions", &[])?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut prices = Vec::new();
    let reader = tx.copy_out("COPY prices (orig_code, dest_code, day, price) TO STDOUT")?;
    for line in std::io::BufReader::new(reader).lines() {
        let line = line?;
        let mut f = line.split('\t');
        let (Some(orig), Some(dest), Some(day), Some(price)) = (f.next(), f.next(), f.next(), f.next()) else {
            return Err(StoreError::Data(format!(
                "prices: a COPY line of fewer than 4 fields: {line:?}"
            )));
        };
        let day = parse_day(day).ok_or_else(|| StoreError::Data(format!("prices: day {day:?}")))?;
        let price = price
            .parse()
            .map_err(|_| StoreError::Data(format!("prices: price {price:?}")))?;
        prices.push(Price {
            orig: unescape(orig),
            dest: unescape(dest),
            day,
            price,
        });
    }
    let batches = tx
        .query("SELECT batch_id, content_hash, items FROM tally_rates_batches", &[])?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
        .collect();
    let offsets = load_offsets(&mut tx, OFFSETS, topic)?;
    tx.commit()?;
    Ok(Snapshot {
        ports,
        regions,
        prices,
        batches,
        offsets,
    })
}

/// COPY's text escapes (`\t`, `\n`, `\\`, ...) undone; codes in the dump have none, but a code may.
fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_owned();
    }
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The writer's side of the store.
pub struct RatesStore {
    client: Client,
    registry: Arc<Registry>,
    /// Ids committed by the last commit (marked stored once it returns).
    written: Vec<String>,
}

impl RatesStore {
    /// Connects for writing.
    pub fn open(url: &str, registry: Arc<Registry>) -> Result<Self, StoreError> {
        Ok(RatesStore {
            client: connect(url)?,
            registry,
            written: Vec::new(),
        })
    }
}

impl TxSink for RatesStore {
    type Data = Batch;
    type Diff = isize;
    type Error = StoreError;
    const NAME: &'static str = "rates-postgres";
    const CONSOLIDATE: bool = false;

    fn offsets(&mut self, topic: &str) -> Result<Offsets, StoreError> {
        Ok(load_offsets(&mut self.client, OFFSETS, topic)?)
    }

    fn commit(
        &mut self,
        _as_of: u64,
        topic: &str,
        changes: &[(Batch, isize)],
        offsets: &Offsets,
    ) -> Result<usize, StoreError> {
        let mut tx = self.client.transaction()?;
        let mut rows = 0;
        let mut seen = HashSet::new();
        self.written.clear();
        for (batch, _) in changes {
            if !seen.insert(&batch.id) {
                continue;
            }
            let new = tx.execute(
                "INSERT INTO tally_rates_batches (batch_id, content_hash, items, topic, kafka_partition, first_offset, end_offset) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (batch_id) DO NOTHING",
                &[
                    &batch.id,
                    &batch.hash,
                    &(batch.items.len() as i64),
                    &topic,
                    &batch.partition,
                    &batch.first_offset,
                    &batch.end_offset,
                ],
            )?;
            self.written.push(batch.id.clone());
            if new == 0 {
                tracing::info!(batch = %batch.id, "batch already in PostgreSQL (another replica, or before a restart): not written again");
                continue;
            }
            let mut copy = tx.copy_in("COPY prices (orig_code, dest_code, day, price) FROM STDIN")?;
            let mut buf = Vec::with_capacity(64 * 1024);
            for p in batch.items.iter() {
                copy_field(&mut buf, Some(&p.orig));
                buf.push(b'\t');
                copy_field(&mut buf, Some(&p.dest));
                buf.push(b'\t');
                buf.extend_from_slice(format_day(p.day).as_bytes());
                buf.push(b'\t');
                buf.extend_from_slice(p.price.to_string().as_bytes());
                buf.push(b'\n');
                if buf.len() >= 60 * 1024 {
                    copy.write_all(&buf)?;
                    buf.clear();
                }
            }
            copy.write_all(&buf)?;
            rows += copy.finish()? as usize;
        }
        store_offsets(&mut tx, OFFSETS, topic, offsets)?;
        tx.commit()?;
        Ok(rows)
    }

    fn closed(&mut self, _as_of: u64, committed: bool) {
        if committed {
            for id in self.written.drain(..) {
                self.registry.committed(&id);
            }
        }
    }
}
