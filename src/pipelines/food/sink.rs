//! The food counts' store: the existing SQLite table `aggregated(food TEXT, count INTEGER, PRIMARY
//! KEY(food))`, its structure unchanged, with `tally_offsets` in the same file. Each closed timestamp is
//! one transaction that adds the count changes AND records how far each partition was read (the shared
//! protocol of [`crate::sinks`]), so on restart nothing is counted twice or missed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use crate::http::ViewHandle;
use crate::metrics::Metrics;
use crate::runtime::publish::observe_publish_delay;
use crate::sinks::sqlite::{self, SqliteError};
use crate::sinks::{Offsets, TxSink};

/// The original assignment's DDL, byte for byte.
pub const AGGREGATED_DDL: &str = r#"CREATE TABLE "aggregated" ("food" TEXT, "count" INTEGER, PRIMARY KEY("food"))"#;

/// Why the food table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FoodSinkError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] SqliteError),
    /// The table is there but is not the food table.
    #[error(
        "table `aggregated` in {path} does not have the expected columns (food TEXT, count INTEGER): found {found}"
    )]
    Structure {
        /// The database file.
        path: String,
        /// The columns found.
        found: String,
    },
}

/// The `aggregated` table as a transactional sink; after each commit it publishes the table as the
/// original API answered it.
pub struct FoodSink {
    conn: Connection,
    path: PathBuf,
    view: Option<(ViewHandle, Arc<Metrics>)>,
}

impl FoodSink {
    /// Opens (or creates) the file; creates `aggregated` with the exact DDL if missing and checks its
    /// columns if present.
    pub fn open(path: &Path) -> Result<Self, FoodSinkError> {
        let p = path.display().to_string();
        let err = |source| SqliteError {
            path: p.clone(),
            source,
        };
        let conn = sqlite::open(path).map_err(err)?;
        let exists: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='aggregated'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        if exists.is_none() {
            conn.execute(AGGREGATED_DDL, []).map_err(err)?;
        } else {
            let mut stmt = conn
                .prepare("SELECT name, type FROM pragma_table_info('aggregated') ORDER BY cid")
                .map_err(err)?;
            let cols: Vec<(String, String)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?;
            let ok = cols.len() == 2 && cols[0].0 == "food" && cols[1].0 == "count";
            if !ok {
                return Err(FoodSinkError::Structure {
                    path: p,
                    found: format!("{cols:?}"),
                });
            }
        }
        Ok(FoodSink {
            conn,
            path: path.to_owned(),
            view: None,
        })
    }

    /// Publishes the table to `view` after every commit.
    pub fn publishing(mut self, view: ViewHandle, metrics: Arc<Metrics>) -> Self {
        self.view = Some((view, metrics));
        self
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> SqliteError + '_ {
        |source| SqliteError {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// `select * from aggregated` as the original API answered it: `[{"count": 36, "food": "pie"}, ...]`.
    pub fn render(&self) -> Result<String, SqliteError> {
        render_aggregated(&self.conn).map_err(self.err())
    }
}

impl TxSink for FoodSink {
    type Data = String;
    type Diff = isize;
    type Error = SqliteError;

    const NAME: &'static str = "sqlite";

    fn offsets(&mut self, topic: &str) -> Result<Offsets, SqliteError> {
        sqlite::offsets(&self.conn, topic).map_err(self.err())
    }

    fn commit(
        &mut self,
        _as_of: u64,
        topic: &str,
        changes: &[(String, isize)],
        offsets: &Offsets,
    ) -> Result<usize, SqliteError> {
        let err = |source| SqliteError {
            path: self.path.display().to_string(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut add = tx
                .prepare_cached(
                    "INSERT INTO aggregated (food, count) VALUES (?1, ?2) ON CONFLICT(food) DO UPDATE SET count = count + excluded.count",
                )
                .map_err(err)?;
            for (food, delta) in changes {
                add.execute(params![food, *delta as i64]).map_err(err)?;
            }
        }
        sqlite::store_offsets(&tx, topic, offsets).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(changes.len())
    }

    fn closed(&mut self, as_of: u64, committed: bool) {
        let Some((view, metrics)) = &self.view else { return };
        if !committed {
            view.publish(as_of, None);
            return;
        }
        match render_aggregated(&self.conn) {
            Ok(body) => {
                view.publish(as_of, Some(body));
                metrics.view_as_of.with_label_values(&["aggregated"]).set(as_of as i64);
                observe_publish_delay(metrics, "aggregated", as_of + 1);
            }
            Err(e) => tracing::warn!(error = %e, "reading back the aggregated table failed"),
        }
    }
}

/// Renders the table as the original API's JSON array, in the table's own (rowid) order.
pub fn render_aggregated(conn: &Connection) -> rusqlite::Result<String> {
    let mut stmt = conn.prepare("select * from aggregated")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
    let mut items = Vec::new();
    for row in rows {
        let (food, count) = row?;
        items.push(serde_json::json!({"count": count, "food": food}));
    }
    Ok(serde_json::Value::Array(items).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_the_exact_table_and_commits_counts_with_offsets() {
        let dir = std::env::temp_dir().join(format!("tally-sqlite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.db");
        let _ = std::fs::remove_file(&path);
        let mut sink = FoodSink::open(&path).unwrap();
        let ddl: String = sink
            .conn
            .query_row("SELECT sql FROM sqlite_master WHERE name='aggregated'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(ddl, AGGREGATED_DDL);
        sink.commit(
            1,
            "message",
            &[("mayo".into(), 1), ("pie".into(), 2)],
            &Offsets::from([(0, 3)]),
        )
        .unwrap();
        sink.commit(2, "message", &[("pie".into(), 1)], &Offsets::from([(0, 4), (1, 1)]))
            .unwrap();
        assert_eq!(
            sink.render().unwrap(),
            r#"[{"count":1,"food":"mayo"},{"count":3,"food":"pie"}]"#
        );
        assert_eq!(sink.offsets("message").unwrap(), Offsets::from([(0, 4), (1, 1)]));
        drop(sink);
        // Reopening keeps the table as it is.
        let mut sink = FoodSink::open(&path).unwrap();
        assert_eq!(sink.offsets("message").unwrap()[&0], 4);
    }

    #[test]
    fn refuses_a_table_of_another_shape() {
        let path = std::env::temp_dir().join(format!("tally-sqlite-bad-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Connection::open(&path)
            .unwrap()
            .execute("CREATE TABLE aggregated (name TEXT, n INTEGER, extra TEXT)", [])
            .unwrap();
        assert!(matches!(FoodSink::open(&path), Err(FoodSinkError::Structure { .. })));
    }
}
