//! Kafka Connect's and Debezium's logical types, as JsonConverter writes them: Decimal (base64 of the
//! big-endian two's complement unscaled value, the scale in the schema) and the timestamp kinds.

use base64::Engine as _;

use crate::error::DecodeError;

/// A field's logical type, from its schema's `name`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Logical {
    /// No logical type, or the schema is off: decoders guess from the JSON.
    #[default]
    Plain,
    /// `org.apache.kafka.connect.data.Decimal` with this scale.
    Decimal {
        /// Digits after the point.
        scale: u32,
    },
    /// `io.debezium.time.ZonedTimestamp`: an RFC 3339 string.
    ZonedTimestamp,
    /// `io.debezium.time.Timestamp` or Connect's `Timestamp`: epoch milliseconds.
    Timestamp,
    /// `io.debezium.time.MicroTimestamp`: epoch microseconds.
    MicroTimestamp,
    /// `io.debezium.time.NanoTimestamp`: epoch nanoseconds.
    NanoTimestamp,
}

/// The unscaled value of a Connect Decimal: base64 text of big-endian two's complement bytes (at most 16,
/// which covers DECIMAL(38)). The standard library reads fixed widths only, hence the sign extension.
pub fn connect_decimal(base64_text: &str) -> Result<i128, DecodeError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_text)
        .map_err(|_| DecodeError::BadDecimal("Decimal is not base64".into()))?;
    if bytes.is_empty() || bytes.len() > 16 {
        return Err(DecodeError::BadDecimal(format!("{} bytes", bytes.len())));
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut buf = [fill; 16];
    buf[16 - bytes.len()..].copy_from_slice(&bytes);
    Ok(i128::from_be_bytes(buf))
}

/// A timestamp field (its raw JSON text) as epoch milliseconds, rounded down. Without a logical type a
/// string is RFC 3339 and an integer is milliseconds, or microseconds when beyond the year 5000 as ms.
/// `column` names the field in errors.
pub fn timestamp_ms(raw: &str, logical: Logical, column: &'static str) -> Result<i64, DecodeError> {
    if let Some(text) = raw.strip_prefix('"') {
        let text = text.strip_suffix('"').ok_or(DecodeError::BadTimestamp)?;
        return match logical {
            Logical::Plain | Logical::ZonedTimestamp => rfc3339_ms(text).ok_or(DecodeError::BadTimestamp),
            _ => Err(DecodeError::WrongType(column)),
        };
    }
    let n: i64 = raw.parse().map_err(|_| DecodeError::WrongType(column))?;
    Ok(match logical {
        Logical::Timestamp => n,
        Logical::MicroTimestamp => n.div_euclid(1_000),
        Logical::NanoTimestamp => n.div_euclid(1_000_000),
        Logical::ZonedTimestamp | Logical::Decimal { .. } => return Err(DecodeError::WrongType(column)),
        // 10^14 ms is the year 5138: larger values are microseconds.
        Logical::Plain if n.abs() >= 100_000_000_000_000 => n.div_euclid(1_000),
        Logical::Plain => n,
    })
}

/// `2024-05-01T12:34:56Z`, `2024-05-01T12:34:56.123456+02:00` -> epoch milliseconds, rounded down.
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let ts: jiff::Timestamp = text.parse().ok()?;
    i64::try_from(ts.as_nanosecond().div_euclid(1_000_000)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_every_encoding() {
        assert_eq!(
            timestamp_ms("\"2024-05-01T12:34:56Z\"", Logical::ZonedTimestamp, "t").unwrap(),
            1_714_566_896_000
        );
        assert_eq!(
            timestamp_ms("\"2024-05-01T14:34:56.250+02:00\"", Logical::Plain, "t").unwrap(),
            1_714_566_896_250
        );
        assert_eq!(
            timestamp_ms("\"2024-05-01 12:34:56.9999Z\"", Logical::Plain, "t").unwrap(),
            1_714_566_896_999
        );
        assert_eq!(
            timestamp_ms("\"1969-12-31T23:59:59.9995Z\"", Logical::Plain, "t").unwrap(),
            -1
        );
        assert_eq!(
            timestamp_ms("1714566896000", Logical::Timestamp, "t").unwrap(),
            1_714_566_896_000
        );
        assert_eq!(
            timestamp_ms("1714566896000123", Logical::MicroTimestamp, "t").unwrap(),
            1_714_566_896_000
        );
        assert_eq!(
            timestamp_ms("1714566896000123", Logical::Plain, "t").unwrap(),
            1_714_566_896_000
        );
        assert_eq!(
            timestamp_ms("1714566896000123456", Logical::NanoTimestamp, "t").unwrap(),
            1_714_566_896_000
        );
        assert!(timestamp_ms("\"2024-13-01T00:00:00Z\"", Logical::ZonedTimestamp, "t").is_err());
        assert!(timestamp_ms("\"2024-02-30T00:00:00Z\"", Logical::ZonedTimestamp, "t").is_err());
        assert!(
            timestamp_ms("\"2024-05-01T12:34:56\"", Logical::ZonedTimestamp, "t").is_err(),
            "an instant needs an offset"
        );
        assert_eq!(
            timestamp_ms("\"x\"", Logical::Timestamp, "t").unwrap_err(),
            DecodeError::WrongType("t")
        );
    }

    #[test]
    fn decimals_in_twos_complement() {
        assert_eq!(connect_decimal("APo=").unwrap(), 250);
        assert_eq!(connect_decimal("/w==").unwrap(), -1);
        assert!(connect_decimal("").is_err());
        assert!(connect_decimal("not base64!").is_err());
    }
}
