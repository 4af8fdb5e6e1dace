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
//! Re-delivery (a connector restart replays events) is told apart from new history by what Debezium
//! guarantees ([`redelivery`]): per partition, worker and history (server or GTID domain), a watermark of
//! the stretches applied. Deleted keys are forgotten once the watermark has passed them, so memory follows
//! the running set, not the history, with or without tombstones.
//!
//! Checkpoints ([`Options::checkpoint_at`]): at checkpoint times a second output carries what changed since
//! the last one (keys' states as `-before +now`, closed bills, organizations' usage, watermarks), which a
//! sink stores with the source offsets in one transaction; [`Options::restore`] feeds a stored checkpoint
//! back, routed by key, so it restores into any number of workers.

pub mod redelivery;
pub mod state;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

// foldhash, not SipHash, for the per-record maps (keys, watermarks, organizations): several lookups per
// change. Routing across workers keeps `key_hash`, which every process must compute alike.
use foldhash::HashMap;

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::lattice::Lattice;
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::order::TotalOrder;
use timely::progress::Timestamp;

use crate::money::Money;

pub use redelivery::{Coord, History, Pos, Segment, Watermark};
pub use state::{billable_seconds, Bill, KeyState, Period, UpsertState};

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
    /// Binlog position with its history, when the connector reports one and the event is not from an
    /// incremental snapshot.
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
    /// A re-delivery of an event already applied (same history, a position already passed, no newer).
    Duplicate,
    /// A position behind the watermark with a newer source timestamp: new history (a binlog reset, a
    /// restored database, a stray position before it), applied.
    NewHistory,
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

fn key_hash(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Checks that a batch needs no sorting: no truncate, no restored checkpoint, and within each partition
/// offsets only rise. Keeps its buffer between batches.
#[derive(Default)]
struct ArrivalOrder {
    /// Per partition id, the last offset seen in this batch (`i64::MIN`: none yet).
    last: Vec<i64>,
}

impl ArrivalOrder {
    fn in_offset_order<'a>(&mut self, items: impl Iterator<Item = &'a In>) -> bool {
        self.last.iter_mut().for_each(|o| *o = i64::MIN);
        for item in items {
            let In::Change(c) = item else {
                return false;
            };
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

/// What checkpoints save, with the difference each record carries: a worker's watermark and a closed bill
/// count (`+1` saved, `-1` no longer); a key's state is saved whole (`+1`); an organization's totals add
/// `usage`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Saved {
    /// A key's state as of checkpoint number `seq` of the worker holding it (`None`: no longer held). Saved
    /// whole, not as a difference: the latest `seq` of a key is its state.
    Key {
        /// The Kafka key.
        key: String,
        /// Which of its worker's checkpoints (they count up; a restored key has 0).
        seq: u64,
        /// Its state then.
        state: Option<KeyState>,
    },
    /// The watermark one worker keeps for a partition and history.
    Mark {
        /// The partition.
        partition: i32,
        /// The history.
        history: History,
        /// The worker that kept it.
        worker: u32,
        /// Its segments, oldest first.
        segments: Vec<Segment>,
    },
    /// An organization: its totals are the accumulated `usage` of the difference.
    Org(String),
    /// A closed bill, for the ledger.
    Bill(Bill),
}

/// The difference of a checkpoint record: a count for keys, watermarks and bills; usage for organizations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SavedDiff {
    /// `+1` saved, `-1` retracted.
    pub count: i64,
    /// What an organization's totals change by.
    pub usage: Usage,
}

impl SavedDiff {
    /// A count, no usage.
    pub fn count(count: i64) -> Self {
        SavedDiff {
            count,
            usage: Usage::default(),
        }
    }
}

impl IsZero for SavedDiff {
    fn is_zero(&self) -> bool {
        self.count == 0 && self.usage.is_zero()
    }
}
impl Semigroup for SavedDiff {
    fn plus_equals(&mut self, rhs: &Self) {
        self.count += rhs.count;
        self.usage.plus_equals(&rhs.usage);
    }
}
impl Monoid for SavedDiff {
    fn zero() -> Self {
        SavedDiff::default()
    }
}

/// A long run of re-deliveries on one partition: more than a connector restart re-sends.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DuplicateRun {
    /// The partition.
    pub partition: i32,
    /// The offset of the event that made the run this long.
    pub offset: i64,
    /// Its position.
    pub pos: Pos,
    /// Duplicates in a row so far (on the worker that saw them).
    pub length: u64,
}

/// Maps a time to the checkpoint time at or after it.
pub type CheckpointAt<T> = Rc<dyn Fn(&T) -> T>;

/// An output that builds containers of `(data, time, diff)` updates.
type Updates<T, D, R> = OutputBuilder<T, CapacityContainerBuilder<Vec<(D, T, R)>>>;

/// How the usage dataflow keeps what it needs to resume.
pub struct Options<'s, T: Timestamp> {
    /// Records of a checkpoint to start from, given once at the first timestamp.
    pub restore: Option<Stream<'s, T, Vec<(Saved, SavedDiff)>>>,
    /// When set, state is checkpointed at the timestamps this maps each time to (the first checkpoint
    /// time at or after it); the `checkpoint` output then carries what changed, at those times.
    pub checkpoint_at: Option<CheckpointAt<T>>,
    /// A run of this many re-deliveries in a row on one partition is reported in `duplicate_runs`.
    pub duplicate_run: u64,
    /// With checkpoints, also save every closed bill (for a ledger).
    pub ledger: bool,
}

impl<T: Timestamp> Default for Options<'_, T> {
    fn default() -> Self {
        Options {
            restore: None,
            checkpoint_at: None,
            duplicate_run: 10_000,
            ledger: true,
        }
    }
}

/// The usage pipeline's outputs.
pub struct Views<'s, T: Timestamp + Lattice> {
    /// Per organization; the accumulated difference is that organization's usage.
    pub usage: VecCollection<'s, T, String, Usage>,
    /// Anomalies worth counting.
    pub notes: VecCollection<'s, T, Note>,
    /// Runs of re-deliveries longer than a connector restart would send.
    pub duplicate_runs: VecCollection<'s, T, DuplicateRun>,
    /// What changed since the last checkpoint, at checkpoint times (empty without checkpoints).
    pub checkpoint: VecCollection<'s, T, Saved, SavedDiff>,
    /// Keys held by this worker's upsert state, refreshed as it runs.
    pub state_size: Rc<Cell<usize>>,
}

/// Builds the usage views from a stream of decoded change events (each worker passes its own share).
pub fn usage<'s, T>(changes: Stream<'s, T, Vec<Change>>) -> Views<'s, T>
where
    T: Timestamp + Lattice + TotalOrder,
{
    usage_with(changes, Options::default())
}

/// What the keyed operator receives: a change, or a record of the checkpoint it starts from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum In {
    Change(Change),
    Saved(Saved, SavedDiff),
}

/// [`usage`] with checkpoints: restored from `options.restore`, saved at `options.checkpoint_at`.
pub fn usage_with<'s, T>(changes: Stream<'s, T, Vec<Change>>, options: Options<'s, T>) -> Views<'s, T>
where
    T: Timestamp + Lattice + TotalOrder,
{
    let state_size = Rc::new(Cell::new(0));
    let size_out = state_size.clone();
    let scope = changes.scope();
    let peers = scope.peers() as u64;
    let restore = options
        .restore
        .unwrap_or_else(|| timely::dataflow::operators::generic::operator::empty(scope));
    // Each change goes to the worker owning its key; a truncate (no key) and a saved watermark to every
    // worker, one copy each. Routing in one pipelined step, moving each change once, replaces timely's
    // `partition` (which stages every record of a timestamp in a growing vector: profiled at 12% of a
    // worker, mostly page faults), a broadcast and a concat.
    let routed = changes.binary::<_, CapacityContainerBuilder<Vec<(u64, In)>>, _, _, _, _>(
        restore,
        Pipeline,
        Pipeline,
        "RouteByKey",
        |_cap, _info| {
            move |changes, saved, output| {
                changes.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for change in data.drain(..) {
                        match change.key.as_deref() {
                            Some(key) => session.give((key_hash(key), In::Change(change))),
                            None => {
                                for worker in 1..peers {
                                    session.give((worker, In::Change(change.clone())));
                                }
                                session.give((0, In::Change(change)));
                            }
                        }
                    }
                });
                saved.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for (record, diff) in data.drain(..) {
                        let route = match &record {
                            Saved::Key { key, .. } => key_hash(key),
                            Saved::Org(org) => key_hash(org),
                            Saved::Bill(_) => continue,
                            Saved::Mark { .. } => {
                                for worker in 1..peers {
                                    session.give((worker, In::Saved(record.clone(), diff)));
                                }
                                0
                            }
                        };
                        session.give((route, In::Saved(record, diff)));
                    }
                });
            }
        },
    );
    let checkpoint_at = options.checkpoint_at;
    let duplicate_run = options.duplicate_run.max(1);
    let ledger = options.ledger;
    let mut builder = OperatorBuilder::new("UsageUpsert".to_owned(), scope);
    // Outputs first: an input is connected to the outputs that exist when it is added.
    let (out, out_stream) = builder.new_output::<Vec<(Out, T, isize)>>();
    let (saved_out, saved_stream) = builder.new_output::<Vec<(Saved, T, SavedDiff)>>();
    let mut input = builder.new_input(routed, Exchange::new(|(route, _): &(u64, In)| *route));
    let mut out: Updates<T, Out, isize> = OutputBuilder::from(out);
    let mut saved_out: Updates<T, Saved, SavedDiff> = OutputBuilder::from(saved_out);
    let worker = scope.index() as u32;
    builder.build(move |mut capabilities| {
        // The checkpoint output's capability, at the next checkpoint time; none without checkpoints.
        let mut next_checkpoint = capabilities.pop().filter(|_| checkpoint_at.is_some());
        drop(capabilities);
        let mut state = if checkpoint_at.is_some() {
            UpsertState::tracking(ledger)
        } else {
            UpsertState::default()
        };
        // Per pending timestamp, the containers as they arrived: kept whole, not copied into one vector.
        let mut stash: BTreeMap<T, (Capability<T>, Vec<Routed>)> = BTreeMap::new();
        let mut order = ArrivalOrder::default();
        let mut produced = Vec::new();
        let mut per_org: HashMap<String, Usage> = HashMap::default();
        // Usage since the last checkpoint, and the watermark records it saved (to retract when they change).
        let mut unsaved_usage: HashMap<String, Usage> = HashMap::default();
        let mut saved_marks: Vec<Saved> = Vec::new();
        let mut runs: HashMap<i32, u64> = HashMap::default();
        let mut checkpoints = 0u64;
        move |frontiers| {
            input.for_each(|cap, data| {
                if let Some(cap) = cap.retain_least(0) {
                    let entry = stash
                        .entry(cap.time().clone())
                        .or_insert_with(|| (cap.clone(), Vec::new()));
                    entry.1.push(std::mem::take(data));
                }
            });
            let frontier = &frontiers[0];
            let mut out = out.activate();
            let mut saved_out = saved_out.activate();
            let mut save = |cap: &Capability<T>,
                            seq: &mut u64,
                            state: &mut UpsertState,
                            unsaved: &mut HashMap<String, Usage>,
                            marks: &mut Vec<Saved>| {
                let time = cap.time().clone();
                let mut session = saved_out.session(cap);
                *seq += 1;
                for (key, state) in state.take_dirty() {
                    let record = Saved::Key { key, seq: *seq, state };
                    session.give((record, time.clone(), SavedDiff::count(1)));
                }
                for bill in state.take_bills() {
                    session.give((Saved::Bill(bill), time.clone(), SavedDiff::count(1)));
                }
                for (org, usage) in unsaved.drain().filter(|(_, u)| !u.is_zero()) {
                    session.give((Saved::Org(org), time.clone(), SavedDiff { count: 0, usage }));
                }
                // Watermarks are few (partitions x histories): retract all, save all; unchanged ones cancel.
                for old in marks.drain(..) {
                    session.give((old, time.clone(), SavedDiff::count(-1)));
                }
                for ((partition, history), mark) in state.watermarks() {
                    marks.push(Saved::Mark {
                        partition: *partition,
                        history: *history,
                        worker,
                        segments: mark.segments().to_vec(),
                    });
                }
                for new in marks.iter() {
                    session.give((new.clone(), time.clone(), SavedDiff::count(1)));
                }
            };
            while let Some(entry) = stash.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (cap, chunks) = entry.remove();
                let time = cap.time().clone();
                // State of every time up to a checkpoint time is saved before a later time changes it.
                if let (Some(at), Some(ckpt)) = (checkpoint_at.as_ref(), next_checkpoint.as_mut()) {
                    if time > *ckpt.time() {
                        save(ckpt, &mut checkpoints, &mut state, &mut unsaved_usage, &mut saved_marks);
                        ckpt.downgrade(&at(&time));
                    }
                }
                let mut session = out.session(&cap);
                // Each key's events must apply in offset order. They arrive so when every partition's
                // offsets rise through the batch (one worker reads a partition, and channels keep
                // order): then arrival order is used as is, since keys never share state across
                // partitions. Otherwise (timely promises completeness per timestamp, not order: seen
                // in tests/engine.rs with several workers), or when a truncate (which touches every
                // key) or a restored checkpoint is in the batch, the batch is sorted by (partition,
                // offset), which is unique, after the checkpoint is restored.
                let (ordered, sorted) = if order.in_offset_order(chunks.iter().flatten().map(|(_, item)| item)) {
                    (chunks, Vec::new())
                } else {
                    let mut restored: HashMap<(i32, History), Vec<Segment>> = HashMap::default();
                    let mut changes: Vec<Change> = Vec::new();
                    for (_, item) in chunks.into_iter().flatten() {
                        match item {
                            In::Change(c) => changes.push(c),
                            In::Saved(
                                Saved::Key {
                                    key, state: Some(st), ..
                                },
                                _,
                            ) => state.restore_key(key, st),
                            In::Saved(Saved::Key { state: None, .. }, _) => {}
                            In::Saved(Saved::Org(org), diff) => {
                                session.give((Out::Usage(org, diff.usage), time.clone(), 1));
                            }
                            In::Saved(
                                mark @ Saved::Mark {
                                    partition,
                                    history,
                                    worker: saver,
                                    ..
                                },
                                _,
                            ) => {
                                // This worker retracts, at its next checkpoint, what it now stands for.
                                if saver == worker || (worker == 0 && u64::from(saver) >= peers) {
                                    saved_marks.push(mark.clone());
                                }
                                if let Saved::Mark { segments, .. } = mark {
                                    restored.entry((partition, history)).or_default().extend(segments);
                                }
                            }
                            In::Saved(Saved::Bill(_), _) => {}
                        }
                    }
                    for ((partition, history), segments) in restored {
                        state.restore_watermark(partition, history, Watermark::restored(segments));
                    }
                    changes.sort_unstable_by_key(|c| (c.partition, c.offset));
                    (Vec::new(), changes)
                };
                let mut apply = |change: Change| {
                    let (partition, offset, pos) = (change.partition, change.offset, change.pos);
                    let duplicate = state.apply(change, &mut produced);
                    let run = runs.entry(partition).or_default();
                    *run = if duplicate { *run + 1 } else { 0 };
                    if *run == duplicate_run {
                        if let Some(pos) = pos {
                            let length = *run;
                            let alert = DuplicateRun {
                                partition,
                                offset,
                                pos,
                                length,
                            };
                            session.give((Out::Run(alert), time.clone(), 1));
                        }
                    }
                    for (delta, diff) in produced.drain(..) {
                        match delta.into_usage(diff) {
                            Ok((org, usage)) => per_org.entry(org).or_default().plus_equals(&usage),
                            Err(note) => session.give((Out::Note(note), time.clone(), diff)),
                        }
                    }
                };
                for (_, item) in ordered.into_iter().flatten() {
                    if let In::Change(change) = item {
                        apply(change);
                    }
                }
                sorted.into_iter().for_each(&mut apply);
                state.expire();
                // One update per organization and timestamp: the batch's usage, already summed.
                for (org, usage) in per_org.drain().filter(|(_, u)| !u.is_zero()) {
                    if checkpoint_at.is_some() {
                        unsaved_usage.entry(org.clone()).or_default().plus_equals(&usage);
                    }
                    session.give((Out::Usage(org, usage), time.clone(), 1));
                }
            }
            // Once no time up to the next checkpoint time can arrive, save and move to the next one.
            if let (Some(at), Some(ckpt)) = (checkpoint_at.as_ref(), next_checkpoint.as_mut()) {
                match frontier.frontier().first() {
                    Some(least) if least > ckpt.time() => {
                        save(ckpt, &mut checkpoints, &mut state, &mut unsaved_usage, &mut saved_marks);
                        ckpt.downgrade(&at(least));
                    }
                    Some(_) => {}
                    None => {
                        let last = next_checkpoint.take().expect("matched above");
                        save(
                            &last,
                            &mut checkpoints,
                            &mut state,
                            &mut unsaved_usage,
                            &mut saved_marks,
                        );
                    }
                }
            }
            size_out.set(state.len());
        }
    });
    let out = out_stream.as_collection();
    let notes = out.clone().flat_map(|o| match o {
        Out::Note(n) => Some(n),
        _ => None,
    });
    let duplicate_runs = out.clone().flat_map(|o| match o {
        Out::Run(r) => Some(r),
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
        duplicate_runs,
        checkpoint: saved_stream.as_collection(),
        state_size,
    }
}

/// Changes with the worker route each was sent by (a key's hash; for a truncate, the worker itself).
type Routed = Vec<(u64, In)>;

/// What the upsert operator emits: per-organization usage already summed over the timestamp, notes, and
/// long duplicate runs. (Rows of the table are not materialised: nothing reads them, and `running`
/// already counts them.)
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
enum Out {
    Usage(String, Usage),
    Note(Note),
    Run(DuplicateRun),
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
            pos: Some(Pos {
                history: History::Server(1),
                at: Coord {
                    seq: 0,
                    file: 1,
                    pos,
                    row: 0,
                },
            }),
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
        let ins = |changes: Vec<Change>| changes.into_iter().map(In::Change).collect::<Vec<_>>();
        assert!(order.in_offset_order(ins(vec![at(0, 1), at(1, 1), at(0, 2), at(1, 5)]).iter()));
        assert!(!order.in_offset_order(ins(vec![at(0, 2), at(1, 1), at(0, 1)]).iter()));
        assert!(!order.in_offset_order(ins(vec![at(0, 1), at(0, 1)]).iter()));
        let truncate = Change {
            key: None,
            op: Op::Truncate,
            ..at(0, 3)
        };
        assert!(!order.in_offset_order(ins(vec![at(0, 1), truncate]).iter()));
        // The buffer is reset between batches: offsets may start lower in the next one.
        assert!(order.in_offset_order(ins(vec![at(0, 1)]).iter()));
    }

    /// Runs `batches` (batch `t` at time `10 (t + 1)`) on `workers` workers from the checkpoint `restore`,
    /// checkpointing at every multiple of 10. Returns the usage (including what was restored) and the
    /// checkpoint records written, accumulated.
    fn run_checkpointed(
        workers: usize,
        restore: Vec<(Saved, SavedDiff)>,
        batches: Vec<Vec<Change>>,
    ) -> (BTreeMap<String, Usage>, BTreeMap<Saved, SavedDiff>) {
        use std::sync::{Arc, Mutex};
        let usage = Arc::new(Mutex::new(BTreeMap::<String, Usage>::new()));
        let saved = Arc::new(Mutex::new(BTreeMap::<Saved, SavedDiff>::new()));
        let (u, c) = (usage.clone(), saved.clone());
        timely::execute(timely::Config::process(workers), move |worker| {
            let (u, c) = (u.clone(), c.clone());
            let index = worker.index();
            let (mut input, mut restored) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Change>>();
                let (restored, restore) = scope.new_input::<Vec<(Saved, SavedDiff)>>();
                let options = Options {
                    restore: Some(restore),
                    checkpoint_at: Some(Rc::new(|t: &u64| t.div_ceil(10) * 10)),
                    duplicate_run: 10_000,
                    ledger: true,
                };
                let views = usage_with(stream, options);
                views.usage.inspect(move |(org, _t, d)| {
                    u.lock().unwrap().entry(org.clone()).or_default().plus_equals(d);
                });
                views.checkpoint.inspect(move |(rec, _t, d)| {
                    c.lock().unwrap().entry(rec.clone()).or_default().plus_equals(d);
                });
                (input, restored)
            });
            if index == 0 {
                restored.send_batch(&mut restore.clone());
            }
            drop(restored);
            for (t, batch) in batches.iter().enumerate() {
                input.advance_to(10 * (t as u64 + 1));
                if index == 0 {
                    input.send_batch(&mut batch.clone());
                }
            }
        })
        .unwrap();
        let mut usage = Arc::try_unwrap(usage).unwrap().into_inner().unwrap();
        usage.retain(|_, u| !u.is_zero());
        let mut saved = Arc::try_unwrap(saved).unwrap().into_inner().unwrap();
        saved.retain(|_, d| !d.is_zero());
        (usage, saved)
    }

    /// A history with creates, price changes, deletes with and without tombstones, and a re-delivery.
    fn history() -> Vec<Vec<Change>> {
        let mut batches = Vec::new();
        for round in 0..6u64 {
            let mut batch = Vec::new();
            for id in 0..12u32 {
                let key = round as u32 * 12 + id;
                let base = round * 1000 + u64::from(id) * 10;
                let ts = base as i64;
                let r = row(
                    if id % 3 == 0 { A } else { B },
                    &format!("i{key}"),
                    i64::from(id) + 1,
                    ts,
                );
                batch.push(ev(key, base, ts, create(r.clone())));
                let r2 = Row {
                    price: Money::from_int(i64::from(id) + 5),
                    ..r.clone()
                };
                batch.push(ev(key, base + 1, ts + 7, update(r2.clone())));
                if id % 2 == 0 {
                    batch.push(ev(key, base + 2, ts + 20, delete(r2)));
                    if id % 4 == 0 {
                        batch.push(Change {
                            pos: None,
                            ..ev(key, base + 3, 0, Op::Tombstone)
                        });
                    }
                }
            }
            batches.push(batch);
        }
        // A connector restart re-sends round 4.
        let again = batches[4].clone();
        batches.push(again);
        batches
    }

    /// Each key's latest saved state, as the store keeps it.
    fn final_keys(saved: &BTreeMap<Saved, SavedDiff>) -> BTreeMap<String, KeyState> {
        let mut keys = BTreeMap::new();
        // Records sort by key, then seq: the last one per key wins.
        for record in saved.keys() {
            if let Saved::Key { key, state, .. } = record {
                match state {
                    Some(s) => keys.insert(key.clone(), s.clone()),
                    None => keys.remove(key),
                };
            }
        }
        keys
    }

    fn restore_from(saved: &BTreeMap<Saved, SavedDiff>) -> Vec<(Saved, SavedDiff)> {
        let keys = final_keys(saved).into_iter().map(|(key, state)| {
            let record = Saved::Key {
                key,
                seq: 0,
                state: Some(state),
            };
            (record, SavedDiff::count(1))
        });
        saved
            .iter()
            .filter(|(s, _)| matches!(s, Saved::Mark { .. } | Saved::Org(_)))
            .map(|(s, d)| (s.clone(), *d))
            .chain(keys)
            .collect()
    }

    fn ledger_total(saved: &BTreeMap<Saved, SavedDiff>) -> Money {
        saved
            .iter()
            .filter_map(|(s, d)| match s {
                Saved::Bill(b) => Some(b.amount.times(d.count)),
                _ => None,
            })
            .fold(Money::default(), |a, b| a + b)
    }

    #[test]
    fn a_checkpoint_restores_into_any_number_of_workers_and_bills_once() {
        let batches = history();
        let (full, full_saved) = run_checkpointed(1, Vec::new(), batches.clone());
        let billing = full.values().fold(Money::default(), |a, u| a + u.billing);
        assert!(billing > Money::default());
        assert_eq!(ledger_total(&full_saved), billing, "the ledger sums to billing");
        // Checkpointed after five rounds by two workers; restored into one, two and four, which then see
        // round 5 and a re-delivery of round 4 (from before the checkpoint).
        let (first, first_saved) = run_checkpointed(2, Vec::new(), batches[..5].to_vec());
        assert_ne!(first, full);
        for workers in [1, 2, 4] {
            let (rest, rest_saved) = run_checkpointed(workers, restore_from(&first_saved), batches[5..].to_vec());
            assert_eq!(rest, full, "{workers} workers after the restore");
            assert_eq!(ledger_total(&first_saved) + ledger_total(&rest_saved), billing);
        }
    }

    #[test]
    fn a_checkpoint_keeps_the_running_set_not_the_history() {
        // Tombstones off: deletes are the last word on their keys.
        let batches: Vec<Vec<Change>> = history()
            .into_iter()
            .map(|b| b.into_iter().filter(|c| c.op != Op::Tombstone).collect())
            .collect();
        let (usage, saved) = run_checkpointed(2, Vec::new(), batches);
        let running: i64 = usage.values().map(|u| u.running).sum();
        let keys = final_keys(&saved).len();
        // Every key deleted is forgotten once a later position is applied on its partition and worker; at
        // most the last delete per partition and worker can still be held.
        assert!(
            keys as i64 >= running && keys as i64 <= running + 4,
            "keys {keys}, running {running}"
        );
    }

    #[test]
    fn without_tombstones_state_follows_the_running_set_over_a_million_records() {
        // 20,000 rows kept running over 4 partitions; after the fill, each step reprices one row (30%) or
        // destroys the oldest and deploys a new one; deletes get no tombstone.
        const RUNNING: usize = 20_000;
        let mut state = UpsertState::default();
        let mut out = Vec::new();
        let mut live: std::collections::VecDeque<(u32, Row)> = std::collections::VecDeque::new();
        let (mut next_id, mut records, mut most_held) = (0u32, 0u64, 0usize);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut send = |state: &mut UpsertState, id: u32, op: Op, records: &mut u64| {
            *records += 1;
            let ts = 1_000_000 + (*records / 10) as i64;
            // The first 25,000 keys live in partition 0, which then goes quiet with a delete last.
            let change = Change {
                partition: if id <= 25_000 { 0 } else { 1 + (id % 3) as i32 },
                offset: *records as i64,
                ..ev(id, *records, ts, op)
            };
            state.apply(change, &mut out);
            state.expire();
            out.clear();
        };
        while records < 1_000_000 {
            if live.len() < RUNNING || rand() % 10 >= 3 {
                if live.len() >= RUNNING {
                    let (id, r) = live.pop_front().expect("full");
                    send(&mut state, id, delete(r), &mut records);
                }
                next_id += 1;
                let r = row(A, &format!("i{next_id}"), 1 + (rand() % 50) as i64, 1_000);
                send(&mut state, next_id, create(r.clone()), &mut records);
                live.push_back((next_id, r));
            } else {
                let i = (rand() % live.len() as u64) as usize;
                let (id, r) = live[i].clone();
                let r2 = Row {
                    price: Money::from_int(1 + (rand() % 50) as i64),
                    ..r
                };
                send(&mut state, id, update(r2.clone()), &mut records);
                live[i].1 = r2;
            }
            most_held = most_held.max(state.len());
        }
        assert!(
            most_held <= RUNNING * 11 / 10,
            "at most {most_held} keys held for {RUNNING} running rows"
        );
        assert!(state.len() >= RUNNING);
    }

    #[test]
    fn billable_seconds_floor_to_whole_seconds() {
        assert_eq!(billable_seconds(1_999, 3_000), 2);
        assert_eq!(billable_seconds(5_000, 4_000), 0);
        assert_eq!(billable_seconds(-1, 0), 1);
    }
}
