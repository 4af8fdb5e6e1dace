//! The processing-time clock: timely timestamps are wall-clock epochs rounded down to the tick, so every
//! worker's time advances even when its partitions are idle. Event time (e.g. `source.ts_ms`) is data.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The processing-time epoch now: wall-clock milliseconds rounded down to `tick_ms`.
pub fn epoch_now(tick_ms: u64) -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    ms - ms % tick_ms.max(1)
}

/// A positive duration flag: `10s`, `250ms`, `1m`, `10m` (jiff's friendly format).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = text
        .parse()
        .map_err(|e| format!("{text:?} is not a duration like 10s, 500ms or 1m: {e}"))?;
    Duration::try_from(d)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?}: the duration must be positive"))
}

/// An epoch-milliseconds instant as RFC 3339 in UTC (`2026-12-02T07:15:59.123Z`); the number itself if it
/// is outside what a timestamp holds.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}
