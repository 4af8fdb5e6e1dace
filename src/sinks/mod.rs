//! Sinks that store results exactly once: one transactional operator for every sink, and the [`TxSink`]
//! trait a database implements.
//!
//! The protocol: at each closed timestamp (the frontier of both the changes and the source's progress has
//! passed it), the writer commits, in ONE transaction, every change up to that timestamp together with the
//! source offsets read up to it. On start a pipeline reads the stored offsets and resumes the source from
//! them. A crash before the commit loses the transaction and the offsets with it, so the changes are read
//! again; a crash after it resumes past them: kill -9 anywhere loses and doubles nothing. A failed commit
//! keeps its changes and offsets and is retried at the next timestamp.

pub mod sqlite;

use std::collections::BTreeMap;

use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::Stream;

use crate::runtime::publish::drain_closed;
use crate::runtime::Env;
use crate::sources::kafka::Progress;

/// The next offset to read, per partition.
pub type Offsets = BTreeMap<i32, i64>;

/// A store that writes a closed timestamp's changes and the source offsets in one transaction.
pub trait TxSink: 'static {
    /// What the dataflow hands the sink: a record whose accumulated difference is the change to store.
    type Data: timely::ExchangeData + Ord + Clone;
    /// The change to a record (a count's delta, `+1` for a row to insert, ...).
    type Diff: timely::ExchangeData + Semigroup + IsZero;
    /// Why a write failed.
    type Error: std::error::Error;

    /// A short name for metrics, logs and `/health` (`sqlite`, `postgres`).
    const NAME: &'static str;

    /// The offsets stored for `topic`, to resume from.
    fn offsets(&mut self, topic: &str) -> Result<Offsets, Self::Error>;

    /// One transaction: `changes` (consolidated, none zero) and the `offsets` of `topic` read up to the
    /// closed timestamp `as_of`. Returns the rows written.
    fn commit(
        &mut self,
        as_of: u64,
        topic: &str,
        changes: &[(Self::Data, Self::Diff)],
        offsets: &Offsets,
    ) -> Result<usize, Self::Error>;

    /// Called at each closed timestamp once its changes are stored (`committed`) or when it had none, so a
    /// sink that serves what it stored can publish it.
    fn closed(&mut self, _as_of: u64, _committed: bool) {}
}

/// Writes `changes` and the source's `progress` on worker 0 through the sink `open` makes there (opened on
/// the first write, reopened after a failure to open), at every closed timestamp.
pub fn tx_sink<'s, S: TxSink, E: std::fmt::Display>(
    changes: VecCollection<'s, u64, S::Data, S::Diff>,
    progress: Stream<'s, u64, Vec<Progress>>,
    topic: String,
    env: &Env,
    open: impl FnMut() -> Result<S, E> + 'static,
) {
    tx_sink_every(changes, progress, topic, env, None, open);
}

/// [`tx_sink`], committing only at timestamps that are multiples of `every` (and once more when the inputs
/// end): for changes that are themselves produced only at those times, such as checkpoints.
pub fn tx_sink_every<'s, S: TxSink, E: std::fmt::Display>(
    changes: VecCollection<'s, u64, S::Data, S::Diff>,
    progress: Stream<'s, u64, Vec<Progress>>,
    topic: String,
    env: &Env,
    every: Option<u64>,
    mut open: impl FnMut() -> Result<S, E> + 'static,
) {
    let (metrics, health) = (env.metrics.clone(), env.health.clone());
    let scope = progress.scope();
    let is_writer = scope.index() == 0;
    let mut builder = OperatorBuilder::new("TxSink".to_owned(), scope);
    let mut changes_in = builder.new_input(changes.inner, Exchange::new(|_| 0u64));
    let mut progress_in = builder.new_input(progress, Exchange::new(|_| 0u64));
    builder.build(move |_capabilities| {
        let mut sink: Option<S> = None;
        let mut pending: Vec<(S::Data, u64, S::Diff)> = Vec::new();
        let mut pending_progress: Vec<(Progress, u64, ())> = Vec::new();
        let mut changed: BTreeMap<S::Data, S::Diff> = BTreeMap::new();
        let mut offsets = Offsets::new();
        let mut last_as_of = None;
        let mut batch: Vec<(S::Data, S::Diff)> = Vec::new();
        move |frontiers| {
            changes_in.for_each(|_cap, data| pending.append(data));
            progress_in.for_each(|cap, data| {
                let time = *cap.least().expect("a message's capability has a time");
                pending_progress.extend(data.drain(..).map(|p| (p, time, ())));
            });
            if !is_writer {
                return;
            }
            let mut bound = frontiers.iter().filter_map(|f| f.frontier().first().copied()).min();
            if let (Some(every), Some(b)) = (every.filter(|e| *e > 0), bound) {
                // Close only up to the last multiple of `every` below the frontier.
                match b.checked_sub(1) {
                    Some(last) => bound = Some(last - last % every + 1),
                    None => return,
                }
            }
            // Once the inputs end, everything pending closes at the latest time seen.
            let latest = bound
                .is_none()
                .then(|| {
                    pending
                        .iter()
                        .map(|(_, t, _)| *t)
                        .chain(pending_progress.iter().map(|(_, t, _)| *t))
                        .max()
                })
                .flatten();
            drain_closed(&mut pending, bound, |d, r| match changed.entry(d.clone()) {
                std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().plus_equals(r),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(r.clone());
                }
            });
            drain_closed(&mut pending_progress, bound, |p, ()| {
                let next = offsets.entry(p.partition).or_insert(p.next_offset);
                *next = (*next).max(p.next_offset);
            });
            let Some(as_of) = bound.map(|b| b.saturating_sub(1)).or(latest).or(last_as_of) else {
                return;
            };
            if sink.is_none() {
                match open() {
                    Ok(s) => sink = Some(s),
                    Err(e) => {
                        tracing::error!(sink = S::NAME, error = %e, "sink cannot open its store; will retry");
                        health.sink(S::NAME, Some(format!("cannot open its store: {e}")));
                        return;
                    }
                }
            }
            let s = sink.as_mut().expect("opened above");
            changed.retain(|_, r| !r.is_zero());
            if changed.is_empty() && offsets.is_empty() {
                if last_as_of != Some(as_of) {
                    s.closed(as_of, false);
                    last_as_of = Some(as_of);
                }
                return;
            }
            batch.clear();
            batch.extend(changed.iter().map(|(d, r)| (d.clone(), r.clone())));
            match s.commit(as_of, &topic, &batch, &offsets) {
                Ok(rows) => {
                    metrics.sink_batches.with_label_values(&[S::NAME]).inc();
                    metrics.sink_rows.with_label_values(&[S::NAME]).inc_by(rows as u64);
                    health.sink(S::NAME, None);
                    changed.clear();
                    offsets.clear();
                    s.closed(as_of, true);
                    last_as_of = Some(as_of);
                }
                Err(e) => {
                    tracing::error!(sink = S::NAME, error = %e, "commit failed; changes kept and retried");
                    metrics.sink_errors.with_label_values(&[S::NAME]).inc();
                    health.sink(S::NAME, Some(e.to_string()));
                }
            }
        }
    });
}
