//! Telling a connector's re-delivery apart from new history, by what Debezium guarantees.
//!
//! A re-delivered event repeats one already applied: the same server (or GTID domain), a position the
//! partition has already passed, and a source timestamp no newer than the newest applied there. Positions
//! only compare within one history: one server's binlog without GTIDs, or one GTID domain (whose sequence
//! numbers survive a failover to another server). So:
//! - a new server id or GTID domain is a history of its own, with its own watermark;
//! - a position that goes backwards with a *newer* source timestamp is new history (a binlog reset, a
//!   restored database, RESET MASTER): it starts a new segment and is applied;
//! - a stray far-ahead position ends its segment for the events after it (they go backwards with newer
//!   timestamps), instead of hiding them.
//!
//! Per partition and history the watermark keeps the last few segments: the first and highest position
//! applied, the newest source timestamp, and the keys applied at exactly the highest position (snapshot reads
//! share one position). An event inside a segment's range, no newer than its timestamp, is a re-delivery.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Which history a binlog coordinate belongs to: positions compare only within one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum History {
    /// One server's binlog, without GTIDs (`source.server_id`; snapshot reads report 0).
    Server(u64),
    /// A MariaDB GTID domain (`domain-server-sequence`).
    MariaDomain(u32),
    /// A MySQL GTID source (`uuid:sequence`), as the UUID's bits.
    MysqlSource(u128),
}

/// Where an event sits in its history: ordered as the log is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Coord {
    /// The GTID sequence number (0 without GTIDs): orders transactions across a failover.
    pub seq: u64,
    /// The binlog file's number.
    pub file: u64,
    /// The event's position in that file.
    pub pos: u64,
    /// The row's index within the event.
    pub row: u32,
}

/// A binlog coordinate with its history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pos {
    /// The history the coordinate belongs to.
    pub history: History,
    /// The coordinate within it.
    pub at: Coord,
}

/// Segments kept per partition and history: the current one and a few before it (a binlog reset, a stray
/// position and each restore start one).
const SEGMENTS: usize = 8;

/// A stretch of one history applied in order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// The first position applied.
    pub first: Coord,
    /// The highest position applied.
    pub max: Coord,
    /// The newest source timestamp applied.
    pub max_ts: i64,
    /// The (key, is a delete) applied at exactly `max`.
    pub at_max: BTreeSet<(String, bool)>,
}

impl Segment {
    fn new(at: Coord, ts: i64, tag: (String, bool)) -> Self {
        Segment {
            first: at,
            max: at,
            max_ts: ts,
            at_max: BTreeSet::from([tag]),
        }
    }

    /// Was the event at `at`, source time `ts`, for `tag` applied within this stretch?
    fn holds(&self, at: Coord, ts: i64, tag: &(String, bool)) -> bool {
        self.first <= at && at <= self.max && ts <= self.max_ts && (at < self.max || self.at_max.contains(tag))
    }
}

/// What an event is, compared with the watermark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Past the watermark, or at it for a new key: apply.
    Apply,
    /// Behind the watermark with a newer source timestamp: a new segment of history; apply.
    NewHistory,
    /// A re-delivery of an event already applied: drop.
    Duplicate,
}

/// The watermark of one partition and history on one worker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Watermark {
    /// Oldest first. When `open`, the last one is the stretch this worker is extending.
    segments: Vec<Segment>,
    open: bool,
}

impl Watermark {
    /// A watermark restored from segments saved by any number of workers: each is a truthful stretch of
    /// the log (every position in it was read before the checkpoint), so an event inside one is a
    /// re-delivery. None is open: the next event applied starts this worker's own.
    pub fn restored(mut segments: Vec<Segment>) -> Self {
        segments.sort_by_key(|s| (s.max_ts, s.max));
        segments.dedup();
        let excess = segments.len().saturating_sub(SEGMENTS);
        segments.drain(..excess);
        Watermark { segments, open: false }
    }

    /// The segments, oldest first, as a checkpoint saves them.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    fn start(&mut self, at: Coord, ts: i64, tag: (String, bool)) {
        if self.segments.len() == SEGMENTS {
            self.segments.remove(0);
        }
        self.segments.push(Segment::new(at, ts, tag));
        self.open = true;
    }

    /// Classifies an event at `at` with source time `ts` for `tag` (its key and whether it deletes), and
    /// records it unless it is a duplicate.
    pub fn observe(&mut self, at: Coord, ts: i64, tag: (String, bool)) -> Verdict {
        let newest = self.segments.iter().map(|s| s.max_ts).max();
        // After a reset the older stretches hold higher positions: a repeat of theirs is no progress.
        let older = self.segments.len().saturating_sub(usize::from(self.open));
        if self.segments[..older].iter().any(|s| s.holds(at, ts, &tag)) {
            return Verdict::Duplicate;
        }
        let cur = match self.segments.last_mut() {
            Some(cur) if self.open => cur,
            _ => {
                // Nothing of this worker's own yet, and no restored stretch holds it.
                self.start(at, ts, tag);
                return Verdict::Apply;
            }
        };
        if at > cur.max {
            cur.max = at;
            cur.max_ts = cur.max_ts.max(ts);
            cur.at_max.clear();
            cur.at_max.insert(tag);
            return Verdict::Apply;
        }
        if at == cur.max {
            if cur.at_max.insert(tag) {
                cur.max_ts = cur.max_ts.max(ts);
                return Verdict::Apply;
            }
            return Verdict::Duplicate;
        }
        if self
            .segments
            .iter()
            .rev()
            .any(|s| s.first <= at && at <= s.max && ts <= s.max_ts)
        {
            // Inside a stretch already applied; at an older stretch's end, only the keys applied there repeat.
            return if self.segments.iter().any(|s| s.holds(at, ts, &tag)) {
                Verdict::Duplicate
            } else {
                Verdict::Apply
            };
        }
        if newest.is_some_and(|n| ts > n) {
            self.start(at, ts, tag);
            return Verdict::NewHistory;
        }
        // Behind everything kept and no newer: a re-delivery older than the stretches remembered.
        Verdict::Duplicate
    }

    /// Has this worker moved past `at` for good, so that a re-delivery of the event there is recognised by
    /// the watermark alone (not by its key remembering it)?
    pub fn passed(&self, at: Coord) -> bool {
        match self.segments.last() {
            Some(cur) if self.open => cur.first <= at && at < cur.max,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(file: u64, pos: u64) -> Coord {
        Coord {
            seq: 0,
            file,
            pos,
            row: 0,
        }
    }
    fn tag(k: &str) -> (String, bool) {
        (k.to_string(), false)
    }

    #[test]
    fn a_replay_of_applied_events_is_duplicate() {
        let mut w = Watermark::default();
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(w.observe(at(1, 10 + i as u64), 100 + i as i64, tag(k)), Verdict::Apply);
        }
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            assert_eq!(
                w.observe(at(1, 10 + i as u64), 100 + i as i64, tag(k)),
                Verdict::Duplicate
            );
        }
        assert_eq!(w.observe(at(1, 13), 103, tag("d")), Verdict::Apply);
    }

    #[test]
    fn a_binlog_reset_is_new_history_and_its_replay_is_recognised() {
        let mut w = Watermark::default();
        w.observe(at(3, 500), 1_000, tag("a"));
        w.observe(at(3, 900), 2_000, tag("b"));
        // RESET MASTER: file 1 again, later timestamps.
        assert_eq!(w.observe(at(1, 4), 3_000, tag("c")), Verdict::NewHistory);
        assert_eq!(w.observe(at(1, 8), 3_000, tag("d")), Verdict::Apply);
        // The connector re-sends both stretches: all repeats.
        assert_eq!(w.observe(at(3, 900), 2_000, tag("b")), Verdict::Duplicate);
        assert_eq!(w.observe(at(1, 4), 3_000, tag("c")), Verdict::Duplicate);
        assert_eq!(w.observe(at(1, 8), 3_000, tag("d")), Verdict::Duplicate);
    }

    #[test]
    fn a_stray_high_position_hides_nothing_after_it() {
        let mut w = Watermark::default();
        w.observe(at(1, 100), 1_000, tag("a"));
        assert_eq!(w.observe(at(1, u64::MAX / 2), 1_000, tag("stray")), Verdict::Apply);
        assert_eq!(w.observe(at(1, 110), 2_000, tag("b")), Verdict::NewHistory);
        for p in 111..200 {
            assert_eq!(w.observe(at(1, p), 2_000, tag("c")), Verdict::Apply);
        }
        assert_eq!(w.observe(at(1, u64::MAX / 2), 1_000, tag("stray")), Verdict::Duplicate);
    }

    #[test]
    fn restored_stretches_of_other_workers_recognise_repeats_and_let_new_events_in() {
        let mut w0 = Watermark::default();
        let mut w1 = Watermark::default();
        // Two workers share one partition's log, alternating keys; then the log is reset.
        for p in 0..10u64 {
            let w = if p % 2 == 0 { &mut w0 } else { &mut w1 };
            w.observe(at(3, 100 + p), 1_000, tag(&format!("k{p}")));
        }
        w0.observe(at(1, 4), 2_000, tag("after-reset"));
        let mut saved = w0.segments().to_vec();
        saved.extend(w1.segments().iter().cloned());
        let mut one = Watermark::restored(saved);
        for p in 0..10u64 {
            assert_eq!(
                one.observe(at(3, 100 + p), 1_000, tag(&format!("k{p}"))),
                Verdict::Duplicate
            );
        }
        assert_eq!(one.observe(at(1, 4), 2_000, tag("after-reset")), Verdict::Duplicate);
        assert_eq!(one.observe(at(1, 5), 2_000, tag("new")), Verdict::Apply);
        assert_eq!(one.observe(at(1, 6), 2_000, tag("newer")), Verdict::Apply);
    }

    #[test]
    fn segments_are_capped() {
        let mut w = Watermark::default();
        for i in 0..20u64 {
            w.observe(at(20 - i, 1), 1_000 * i as i64, tag("x"));
        }
        assert_eq!(w.segments().len(), SEGMENTS);
    }

    #[test]
    fn passed_means_a_later_position_was_applied() {
        let mut w = Watermark::default();
        w.observe(at(1, 5), 1, tag("a"));
        assert!(!w.passed(at(1, 5)));
        w.observe(at(1, 6), 1, tag("b"));
        assert!(w.passed(at(1, 5)));
    }
}
