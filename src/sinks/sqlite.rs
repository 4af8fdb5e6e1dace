//! The food counts' SQLite sink: the existing table `aggregated(food TEXT, count INTEGER, PRIMARY KEY(food))`,
//! its structure unchanged, plus a bookkeeping table `tally_offsets` in the same file. Each closed timestamp
//! is one transaction that adds the count changes AND records how far each partition was read, so a crash at
//! any point leaves counts and offsets consistent: on restart tally resumes from the recorded offsets and
//! nothing is counted twice or missed.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

/// The original assignment's DDL, byte for byte.
pub const AGGREGATED_DDL: &str = r#"CREATE TABLE "aggregated" ("food" TEXT, "count" INTEGER, PRIMARY KEY("food"))"#;
const OFFSETS_DDL: &str = "CREATE TABLE IF NOT EXISTS tally_offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition))";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sqlite {path}: {source}")]
    Sqlite { path: String, source: rusqlite::Error },
    #[error("table `aggregated` in {path} does not have the expected columns (food TEXT, count INTEGER): found {found}")]
    Structure { path: String, found: String },
}

pub struct SqliteSink {
    conn: Connection,
    path: String,
}

impl SqliteSink {
    /// Opens (or creates) the file; creates `aggregated` with the exact DDL if missing and checks its columns
    /// if present. WAL mode lets readers see the last committed transaction while the sink writes.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let p = path.display().to_string();
        let err = |source| SinkError::Sqlite { path: p.clone(), source };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(err)?;
        let exists: Option<String> = conn
            .query_row("SELECT name FROM sqlite_master WHERE type='table' AND name='aggregated'", [], |r| r.get(0))
            .optional()
            .map_err(err)?;
        if exists.is_none() {
            conn.execute(AGGREGATED_DDL, []).map_err(err)?;
        } else {
            let mut stmt = conn.prepare("SELECT name, type FROM pragma_table_info('aggregated') ORDER BY cid").map_err(err)?;
            let cols: Vec<(String, String)> =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(err)?.collect::<Result<_, _>>().map_err(err)?;
            let ok = cols.len() == 2 && cols[0].0 == "food" && cols[1].0 == "count";
            if !ok {
                return Err(SinkError::Structure { path: p, found: format!("{cols:?}") });
            }
        }
        conn.execute(OFFSETS_DDL, []).map_err(err)?;
        Ok(SqliteSink { conn, path: p })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> SinkError + '_ {
        |source| SinkError::Sqlite { path: self.path.clone(), source }
    }

    /// The recorded next offset of each partition of `topic`.
    pub fn offsets(&self, topic: &str) -> Result<BTreeMap<i32, i64>, SinkError> {
        let mut stmt = self.conn.prepare("SELECT partition, next_offset FROM tally_offsets WHERE topic = ?1").map_err(self.err())?;
        let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?))).map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    /// One transaction: add `deltas` to the counts and record `offsets`. Returns the rows written.
    pub fn commit(&mut self, topic: &str, deltas: &BTreeMap<String, i64>, offsets: &BTreeMap<i32, i64>) -> Result<usize, SinkError> {
        let path = self.path.clone();
        let err = |source| SinkError::Sqlite { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(err)?;
        let mut written = 0;
        {
            let mut add = tx
                .prepare_cached(
                    "INSERT INTO aggregated (food, count) VALUES (?1, ?2) ON CONFLICT(food) DO UPDATE SET count = count + excluded.count",
                )
                .map_err(err)?;
            for (food, delta) in deltas.iter().filter(|(_, d)| **d != 0) {
                add.execute(params![food, delta]).map_err(err)?;
                written += 1;
            }
            let mut off = tx
                .prepare_cached(
                    "INSERT INTO tally_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(topic, partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                )
                .map_err(err)?;
            for (p, o) in offsets {
                off.execute(params![topic, p, o]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(written)
    }

    /// `select * from aggregated` as the original API answered it: `[{"count": 36, "food": "pie"}, ...]`.
    pub fn render(&self) -> Result<String, SinkError> {
        render_aggregated(&self.conn).map_err(self.err())
    }
}

/// Renders the table as the original API's JSON array.
pub fn render_aggregated(conn: &Connection) -> rusqlite::Result<String> {
    let mut stmt = conn.prepare("select * from aggregated")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?)))?;
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
        let mut sink = SqliteSink::open(&path).unwrap();
        let ddl: String = sink.conn.query_row("SELECT sql FROM sqlite_master WHERE name='aggregated'", [], |r| r.get(0)).unwrap();
        assert_eq!(ddl, AGGREGATED_DDL);
        sink.commit("message", &BTreeMap::from([("pie".into(), 2), ("mayo".into(), 1)]), &BTreeMap::from([(0, 3)])).unwrap();
        sink.commit("message", &BTreeMap::from([("pie".into(), 1)]), &BTreeMap::from([(0, 4), (1, 1)])).unwrap();
        assert_eq!(sink.render().unwrap(), r#"[{"count":1,"food":"mayo"},{"count":3,"food":"pie"}]"#);
        assert_eq!(sink.offsets("message").unwrap(), BTreeMap::from([(0, 4), (1, 1)]));
        drop(sink);
        // Reopening keeps the table as it is.
        let sink = SqliteSink::open(&path).unwrap();
        assert_eq!(sink.offsets("message").unwrap()[&0], 4);
    }

    #[test]
    fn refuses_a_table_of_another_shape() {
        let path = std::env::temp_dir().join(format!("tally-sqlite-bad-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Connection::open(&path).unwrap().execute("CREATE TABLE aggregated (name TEXT, n INTEGER, extra TEXT)", []).unwrap();
        assert!(matches!(SqliteSink::open(&path), Err(SinkError::Structure { .. })));
    }
}
