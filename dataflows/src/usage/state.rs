//! One worker's upsert state: each key's live row with its price periods, deleted keys until a tombstone
//! or the watermark makes them unnecessary, the re-delivery watermarks, and what a checkpoint must save.

use std::collections::VecDeque;

use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use super::redelivery::{Pos, Verdict, Watermark};
use super::{Change, Delta, Note, Op, Row, Upsert};
use crate::money::Money;

/// Whole seconds between two epoch-millisecond instants, as MariaDB's second-resolution clock counts
/// them; zero if the end is not after the start.
pub fn billable_seconds(start_ms: i64, end_ms: i64) -> i64 {
    (end_ms.div_euclid(1000) - start_ms.div_euclid(1000)).max(0)
}

/// A price in force over a stretch of a row's life: one line of a bill.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Period {
    /// Price per second.
    pub price: Money,
    /// When it came into force (epoch ms).
    pub from_ms: i64,
    /// When it ended (epoch ms).
    pub to_ms: i64,
    /// Billable whole seconds.
    pub seconds: i64,
    /// `price x seconds`.
    pub amount: Money,
}

impl Period {
    fn new(price: Money, from_ms: i64, to_ms: i64) -> Self {
        let seconds = billable_seconds(from_ms, to_ms);
        Period {
            price,
            from_ms,
            to_ms,
            seconds,
            amount: price.times(seconds),
        }
    }
}

/// A closed bill: one instance (under one key) from its start to its end, with its price periods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bill {
    /// `organization_uuid`.
    pub org: String,
    /// `instance_uuid`.
    pub instance: String,
    /// The Kafka key (the primary key).
    pub key: String,
    /// The row's `started` column (epoch ms).
    pub started_ms: i64,
    /// When it was deleted (epoch ms, the event's source time).
    pub ended_ms: i64,
    /// Each price with the seconds it was in force.
    pub periods: Vec<Period>,
    /// The sum of the periods.
    pub amount: Money,
}

/// What the state holds for one key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KeyState {
    /// In the table. The current price has been in force since `since_ms`; `periods` are the earlier
    /// prices, already billed to the second.
    Live {
        /// The current row image.
        row: Row,
        /// Since when the current price is in force (epoch ms).
        since_ms: i64,
        /// Earlier prices.
        periods: Vec<Period>,
    },
    /// Deleted: kept until its tombstone, or until the partition has moved past the delete's position
    /// (then the watermark recognises a re-delivered delete on its own), so a repeated delete bills nothing.
    Gone {
        /// The partition and position of the delete.
        at: Option<(i32, Pos)>,
    },
}

/// A key's state, and whether it changed since the last checkpoint.
struct Slot {
    state: KeyState,
    dirty: bool,
}

impl Slot {
    fn changed(state: KeyState) -> Self {
        Slot { state, dirty: true }
    }
}

/// Per-worker upsert state: the live rows of the keys this worker owns.
#[derive(Default)]
pub struct UpsertState {
    keys: HashMap<String, Slot>,
    watermarks: HashMap<(i32, super::redelivery::History), Watermark>,
    /// Per partition and history, deleted keys in the order they were deleted, to expire once the
    /// partition moves past them (one queue each: a partition gone quiet must not hold up the others).
    gone: HashMap<(i32, super::redelivery::History), VecDeque<(Pos, String)>>,
    /// Closed bills not yet handed to a checkpoint (kept only with `ledger`).
    bills: Vec<Bill>,
    /// Keep removed keys for checkpoints.
    tracking: bool,
    /// Keep closed bills for a ledger.
    ledger: bool,
    /// Keys removed since the last checkpoint (changed keys are marked in their slot).
    removed: Vec<String>,
}

impl UpsertState {
    /// A state that also keeps what checkpoints save: the keys changed since the last one and, with
    /// `ledger`, the closed bills.
    pub fn tracking(ledger: bool) -> Self {
        UpsertState {
            tracking: true,
            ledger,
            ..UpsertState::default()
        }
    }

    /// Keys held (live rows and deleted keys awaiting their tombstone or expiry).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The re-delivery watermarks, per partition and history.
    pub fn watermarks(&self) -> impl Iterator<Item = (&(i32, super::redelivery::History), &Watermark)> {
        self.watermarks.iter()
    }

    /// Puts back a key's state from a checkpoint.
    pub fn restore_key(&mut self, key: String, state: KeyState) {
        if let KeyState::Gone { at: Some((p, pos)) } = &state {
            self.gone
                .entry((*p, pos.history))
                .or_default()
                .push_back((*pos, key.clone()));
        }
        self.keys.insert(key, Slot { state, dirty: false });
    }

    /// Puts back a watermark from a checkpoint.
    pub fn restore_watermark(&mut self, partition: i32, history: super::redelivery::History, mark: Watermark) {
        self.watermarks.insert((partition, history), mark);
    }

    /// The keys changed since the last call, each with its state now (`None`: no longer held).
    pub fn take_dirty(&mut self) -> Vec<(String, Option<KeyState>)> {
        let mut out: Vec<(String, Option<KeyState>)> = Vec::new();
        for (key, slot) in self.keys.iter_mut().filter(|(_, s)| s.dirty) {
            slot.dirty = false;
            out.push((key.clone(), Some(slot.state.clone())));
        }
        let keys = &self.keys;
        out.extend(
            self.removed
                .drain(..)
                .filter(|k| !keys.contains_key(k))
                .map(|k| (k, None)),
        );
        out
    }

    /// The bills closed since the last call.
    pub fn take_bills(&mut self) -> Vec<Bill> {
        std::mem::take(&mut self.bills)
    }

    /// Removes a key, remembering it for the next checkpoint.
    fn remove(&mut self, key: &str) -> Option<KeyState> {
        let (key, slot) = self.keys.remove_entry(key)?;
        if self.tracking {
            self.removed.push(key);
        }
        Some(slot.state)
    }

    /// Is this event a re-delivery of one already applied?
    fn verdict(&mut self, change: &Change) -> Verdict {
        let Some(pos) = change.pos else {
            return Verdict::Apply;
        };
        // A truncate has no key; one per position is remembered under the empty key.
        let key = change.key.clone().unwrap_or_default();
        let is_delete = matches!(change.op, Op::Delete { .. });
        self.watermarks
            .entry((change.partition, pos.history))
            .or_default()
            .observe(pos.at, change.ts_ms, (key, is_delete))
    }

    /// Applies one change in its key's order, pushing the resulting deltas. Returns whether it was a
    /// re-delivery (and so dropped).
    pub fn apply(&mut self, change: Change, out: &mut Vec<(Delta, isize)>) -> bool {
        match self.verdict(&change) {
            Verdict::Duplicate => {
                out.push((Delta::Note(Note::Duplicate), 1));
                return true;
            }
            Verdict::NewHistory => out.push((Delta::Note(Note::NewHistory), 1)),
            Verdict::Apply => {}
        }
        let ts = change.ts_ms;
        let Some(key) = change.key else {
            if change.op == Op::Truncate {
                let keys: Vec<String> = self.keys.keys().cloned().collect();
                for key in keys {
                    if let Some(KeyState::Live { row, since_ms, periods }) = self.remove(&key) {
                        self.close(key, row, since_ms, periods, ts, true, out);
                    }
                }
            }
            return false;
        };
        match change.op {
            // A key's state changes in place: one hash lookup, not a remove and an insert.
            Op::Upsert { kind, row, moved_in } => {
                match self.keys.get_mut(&key).map(|s| &mut s.state) {
                    Some(KeyState::Live { row: old, .. }) if *old == row => return false,
                    Some(KeyState::Live {
                        row: old,
                        since_ms,
                        periods,
                    }) if old.org == row.org && old.instance == row.instance => {
                        // Same organization and instance: `running` is unchanged.
                        if old.price != row.price {
                            periods.push(Period::new(old.price, *since_ms, ts));
                            *since_ms = ts;
                        } else if periods.is_empty() && *since_ms == old.started_ms {
                            *since_ms = row.started_ms;
                        }
                        *old = row;
                        self.keys.get_mut(&key).expect("just matched").dirty = true;
                        return false;
                    }
                    Some(state @ KeyState::Live { .. }) => {
                        if let KeyState::Live {
                            row: old,
                            since_ms,
                            periods,
                        } = std::mem::replace(state, KeyState::Gone { at: None })
                        {
                            out.push((Delta::Note(Note::Replaced), 1));
                            self.close(key.clone(), old, since_ms, periods, ts, true, out);
                        }
                    }
                    Some(KeyState::Gone { .. }) | None => {}
                }
                self.appear(key, kind, row, moved_in, ts, out);
            }
            Op::Delete { before, moved_out: _ } => {
                let at = change.pos.map(|p| (change.partition, p));
                if let Some((p, pos)) = at {
                    self.gone
                        .entry((p, pos.history))
                        .or_default()
                        .push_back((pos, key.clone()));
                }
                match self.keys.get_mut(&key) {
                    Some(slot) => {
                        slot.dirty = true;
                        match std::mem::replace(&mut slot.state, KeyState::Gone { at }) {
                            KeyState::Live { row, since_ms, periods } => {
                                self.close(key, row, since_ms, periods, ts, true, out)
                            }
                            KeyState::Gone { .. } => out.push((Delta::Note(Note::DeleteRepeated), 1)),
                        }
                    }
                    None => {
                        if let Some(row) = before {
                            out.push((Delta::Note(Note::DeleteUnseen), 1));
                            let since = row.started_ms;
                            // Billed from its before image; it was never counted as running here.
                            self.close(key.clone(), row, since, Vec::new(), ts, false, out);
                        }
                        self.keys.insert(key, Slot::changed(KeyState::Gone { at }));
                    }
                }
            }
            Op::Tombstone => {
                if let Some(KeyState::Live { .. }) = self.keys.get(&key).map(|s| &s.state) {
                    // A tombstone never removes a live row: it is compaction's marker of an earlier delete.
                } else {
                    self.remove(&key);
                }
            }
            Op::Truncate => {}
        }
        false
    }

    /// Forgets deleted keys whose partition has moved past their delete: a re-delivered delete is then a
    /// duplicate by the watermark alone, so state follows the running set with or without tombstones.
    pub fn expire(&mut self) {
        let mut expired = Vec::new();
        for (partition_history, queue) in self.gone.iter_mut() {
            let Some(mark) = self.watermarks.get(partition_history) else {
                continue;
            };
            while queue.front().is_some_and(|(pos, _)| mark.passed(pos.at)) {
                let (pos, key) = queue.pop_front().expect("front exists");
                expired.push((partition_history.0, pos, key));
            }
        }
        self.gone.retain(|_, q| !q.is_empty());
        for (p, pos, key) in expired {
            // Only if it is still that delete's marker (the key may have come back since).
            if let Some(KeyState::Gone { at: Some(at) }) = self.keys.get(&key).map(|s| &s.state) {
                if *at == (p, pos) {
                    self.remove(&key);
                }
            }
        }
    }

    fn appear(&mut self, key: String, kind: Upsert, row: Row, moved_in: bool, ts: i64, out: &mut Vec<(Delta, isize)>) {
        // A moved row keeps running: its earlier price periods were billed at the move.
        let since_ms = if moved_in { ts } else { row.started_ms };
        match kind {
            _ if moved_in => {}
            Upsert::Read | Upsert::Create => out.push((Delta::Started(row.org.clone()), 1)),
            Upsert::Update => out.push((Delta::Note(Note::UpdateUnseen), 1)),
        }
        out.push((Delta::Running(row.org.clone()), 1));
        self.keys.insert(
            key,
            Slot::changed(KeyState::Live {
                row,
                since_ms,
                periods: Vec::new(),
            }),
        );
    }

    /// Bills a row up to `end_ms` (it is already out of `keys`); `running`: it was counted as running.
    #[allow(clippy::too_many_arguments)]
    fn close(
        &mut self,
        key: String,
        row: Row,
        since_ms: i64,
        mut periods: Vec<Period>,
        end_ms: i64,
        running: bool,
        out: &mut Vec<(Delta, isize)>,
    ) {
        periods.push(Period::new(row.price, since_ms, end_ms));
        let amount = periods.iter().fold(Money::default(), |sum, p| sum + p.amount);
        out.push((Delta::Billed(row.org.clone(), amount), 1));
        if running {
            out.push((Delta::Running(row.org.clone()), -1));
        }
        if self.ledger {
            self.bills.push(Bill {
                org: row.org,
                instance: row.instance,
                key,
                started_ms: row.started_ms,
                ended_ms: end_ms,
                periods,
                amount,
            });
        }
    }
}
