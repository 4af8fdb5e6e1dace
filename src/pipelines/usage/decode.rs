//! The `cloud.instances` row as Debezium's MySQL connector writes it, and the usage pipeline's decoder:
//! a Debezium envelope over that row, turned into the usage dataflow's [`Change`].

use std::borrow::Cow;

use dataflows::money::{Money, MoneyError};
use dataflows::usage::{Change, Coord, History, Op, Pos, Row, Upsert};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::DecodeError;
use crate::sources::debezium::logical::{connect_decimal, timestamp_ms, Logical};
use crate::sources::debezium::{Envelope, EventOp, Gtid, RowDecoder, SchemaField};
use crate::sources::decode::{Decoded, Decoder, Metadata};

/// Decodes `cloud.instances` change events into usage [`Change`]s.
#[derive(Debug)]
pub struct UsageDecoder {
    envelope: Envelope<Instances>,
}

impl UsageDecoder {
    /// `decimal_scale`: the scale of base64 Decimal prices when the connector runs with schemas off (the
    /// scale travels in the schema).
    pub fn new(decimal_scale: Option<u32>) -> Self {
        UsageDecoder {
            envelope: Envelope::new(Instances { decimal_scale }),
        }
    }
}

impl Decoder for UsageDecoder {
    type Out = Change;

    fn decode(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
    ) -> Result<Decoded<Change>, DecodeError> {
        let event = match self.envelope.decode(key, value, meta)? {
            Decoded::Record(event) => event,
            Decoded::Ignored(reason) => return Ok(Decoded::Ignored(reason)),
        };
        let upsert = |kind, row| Op::Upsert {
            kind,
            row,
            moved_in: event.moved_in,
        };
        let op = match event.op {
            EventOp::Read(row) => upsert(Upsert::Read, row),
            EventOp::Create(row) => upsert(Upsert::Create, row),
            EventOp::Update(row) => upsert(Upsert::Update, row),
            EventOp::Delete(before) => Op::Delete {
                before,
                moved_out: event.moved_out,
            },
            EventOp::Tombstone => Op::Tombstone,
            EventOp::Truncate => Op::Truncate,
        };
        let pos = event.binlog.map(|b| {
            let (history, seq) = match b.gtid {
                Some(Gtid::Maria { domain, seq }) => (History::MariaDomain(domain), seq),
                Some(Gtid::Mysql { source, seq }) => (History::MysqlSource(source), seq),
                None => (History::Server(b.server_id), 0),
            };
            Pos {
                history,
                at: Coord {
                    seq,
                    file: b.file,
                    pos: b.pos,
                    row: b.row,
                },
            }
        });
        Ok(Decoded::Record(Change {
            key: event.key,
            partition: meta.partition,
            offset: meta.offset,
            pos,
            ts_ms: event.ts_ms,
            op,
        }))
    }
}

/// The row of `cloud.instances` the usage pipeline reads.
#[derive(Debug)]
struct Instances {
    /// Scale for base64 Decimals when schemas are off (the schema that would carry it is absent).
    decimal_scale: Option<u32>,
}

/// The logical types of `price_second` and `started`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct InstanceTypes {
    price: Logical,
    started: Logical,
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

impl RowDecoder for Instances {
    type Raw<'a> = RawRow<'a>;
    type Row = Row;
    type Types = InstanceTypes;

    fn types(&self, fields: &[SchemaField<'_>]) -> Result<InstanceTypes, DecodeError> {
        let mut types = InstanceTypes::default();
        for f in fields {
            match f.column() {
                Some("price_second") => types.price = f.logical()?,
                Some("started") => types.started = f.logical()?,
                _ => {}
            }
        }
        // Only a Decimal changes how a price is read; a price of any other logical type is read as plain.
        if !matches!(types.price, Logical::Decimal { .. }) {
            types.price = Logical::Plain;
        }
        Ok(types)
    }

    fn row(&self, raw: RawRow<'_>, types: InstanceTypes) -> Result<Row, DecodeError> {
        let org = raw
            .organization_uuid
            .ok_or(DecodeError::MissingField("organization_uuid"))?;
        let instance = raw.instance_uuid.ok_or(DecodeError::MissingField("instance_uuid"))?;
        let price = raw.price_second.ok_or(DecodeError::MissingField("price_second"))?;
        let started = raw.started.ok_or(DecodeError::MissingField("started"))?;
        Ok(Row {
            org: org.into_owned(),
            instance: instance.into_owned(),
            price: decode_price(price.get(), types.price, self.decimal_scale)?,
            started_ms: timestamp_ms(started.get(), types.started, "started")?,
        })
    }
}

fn money_err(e: MoneyError) -> DecodeError {
    DecodeError::BadDecimal(format!("{e:?}"))
}

/// `price_second` in whatever the JSON holds: an integer, a double, a decimal string, or a base64 Decimal
/// (with the schema's scale, or `decimal_scale` when schemas are off).
fn decode_price(raw: &str, ty: Logical, decimal_scale: Option<u32>) -> Result<Money, DecodeError> {
    if let Some(text) = raw.strip_prefix('"') {
        let text = text
            .strip_suffix('"')
            .ok_or_else(|| DecodeError::BadDecimal("unterminated string".into()))?;
        let scale = match ty {
            Logical::Decimal { scale } => Some(scale),
            _ => decimal_scale,
        };
        match scale {
            Some(scale) => Money::from_unscaled(connect_decimal(text)?, scale).map_err(money_err),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::decode::Headers;
    use std::path::{Path, PathBuf};

    /// The coordinates and the primary-key-change headers a test message carries.
    #[derive(Clone, Copy, Default)]
    struct Meta {
        partition: i32,
        offset: i64,
        has_newkey: bool,
        has_oldkey: bool,
    }

    /// Decodes as the Kafka source would, with `meta`'s headers on the message.
    fn decode(
        d: &mut UsageDecoder,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: Meta,
    ) -> Result<Decoded<Change>, DecodeError> {
        let newkey: &[(&str, Option<&[u8]>)] = if meta.has_newkey {
            &[("__debezium.newkey", Some(b"{}"))]
        } else {
            &[]
        };
        let oldkey: &[(&str, Option<&[u8]>)] = if meta.has_oldkey {
            &[("__debezium.oldkey", Some(b"{}"))]
        } else {
            &[]
        };
        let headers = [newkey, oldkey].concat();
        let m = Metadata {
            headers: Headers::list(&headers),
            ..Metadata::at("topic.cloud.instances", meta.partition, meta.offset)
        };
        d.decode(key, value, &m)
    }

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
        let ms = payload(json(&decimal_dir.join(file)))[side]["started"]
            .as_i64()
            .unwrap();
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
                        let Some(stem) = name.strip_suffix(".value.json") else {
                            continue;
                        };
                        let key = read(&dir.join(format!("{stem}.key.json")));
                        let value = read(&path);
                        let got = decode(
                            &mut UsageDecoder::new(scale),
                            key.as_deref(),
                            value.as_deref(),
                            Meta::default(),
                        );
                        let got = got.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                        let Decoded::Record(change) = got else {
                            panic!("{}: ignored", path.display())
                        };
                        assert_eq!(
                            change.key.as_deref(),
                            Some(
                                "{\"id\":".to_owned()
                                    + &payload(json(&dir.join(format!("{stem}.key.json"))))["id"].to_string()
                                    + "}"
                            )
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
                        assert_eq!(
                            change.ts_ms,
                            p["source"]["ts_ms"].as_i64().unwrap(),
                            "{}",
                            path.display()
                        );
                        let pos = change.pos.expect("generated fixtures carry binlog positions");
                        assert_eq!(pos.at.pos, p["source"]["pos"].as_u64().unwrap());
                        assert_eq!(pos.at.file, 3, "mysql-bin.000003");
                        // MariaDB's connector reports the GTID `0-1-N` on streamed events: domain 0, sequence N.
                        let expected_history = match p["source"]["gtid"].as_str() {
                            Some(gtid) => {
                                let seq: u64 = gtid.rsplit('-').next().unwrap().parse().unwrap();
                                assert_eq!(pos.at.seq, seq, "{}", path.display());
                                History::MariaDomain(0)
                            }
                            None => History::Server(p["source"]["server_id"].as_u64().unwrap()),
                        };
                        assert_eq!(pos.history, expected_history, "{}", path.display());
                        let after = expected_row(&profile, kind, &name, "after");
                        let before = expected_row(&profile, kind, &name, "before");
                        let expected = match p["op"].as_str().unwrap() {
                            "r" => Op::Upsert {
                                kind: Upsert::Read,
                                row: after.unwrap(),
                                moved_in: false,
                            },
                            "c" => Op::Upsert {
                                kind: Upsert::Create,
                                row: after.unwrap(),
                                moved_in: false,
                            },
                            "u" => Op::Upsert {
                                kind: Upsert::Update,
                                row: after.unwrap(),
                                moved_in: false,
                            },
                            "d" => Op::Delete {
                                before,
                                moved_out: false,
                            },
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
    fn decode_lines(path: &Path, scale: Option<u32>) -> Vec<Result<Decoded<Change>, DecodeError>> {
        let mut decoder = UsageDecoder::new(scale);
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .enumerate()
            .map(|(i, line)| {
                let rec: serde_json::Value = serde_json::from_str(line).unwrap();
                let header = |name: &str| {
                    rec["headers"]
                        .as_array()
                        .is_some_and(|h| h.iter().any(|x| x["key"] == name))
                };
                let meta = Meta {
                    partition: rec["partition"].as_i64().unwrap_or(0) as i32,
                    offset: rec["offset"].as_i64().unwrap_or(i as i64),
                    has_newkey: header("__debezium.newkey"),
                    has_oldkey: header("__debezium.oldkey"),
                };
                decode(
                    &mut decoder,
                    rec["key"].as_str().map(str::as_bytes),
                    rec["value"].as_str().map(str::as_bytes),
                    meta,
                )
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
            let mut streaming = UsageDecoder::new(None);
            for (i, line) in std::fs::read_to_string(path).unwrap().lines().enumerate() {
                let rec: serde_json::Value = serde_json::from_str(line).unwrap();
                let (key, value) = (
                    rec["key"].as_str().map(str::as_bytes),
                    rec["value"].as_str().map(str::as_bytes),
                );
                let meta = Meta {
                    partition: 0,
                    offset: i as i64,
                    ..Meta::default()
                };
                if value.is_some_and(|v| streaming.envelope.same_schema_payload(v).is_some()) {
                    fast += 1;
                }
                let general = decode(&mut UsageDecoder::new(None), key, value, meta);
                let streamed = decode(&mut streaming, key, value, meta);
                assert_eq!(
                    format!("{streamed:?}"),
                    format!("{general:?}"),
                    "{} line {}",
                    path.display(),
                    i + 1
                );
            }
            assert!(fast > 0, "{}: fast path never taken", path.display());
        }
        // A value with the cached schema but another field after the payload takes the general path.
        let mut d = UsageDecoder::new(None);
        let schema = r#"{"type":"struct","fields":[],"optional":false}"#;
        let payload = r#"{"op":"t","source":{"ts_ms":1,"file":"b.000001","pos":4},"ts_ms":1}"#;
        let plain = format!(r#"{{"schema":{schema},"payload":{payload}}}"#);
        decode(&mut d, None, Some(plain.as_bytes()), Meta::default()).unwrap();
        assert!(d.envelope.same_schema_payload(plain.as_bytes()).is_some());
        let extra = format!(r#"{{"schema":{schema},"payload":{payload},"x":1}}"#);
        assert!(d.envelope.same_schema_payload(extra.as_bytes()).is_none());
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
                        assert!(
                            matches!(r, Ok(Decoded::Record(_))),
                            "{}:{}: {r:?}",
                            path.display(),
                            i + 1
                        );
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
                Ok(Decoded::Record(c)) => match &c.op {
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
            decode(
                &mut UsageDecoder::new(None),
                key.as_deref(),
                read(&dir.join(format!("{stem}.value.json"))).as_deref(),
                Meta::default(),
            )
        };
        assert_eq!(one("heartbeat").unwrap(), Decoded::Ignored("heartbeat"));
        assert_eq!(one("transaction-begin").unwrap(), Decoded::Ignored("transaction"));
        assert_eq!(one("transaction-end").unwrap(), Decoded::Ignored("transaction"));
        assert_eq!(
            one("schema-change.schemaless").unwrap(),
            Decoded::Ignored("schema_change")
        );
        let Decoded::Record(t) = one("truncate").unwrap() else {
            panic!("truncate ignored")
        };
        assert_eq!((t.key, t.op), (None, Op::Truncate));
        let Decoded::Record(inc) = one("incremental-snapshot-read.schemaless").unwrap() else {
            panic!()
        };
        assert_eq!(
            inc.pos, None,
            "incremental snapshot reads are not position-deduplicated"
        );
        for stem in ["create-with-query.schemaless", "create-with-transaction.schemaless"] {
            assert!(
                matches!(
                    one(stem).unwrap(),
                    Decoded::Record(Change {
                        op: Op::Upsert {
                            kind: Upsert::Create,
                            ..
                        },
                        ..
                    })
                ),
                "{stem}"
            );
        }
    }

    #[test]
    fn captured_streams_with_and_without_schemas_decode_alike() {
        let changes = |file: &str| -> (Vec<Change>, usize) {
            let mut ignored = 0;
            let mut out = Vec::new();
            for r in decode_lines(&fixtures().join("captured").join(file), None) {
                match r.unwrap() {
                    Decoded::Record(c) => out.push(c),
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
        let explicit = with
            .iter()
            .find(|c| matches!(&c.op, Op::Upsert { row, .. } if row.instance.ends_with("000000000005")))
            .unwrap();
        let Op::Upsert { row, .. } = &explicit.op else {
            unreachable!()
        };
        assert_eq!(row.started_ms, 1_748_781_296_000);
        assert_eq!(row.price, Money::from_int(3));
    }

    #[test]
    fn bad_input_is_an_error_with_a_reason() {
        let good =
            std::fs::read_to_string(fixtures().join("v2.7/int-zonedtimestamp/schemas-disabled/create.value.json"))
                .unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xfe, 0x00, 0x13], "malformed"),
            (good.as_bytes()[..good.len() / 2].to_vec(), "truncated"),
            (b"not json at all".to_vec(), "malformed"),
            (good.replace("\"op\":\"c\"", "\"op\":\"x\"").into_bytes(), "unknown_op"),
            (
                good.replace("\"price_second\":12", "\"price_second\":true")
                    .into_bytes(),
                "wrong_type",
            ),
            (good.replace("\"price_second\":12,", "").into_bytes(), "missing_field"),
            (
                good.replace(
                    "\"organization_uuid\":\"7c9e6679-7425-40de-944b-e07fc1f90ae7\"",
                    "\"organization_uuid\":42",
                )
                .into_bytes(),
                "shape",
            ),
            (
                good.replace("2024-05-01T12:34:56Z", "yesterday").into_bytes(),
                "bad_timestamp",
            ),
            (good.replace("\"source\":", "\"src\":").into_bytes(), "missing_field"),
            (b"[1,2,3]".to_vec(), "shape"),
            (
                good.replace("\"price_second\":12", "\"price_second\":1e-12")
                    .into_bytes(),
                "bad_decimal",
            ),
        ];
        for (value, reason) in cases {
            let got = decode(
                &mut UsageDecoder::new(None),
                Some(b"{\"id\":43}"),
                Some(&value),
                Meta::default(),
            );
            match got {
                Err(e) => assert_eq!(
                    e.reason(),
                    reason,
                    "{e} for {:?}",
                    String::from_utf8_lossy(&value[..value.len().min(60)])
                ),
                Ok(d) => panic!("expected {reason}, decoded {d:?}"),
            }
        }
        let key_garbage = decode(
            &mut UsageDecoder::new(None),
            Some(b"{\"id\":"),
            Some(good.as_bytes()),
            Meta::default(),
        );
        assert_eq!(key_garbage.unwrap_err().reason(), "truncated");
    }

    #[test]
    fn prices_in_every_encoding() {
        assert_eq!(decode_price("42", Logical::Plain, None).unwrap(), Money::from_int(42));
        assert_eq!(decode_price("12.5", Logical::Plain, None).unwrap().to_string(), "12.5");
        assert_eq!(
            decode_price("\"12.50\"", Logical::Plain, None).unwrap().to_string(),
            "12.5"
        );
        assert_eq!(
            decode_price("\"APo=\"", Logical::Decimal { scale: 2 }, None)
                .unwrap()
                .to_string(),
            "2.5"
        );
        assert_eq!(
            decode_price("\"/w==\"", Logical::Decimal { scale: 0 }, None)
                .unwrap()
                .to_string(),
            "-1"
        );
        assert_eq!(
            decode_price("\"APo=\"", Logical::Plain, Some(3)).unwrap().to_string(),
            "0.25"
        );
        assert!(
            decode_price("\"APo=\"", Logical::Plain, None).is_err(),
            "base64 without a scale is not a number"
        );
    }
}
