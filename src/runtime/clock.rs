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
