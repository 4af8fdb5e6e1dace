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
        super::reject_array(value)?;
        if let Some(payload) = self.same_schema_payload(value) {
            return self.decode_payload(payload, self.types, key, meta);
        }
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
        self.decode_payload(payload, types, key, meta)
    }

    /// The fast path for schemas on. JsonConverter writes `{"schema":S,"payload":P}` with the same S on
    /// every message of a table, so when the value starts with the schema already seen, only P is parsed:
    /// scanning S (3 KB against P's 0.5 KB) was most of the decoding cost. Anything else (another schema,
    /// other fields, other spacing) is `None` and takes the general path; so is a P that does not parse as a
    /// whole up to the closing brace, which keeps the two paths' results identical.
    fn same_schema_payload<'v>(&self, value: &'v [u8]) -> Option<Payload<'v>> {
        const HEAD: &[u8] = br#"{"schema":"#;
        const MID: &[u8] = br#","payload":"#;
        if self.last_schema.is_empty() {
            return None;
        }
        let rest = value.strip_prefix(HEAD)?.strip_prefix(self.last_schema.as_slice())?.strip_prefix(MID)?;
        let body = rest.trim_ascii_end().strip_suffix(b"}")?;
        serde_json::from_slice::<Payload<'v>>(body).ok().filter(|p| p.schema.is_none() && p.payload.is_none())
    }

    fn decode_payload(
        &self,
        payload: Payload<'_>,
        types: (PriceType, TimeType),
        key: Option<String>,
        meta: Meta,
    ) -> Result<Decoded, DecodeError> {
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
    // One parse for the usual key (a JSON object): a key with schema carries its value in `payload`. Only a
    // key the envelope does not fit (a scalar, or bad JSON) is parsed again, to accept or reject it.
    match serde_json::from_str::<KeyEnvelope<'_>>(text) {
        Ok(KeyEnvelope { payload: Some(p), schema: Some(_) }) => Ok(p.get().trim().to_owned()),
        Ok(_) => Ok(text.trim().to_owned()),
        Err(_) => {
            let raw: &RawValue = serde_json::from_str(text).map_err(DecodeError::from_json)?;
            Ok(raw.get().trim().to_owned())
        }
    }
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
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
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
            if *sign == b'+' {
                off
            } else {
                -off
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/debezium");
        assert!(dir.is_dir(), "fixtures missing at {}", dir.display());
        dir
    }

    fn read(path: &Path) -> Option<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (!bytes.is_empty()).then_some(bytes)
    }

    fn json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The payload of a fixture value, whatever its schema setting.
    fn payload(v: serde_json::Value) -> serde_json::Value {
        match v.get("payload") {
            Some(p) if v.get("schema").is_some() => p.clone(),
            _ => v,
        }
    }

    /// Expected row of `side` in `file` of `profile/kind/schemas`, from independent facts: integer prices
    /// read as JSON integers, decimal prices = the integer profile's price / 100 (same rows, DECIMAL(10,2)),
    /// and `started` = the epoch milliseconds the Timestamp profile carries for the same row.
    fn expected_row(profile: &Path, kind: &str, file: &str, side: &str) -> Option<Row> {
        let int = payload(json(&profile.join("int-zonedtimestamp/schemas-disabled").join(file)));
        let r = int.get(side).filter(|r| !r.is_null())?;
        let int_price = r["price_second"].as_i64().unwrap();
        let decimal_dir = fixtures().join("v2.7/decimal-timestamp/schemas-disabled");
        let ms = payload(json(&decimal_dir.join(file)))[side]["started"].as_i64().unwrap();
        Some(Row {
            org: r["organization_uuid"].as_str().unwrap().into(),
            instance: r["instance_uuid"].as_str().unwrap().into(),
            price: if kind == "int-zonedtimestamp" {
                Money::from_int(int_price)
            } else {
                Money::from_unscaled(int_price.into(), 2).unwrap()
            },
            started_ms: ms,
        })
    }

    #[test]
    fn every_generated_fixture_decodes_to_the_values_it_holds() {
        let mut checked = 0;
        for profile in ["v1.9", "v2.7", "v3.2-mariadb"] {
            let profile = fixtures().join(profile);
            for kind in ["int-zonedtimestamp", "decimal-timestamp"] {
                for schemas in ["schemas-enabled", "schemas-disabled"] {
                    let dir = profile.join(kind).join(schemas);
                    if !dir.is_dir() {
                        continue;
                    }
                    // Schemas off lose the Decimal's scale: the operator supplies it.
                    let scale = (kind == "decimal-timestamp" && schemas == "schemas-disabled").then_some(2);
                    for entry in std::fs::read_dir(&dir).unwrap() {
                        let path = entry.unwrap().path();
                        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                        let Some(stem) = name.strip_suffix(".value.json") else { continue };
                        let key = read(&dir.join(format!("{stem}.key.json")));
                        let value = read(&path);
                        let got = DebeziumDecoder::new(scale).decode(key.as_deref(), value.as_deref(), Meta::default());
                        let got = got.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        let Decoded::Change(change) = got else { panic!("{}: ignored", path.display()) };
                        assert_eq!(
                            change.key.as_deref(),
                            Some("{\"id\":".to_owned() + &payload(json(&dir.join(format!("{stem}.key.json"))))["id"].to_string() + "}")
                                .as_deref(),
                            "{}",
                            path.display()
                        );
                        let Some(value) = value else {
                            assert_eq!(change.op, Op::Tombstone, "{}", path.display());
                            checked += 1;
                            continue;
                        };
                        let p = payload(serde_json::from_slice(&value).unwrap());
                        assert_eq!(change.ts_ms, p["source"]["ts_ms"].as_i64().unwrap(), "{}", path.display());
                        let pos = change.pos.expect("generated fixtures carry binlog positions");
                        assert_eq!(pos.pos, p["source"]["pos"].as_u64().unwrap());
                        assert_eq!(pos.file, 3, "mysql-bin.000003");
                        let after = expected_row(&profile, kind, &name, "after");
                        let before = expected_row(&profile, kind, &name, "before");
                        let expected = match p["op"].as_str().unwrap() {
                            "r" => Op::Upsert { kind: Upsert::Read, row: after.unwrap(), moved_in: false },
                            "c" => Op::Upsert { kind: Upsert::Create, row: after.unwrap(), moved_in: false },
                            "u" => Op::Upsert { kind: Upsert::Update, row: after.unwrap(), moved_in: false },
                            "d" => Op::Delete { before, moved_out: false },
                            other => panic!("unexpected op {other}"),
                        };
                        assert_eq!(change.op, expected, "{}", path.display());
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 10 * 7, "ten directories of seven events each");
    }

    /// Decodes a `.jsonl` capture (`{"topic","key","value", "partition"?, "offset"?, "headers"?}` per line).
    fn decode_lines(path: &Path, scale: Option<u32>) -> Vec<Result<Decoded, DecodeError>> {
        let mut decoder = DebeziumDecoder::new(scale);
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .enumerate()
            .map(|(i, line)| {
                let rec: serde_json::Value = serde_json::from_str(line).unwrap();
                let header = |name: &str| rec["headers"].as_array().is_some_and(|h| h.iter().any(|x| x["key"] == name));
                let meta = Meta {
                    partition: rec["partition"].as_i64().unwrap_or(0) as i32,
                    offset: rec["offset"].as_i64().unwrap_or(i as i64),
                    has_newkey: header("__debezium.newkey"),
                    has_oldkey: header("__debezium.oldkey"),
                };
                decoder.decode(rec["key"].as_str().map(str::as_bytes), rec["value"].as_str().map(str::as_bytes), meta)
            })
            .collect()
    }

    /// The same-schema fast path gives exactly what the general path gives, and is taken on real streams.
    #[test]
    fn same_schema_fast_path_matches_the_general_path() {
        let mut files = vec![fixtures().join("captured/mysqlconn-instances_schemas.jsonl")];
        for stream in [
            "v1.9/int-zonedtimestamp",
            "v2.7/int-zonedtimestamp",
            "v2.7/decimal-timestamp",
            "v3.2-mariadb/int-zonedtimestamp",
            "v3.2-mariadb/decimal-timestamp",
        ] {
            files.push(fixtures().join(stream).join("schemas-enabled/stream.jsonl"));
        }
        for path in &files {
            let mut fast = 0;
            let mut streaming = DebeziumDecoder::new(None);
            for (i, line) in std::fs::read_to_string(path).unwrap().lines().enumerate() {
                let rec: serde_json::Value = serde_json::from_str(line).unwrap();
                let (key, value) = (rec["key"].as_str().map(str::as_bytes), rec["value"].as_str().map(str::as_bytes));
                let meta = Meta { partition: 0, offset: i as i64, ..Meta::default() };
                if value.is_some_and(|v| streaming.same_schema_payload(v).is_some()) {
                    fast += 1;
                }
                let general = DebeziumDecoder::new(None).decode(key, value, meta);
                let streamed = streaming.decode(key, value, meta);
                assert_eq!(format!("{streamed:?}"), format!("{general:?}"), "{} line {}", path.display(), i + 1);
            }
            assert!(fast > 0, "{}: fast path never taken", path.display());
        }
        // A value with the cached schema but another field after the payload takes the general path.
        let mut d = DebeziumDecoder::new(None);
        let schema = r#"{"type":"struct","fields":[],"optional":false}"#;
        let payload = r#"{"op":"t","source":{"ts_ms":1,"file":"b.000001","pos":4},"ts_ms":1}"#;
        let plain = format!(r#"{{"schema":{schema},"payload":{payload}}}"#);
        d.decode(None, Some(plain.as_bytes()), Meta::default()).unwrap();
        assert!(d.same_schema_payload(plain.as_bytes()).is_some());
        let extra = format!(r#"{{"schema":{schema},"payload":{payload},"x":1}}"#);
        assert!(d.same_schema_payload(extra.as_bytes()).is_none());
    }

    #[test]
    fn generated_streams_decode_without_errors() {
        for profile in ["v1.9", "v2.7", "v3.2-mariadb"] {
            for kind in ["int-zonedtimestamp", "decimal-timestamp"] {
                for schemas in ["schemas-enabled", "schemas-disabled"] {
                    let path = fixtures().join(profile).join(kind).join(schemas).join("stream.jsonl");
                    if !path.exists() {
                        continue;
                    }
                    let scale = (kind == "decimal-timestamp").then_some(2);
                    for (i, r) in decode_lines(&path, scale).into_iter().enumerate() {
                        assert!(matches!(r, Ok(Decoded::Change(_))), "{}:{}: {r:?}", path.display(), i + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn extras_primary_key_change_truncate_and_non_row_records() {
        let lines = decode_lines(&fixtures().join("v2.7/extras/stream.jsonl"), None);
        let ops: Vec<String> = lines
            .iter()
            .map(|r| match r {
                Ok(Decoded::Change(c)) => match &c.op {
                    Op::Upsert { kind, moved_in, .. } => format!("{kind:?}{}", if *moved_in { "+moved" } else { "" }),
                    Op::Delete { moved_out, .. } => format!("Delete{}", if *moved_out { "+moved" } else { "" }),
                    other => format!("{other:?}"),
                },
                Ok(Decoded::Ignored(reason)) => format!("ignored:{reason}"),
                Err(e) => panic!("{e}"),
            })
            .collect();
        assert_eq!(ops[..3], ["Delete+moved", "Tombstone", "Create+moved"]);
        assert!(ops.contains(&"Truncate".to_string()), "{ops:?}");

        let dir = fixtures().join("v2.7/extras");
        let one = |stem: &str| {
            let key = dir.join(format!("{stem}.key.json"));
            // Some extras ship without a key file; a row event always has one on the wire.
            let key = if key.exists() {
                read(&key)
            } else if stem == "truncate" {
                None
            } else {
                Some(b"{\"id\":41}".to_vec())
            };
            DebeziumDecoder::new(None).decode(key.as_deref(), read(&dir.join(format!("{stem}.value.json"))).as_deref(), Meta::default())
        };
        assert_eq!(one("heartbeat").unwrap(), Decoded::Ignored("heartbeat"));
        assert_eq!(one("transaction-begin").unwrap(), Decoded::Ignored("transaction"));
        assert_eq!(one("transaction-end").unwrap(), Decoded::Ignored("transaction"));
        assert_eq!(one("schema-change.schemaless").unwrap(), Decoded::Ignored("schema_change"));
        let Decoded::Change(t) = one("truncate").unwrap() else { panic!("truncate ignored") };
        assert_eq!((t.key, t.op), (None, Op::Truncate));
        let Decoded::Change(inc) = one("incremental-snapshot-read.schemaless").unwrap() else { panic!() };
        assert_eq!(inc.pos, None, "incremental snapshot reads are not position-deduplicated");
        for stem in ["create-with-query.schemaless", "create-with-transaction.schemaless"] {
            assert!(matches!(one(stem).unwrap(), Decoded::Change(Change { op: Op::Upsert { kind: Upsert::Create, .. }, .. })), "{stem}");
        }
    }

    #[test]
    fn captured_streams_with_and_without_schemas_decode_alike() {
        let changes = |file: &str| -> (Vec<Change>, usize) {
            let mut ignored = 0;
            let mut out = Vec::new();
            for r in decode_lines(&fixtures().join("captured").join(file), None) {
                match r.unwrap() {
                    Decoded::Change(c) => out.push(c),
                    Decoded::Ignored(reason) => {
                        assert_eq!(reason, "schema_change");
                        ignored += 1;
                    }
                }
            }
            (out, ignored)
        };
        let (with, ignored_with) = changes("mysqlconn-instances_schemas.jsonl");
        let (without, ignored_without) = changes("mysqlconn-instances_noschemas.jsonl");
        assert_eq!((ignored_with, ignored_without), (6, 6));
        assert_eq!(with.len(), 23);
        // Two separate captures of the same statements: equal but for the wall-clock times.
        let strip = |v: Vec<Change>| {
            v.into_iter()
                .map(|c| {
                    let op = match c.op {
                        Op::Upsert { kind, row, .. } => format!("{kind:?} {} {} {}", row.org, row.instance, row.price),
                        Op::Delete { before, .. } => format!("Delete {:?}", before.map(|r| (r.instance, r.price))),
                        other => format!("{other:?}"),
                    };
                    (c.key, op)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(with.clone()), strip(without));
        // Line 11 of the capture: the explicit `started` of 2025-06-01 12:34:56 UTC.
        let explicit = with.iter().find(|c| matches!(&c.op, Op::Upsert { row, .. } if row.instance.ends_with("000000000005"))).unwrap();
        let Op::Upsert { row, .. } = &explicit.op else { unreachable!() };
        assert_eq!(row.started_ms, 1_748_781_296_000);
        assert_eq!(row.price, Money::from_int(3));
    }

    #[test]
    fn bad_input_is_an_error_with_a_reason() {
        let good = std::fs::read_to_string(fixtures().join("v2.7/int-zonedtimestamp/schemas-disabled/create.value.json")).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xfe, 0x00, 0x13], "malformed"),
            (good.as_bytes()[..good.len() / 2].to_vec(), "truncated"),
            (b"not json at all".to_vec(), "malformed"),
            (good.replace("\"op\":\"c\"", "\"op\":\"x\"").into_bytes(), "unknown_op"),
            (good.replace("\"price_second\":12", "\"price_second\":true").into_bytes(), "wrong_type"),
            (good.replace("\"price_second\":12,", "").into_bytes(), "missing_field"),
            (
                good.replace("\"organization_uuid\":\"7c9e6679-7425-40de-944b-e07fc1f90ae7\"", "\"organization_uuid\":42").into_bytes(),
                "shape",
            ),
            (good.replace("2024-05-01T12:34:56Z", "yesterday").into_bytes(), "bad_timestamp"),
            (good.replace("\"source\":", "\"src\":").into_bytes(), "missing_field"),
            (b"[1,2,3]".to_vec(), "shape"),
            (good.replace("\"price_second\":12", "\"price_second\":1e-12").into_bytes(), "bad_decimal"),
        ];
        for (value, reason) in cases {
            let got = DebeziumDecoder::new(None).decode(Some(b"{\"id\":43}"), Some(&value), Meta::default());
            match got {
                Err(e) => assert_eq!(e.reason(), reason, "{e} for {:?}", String::from_utf8_lossy(&value[..value.len().min(60)])),
                Ok(d) => panic!("expected {reason}, decoded {d:?}"),
            }
        }
        let key_garbage = DebeziumDecoder::new(None).decode(Some(b"{\"id\":"), Some(good.as_bytes()), Meta::default());
        assert_eq!(key_garbage.unwrap_err().reason(), "truncated");
    }

    #[test]
    fn prices_in_every_encoding() {
        assert_eq!(decode_price("42", PriceType::Plain, None).unwrap(), Money::from_int(42));
        assert_eq!(decode_price("12.5", PriceType::Plain, None).unwrap().to_string(), "12.5");
        assert_eq!(decode_price("\"12.50\"", PriceType::Plain, None).unwrap().to_string(), "12.5");
        assert_eq!(decode_price("\"APo=\"", PriceType::Decimal(2), None).unwrap().to_string(), "2.5");
        assert_eq!(decode_price("\"/w==\"", PriceType::Decimal(0), None).unwrap().to_string(), "-1");
        assert_eq!(decode_price("\"APo=\"", PriceType::Plain, Some(3)).unwrap().to_string(), "0.25");
        assert!(decode_price("\"APo=\"", PriceType::Plain, None).is_err(), "base64 without a scale is not a number");
    }

    #[test]
    fn timestamps_in_every_encoding() {
        assert_eq!(decode_time("\"2024-05-01T12:34:56Z\"", TimeType::Zoned).unwrap(), 1_714_566_896_000);
        assert_eq!(decode_time("\"2024-05-01T14:34:56.250+02:00\"", TimeType::Plain).unwrap(), 1_714_566_896_250);
        assert_eq!(decode_time("1714566896000", TimeType::Millis).unwrap(), 1_714_566_896_000);
        assert_eq!(decode_time("1714566896000123", TimeType::Micros).unwrap(), 1_714_566_896_000);
        assert_eq!(decode_time("1714566896000123", TimeType::Plain).unwrap(), 1_714_566_896_000);
        assert_eq!(decode_time("1714566896000123456", TimeType::Nanos).unwrap(), 1_714_566_896_000);
        assert!(decode_time("\"2024-13-01T00:00:00Z\"", TimeType::Zoned).is_err());
    }
}
