//! SQLite for sinks: opening a file for a single writer with concurrent readers, and the offsets table
//! (`tally_offsets`) that a sink writes in the same transaction as its changes.

use std::path::Path;

use rusqlite::{params, Connection, Transaction};

use super::Offsets;

const OFFSETS_DDL: &str = "CREATE TABLE IF NOT EXISTS tally_offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition))";

/// A SQLite failure, with the file it happened on.
#[derive(Debug, thiserror::Error)]
#[error("sqlite {path}: {source}")]
pub struct SqliteError {
    /// The database file.
    pub path: String,
    /// What SQLite said.
    pub source: rusqlite::Error,
}

/// Opens (or creates) `path` in WAL mode, so readers see the last committed transaction while the sink
/// writes, and creates `tally_offsets` if missing.
pub fn open(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute(OFFSETS_DDL, [])?;
    Ok(conn)
}

/// The stored next offset of each partition of `topic`.
pub fn offsets(conn: &Connection, topic: &str) -> Result<Offsets, rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT partition, next_offset FROM tally_offsets WHERE topic = ?1")?;
    let rows = stmt.query_map([topic], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Records `offsets` of `topic` inside the sink's transaction `tx` (an offset never moves back).
pub fn store_offsets(tx: &Transaction<'_>, topic: &str, offsets: &Offsets) -> Result<(), rusqlite::Error> {
    let mut off = tx.prepare_cached(
        "INSERT INTO tally_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3) \
         ON CONFLICT(topic, partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
    )?;
    for (p, o) in offsets {
        off.execute(params![topic, p, o])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_stored_in_the_transaction_and_never_move_back() {
        let path = std::env::temp_dir().join(format!("tally-sqlite-offsets-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut conn = open(&path).unwrap();
        let tx = conn.transaction().unwrap();
        store_offsets(&tx, "t", &Offsets::from([(0, 4), (1, 1)])).unwrap();
        tx.commit().unwrap();
        let tx = conn.transaction().unwrap();
        store_offsets(&tx, "t", &Offsets::from([(0, 9)])).unwrap();
        drop(tx); // rolled back
        let tx = conn.transaction().unwrap();
        store_offsets(&tx, "t", &Offsets::from([(0, 3)])).unwrap();
        tx.commit().unwrap();
        assert_eq!(offsets(&conn, "t").unwrap(), Offsets::from([(0, 4), (1, 1)]));
        assert!(offsets(&conn, "other").unwrap().is_empty());
    }
}
