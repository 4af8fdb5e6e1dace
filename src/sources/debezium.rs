//! Decoding Debezium change events (JsonConverter, schemas on or off) for `cloud.instances`.
//!
//! Typed serde over borrowed slices, never `serde_json::Value`: the embedded `schema` is kept as a raw
//! slice and only parsed when it differs from the previous message's (it almost never does), to learn the
//! logical types of `price_second` and `started`. Unknown fields are ignored; records that are not row
//! changes (schema changes, heartbeats, transaction markers) decode to `Decoded::Ignored`.

use std::borrow::Cow;

use base64::Engine as _;
use dataflows::money::{Money, MoneyError};
use dataflows::usage::{Change, Op, Pos, Row, Upsert};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::DecodeError;

/// What one Kafka message decodes to.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Change(Change),
    /// Not a row change; the reason is a metric label.
    Ignored(&'static str),
}

/// The Kafka coordinates and headers a decoder needs besides key and value.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meta {
    pub partition: i32,
    pub offset: i64,
    /// Debezium's `__debezium.newkey` header is present (delete half of a primary-key change).
    pub has_newkey: bool,
    /// Debezium's `__debezium.oldkey` header is present (create half of a primary-key change).
    pub has_oldkey: bool,
}

/// Logical type of `price_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PriceType {
    /// Whatever the JSON holds: integer, double, or decimal string (base64 when `decimal_scale` is set).
    Plain,
    /// `org.apache.kafka.connect.data.Decimal`: base64 two's-complement, with this scale.
    Decimal(u32),
}

/// Logical type of `started`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TimeType {
    /// Guess from the JSON: RFC 3339 string, or epoch integer (ms, or µs when beyond year 5000 as ms).
    Plain,
    Zoned,
    Millis,
    Micros,
    Nanos,
}

/// Stateful decoder: remembers the last schema seen so it is parsed once, not per message.
#[derive(Debug)]
pub struct DebeziumDecoder {
    /// Scale for base64 Decimals when schemas are off (the schema that would carry it is absent).
    decimal_scale: Option<u32>,
    last_schema: Vec<u8>,
    types: (PriceType, TimeType),
}

impl DebeziumDecoder {
    pub fn new(decimal_scale: Option<u32>) -> Self {
        DebeziumDecoder { decimal_scale, last_schema: Vec::new(), types: (PriceType::Plain, TimeType::Plain) }
    }

    /// Decodes one message. `key`/`value` are the raw Kafka bytes (`None` for null).
    pub fn decode(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, meta: Meta) -> Result<Decoded, DecodeError> {
        let key = match key {
            Some(k) => Some(key_payload(k)?),
            None => None,
        };
        let Some(value) = value else {
            return match key {
                Some(key) => Ok(Decoded::Change(Change {
                    key: Some(key),
                    partition: meta.partition,
                    offset: meta.offset,
                    pos: None,
                    ts_ms: 0,
                    op: Op::Tombstone,
                })),
                None => Ok(Decoded::Ignored("null_key_and_value")),
            };
        };
        let top: Payload<'_> = serde_json::from_slice(value).map_err(DecodeError::from_json)?;
        let (payload, types) = match (top.payload, top.schema) {
            (Some(payload), schema) => {
                let types = match schema {
                    Some(schema) => self.schema_types(schema)?,
                    None => (PriceType::Plain, TimeType::Plain),
                };
                let payload: Payload<'_> = serde_json::from_str(payload.get()).map_err(DecodeError::from_json)?;
                (payload, types)
            }
            (None, _) => (top, (PriceType::Plain, TimeType::Plain)),
        };
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
        let pos = match (&source.file, source.pos) {
            (Some(file), Some(pos)) if !incremental => Some(Pos { file: binlog_number(file), pos, row: source.row.unwrap_or(0) }),
            _ => None,
        };
        let decode_row = |raw: Option<RawRow<'_>>, name: &'static str| -> Result<Row, DecodeError> {
            raw.ok_or(DecodeError::MissingField(name))?.into_row(types, self.decimal_scale)
        };
        let op = match op {
            "r" | "c" | "u" => {
                let kind = match op {
                    "r" => Upsert::Read,
                    "c" => Upsert::Create,
                    _ => Upsert::Update,
                };
                Op::Upsert { kind, row: decode_row(payload.after, "after")?, moved_in: meta.has_oldkey }
            }
            "d" => {
                let before = payload.before.map(|b| b.into_row(types, self.decimal_scale)).transpose()?;
                Op::Delete { before, moved_out: meta.has_newkey }
            }
            "t" => Op::Truncate,
            other => return Err(DecodeError::UnknownOp(other.chars().take(16).collect())),
        };
        let key = match (&op, key) {
            (Op::Truncate, _) => None,
            (_, Some(k)) => Some(k),
            (_, None) => return Err(DecodeError::MissingField("key")),
        };
        Ok(Decoded::Change(Change { key, partition: meta.partition, offset: meta.offset, pos, ts_ms, op }))
    }

    fn schema_types(&mut self, schema: &RawValue) -> Result<(PriceType, TimeType), DecodeError> {
        let raw = schema.get().as_bytes();
        if raw != self.last_schema.as_slice() {
            let schema: Schema<'_> = serde_json::from_slice(raw).map_err(DecodeError::from_json)?;
            self.types = schema.row_types()?;
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
    // Parse once to validate; a key with schema carries its value in `payload`.
    let raw: &RawValue = serde_json::from_str(text).map_err(DecodeError::from_json)?;
    let inner = match serde_json::from_str::<KeyEnvelope<'_>>(raw.get()) {
        Ok(KeyEnvelope { payload: Some(p), schema: Some(_) }) => p,
        _ => raw,
    };
    Ok(inner.get().trim().to_owned())
}

/// `mariadb-bin.000002` -> 2. Binlog file names are numbered in order.
fn binlog_number(file: &str) -> u64 {
    file.rsplit('.').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A Debezium value: with schemas on, `schema` + `payload` (itself decoded as a `Payload`); with schemas
/// off, the payload's fields at the top level.
#[derive(Deserialize, Default)]
struct Payload<'a> {
    #[serde(borrow)]
    schema: Option<&'a RawValue>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    before: Option<RawRow<'a>>,
    #[serde(borrow)]
    after: Option<RawRow<'a>>,
    #[serde(borrow)]
    source: Option<Source<'a>>,
    #[serde(borrow)]
    op: Option<Cow<'a, str>>,
    ts_ms: Option<i64>,
    // Present on records that are not row changes.
    ddl: Option<&'a RawValue>,
    #[serde(rename = "databaseName")]
    database_name: Option<&'a RawValue>,
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
}

#[derive(Deserialize)]
struct RawRow<'a> {
    #[serde(borrow)]
    organization_uuid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    instance_uuid: Option<Cow<'a, str>>,
    #[serde(borrow)]
    price_second: Option<&'a RawValue>,
    #[serde(borrow)]
    started: Option<&'a RawValue>,
}

impl RawRow<'_> {
    fn into_row(self, (price_type, time_type): (PriceType, TimeType), decimal_scale: Option<u32>) -> Result<Row, DecodeError> {
        let org = self.organization_uuid.ok_or(DecodeError::MissingField("organization_uuid"))?;
        let instance = self.instance_uuid.ok_or(DecodeError::MissingField("instance_uuid"))?;
        let price = self.price_second.ok_or(DecodeError::MissingField("price_second"))?;
        let started = self.started.ok_or(DecodeError::MissingField("started"))?;
        Ok(Row {
            org: org.into_owned(),
            instance: instance.into_owned(),
            price: decode_price(price.get(), price_type, decimal_scale)?,
            started_ms: decode_time(started.get(), time_type)?,
        })
    }
}

fn money_err(e: MoneyError) -> DecodeError {
    DecodeError::BadDecimal(format!("{e:?}"))
}

fn decode_price(raw: &str, ty: PriceType, decimal_scale: Option<u32>) -> Result<Money, DecodeError> {
    if let Some(text) = raw.strip_prefix('"') {
        let text = text.strip_suffix('"').ok_or_else(|| DecodeError::BadDecimal("unterminated string".into()))?;
        let scale = match ty {
            PriceType::Decimal(scale) => Some(scale),
            PriceType::Plain => decimal_scale,
        };
        match scale {
            Some(scale) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| DecodeError::BadDecimal("Decimal is not base64".into()))?;
                Money::from_unscaled(twos_complement(&bytes)?, scale).map_err(money_err)
            }
            None => Money::parse(text).map_err(money_err),
        }
    } else if raw == "null" {
        Err(DecodeError::MissingField("price_second"))
    } else {
        Money::parse(raw).map_err(|e| match e {
            MoneyError::Syntax => DecodeError::WrongType("price_second"),
            other => money_err(other),
        })
    }
}

/// Big-endian two's complement bytes (Kafka Connect Decimal) as an i128.
fn twos_complement(bytes: &[u8]) -> Result<i128, DecodeError> {
    if bytes.is_empty() || bytes.len() > 16 {
        return Err(DecodeError::BadDecimal(format!("{} bytes", bytes.len())));
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(bytes);
    Ok(i128::from_be_bytes(buf))
}

fn decode_time(raw: &str, ty: TimeType) -> Result<i64, DecodeError> {
    if let Some(text) = raw.strip_prefix('"') {
        let text = text.strip_suffix('"').ok_or(DecodeError::BadTimestamp)?;
        return match ty {
            TimeType::Plain | TimeType::Zoned => parse_rfc3339_ms(text).ok_or(DecodeError::BadTimestamp),
            _ => Err(DecodeError::WrongType("started")),
        };
    }
    let n: i64 = raw.parse().map_err(|_| DecodeError::WrongType("started"))?;
    Ok(match ty {
        TimeType::Millis => n,
        TimeType::Micros => n.div_euclid(1_000),
        TimeType::Nanos => n.div_euclid(1_000_000),
        TimeType::Zoned => return Err(DecodeError::WrongType("started")),
        // 10^14 ms is the year 5138: larger values are microseconds.
        TimeType::Plain if n.abs() >= 100_000_000_000_000 => n.div_euclid(1_000),
        TimeType::Plain => n,
    })
}

/// `2024-05-01T12:34:56Z`, `2024-05-01T12:34:56.123456+02:00` -> epoch milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) { t.parse().ok() } else { None }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() {
            return None;
        }
        let first3: String = frac.chars().chain(std::iter::repeat('0')).take(3).collect();
        millis = first3.parse().ok()?;
    }
    let offset_s = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second - offset_s) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Deserialize)]
struct Schema<'a> {
    #[serde(borrow, default)]
    fields: Vec<Field<'a>>,
}

#[derive(Deserialize)]
struct Field<'a> {
    #[serde(borrow)]
    field: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fields: Vec<Field<'a>>,
    #[serde(borrow)]
    parameters: Option<std::collections::HashMap<Cow<'a, str>, Cow<'a, str>>>,
}

impl Schema<'_> {
    /// Logical types of `price_second` and `started` in the `after` (or `before`) struct.
    fn row_types(&self) -> Result<(PriceType, TimeType), DecodeError> {
        let Some(row) = self.fields.iter().find(|f| matches!(f.field.as_deref(), Some("after" | "before"))) else {
            return Ok((PriceType::Plain, TimeType::Plain));
        };
        let mut types = (PriceType::Plain, TimeType::Plain);
        for f in &row.fields {
            match (f.field.as_deref(), f.name.as_deref()) {
                (Some("price_second"), Some("org.apache.kafka.connect.data.Decimal")) => {
                    let scale = f
                        .parameters
                        .as_ref()
                        .and_then(|p| p.get("scale"))
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| DecodeError::BadDecimal("Decimal schema without scale".into()))?;
                    types.0 = PriceType::Decimal(scale);
                }
                (Some("started"), Some(name)) => {
                    types.1 = match name {
                        "io.debezium.time.ZonedTimestamp" => TimeType::Zoned,
                        "io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp" => TimeType::Millis,
                        "io.debezium.time.MicroTimestamp" => TimeType::Micros,
                        "io.debezium.time.NanoTimestamp" => TimeType::Nanos,
                        _ => TimeType::Plain,
                    }
                }
                _ => {}
            }
        }
        Ok(types)
    }
}
