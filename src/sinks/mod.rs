//! Sinks that store results exactly once: one transactional operator for every sink, and the [`TxSink`]
//! trait a database implements.
//!
//! The protocol: at each closed timestamp (the frontier of both the changes and the source's progress has
//! passed it), the writer commits, in ONE transaction, every change up to that timestamp together with the
//! source offsets read up to it. On start a pipeline reads the stored offsets and resumes the source from
//! them. A crash before the commit loses the transaction and the offsets with it, so the changes are read
//! again; a crash after it resumes past them: kill -9 anywhere loses and doubles nothing. A failed commit
//! keeps its changes and offsets and is retried at the next timestamp.

pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::Stream;
use timely::scheduling::SyncActivator;

use crate::metrics::Metrics;
use crate::runtime::health::Health;
use crate::runtime::publish::drain_closed;
use crate::runtime::Env;
use crate::sources::kafka::Progress;

/// The next offset to read, per partition.
pub type Offsets = BTreeMap<i32, i64>;

/// A store that writes a closed timestamp's changes and the source offsets in one transaction.
pub trait TxSink: Send + 'static {
    /// What the dataflow hands the sink: a record whose accumulated difference is the change to store.
    type Data: timely::ExchangeData + Ord + Clone;
    /// The change to a record (a count's delta, `+1` for a row to insert, ...).
    type Diff: timely::ExchangeData + Semigroup + IsZero;
    /// Why a write failed.
    type Error: std::error::Error;

    /// A short name for metrics, logs and `/health` (`sqlite`, `postgres`).
    const NAME: &'static str;

    /// Whether `commit` needs its changes consolidated (sorted, one per record, none zero). A sink whose
    /// records are already distinct, or that orders them itself, saves the writer a sort.
    const CONSOLIDATE: bool = true;

    /// The offsets stored for `topic`, to resume from.
    fn offsets(&mut self, topic: &str) -> Result<Offsets, Self::Error>;

    /// One transaction: `changes` (consolidated, none zero, unless `CONSOLIDATE` is off) and the
    /// `offsets` of `topic` read up to the closed timestamp `as_of`. Returns the rows written.
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
/// the first write, reopened after a failure to open), at every closed timestamp. The stream returned
/// carries no data: its frontier passes a timestamp once that timestamp is committed, so a probe on it
/// (a source's, [`crate::sources::kafka::kafka_source`]) waits for the store, not only for the dataflow.
pub fn tx_sink<'s, S: TxSink, E: std::fmt::Display>(
    changes: VecCollection<'s, u64, S::Data, S::Diff>,
    progress: Stream<'s, u64, Vec<Progress>>,
    topic: String,
    env: &Env,
    open: impl FnMut() -> Result<S, E> + Send + 'static,
) -> Stream<'s, u64, Vec<()>> {
    tx_sink_every(changes, progress, topic, env, None, open)
}

/// What the dataflow hands the writer thread.
enum Job<D, R> {
    /// The changes and offsets closed since the last job, up to `as_of`.
    Commit {
        as_of: u64,
        changes: Vec<(D, R)>,
        offsets: Offsets,
    },
    /// `as_of` closed with nothing to store.
    Closed(u64),
}

/// The niceness of sink writer threads.
const WRITER_NICE: i32 = 10;

/// Jobs waiting for the writer at most; past that the operator keeps accumulating (the next job carries
/// more), so a slow store never blocks a worker.
const QUEUED_JOBS: usize = 2;

/// [`tx_sink`], committing only at timestamps that are multiples of `every` (and once more when the inputs
/// end): for changes that are themselves produced only at those times, such as checkpoints.
///
/// The store is written by a thread of its own: worker 0 hands it each closed timestamp's changes and
/// offsets and goes on, so a commit (a checkpoint of 100,000 rows, an fsync) never stalls the dataflow.
/// Jobs are committed in order, so stored offsets never pass stored changes; when the inputs end, the
/// operator waits for the last commit.
pub fn tx_sink_every<'s, S: TxSink, E: std::fmt::Display>(
    changes: VecCollection<'s, u64, S::Data, S::Diff>,
    progress: Stream<'s, u64, Vec<Progress>>,
    topic: String,
    env: &Env,
    every: Option<u64>,
    open: impl FnMut() -> Result<S, E> + Send + 'static,
) -> Stream<'s, u64, Vec<()>> {
    let (metrics, health) = (env.metrics.clone(), env.health.clone());
    let scope = progress.scope();
    let is_writer = scope.index() == 0;
    let mut builder = OperatorBuilder::new("TxSink".to_owned(), scope);
    let mut changes_in = builder.new_input(changes.inner, Exchange::new(|_| 0u64));
    let mut progress_in = builder.new_input(progress, Exchange::new(|_| 0u64));
    let (_never_sent, stored) = builder.new_output::<Vec<()>>();
    // What the writer has committed: every timestamp below it is stored. It wakes the operator, which
    // moves the `stored` output's frontier there.
    let through = Arc::new(AtomicU64::new(0));
    let wake = scope
        .worker()
        .sync_activator_for(builder.operator_info().address.to_vec());
    builder.build(move |mut capabilities| {
        let mut stored_cap = capabilities.pop().filter(|_| is_writer);
        let mut writer = is_writer.then(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Job<S::Data, S::Diff>>(QUEUED_JOBS);
            let mark = Stored {
                through: through.clone(),
                wake,
            };
            let thread = std::thread::Builder::new()
                .name(format!("tally-sink-{}", S::NAME))
                .spawn(move || {
                    // Storing yields the cores to the workers: the dataflow and its views come first, and
                    // the writer catches up when they idle (jobs accumulate meanwhile, nothing is lost).
                    crate::runtime::process::yield_to_workers(WRITER_NICE);
                    write_jobs(rx, open, topic, metrics, health, mark)
                })
                .expect("spawning the sink's writer thread");
            (Some(tx), Some(thread))
        });
        let mut pending: Vec<(S::Data, u64, S::Diff)> = Vec::new();
        let mut pending_progress: Vec<(Progress, u64, ())> = Vec::new();
        let mut closed: Vec<(S::Data, S::Diff)> = Vec::new();
        let mut offsets = Offsets::new();
        let mut last_as_of = None;
        move |frontiers| {
            if let Some(cap) = stored_cap.as_mut() {
                let through = through.load(Ordering::Acquire);
                if through > *cap.time() {
                    cap.downgrade(&through);
                }
            }
            changes_in.for_each(|_cap, data| pending.append(data));
            progress_in.for_each(|cap, data| {
                let time = *cap.least().expect("a message's capability has a time");
                pending_progress.extend(data.drain(..).map(|p| (p, time, ())));
            });
            let Some((sender, thread)) = writer.as_mut() else {
                return;
            };
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
            // Closed updates move out as they are (the writer consolidates them), open ones stay.
            drain_closed(&mut pending, bound, |d, r| closed.push((d, r)));
            drain_closed(&mut pending_progress, bound, |p, ()| {
                let next = offsets.entry(p.partition).or_insert(p.next_offset);
                *next = (*next).max(p.next_offset);
            });
            let done = bound.is_none();
            let Some(as_of) = bound.map(|b| b.saturating_sub(1)).or(latest).or(last_as_of) else {
                if done {
                    finish(sender, thread);
                }
                return;
            };
            let Some(tx) = sender.as_ref() else { return };
            if closed.is_empty() && offsets.is_empty() {
                if last_as_of != Some(as_of) {
                    // Only tells the store's readers the time moved on: skipped when the writer is busy.
                    let _ = tx.try_send(Job::Closed(as_of));
                    last_as_of = Some(as_of);
                }
            } else {
                let job = Job::Commit {
                    as_of,
                    changes: std::mem::take(&mut closed),
                    offsets: std::mem::take(&mut offsets),
                };
                let sent = if done {
                    tx.send(job)
                        .map_err(|e| std::sync::mpsc::TrySendError::Disconnected(e.0))
                } else {
                    tx.try_send(job)
                };
                match sent {
                    Ok(()) => last_as_of = Some(as_of),
                    Err(std::sync::mpsc::TrySendError::Full(Job::Commit {
                        changes, offsets: o, ..
                    })) => {
                        // The writer is busy: keep it all for the next job, which closes later.
                        closed = changes;
                        offsets = o;
                    }
                    Err(_) => tracing::error!(
                        sink = S::NAME,
                        "the sink's writer thread is gone: changes are not stored"
                    ),
                }
            }
            if done {
                finish(sender, thread);
                stored_cap = None;
            }
        }
    });
    stored
}

/// How the writer thread tells the operator what it has committed.
struct Stored {
    through: Arc<AtomicU64>,
    wake: SyncActivator,
}

impl Stored {
    /// Every timestamp up to `as_of` is stored.
    fn set(&self, as_of: u64) {
        self.through.fetch_max(as_of + 1, Ordering::AcqRel);
        // The operator is gone once the dataflow has ended: nothing to tell.
        let _ = self.wake.activate();
    }
}

/// The inputs ended: lets the writer drain its queue and waits for its last commit.
fn finish<D, R>(
    sender: &mut Option<std::sync::mpsc::SyncSender<Job<D, R>>>,
    thread: &mut Option<std::thread::JoinHandle<()>>,
) {
    drop(sender.take());
    if let Some(thread) = thread.take() {
        if thread.join().is_err() {
            tracing::error!("the sink's writer thread panicked");
        }
    }
}

/// A commit the writer has not stored yet: up to which timestamp, its changes and its offsets.
type Held<D, R> = (u64, Vec<(D, R)>, Offsets);

/// How long the writer keeps retrying once the inputs have ended.
const FINAL_RETRIES: Duration = Duration::from_secs(10);

/// The writer thread: commits jobs in order; a failed commit keeps its changes and offsets, merges the
/// next job into them and is retried.
fn write_jobs<S: TxSink, E: std::fmt::Display>(
    jobs: std::sync::mpsc::Receiver<Job<S::Data, S::Diff>>,
    mut open: impl FnMut() -> Result<S, E>,
    topic: String,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stored: Stored,
) {
    let mut sink: Option<S> = None;
    // A commit not yet stored: its timestamp, changes and offsets.
    let mut held: Option<Held<S::Data, S::Diff>> = None;
    let mut backoff = Duration::from_millis(100);
    let mut ended: Option<Instant> = None;
    loop {
        let job = match (&held, ended) {
            (None, None) => jobs.recv().ok(),
            (Some(_), None) => match jobs.recv_timeout(backoff) {
                Ok(job) => Some(job),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    ended = Some(Instant::now());
                    None
                }
            },
            (_, Some(_)) => None,
        };
        if job.is_none() && held.is_none() {
            // The operator dropped its sender and nothing is left to store.
            return;
        }
        match job {
            Some(Job::Commit {
                as_of,
                changes,
                offsets,
            }) => match held.as_mut() {
                None => held = Some((as_of, changes, offsets)),
                Some((held_as_of, held_changes, held_offsets)) => {
                    *held_as_of = as_of;
                    held_changes.extend(changes);
                    for (p, o) in offsets {
                        let next = held_offsets.entry(p).or_insert(o);
                        *next = (*next).max(o);
                    }
                }
            },
            Some(Job::Closed(as_of)) if held.is_none() => {
                if let Some(s) = sink.as_mut() {
                    s.closed(as_of, false);
                }
                stored.set(as_of);
            }
            Some(Job::Closed(_)) | None => {}
        }
        let Some((as_of, changes, offsets)) = held.as_mut() else {
            continue;
        };
        if sink.is_none() {
            match open() {
                Ok(s) => sink = Some(s),
                Err(e) => {
                    tracing::error!(sink = S::NAME, error = %e, "sink cannot open its store; will retry");
                    health.sink(S::NAME, Some(format!("cannot open its store: {e}")));
                }
            }
        }
        if let Some(s) = sink.as_mut() {
            if S::CONSOLIDATE {
                differential_dataflow::consolidation::consolidate(changes);
            }
            match s.commit(*as_of, &topic, changes, offsets) {
                Ok(rows) => {
                    metrics.sink_batches.with_label_values(&[S::NAME]).inc();
                    metrics.sink_rows.with_label_values(&[S::NAME]).inc_by(rows as u64);
                    health.sink(S::NAME, None);
                    s.closed(*as_of, true);
                    stored.set(*as_of);
                    held = None;
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(e) => {
                    tracing::error!(sink = S::NAME, error = %e, "commit failed; changes kept and retried");
                    metrics.sink_errors.with_label_values(&[S::NAME]).inc();
                    health.sink(S::NAME, Some(e.to_string()));
                }
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if let Some(since) = ended {
            if since.elapsed() > FINAL_RETRIES {
                tracing::error!(
                    sink = S::NAME,
                    "giving up at shutdown: these changes are read again on restart"
                );
                return;
            }
            std::thread::sleep(backoff.min(Duration::from_secs(1)));
        }
    }
}
