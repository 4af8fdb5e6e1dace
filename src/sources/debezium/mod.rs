//! Debezium change events (JsonConverter, schemas on or off), generic over the table's row.
//!
//! The stream is an upsert on the Kafka key (the primary key), as Materialize treats it: `after` is the
//! new row, a null `after` or a null value (a tombstone) is a delete. Typed serde over borrowed slices,
//! never `serde_json::Value`: the embedded `schema` is kept as a raw slice and parsed only when it differs
//! from the previous message's (it almost never does), to learn the row's logical types. Unknown fields
//! are ignored; records that are not row changes (schema changes, heartbeats, transaction markers) decode
//! to [`Decoded::Ignored`]. A table plugs in its row by implementing [`RowDecoder`].

pub mod logical;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::decode::{reject_array, Decoded, Metadata};
use crate::error::DecodeError;
use logical::Logical;

/// A table's row as Debezium carries it: how to read its fields, and its logical types from the schema.
pub trait RowDecoder: 'static {
    /// The row image as deserialized from the event, borrowing from the message.
    type Raw<'a>: Deserialize<'a>;
    /// The decoded row.
    type Row;
    /// What the schema says of the fields this decoder reads (their logical types).
    type Types: Copy + Debug + Default;

    /// Learns the logical types from the fields of the schema's `after` (or `before`) struct.
    fn types(&self, fields: &[SchemaField<'_>]) -> Result<Self::Types, DecodeError>;

    /// Decodes one row image.
    fn row(&self, raw: Self::Raw<'_>, types: Self::Types) -> Result<Self::Row, DecodeError>;
}

/// One decoded change event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<Row> {
    /// The Kafka key's payload as compact JSON text (the same for schemas on and off, e.g. `{"id":4}`);
    /// `None` only for a truncate.
    pub key: Option<String>,
    /// What happened to the row.
    pub op: EventOp<Row>,
    /// `source.ts_ms`: when the change happened in the database (0 for a tombstone, which has no source).
    pub ts_ms: i64,
    /// The binlog coordinate, when the connector reports one and the event is not from an incremental
    /// snapshot (whose reads interleave with the log and so carry no position order).
    pub binlog: Option<Binlog>,
    /// Debezium's `__debezium.oldkey` header: the create half of a primary-key change.
    pub moved_in: bool,
    /// Debezium's `__debezium.newkey` header: the delete half of a primary-key change.
    pub moved_out: bool,
}

/// What a change event does.
#[derive(Clone, Debug, PartialEq)]
pub enum EventOp<Row> {
    /// `r`: read by a snapshot.
    Read(Row),
    /// `c`: inserted.
    Create(Row),
    /// `u`: updated, with the new image.
    Update(Row),
    /// `d`, with the old image when the connector sends it.
    Delete(Option<Row>),
    /// A null value: Kafka log compaction's marker after a delete.
    Tombstone,
    /// `t`: every row of the table is gone.
    Truncate,
}

/// A binlog coordinate (`source.file` number, `source.pos`, `source.row`) with the server and GTID it
/// came from: positions are ordered as the log is, within one server's log or one GTID domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Binlog {
    /// `source.server_id` (0 for snapshot reads).
    pub server_id: u64,
    /// `source.gtid`, when the server runs with GTIDs.
    pub gtid: Option<Gtid>,
    /// The number of the binlog file (`mariadb-bin.000002` is 2).
    pub file: u64,
    /// The event's position in that file.
    pub pos: u64,
    /// The row's index within the event.
    pub row: u32,
}

/// The envelope decoder: remembers the last schema seen so it is parsed once, not per message.
#[derive(Debug)]
pub struct Envelope<R: RowDecoder> {
    rows: R,
    last_schema: Vec<u8>,
    types: R::Types,
}

impl<R: RowDecoder> Envelope<R> {
    /// An envelope decoder for rows decoded by `rows`.
    pub fn new(rows: R) -> Self {
        Envelope {
            rows,
            last_schema: Vec::new(),
            types: R::Types::default(),
        }
    }

    /// Decodes one message. `key`/`value` are the raw Kafka bytes (`None` for null).
    pub fn decode(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
    ) -> Result<Decoded<Event<R::Row>>, DecodeError> {
        let key = key.map(key_payload).transpose()?;
        let (mut moved_in, mut moved_out) = (false, false);
        for (name, _) in meta.headers.iter() {
            match name {
                "__debezium.oldkey" => moved_in = true,
                "__debezium.newkey" => moved_out = true,
                _ => {}
            }
        }
        let Some(value) = value else {
            return Ok(match key {
                Some(key) => Decoded::Record(Event {
                    key: Some(key),
                    op: EventOp::Tombstone,
                    ts_ms: 0,
                    binlog: None,
                    moved_in,
                    moved_out,
                }),
                None => Decoded::Ignored("null_key_and_value"),
            });
        };
        reject_array(value)?;
        let (payload, types) = match self.same_schema_payload(value) {
            Some(payload) => (payload, self.types),
            None => {
                let top: Payload<'_, R::Raw<'_>> = serde_json::from_slice(value).map_err(DecodeError::from_json)?;
                match (top.payload, top.schema) {
                    (Some(payload), schema) => {
                        let types = match schema {
                            Some(schema) => self.schema_types(schema)?,
                            None => R::Types::default(),
                        };
                        (
                            serde_json::from_str(payload.get()).map_err(DecodeError::from_json)?,
                            types,
                        )
                    }
                    (None, _) => (top, R::Types::default()),
                }
            }
        };
        self.event(payload, types, key, moved_in, moved_out)
    }

    /// The fast path for schemas on. JsonConverter writes `{"schema":S,"payload":P}` with the same S on
    /// every message of a table, so when the value starts with the schema already seen, only P is parsed:
    /// scanning S (3 KB against P's 0.5 KB) was most of the decoding cost. Anything else (another schema,
    /// other fields, other spacing) is `None` and takes the general path; so is a P that does not parse as a
    /// whole up to the closing brace, which keeps the two paths' results identical.
    pub(crate) fn same_schema_payload<'v>(&self, value: &'v [u8]) -> Option<Payload<'v, R::Raw<'v>>> {
        const HEAD: &[u8] = br#"{"schema":"#;
        const MID: &[u8] = br#","payload":"#;
        if self.last_schema.is_empty() {
            return None;
        }
        let rest = value
            .strip_prefix(HEAD)?
            .strip_prefix(self.last_schema.as_slice())?
            .strip_prefix(MID)?;
        let body = rest.trim_ascii_end().strip_suffix(b"}")?;
        serde_json::from_slice::<Payload<'v, R::Raw<'v>>>(body)
            .ok()
            .filter(|p| p.schema.is_none() && p.payload.is_none())
    }

    fn event(
        &self,
        payload: Payload<'_, R::Raw<'_>>,
        types: R::Types,
        key: Option<String>,
        moved_in: bool,
        moved_out: bool,
    ) -> Result<Decoded<Event<R::Row>>, DecodeError> {
        let Some(op) = payload.op.as_deref() else {
            return if payload.ddl.is_some() || payload.database_name.is_some() {
                Ok(Decoded::Ignored("schema_change"))
            } else if payload.status.is_some() {
                Ok(Decoded::Ignored("transaction"))
            } else if payload.ts_ms.is_some() && payload.source.is_none() {
                Ok(Decoded::Ignored("heartbeat"))
            } else {
                Err(DecodeError::MissingField("op"))
            };
        };
        let source = payload.source.as_ref().ok_or(DecodeError::MissingField("source"))?;
        let ts_ms = source.ts_ms.ok_or(DecodeError::MissingField("source.ts_ms"))?;
        let incremental = source.snapshot.as_deref() == Some("incremental");
        let binlog = match (&source.file, source.pos) {
            (Some(file), Some(pos)) if !incremental => Some(Binlog {
                server_id: source.server_id.unwrap_or(0),
                gtid: source.gtid.as_deref().and_then(Gtid::parse),
                file: binlog_number(file),
                pos,
                row: source.row.unwrap_or(0),
            }),
            _ => None,
        };
        let row = |raw: Option<R::Raw<'_>>, name: &'static str| -> Result<R::Row, DecodeError> {
            self.rows.row(raw.ok_or(DecodeError::MissingField(name))?, types)
        };
        let op = match op {
            "r" => EventOp::Read(row(payload.after, "after")?),
            "c" => EventOp::Create(row(payload.after, "after")?),
            "u" => EventOp::Update(row(payload.after, "after")?),
            "d" => EventOp::Delete(payload.before.map(|b| self.rows.row(b, types)).transpose()?),
            "t" => EventOp::Truncate,
            other => return Err(DecodeError::UnknownOp(other.chars().take(16).collect())),
        };
        let key = match (&op, key) {
            (EventOp::Truncate, _) => None,
            (_, Some(k)) => Some(k),
            (_, None) => return Err(DecodeError::MissingField("key")),
        };
        Ok(Decoded::Record(Event {
            key,
            op,
            ts_ms,
            binlog,
            moved_in,
            moved_out,
        }))
    }

    fn schema_types(&mut self, schema: &RawValue) -> Result<R::Types, DecodeError> {
        let raw = schema.get().as_bytes();
        if raw != self.last_schema.as_slice() {
            let schema: Schema<'_> = serde_json::from_slice(raw).map_err(DecodeError::from_json)?;
            let row = schema
                .fields
                .iter()
                .find(|f| matches!(f.field.as_deref(), Some("after" | "before")));
            self.types = match row {
                Some(row) => self.rows.types(&row.fields)?,
                None => R::Types::default(),
            };
            self.last_schema = raw.to_vec();
        }
        Ok(self.types)
    }
}

/// The key's payload as compact JSON text: the same for schemas on and off.
fn key_payload(key: &[u8]) -> Result<String, DecodeError> {
    #[derive(Deserialize)]
    struct KeyEnvelope<'a> {
        #[serde(borrow)]
        payload: Option<&'a RawValue>,
        #[serde(borrow)]
        schema: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(key).map_err(|_| DecodeError::Malformed("key is not UTF-8".into()))?;
    // One parse for the usual key (a JSON object): a key with schema carries its value in `payload`. Only a
    // key the envelope does not fit (a scalar, or bad JSON) is parsed again, to accept or reject it.
    match serde_json::from_str::<KeyEnvelope<'_>>(text) {
        Ok(KeyEnvelope {
            payload: Some(p),
            schema: Some(_),
        }) => Ok(p.get().trim().to_owned()),
        Ok(_) => Ok(text.trim().to_owned()),
        Err(_) => {
            let raw: &RawValue = serde_json::from_str(text).map_err(DecodeError::from_json)?;
            Ok(raw.get().trim().to_owned())
        }
    }
}

/// A global transaction id as Debezium reports it in `source.gtid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Gtid {
    /// MariaDB: `domain-server-sequence`. Sequence numbers order transactions within a domain across
    /// servers.
    Maria {
        /// The replication domain.
        domain: u32,
        /// The sequence number.
        seq: u64,
    },
    /// MySQL: `source_uuid:transaction_id`.
    Mysql {
        /// The originating server's UUID, as its 128 bits.
        source: u128,
        /// The transaction number.
        seq: u64,
    },
}

impl Gtid {
    /// Parses `0-1-1038` (MariaDB) or `3e11fa47-71ca-11e1-9e33-c80aa9429562:23` (MySQL); `None` for
    /// anything else (the event then orders by server and position).
    pub fn parse(text: &str) -> Option<Gtid> {
        if let Some((uuid, seq)) = text.split_once(':') {
            let hex: String = uuid.chars().filter(|c| *c != '-').collect();
            if hex.len() != 32 {
                return None;
            }
            let source = u128::from_str_radix(&hex, 16).ok()?;
            // A GTID set's range (`uuid:1-23`) names its last transaction.
            let seq = seq.rsplit('-').next()?.parse().ok()?;
            return Some(Gtid::Mysql { source, seq });
        }
        let mut parts = text.split('-');
        let (Some(domain), Some(_server), Some(seq), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some(Gtid::Maria {
            domain: domain.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// `mariadb-bin.000002` -> 2. Binlog file names are numbered in order.
fn binlog_number(file: &str) -> u64 {
    file.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A Debezium value: with schemas on, `schema` + `payload` (itself decoded as a `Payload`); with schemas
/// off, the payload's fields at the top level. `W` is the table's raw row image.
#[derive(Deserialize)]
#[serde(bound(deserialize = "W: Deserialize<'de>"))]
pub(crate) struct Payload<'a, W> {
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    before: Option<W>,
    after: Option<W>,
    #[serde(borrow)]
    source: Option<Source<'a>>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    ts_ms: Option<i64>,
    // Present on records that are not row changes.
    #[serde(borrow)]
    ddl: Option<&'a RawValue>,
    #[serde(borrow, rename = "databaseName")]
    database_name: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Source<'a> {
    ts_ms: Option<i64>,
    #[serde(borrow)]
    snapshot: Option<Cow<'a, str>>,
    #[serde(borrow)]
    file: Option<Cow<'a, str>>,
    pos: Option<u64>,
    row: Option<u32>,
    server_id: Option<u64>,
    #[serde(borrow)]
    gtid: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Schema<'a> {
    #[serde(borrow, default)]
    fields: Vec<SchemaField<'a>>,
}

/// One field of a Kafka Connect schema: its name in the row, its logical type's name, its parameters.
#[derive(Deserialize, Debug)]
pub struct SchemaField<'a> {
    #[serde(borrow)]
    field: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fields: Vec<SchemaField<'a>>,
    #[serde(borrow)]
    parameters: Option<HashMap<Cow<'a, str>, Cow<'a, str>>>,
}

impl SchemaField<'_> {
    /// The column this field holds.
    pub fn column(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// Its logical type (Decimal with its scale, the timestamp kinds), or [`Logical::Plain`].
    pub fn logical(&self) -> Result<Logical, DecodeError> {
        Ok(match self.name.as_deref() {
            Some("org.apache.kafka.connect.data.Decimal") => {
                let scale = self
                    .parameters
                    .as_ref()
                    .and_then(|p| p.get("scale"))
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| DecodeError::BadDecimal("Decimal schema without scale".into()))?;
                Logical::Decimal { scale }
            }
            Some("io.debezium.time.ZonedTimestamp") => Logical::ZonedTimestamp,
            Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => Logical::Timestamp,
            Some("io.debezium.time.MicroTimestamp") => Logical::MicroTimestamp,
            Some("io.debezium.time.NanoTimestamp") => Logical::NanoTimestamp,
            _ => Logical::Plain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Gtid;

    #[test]
    fn gtids_of_both_servers_parse_and_anything_else_is_none() {
        assert_eq!(Gtid::parse("0-1-1038"), Some(Gtid::Maria { domain: 0, seq: 1038 }));
        assert_eq!(Gtid::parse("7-12-5"), Some(Gtid::Maria { domain: 7, seq: 5 }));
        assert_eq!(
            Gtid::parse("3E11FA47-71CA-11E1-9E33-C80AA9429562:23"),
            Some(Gtid::Mysql {
                source: 0x3E11FA4771CA11E19E33C80AA9429562,
                seq: 23
            })
        );
        assert_eq!(
            Gtid::parse("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-40"),
            Some(Gtid::Mysql {
                source: 0x3E11FA4771CA11E19E33C80AA9429562,
                seq: 40
            })
        );
        for bad in ["", "0-1", "a-b-c", "0-1-2-3", "xyz:4"] {
            assert_eq!(Gtid::parse(bad), None, "{bad}");
        }
    }
}
