//! Usage billing over Debezium CDC of `cloud.instances`: per organization, how many instances were
//! `started`, how many are `running`, and the `billing` of the destroyed ones.
//!
//! Shape: the change stream is an upsert on the Kafka key (the primary key). One operator, keyed by that
//! key, turns each key's events (in partition-offset order) into differential updates: live rows
//! (`+1`/`-1` running), appearances (`+1` started) and closed bills (`+amount`), summed per organization
//! and timestamp. Billing is event time only (`started` column, `source.ts_ms` of updates and deletes), so
//! any replay, batching or worker count gives the same numbers. They form one collection keyed by
//! organization whose *difference* is the triple `Usage`, so consolidation is the aggregation and state is
//! one record per organization.
//!
//! Re-delivery (a connector restart replays events) is recognised by binlog position: per partition and
//! worker, an event at or before the highest position already applied is a duplicate. Only the keys seen at
//! exactly that position are remembered, so memory follows the running set, not the history.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

// foldhash, not SipHash, for the per-record maps (keys, watermarks, organizations): several lookups per
// change. Routing across workers keeps `key_hash`, which every process must compute alike.
use foldhash::{HashMap, HashSet};

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::lattice::Lattice;
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::order::TotalOrder;
use timely::progress::Timestamp;

use crate::money::Money;

/// One row of `cloud.instances`, as far as billing needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Row {
    /// `organization_uuid`.
    pub org: String,
    /// `instance_uuid`.
    pub instance: String,
    /// Price per second.
    pub price: Money,
    /// The `started` column, epoch milliseconds.
    pub started_ms: i64,
}

/// A binlog coordinate (`source.file` number, `source.pos`, `source.row`): totally ordered in commit order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Pos {
    /// The binlog file's number.
    pub file: u64,
    /// The event's position in that file.
    pub pos: u64,
    /// The row's index within the event.
    pub row: u32,
}

/// How a row arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Upsert {
    /// `r`: read by a snapshot.
    Read,
    /// `c`: inserted.
    Create,
    /// `u`: updated.
    Update,
}

/// What a change event does to its key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Op {
    /// `r`, `c` or `u` with the new row image. `moved_in`: the create half of a primary-key change.
    Upsert {
        /// How it arrived.
        kind: Upsert,
        /// The new row image.
        row: Row,
        /// The create half of a primary-key change.
        moved_in: bool,
    },
    /// `d` with the old row image if present. `moved_out`: the delete half of a primary-key change.
    Delete {
        /// The old row image, when the connector sends it.
        before: Option<Row>,
        /// The delete half of a primary-key change.
        moved_out: bool,
    },
    /// A null value: Kafka log compaction's marker after a delete.
    Tombstone,
    /// `t`: every row is gone.
    Truncate,
}

/// A decoded change event with its Kafka coordinates.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Change {
    /// The Kafka key's payload (compact JSON, e.g. `{"id":4}`); `None` only for a truncate.
    pub key: Option<String>,
    /// The Kafka partition it was read from.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// Binlog position, when the connector reports one and the event is not from an incremental snapshot.
    pub pos: Option<Pos>,
    /// `source.ts_ms`: when the change happened in the database.
    pub ts_ms: i64,
    /// What it does to its key.
    pub op: Op,
}

/// Per organization: the difference type of the usage view. Adding differences is the aggregation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Instances that appeared (inserted, or read by a snapshot).
    pub started: i64,
    /// Instances live now.
    pub running: i64,
    /// What the destroyed instances cost: price per second times the seconds each price was in force.
    pub billing: Money,
}

impl IsZero for Usage {
    fn is_zero(&self) -> bool {
        self.started == 0 && self.running == 0 && self.billing.is_zero()
    }
}
impl Semigroup for Usage {
    fn plus_equals(&mut self, rhs: &Self) {
        self.started += rhs.started;
        self.running += rhs.running;
        self.billing += rhs.billing;
    }
}
impl Monoid for Usage {
    fn zero() -> Self {
        Usage::default()
    }
}
impl Abelian for Usage {
    fn negate(&mut self) {
        self.started = -self.started;
        self.running = -self.running;
        self.billing = Money(-self.billing.0);
    }
}
impl Multiply<isize> for Usage {
    type Output = Usage;
    fn multiply(self, rhs: &isize) -> Usage {
        let n = *rhs as i64;
        Usage {
            started: self.started * n,
            running: self.running * n,
            billing: self.billing.times(n),
        }
    }
}

/// Something the upsert noticed that users may want to count; never an error, never data loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Note {
    /// An event at or before a binlog position already applied (connector re-delivery).
    Duplicate,
    /// A delete for a key never seen: billed from its `before` image.
    DeleteUnseen,
    /// A second delete for a key already deleted: bills nothing.
    DeleteRepeated,
    /// An update for a key never seen: the row now runs, but was not counted as started.
    UpdateUnseen,
    /// An insert over a live key with a different instance: the old row is closed and billed.
    Replaced,
}

/// What applying one change contributes, per organization, plus notes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Delta {
    /// A row of this organization appeared (`+1`) or went (`-1`).
    Running(String),
    /// A row of this organization started.
    Started(String),
    /// A row of this organization closed with this bill.
    Billed(String, Money),
    /// Something worth counting.
    Note(Note),
}

impl Delta {
    /// What this delta, `diff` times, adds to its organization's usage; a note adds nothing and is
    /// returned as the error.
    pub fn into_usage(self, diff: isize) -> Result<(String, Usage), Note> {
        let n = diff as i64;
        match self {
            Delta::Running(org) => Ok((
                org,
                Usage {
                    running: n,
                    ..Usage::default()
                },
            )),
            Delta::Started(org) => Ok((
                org,
                Usage {
                    started: n,
                    ..Usage::default()
                },
            )),
            Delta::Billed(org, amount) => Ok((
                org,
                Usage {
                    billing: amount.times(n),
                    ..Usage::default()
                },
            )),
            Delta::Note(note) => Err(note),
        }
    }
}

/// Whole seconds between two epoch-millisecond instants, as MariaDB's second-resolution clock counts
/// them; zero if the end is not after the start.
pub fn billable_seconds(start_ms: i64, end_ms: i64) -> i64 {
    (end_ms.div_euclid(1000) - start_ms.div_euclid(1000)).max(0)
}

#[derive(Clone, Debug)]
enum KeyState {
    /// In the table. The current price has been in force since `since_ms`; `accrued` holds the bill of
    /// earlier prices.
    Live { row: Row, since_ms: i64, accrued: Money },
    /// Deleted; kept until its tombstone so that a repeated delete bills nothing.
    Gone,
}

#[derive(Default)]
struct Watermark {
    max: Option<Pos>,
    at_max: HashSet<(String, bool)>,
}

/// Per-worker upsert state: the live rows of the keys this worker owns.
#[derive(Default)]
pub struct UpsertState {
    keys: HashMap<String, KeyState>,
    watermarks: HashMap<i32, Watermark>,
}

impl UpsertState {
    /// Keys held (live rows and deleted keys awaiting their tombstone).
    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// No key held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Is this event a re-delivery of one already applied?
    fn is_duplicate(&mut self, change: &Change) -> bool {
        let (Some(pos), Some(key)) = (change.pos, change.key.as_ref()) else {
            return false;
        };
        let is_delete = matches!(change.op, Op::Delete { .. });
        let mark = self.watermarks.entry(change.partition).or_default();
        match mark.max {
            Some(max) if pos < max => true,
            Some(max) if pos == max => !mark.at_max.insert((key.clone(), is_delete)),
            _ => {
                mark.max = Some(pos);
                mark.at_max.clear();
                mark.at_max.insert((key.clone(), is_delete));
                false
            }
        }
    }

    /// Applies one change in its key's order, pushing the resulting deltas.
    pub fn apply(&mut self, change: Change, out: &mut Vec<(Delta, isize)>) {
        if self.is_duplicate(&change) {
            out.push((Delta::Note(Note::Duplicate), 1));
            return;
        }
        let ts = change.ts_ms;
        let Some(key) = change.key else {
            if change.op == Op::Truncate {
                for (_, state) in self.keys.drain() {
                    if let KeyState::Live { row, since_ms, accrued } = state {
                        close(row, since_ms, accrued, ts, out);
                    }
                }
            }
            return;
        };
        match change.op {
            // A key's state changes in place: one hash lookup, not a remove and an insert.
            Op::Upsert { kind, row, moved_in } => {
                match self.keys.get_mut(&key) {
                    Some(KeyState::Live { row: old, .. }) if *old == row => return,
                    Some(KeyState::Live {
                        row: old,
                        since_ms,
                        accrued,
                    }) if old.org == row.org && old.instance == row.instance => {
                        // Same organization and instance: `running` is unchanged.
                        if old.price != row.price {
                            *accrued += old.price.times(billable_seconds(*since_ms, ts));
                            *since_ms = ts;
                        } else if accrued.is_zero() && *since_ms == old.started_ms {
                            *since_ms = row.started_ms;
                        }
                        *old = row;
                        return;
                    }
                    Some(state @ KeyState::Live { .. }) => {
                        if let KeyState::Live {
                            row: old,
                            since_ms,
                            accrued,
                        } = std::mem::replace(state, KeyState::Gone)
                        {
                            out.push((Delta::Note(Note::Replaced), 1));
                            close(old, since_ms, accrued, ts, out);
                        }
                    }
                    Some(KeyState::Gone) | None => {}
                }
                self.appear(key, kind, row, moved_in, ts, out);
            }
            Op::Delete { before, moved_out: _ } => match self.keys.get_mut(&key) {
                Some(state) => match std::mem::replace(state, KeyState::Gone) {
                    KeyState::Live { row, since_ms, accrued } => close(row, since_ms, accrued, ts, out),
                    KeyState::Gone => out.push((Delta::Note(Note::DeleteRepeated), 1)),
                },
                None => {
                    if let Some(row) = before {
                        out.push((Delta::Note(Note::DeleteUnseen), 1));
                        let bill = row.price.times(billable_seconds(row.started_ms, ts));
                        out.push((Delta::Billed(row.org, bill), 1));
                    }
                    self.keys.insert(key, KeyState::Gone);
                }
            },
            Op::Tombstone => {
                if let Some(KeyState::Live { .. }) = self.keys.get(&key) {
                    // A tombstone never removes a live row: it is compaction's marker of an earlier delete.
                } else {
                    self.keys.remove(&key);
                }
            }
            Op::Truncate => {}
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
            KeyState::Live {
                row,
                since_ms,
                accrued: Money::default(),
            },
        );
    }
}

/// Removes a live row and bills it up to `end_ms`.
fn close(row: Row, since_ms: i64, accrued: Money, end_ms: i64, out: &mut Vec<(Delta, isize)>) {
    let bill = accrued + row.price.times(billable_seconds(since_ms, end_ms));
    out.push((Delta::Billed(row.org.clone(), bill), 1));
    out.push((Delta::Running(row.org), -1));
}

fn key_hash(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Checks that a batch needs no sorting: no truncate, and within each partition offsets only rise. Keeps
/// its buffer between batches.
#[derive(Default)]
struct ArrivalOrder {
    /// Per partition id, the last offset seen in this batch (`i64::MIN`: none yet).
    last: Vec<i64>,
}

impl ArrivalOrder {
    fn in_offset_order<'a>(&mut self, changes: impl Iterator<Item = &'a Change>) -> bool {
        self.last.iter_mut().for_each(|o| *o = i64::MIN);
        for c in changes {
            let Ok(p) = usize::try_from(c.partition) else {
                return false;
            };
            if c.key.is_none() || p > 4096 {
                return false;
            }
            if p >= self.last.len() {
                self.last.resize(p + 1, i64::MIN);
            }
            if c.offset <= self.last[p] {
                return false;
            }
            self.last[p] = c.offset;
        }
        true
    }
}

/// The usage pipeline's outputs.
pub struct Views<'s, T: Timestamp + Lattice> {
    /// Per organization; the accumulated difference is that organization's usage.
    pub usage: VecCollection<'s, T, String, Usage>,
    /// Anomalies worth counting.
    pub notes: VecCollection<'s, T, Note>,
    /// Keys held by this worker's upsert state, refreshed as it runs.
    pub state_size: std::rc::Rc<std::cell::Cell<usize>>,
}

/// Builds the usage views from a stream of decoded change events (each worker passes its own share).
pub fn usage<'s, T>(changes: Stream<'s, T, Vec<Change>>) -> Views<'s, T>
where
    T: Timestamp + Lattice + TotalOrder,
{
    let state_size = std::rc::Rc::new(std::cell::Cell::new(0));
    let size_out = state_size.clone();
    let peers = changes.scope().peers() as u64;
    // Each change goes to the worker owning its key; a truncate (no key) to every worker, one copy each.
    // Routing in one pipelined step, moving each change once, replaces timely's `partition` (which stages
    // every record of a timestamp in a growing vector: profiled at 12% of a worker, mostly page faults),
    // a broadcast and a concat.
    let routed = changes.unary::<timely::container::CapacityContainerBuilder<Vec<(u64, Change)>>, _, _, _>(
        Pipeline,
        "RouteByKey",
        |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for change in data.drain(..) {
                        match change.key.as_deref() {
                            Some(key) => session.give((key_hash(key), change)),
                            None => {
                                for worker in 1..peers {
                                    session.give((worker, change.clone()));
                                }
                                session.give((0, change));
                            }
                        }
                    }
                });
            }
        },
    );
    let out = routed
        .unary_frontier::<timely::container::CapacityContainerBuilder<Vec<(Out, T, isize)>>, _, _, _>(
            Exchange::new(|(route, _): &(u64, Change)| *route),
            "UsageUpsert",
            move |_cap, _info| {
                let mut state = UpsertState::default();
                // Per pending timestamp, the containers as they arrived: kept whole, not copied into one vector.
                let mut stash: BTreeMap<T, (Capability<T>, Vec<Routed>)> = BTreeMap::new();
                let mut order = ArrivalOrder::default();
                let mut produced = Vec::new();
                let mut per_org: HashMap<String, Usage> = HashMap::default();
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        if let Some(cap) = cap.retain_least(0) {
                            let entry = stash
                                .entry(cap.time().clone())
                                .or_insert_with(|| (cap.clone(), Vec::new()));
                            entry.1.push(std::mem::take(data));
                        }
                    });
                    while let Some(entry) = stash.first_entry() {
                        if frontier.less_equal(entry.key()) {
                            break;
                        }
                        let (cap, chunks) = entry.remove();
                        let time = cap.time().clone();
                        let mut session = output.session(&cap);
                        let mut apply = |change: Change| {
                            state.apply(change, &mut produced);
                            for (delta, diff) in produced.drain(..) {
                                match delta.into_usage(diff) {
                                    Ok((org, usage)) => per_org.entry(org).or_default().plus_equals(&usage),
                                    Err(note) => session.give((Out::Note(note), time.clone(), diff)),
                                }
                            }
                        };
                        // Each key's events must apply in offset order. They arrive so when every partition's
                        // offsets rise through the batch (one worker reads a partition, and channels keep
                        // order): then arrival order is used as is, since keys never share state across
                        // partitions. Otherwise (timely promises completeness per timestamp, not order: seen
                        // in tests/engine.rs with several workers), or when a truncate (which touches every
                        // key) is in the batch, the batch is sorted by (partition, offset), which is unique.
                        if order.in_offset_order(chunks.iter().flatten().map(|(_, c)| c)) {
                            chunks.into_iter().flatten().for_each(|(_, c)| apply(c));
                        } else {
                            let mut changes: Vec<Change> = chunks.into_iter().flatten().map(|(_, c)| c).collect();
                            changes.sort_unstable_by_key(|c| (c.partition, c.offset));
                            changes.into_iter().for_each(&mut apply);
                        }
                        // One update per organization and timestamp: the batch's usage, already summed.
                        for (org, usage) in per_org.drain().filter(|(_, u)| !u.is_zero()) {
                            session.give((Out::Usage(org, usage), time.clone(), 1));
                        }
                    }
                    size_out.set(state.len());
                }
            },
        )
        .as_collection();

    let notes = out.clone().flat_map(|o| match o {
        Out::Note(n) => Some(n),
        _ => None,
    });
    let usage = out
        .explode(|o| match o {
            Out::Usage(org, usage) => Some((org, usage)),
            _ => None,
        })
        .consolidate();
    Views {
        usage,
        notes,
        state_size,
    }
}

/// Changes with the worker route each was sent by (a key's hash; for a truncate, the worker itself).
type Routed = Vec<(u64, Change)>;

/// What the upsert operator emits: per-organization usage already summed over the timestamp, and notes.
/// (Rows of the table are not materialised: nothing reads them, and `running` already counts them.)
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum Out {
    Usage(String, Usage),
    Note(Note),
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::{Capture, Input};

    const A: &str = "org-a";
    const B: &str = "org-b";

    fn row(org: &str, instance: &str, price: i64, started_s: i64) -> Row {
        Row {
            org: org.into(),
            instance: instance.into(),
            price: Money::from_int(price),
            started_ms: started_s * 1000,
        }
    }

    /// A change for key `id` in partition `id % 2`, at binlog position `pos` and database time `ts_s`.
    fn ev(id: u32, pos: u64, ts_s: i64, op: Op) -> Change {
        Change {
            key: Some(format!("{{\"id\":{id}}}")),
            partition: (id % 2) as i32,
            offset: pos as i64,
            pos: Some(Pos { file: 1, pos, row: 0 }),
            ts_ms: ts_s * 1000,
            op,
        }
    }
    fn create(r: Row) -> Op {
        Op::Upsert {
            kind: Upsert::Create,
            row: r,
            moved_in: false,
        }
    }
    fn update(r: Row) -> Op {
        Op::Upsert {
            kind: Upsert::Update,
            row: r,
            moved_in: false,
        }
    }
    fn delete(r: Row) -> Op {
        Op::Delete {
            before: Some(r),
            moved_out: false,
        }
    }

    /// Feeds each batch at its own timestamp and returns the final usage per organization and the live
    /// row count (the sum of `running`).
    fn run(batches: Vec<Vec<Change>>) -> (BTreeMap<String, Usage>, usize) {
        let usage = timely::execute_directly(move |worker| {
            let (mut input, usage) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Change>>();
                let views = usage(stream);
                (input, views.usage.inner.capture())
            });
            for (t, batch) in batches.into_iter().enumerate() {
                input.advance_to(t as u64);
                for c in batch {
                    input.send(c);
                }
            }
            drop(input);
            usage
        });
        let mut out: BTreeMap<String, Usage> = BTreeMap::new();
        for (_t, updates) in usage.extract() {
            for (org, _time, diff) in updates {
                out.entry(org).or_default().plus_equals(&diff);
            }
        }
        let live: i64 = out.values().map(|u| u.running).sum();
        out.retain(|_, u| !u.is_zero());
        (out, live as usize)
    }

    fn usage_of(started: i64, running: i64, billing: i64) -> Usage {
        Usage {
            started,
            running,
            billing: Money::from_int(billing),
        }
    }

    #[test]
    fn insert_update_delete_bills_each_price_for_its_seconds() {
        let r1 = row(A, "i1", 10, 1000);
        let r1b = row(A, "i1", 20, 1000);
        let (out, live) = run(vec![
            vec![ev(1, 1, 1000, create(r1.clone()))],
            vec![ev(1, 2, 1100, update(r1b.clone()))],
            vec![ev(1, 3, 1130, delete(r1b))],
        ]);
        // 100 s at 10 + 30 s at 20
        assert_eq!(out[A], usage_of(1, 0, 100 * 10 + 30 * 20));
        assert_eq!(live, 0);
    }

    #[test]
    fn duplicates_and_redelivery_count_once() {
        let r1 = row(A, "i1", 5, 0);
        let r2 = row(B, "i2", 7, 10);
        let stream = vec![
            ev(1, 1, 0, create(r1.clone())),
            ev(2, 2, 10, create(r2.clone())),
            ev(1, 3, 20, delete(r1.clone())),
        ];
        // The same events delivered twice in a row, then once more after a simulated connector restart.
        let mut batches = vec![stream.clone(), stream.clone()];
        batches.push(stream.clone());
        let (out, live) = run(batches);
        assert_eq!(out[A], usage_of(1, 0, 20 * 5));
        assert_eq!(out[B], usage_of(1, 1, 0));
        assert_eq!(live, 1);
    }

    #[test]
    fn resnapshot_changes_nothing() {
        let r1 = row(A, "i1", 3, 0);
        let read = |pos| Change {
            op: Op::Upsert {
                kind: Upsert::Read,
                row: r1.clone(),
                moved_in: false,
            },
            ..ev(1, pos, 5, Op::Tombstone)
        };
        let (out, _) = run(vec![vec![read(10)], vec![read(10)], vec![read(50)]]);
        assert_eq!(out[A], usage_of(1, 1, 0));
    }

    #[test]
    fn snapshot_rows_share_one_position() {
        // A snapshot reports the same binlog position for every row: each is still a distinct row.
        let reads: Vec<Change> = (1..=3)
            .map(|id| Change {
                op: Op::Upsert {
                    kind: Upsert::Read,
                    row: row(A, &format!("i{id}"), 1, 0),
                    moved_in: false,
                },
                partition: 0,
                ..ev(id, 100, 5, Op::Tombstone)
            })
            .collect();
        let (out, live) = run(vec![reads.clone(), reads]);
        assert_eq!(out[A], usage_of(3, 3, 0));
        assert_eq!(live, 3);
    }

    #[test]
    fn delete_of_unseen_row_bills_before_image_and_repeat_bills_nothing() {
        let r = row(A, "i9", 2, 100);
        let del = |pos| Change {
            pos: None,
            ..ev(9, pos, 160, delete(r.clone()))
        };
        // No binlog positions here, so only the deleted-key marker stops the second bill.
        let (out, _) = run(vec![vec![del(1)], vec![del(2)]]);
        assert_eq!(out[A], usage_of(0, 0, 60 * 2));
    }

    #[test]
    fn tombstone_after_delete_then_key_reused() {
        let r1 = row(A, "i1", 1, 0);
        let r1new = row(B, "i99", 4, 100);
        let tomb = Change {
            pos: None,
            ..ev(1, 0, 0, Op::Tombstone)
        };
        let (out, live) = run(vec![
            vec![ev(1, 1, 0, create(r1.clone()))],
            vec![ev(1, 2, 50, delete(r1)), tomb.clone()],
            vec![ev(1, 3, 100, create(r1new))],
            vec![tomb], // a stray tombstone must not remove the live row
        ]);
        assert_eq!(out[A], usage_of(1, 0, 50));
        assert_eq!(out[B], usage_of(1, 1, 0));
        assert_eq!(live, 1);
    }

    #[test]
    fn truncate_bills_every_live_row() {
        let (out, live) = run(vec![
            vec![
                ev(1, 1, 0, create(row(A, "i1", 1, 0))),
                ev(2, 2, 0, create(row(B, "i2", 2, 0))),
            ],
            vec![Change {
                key: None,
                ..ev(0, 3, 10, Op::Truncate)
            }],
        ]);
        assert_eq!(out[A], usage_of(1, 0, 10));
        assert_eq!(out[B], usage_of(1, 0, 20));
        assert_eq!(live, 0);
    }

    #[test]
    fn primary_key_change_moves_the_row_without_double_billing() {
        let old = row(A, "i1", 3, 0);
        let (out, live) = run(vec![
            vec![ev(42, 1, 0, create(old.clone()))],
            vec![
                ev(
                    42,
                    2,
                    100,
                    Op::Delete {
                        before: Some(old.clone()),
                        moved_out: true,
                    },
                ),
                ev(
                    44,
                    2,
                    100,
                    Op::Upsert {
                        kind: Upsert::Create,
                        row: old.clone(),
                        moved_in: true,
                    },
                ),
            ],
            vec![ev(44, 3, 150, delete(old))],
        ]);
        // 150 s at 3, once; one instance started.
        assert_eq!(out[A], usage_of(1, 0, 450));
        assert_eq!(live, 0);
    }

    #[test]
    fn order_across_partitions_and_batching_do_not_matter() {
        let mut stream = Vec::new();
        for id in 1..=20u32 {
            let r = row(
                if id % 3 == 0 { A } else { B },
                &format!("i{id}"),
                i64::from(id),
                i64::from(id),
            );
            stream.push(ev(id, u64::from(id) * 10, i64::from(id), create(r.clone())));
            if id % 4 != 0 {
                let r2 = Row {
                    price: Money::from_int(i64::from(id) + 1),
                    ..r.clone()
                };
                stream.push(ev(id, u64::from(id) * 10 + 1, i64::from(id) + 7, update(r2.clone())));
                stream.push(ev(id, u64::from(id) * 10 + 2, i64::from(id) + 19, delete(r2)));
            }
        }
        let (expected, expected_live) = run(vec![stream.clone()]);
        // Partition 1 first, then partition 0, in uneven batches: per-key order is what counts.
        let (odd, even): (Vec<_>, Vec<_>) = stream.into_iter().partition(|c| c.partition == 1);
        let batches: Vec<Vec<Change>> = odd.chunks(3).chain(even.chunks(5)).map(|c| c.to_vec()).collect();
        let (out, live) = run(batches);
        assert_eq!(out, expected);
        assert_eq!(live, expected_live);
        assert_eq!(expected_live, 5);
    }

    #[test]
    fn a_batch_arriving_out_of_offset_order_is_applied_in_offset_order() {
        // One timestamp, key 1's delete before its create (as several workers can deliver them): sorted back,
        // the row runs from 100 s to 160 s at price 2. Applied as they came, the delete would bill an unseen
        // row and the create, at an earlier binlog position, would be dropped as a re-delivery.
        let r = row(A, "i1", 2, 100);
        let (out, live) = run(vec![vec![ev(1, 11, 160, delete(r.clone())), ev(1, 10, 100, create(r))]]);
        assert_eq!(out, BTreeMap::from([(A.to_string(), usage_of(1, 0, 120))]));
        assert_eq!(live, 0);
    }

    #[test]
    fn arrival_order_needs_rising_offsets_per_partition_and_no_truncate() {
        let at = |partition: i32, offset: i64| Change {
            partition,
            offset,
            ..ev(1, 1, 1, Op::Tombstone)
        };
        let mut order = ArrivalOrder::default();
        assert!(order.in_offset_order([at(0, 1), at(1, 1), at(0, 2), at(1, 5)].iter()));
        assert!(!order.in_offset_order([at(0, 2), at(1, 1), at(0, 1)].iter()));
        assert!(!order.in_offset_order([at(0, 1), at(0, 1)].iter()));
        let truncate = Change {
            key: None,
            op: Op::Truncate,
            ..at(0, 3)
        };
        assert!(!order.in_offset_order([at(0, 1), truncate].iter()));
        // The buffer is reset between batches: offsets may start lower in the next one.
        assert!(order.in_offset_order([at(0, 1)].iter()));
    }

    #[test]
    fn billable_seconds_floor_to_whole_seconds() {
        assert_eq!(billable_seconds(1_999, 3_000), 2);
        assert_eq!(billable_seconds(5_000, 4_000), 0);
        assert_eq!(billable_seconds(-1, 0), 1);
    }
}
