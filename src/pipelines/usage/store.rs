//! The usage checkpoint and bill ledger in SQLite (`--state FILE`): each checkpoint is one transaction
//! through the shared transactional sink that writes what changed since the last one — keys' states,
//! watermarks, organizations' totals, the closed bills — with the Kafka offsets it reflects. On start the
//! pipeline loads it, restores it into the dataflow (routed by key, so into any number of workers) and
//! resumes each partition from its offset.
//!
//! Tables (all in the one file, beside `tally_offsets`):
//! - `usage_keys(key PRIMARY KEY, state)`: each key's live row with its price periods, or a deleted key
//!   still awaited by its tombstone (JSON).
//! - `usage_marks(partition, history, worker, segments)`: the re-delivery watermarks (JSON).
//! - `usage_orgs(org PRIMARY KEY, started, running, billing)`: the totals `GET /` serves.
//! - `usage_bills(id, org, instance, key, started_ms, ended_ms, amount, periods, as_of)`: every closed bill
//!   once, its price periods as JSON; `GET /bills` reads it. `id` is the rowid (no AUTOINCREMENT: its
//!   bookkeeping table costs a write per bill), rising in the order bills were written.
//! - `usage_checkpoint(id = 1, as_of, at_ms, topic)`: when the last checkpoint was written, and of which topic.

use std::path::{Path, PathBuf};

use dataflows::money::Money;
use dataflows::usage::{History, KeyState, Saved, SavedDiff, Segment, Usage};
use rusqlite::{params, Connection, OptionalExtension};

use crate::sinks::sqlite::{self, SqliteError};
use crate::sinks::{Offsets, TxSink};

const DDL: &str = "
CREATE TABLE IF NOT EXISTS usage_keys (key TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage_marks (partition INTEGER NOT NULL, history TEXT NOT NULL, worker INTEGER NOT NULL,
    segments TEXT NOT NULL, PRIMARY KEY (partition, history, worker));
CREATE TABLE IF NOT EXISTS usage_orgs (org TEXT PRIMARY KEY, started INTEGER NOT NULL, running INTEGER NOT NULL,
    billing TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS usage_bills (id INTEGER PRIMARY KEY, org TEXT NOT NULL,
    instance TEXT NOT NULL, key TEXT NOT NULL, started_ms INTEGER NOT NULL, ended_ms INTEGER NOT NULL,
    amount TEXT NOT NULL, periods TEXT NOT NULL, as_of INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS usage_bills_by_org ON usage_bills (org, ended_ms);
CREATE TABLE IF NOT EXISTS usage_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), as_of INTEGER NOT NULL,
    at_ms INTEGER NOT NULL, topic TEXT NOT NULL);
";

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] SqliteError),
    /// A stored record does not read back (written by another version, or edited by hand).
    #[error("state file {path}: {what} does not decode: {error}")]
    Corrupt {
        /// The database file.
        path: String,
        /// Which record.
        what: String,
        /// Why.
        error: String,
    },
}

/// The usage state file as a transactional sink.
pub struct StateStore {
    conn: Connection,
    path: PathBuf,
}

impl StateStore {
    /// Opens (or creates) the file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = sqlite::open(path).map_err(|e| sqlite_err(path, e))?;
        conn.execute_batch(DDL).map_err(|e| sqlite_err(path, e))?;
        Ok(StateStore {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        sqlite_err(&self.path, e)
    }

    fn corrupt(&self, what: String, error: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.display().to_string(),
            what,
            error: error.to_string(),
        }
    }

    /// The last checkpoint's timestamp and topic, if one was written.
    pub fn last_checkpoint(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.conn
            .query_row("SELECT as_of, topic FROM usage_checkpoint WHERE id = 1", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Every record of the checkpoint, as the dataflow restores it: keys and watermarks with count 1,
    /// organizations with their totals.
    pub fn load(&self) -> Result<Vec<(Saved, SavedDiff)>, StoreError> {
        let mut out = Vec::new();
        let q = |sql: &str| self.conn.prepare(sql).map_err(|e| self.err(e));
        let mut keys = q("SELECT key, state FROM usage_keys")?;
        let rows = keys
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (key, state) = row.map_err(|e| self.err(e))?;
            let state: KeyState = serde_json::from_str(&state).map_err(|e| self.corrupt(format!("key {key}"), e))?;
            let record = Saved::Key {
                key,
                seq: 0,
                state: Some(state),
            };
            out.push((record, SavedDiff::count(1)));
        }
        let mut marks = q("SELECT partition, history, worker, segments FROM usage_marks")?;
        let rows = marks
            .query_map([], |r| {
                Ok((
                    r.get::<_, i32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (partition, history, worker, segments) = row.map_err(|e| self.err(e))?;
            let what = || format!("watermark of partition {partition} {history}");
            let history: History = serde_json::from_str(&history).map_err(|e| self.corrupt(what(), e))?;
            let segments: Vec<Segment> = serde_json::from_str(&segments).map_err(|e| self.corrupt(what(), e))?;
            let mark = Saved::Mark {
                partition,
                history,
                worker,
                segments,
            };
            out.push((mark, SavedDiff::count(1)));
        }
        let mut orgs = q("SELECT org, started, running, billing FROM usage_orgs")?;
        let rows = orgs
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (org, started, running, billing) = row.map_err(|e| self.err(e))?;
            let usage = org_usage(&self.path, &org, started, running, &billing)?;
            out.push((Saved::Org(org), SavedDiff { count: 0, usage }));
        }
        Ok(out)
    }
}

/// An organization's stored totals (billing is exact decimal text).
fn org_usage(path: &Path, org: &str, started: i64, running: i64, billing: &str) -> Result<Usage, StoreError> {
    let billing = Money::parse(billing).map_err(|e| StoreError::Corrupt {
        path: path.display().to_string(),
        what: format!("organization {org}"),
        error: format!("{e:?}"),
    })?;
    Ok(Usage {
        started,
        running,
        billing,
    })
}

fn sqlite_err(path: &Path, source: rusqlite::Error) -> StoreError {
    StoreError::Sqlite(SqliteError {
        path: path.display().to_string(),
        source,
    })
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("checkpoint records always serialize")
}

impl TxSink for StateStore {
    type Data = Saved;
    type Diff = SavedDiff;
    type Error = StoreError;
    const NAME: &'static str = "usage-state";
    // Bills are distinct and most of a checkpoint: sorting them all cost the drain more than writing them.
    // Only keys need an order (by seq, below); watermarks and totals apply correctly in any order.
    const CONSOLIDATE: bool = false;

    fn offsets(&mut self, topic: &str) -> Result<Offsets, StoreError> {
        sqlite::offsets(&self.conn, topic).map_err(|e| self.err(e))
    }

    /// One checkpoint: retracted watermarks first, then keys' states (in order per key), new watermarks,
    /// the organizations' totals, the bills, the offsets and the checkpoint's time.
    fn commit(
        &mut self,
        as_of: u64,
        topic: &str,
        changes: &[(Saved, SavedDiff)],
        offsets: &Offsets,
    ) -> Result<usize, StoreError> {
        let path = self.path.clone();
        let err = |e| sqlite_err(&path, e);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut del_key = tx
                .prepare_cached("DELETE FROM usage_keys WHERE key = ?1")
                .map_err(err)?;
            let mut put_key = tx
                .prepare_cached("INSERT OR REPLACE INTO usage_keys (key, state) VALUES (?1, ?2)")
                .map_err(err)?;
            let mut del_mark = tx
                .prepare_cached("DELETE FROM usage_marks WHERE partition = ?1 AND history = ?2 AND worker = ?3")
                .map_err(err)?;
            let mut put_mark = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO usage_marks (partition, history, worker, segments) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            let mut get_org = tx
                .prepare_cached("SELECT started, running, billing FROM usage_orgs WHERE org = ?1")
                .map_err(err)?;
            let mut put_org = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO usage_orgs (org, started, running, billing) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            let mut del_org = tx
                .prepare_cached("DELETE FROM usage_orgs WHERE org = ?1")
                .map_err(err)?;
            let mut put_bill = tx
                .prepare_cached(
                    "INSERT INTO usage_bills (org, instance, key, started_ms, ended_ms, amount, periods, as_of) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(err)?;
            // Keys, then everything else. A key's records in seq order, so its latest state is written last.
            let (mut keys, rest): (Vec<_>, Vec<_>) = changes.iter().partition(|(r, _)| matches!(r, Saved::Key { .. }));
            keys.sort_by(|a, b| a.0.cmp(&b.0));
            // Watermarks are the only records retracted (a changed one is `-old +new`): retractions first.
            for (record, _) in rest.iter().filter(|(_, d)| d.count < 0) {
                if let Saved::Mark {
                    partition,
                    history,
                    worker,
                    ..
                } = record
                {
                    del_mark
                        .execute(params![partition, json(history), worker])
                        .map_err(err)?;
                }
            }
            for (record, diff) in keys.into_iter().chain(rest.into_iter().filter(|(_, d)| d.count >= 0)) {
                match record {
                    Saved::Key { key, state: None, .. } => {
                        del_key.execute([key]).map_err(err)?;
                    }
                    Saved::Key {
                        key,
                        state: Some(state),
                        ..
                    } => {
                        put_key.execute(params![key, json(state)]).map_err(err)?;
                    }
                    Saved::Mark {
                        partition,
                        history,
                        worker,
                        segments,
                    } => {
                        put_mark
                            .execute(params![partition, json(history), worker, json(segments)])
                            .map_err(err)?;
                    }
                    Saved::Org(org) => {
                        let stored: Option<(i64, i64, String)> = get_org
                            .query_row([org], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                            .optional()
                            .map_err(err)?;
                        let mut total = match stored {
                            Some((started, running, billing)) => org_usage(&path, org, started, running, &billing)?,
                            None => Usage::default(),
                        };
                        differential_dataflow::difference::Semigroup::plus_equals(&mut total, &diff.usage);
                        if differential_dataflow::difference::IsZero::is_zero(&total) {
                            del_org.execute([org]).map_err(err)?;
                        } else {
                            put_org
                                .execute(params![org, total.started, total.running, total.billing.to_string()])
                                .map_err(err)?;
                        }
                    }
                    Saved::Bill(bill) => {
                        for _ in 0..diff.count.max(0) {
                            put_bill
                                .execute(params![
                                    bill.org,
                                    bill.instance,
                                    bill.key,
                                    bill.started_ms,
                                    bill.ended_ms,
                                    bill.amount.to_string(),
                                    json(&bill.periods),
                                    as_of as i64,
                                ])
                                .map_err(err)?;
                        }
                    }
                }
            }
        }
        sqlite::store_offsets(&tx, topic, offsets).map_err(err)?;
        tx.execute(
            "INSERT OR REPLACE INTO usage_checkpoint (id, as_of, at_ms, topic) VALUES (1, ?1, ?2, ?3)",
            params![as_of as i64, crate::runtime::clock::epoch_now(1) as i64, topic],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(changes.len())
    }
}
