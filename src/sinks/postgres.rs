//! PostgreSQL for sinks: the Kafka offsets table a store writes in the same transaction as its rows, and
//! COPY's text format. Each store names its own offsets table (`tally_rates_offsets`, ...), so two pipelines
//! can share a database.

use postgres::{GenericClient, Transaction};

use super::Offsets;

/// The DDL of an offsets table named `table`.
pub fn offsets_ddl(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    topic text NOT NULL,
    kafka_partition integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, kafka_partition)
);"
    )
}

/// The offsets stored in `table` for `topic`, to resume from.
pub fn load_offsets(client: &mut impl GenericClient, table: &str, topic: &str) -> Result<Offsets, postgres::Error> {
    Ok(client
        .query(
            &format!("SELECT kafka_partition, next_offset FROM {table} WHERE topic = $1"),
            &[&topic],
        )?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Stores `offsets` of `topic` in `table` inside `tx`. An offset never moves back, so several writers of
/// the same topic (replicas) can store theirs.
pub fn store_offsets(
    tx: &mut Transaction<'_>,
    table: &str,
    topic: &str,
    offsets: &Offsets,
) -> Result<(), postgres::Error> {
    let sql = format!(
        "INSERT INTO {table} (topic, kafka_partition, next_offset) VALUES ($1, $2, $3) \
         ON CONFLICT (topic, kafka_partition) DO UPDATE SET next_offset = GREATEST({table}.next_offset, EXCLUDED.next_offset)"
    );
    for (partition, next) in offsets {
        tx.execute(&sql, &[&topic, partition, next])?;
    }
    Ok(())
}

/// Appends a field in COPY's text format: `\N` for NULL, backslash, tab, newline and carriage return escaped.
pub fn copy_field(out: &mut Vec<u8>, value: Option<&str>) {
    let Some(v) = value else {
        out.extend_from_slice(b"\\N");
        return;
    };
    for b in v.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_fields_escape_what_copy_text_reads_specially() {
        let mut out = Vec::new();
        copy_field(&mut out, Some("a\tb\\c\nd\re"));
        out.push(b'|');
        copy_field(&mut out, None);
        assert_eq!(out, b"a\\tb\\\\c\\nd\\re|\\N");
    }
}
