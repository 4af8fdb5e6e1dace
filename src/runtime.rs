//! Runs pipelines on timely workers: one process (`-w N`) or a cluster of processes.
//!
//! Each worker builds the same dataflow: Kafka source -> pure dataflow from `dataflows` -> a publisher.
//! The publisher gathers the view's updates on worker 0 and applies them only once their timestamp is
//! closed (the input frontier has passed it), so the HTTP view is always the state at one timestamp.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dataflows::usage::{Note, Usage};
use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Exchange;
use timely::{CommunicationConfig, WorkerConfig};
use tracing::info;

use crate::error::RuntimeError;
use crate::http::{Routes, ViewHandle};
use crate::metrics::Metrics;
use crate::sinks::sqlite::SqliteSink;
use crate::sources::dead_letter::DeadLetter;
use crate::sources::debezium::DebeziumDecoder;
use crate::sources::food::{FoodDecoder, FoodItem};
use crate::sources::kafka::{kafka_source, KafkaConfig, SourceContext};

/// How the timely computation is laid out.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Worker threads in this process.
    pub workers: usize,
    /// Number of processes (1 = no cluster).
    pub processes: usize,
    /// This process's index in `0..processes`.
    pub process: usize,
    /// One `host:port` per line, one line per process (cluster mode only).
    pub hostfile: Option<PathBuf>,
    /// Processing-time tick in milliseconds: how often timestamps close.
    pub tick_ms: u64,
}

impl Cluster {
    pub fn timely_config(&self) -> Result<timely::Config, RuntimeError> {
        if self.workers == 0 {
            return Err(RuntimeError::Config("--workers must be at least 1".into()));
        }
        if self.processes <= 1 {
            return Ok(timely::Config::process(self.workers));
        }
        let hostfile = self.hostfile.as_ref().ok_or_else(|| RuntimeError::Config("--processes > 1 needs --hostfile".into()))?;
        let text = std::fs::read_to_string(hostfile)?;
        let addresses: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        if addresses.len() != self.processes || self.process >= self.processes {
            return Err(RuntimeError::Config(format!(
                "hostfile {} lists {} addresses for --processes {} (process index {})",
                hostfile.display(),
                addresses.len(),
                self.processes,
                self.process
            )));
        }
        Ok(timely::Config {
            communication: CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process,
                addresses,
                report: false,
                zerocopy: false,
            },
            worker: WorkerConfig::default(),
        })
    }

    /// Only the first process serves HTTP: its worker 0 holds the published views.
    pub fn serves_http(&self) -> bool {
        self.process == 0
    }
}

/// The usage pipeline's settings.
#[derive(Clone, Debug)]
pub struct UsageConfig {
    pub kafka: KafkaConfig,
    pub dead_letter: PathBuf,
    /// Scale of base64 Decimal prices when schemas are off.
    pub decimal_scale: Option<u32>,
    pub cluster: Cluster,
}

/// Renders the usage view as the spec's JSON: `{"<org>": {"started": N, "running": N, "billing": N}}`.
pub fn render_usage(state: &BTreeMap<String, Usage>) -> String {
    json_object(state.iter().map(|(org, u)| usage_member(org, u)))
}

/// One member of the usage view's JSON object: `"<org>":{"started":N,"running":N,"billing":N}`.
pub fn usage_member(org: &String, u: &Usage) -> String {
    let key = serde_json::to_string(org).expect("strings always serialize");
    format!("{key}:{{\"started\":{},\"running\":{},\"billing\":{}}}", u.started, u.running, u.billing)
}

/// `{` + members joined by `,` + `}`, in one allocation.
fn json_object<S: AsRef<str>>(members: impl Iterator<Item = S> + Clone) -> String {
    let len = members.clone().map(|m| m.as_ref().len() + 1).sum::<usize>() + 2;
    let mut out = String::with_capacity(len);
    out.push('{');
    for (i, m) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m.as_ref());
    }
    out.push('}');
    out
}

/// Applies, in arrival order, the pending updates whose timestamp the frontier has passed (`bound`: the
/// frontier's least time; `None` once the input is complete) and keeps the rest. Returns how many it applied.
fn drain_closed<D, R>(pending: &mut Vec<(D, u64, R)>, bound: Option<u64>, mut apply: impl FnMut(&D, &R)) -> u64 {
    let mut applied = 0;
    pending.retain(|(d, t, r)| {
        if bound.is_some_and(|b| *t >= b) {
            return true;
        }
        apply(d, r);
        applied += 1;
        false
    });
    applied
}

/// Gathers a view's updates on worker 0 and publishes the accumulated state at each closed timestamp, as a
/// JSON object with one member per key (`member` renders it). Each key keeps its rendered member, redone
/// only when the key changes: with 50,000 organizations, rendering every member took 11.5-11.7 ms per tick
/// (most of worker 0 at 50 ticks per second), a publish with kept members 1.35-1.52 ms when 100 change
/// (`cargo bench --bench view_publish`).
pub fn publish<'s, K, R>(
    collection: VecCollection<'s, u64, K, R>,
    name: &'static str,
    view: ViewHandle,
    metrics: Arc<Metrics>,
    member: fn(&K, &R) -> String,
) where
    K: timely::ExchangeData + Ord + Clone,
    R: timely::ExchangeData + Semigroup + IsZero,
{
    let is_publisher = collection.scope().index() == 0;
    // Per key: its accumulated value and that value's rendered member; an empty member is stale (a rendered
    // one never is) and is redone below, once however many closed timestamps changed the key.
    let mut state: BTreeMap<K, (R, String)> = BTreeMap::new();
    let mut pending: Vec<(K, u64, R)> = Vec::new();
    let mut last_as_of = None;
    collection.inner.exchange(|_| 0u64).sink(Pipeline, name, move |(input, frontier)| {
        input.for_each(|_cap, data| pending.append(data));
        if !is_publisher {
            return;
        }
        let bound = frontier.frontier().first().copied();
        let changed = drain_closed(&mut pending, bound, |k, r| match state.entry(k.clone()) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                o.get_mut().0.plus_equals(r);
                if o.get().0.is_zero() {
                    o.remove();
                } else {
                    o.get_mut().1.clear();
                }
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                if !r.is_zero() {
                    v.insert((r.clone(), String::new()));
                }
            }
        });
        if changed > 0 {
            for (k, (r, rendered)) in state.iter_mut().filter(|(_, (_, rendered))| rendered.is_empty()) {
                *rendered = member(k, r);
            }
        }
        let as_of = match bound {
            Some(b) => b.saturating_sub(1),
            None => last_as_of.unwrap_or(0),
        };
        if changed > 0 || last_as_of != Some(as_of) {
            view.publish(as_of, (changed > 0).then(|| json_object(state.values().map(|(_, rendered)| rendered))));
            if let Some(closed_at) = bound.filter(|_| changed > 0) {
                observe_publish_delay(&metrics, name, closed_at);
            }
            last_as_of = Some(as_of);
            metrics.view_as_of.with_label_values(&[name]).set(as_of as i64);
            metrics.view_rows.with_label_values(&[name]).set(state.len() as i64);
            metrics.view_updates.with_label_values(&[name]).inc_by(changed);
        }
    });
}

/// Timestamps are wall-clock epochs: `closed_at` is the tick whose start closed every time before it, so
/// the wall clock minus it is how long the view took to show a closed timestamp.
fn observe_publish_delay(metrics: &Metrics, view: &str, closed_at: u64) {
    let delay_ms = crate::sources::kafka::epoch_now(1).saturating_sub(closed_at);
    metrics.publish_delay.with_label_values(&[view]).observe(delay_ms as f64 / 1000.0);
}

fn note_label(n: Note) -> &'static str {
    match n {
        Note::Duplicate => "duplicate",
        Note::DeleteUnseen => "delete_unseen",
        Note::DeleteRepeated => "delete_repeated",
        Note::UpdateUnseen => "update_unseen",
        Note::Replaced => "replaced",
    }
}

/// Runs the usage pipeline until `shutdown` is set. `routes` receives the view to serve.
pub fn run_usage(cfg: UsageConfig, metrics: Arc<Metrics>, view: ViewHandle, shutdown: Arc<AtomicBool>) -> Result<(), RuntimeError> {
    let dead_letter = Arc::new(DeadLetter::open(&cfg.dead_letter)?);
    let cluster = cfg.cluster.clone();
    let tick_ms = cfg.cluster.tick_ms.max(1);
    info!(topic = %cfg.kafka.topic, brokers = %cfg.kafka.brokers, workers = cfg.cluster.workers, processes = cfg.cluster.processes, dead_letter = %dead_letter.path().display(), "starting usage pipeline");
    execute(&cluster, move |worker| {
        let ctx = SourceContext { metrics: metrics.clone(), dead_letter: dead_letter.clone(), shutdown: shutdown.clone(), tick_ms };
        let kafka = cfg.kafka.clone();
        let decimal_scale = cfg.decimal_scale;
        let (view, metrics) = (view.clone(), metrics.clone());
        let state_size = worker.dataflow::<u64, _, _>(|scope| {
            let changes = kafka_source(scope, kafka, DebeziumDecoder::new(decimal_scale), ctx);
            let views = dataflows::usage::usage(changes);
            let note_metrics = metrics.clone();
            views.notes.inspect(move |(note, _t, diff)| {
                note_metrics.notes.with_label_values(&[note_label(*note)]).inc_by((*diff).max(0) as u64);
            });
            publish(views.usage, "usage", view, metrics.clone(), usage_member);
            views.state_size
        });
        let worker_label = worker.index().to_string();
        let mut last_report = Instant::now();
        while worker.step_or_park(Some(Duration::from_millis(tick_ms))) {
            if last_report.elapsed() > Duration::from_millis(500) {
                last_report = Instant::now();
                metrics.state_records.with_label_values(&["usage", &worker_label]).set(state_size.get() as i64);
            }
        }
    })
}

/// Runs `work` on every worker of the cluster layout and waits for all of them to finish.
fn execute<F>(cluster: &Cluster, work: F) -> Result<(), RuntimeError>
where
    F: Fn(&mut timely::worker::Worker) + Send + Sync + 'static,
{
    let guards = timely::execute(cluster.timely_config()?, work).map_err(RuntimeError::Timely)?;
    for result in guards.join() {
        result.map_err(RuntimeError::Timely)?;
    }
    Ok(())
}

/// Binds HTTP (when this process serves it), returning the bound address.
pub fn bind(listen: &str) -> Result<(tiny_http::Server, String), RuntimeError> {
    let server = tiny_http::Server::http(listen).map_err(|source| RuntimeError::Bind { addr: listen.to_owned(), source })?;
    let addr = server.server_addr().to_ip().map_or_else(|| listen.to_owned(), |a| a.to_string());
    Ok((server, addr))
}

/// Starts the HTTP thread for `routes`.
pub fn spawn_http(server: tiny_http::Server, routes: Routes, shutdown: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("tally-http".into())
        .spawn(move || crate::http::serve(server, routes, shutdown))
        .expect("spawning a thread at startup")
}

/// The food counts pipeline's settings.
#[derive(Clone, Debug)]
pub struct FoodConfig {
    pub kafka: KafkaConfig,
    pub sqlite: PathBuf,
    pub dead_letter: PathBuf,
    pub cluster: Cluster,
}

/// Runs the food counts pipeline until `shutdown` is set: counts per food into SQLite, one transaction per
/// closed timestamp carrying the counts' changes and the offsets read, resuming from those offsets.
pub fn run_food(mut cfg: FoodConfig, metrics: Arc<Metrics>, view: ViewHandle, shutdown: Arc<AtomicBool>) -> Result<(), RuntimeError> {
    let sink = SqliteSink::open(&cfg.sqlite).map_err(|e| RuntimeError::Config(e.to_string()))?;
    let offsets = sink.offsets(&cfg.kafka.topic).map_err(|e| RuntimeError::Config(e.to_string()))?;
    view.publish(0, Some(sink.render().map_err(|e| RuntimeError::Config(e.to_string()))?));
    drop(sink);
    info!(sqlite = %cfg.sqlite.display(), resume_from = ?offsets, "food counts: resuming from stored offsets");
    cfg.kafka.start_offsets = offsets.into_iter().collect();
    let dead_letter = Arc::new(DeadLetter::open(&cfg.dead_letter)?);
    let cluster = cfg.cluster.clone();
    let tick_ms = cfg.cluster.tick_ms.max(1);
    execute(&cluster, move |worker| {
        let ctx = SourceContext { metrics: metrics.clone(), dead_letter: dead_letter.clone(), shutdown: shutdown.clone(), tick_ms };
        let (kafka, sqlite, view, metrics) = (cfg.kafka.clone(), cfg.sqlite.clone(), view.clone(), metrics.clone());
        worker.dataflow::<u64, _, _>(|scope| {
            let items = kafka_source(scope, kafka.clone(), FoodDecoder, ctx)
                .unary::<CapacityContainerBuilder<Vec<(FoodItem, u64, isize)>>, _, _, _>(Pipeline, "Timestamp", |_cap, _info| {
                    move |input, output| {
                        input.for_each(|cap, data| {
                            if let Some(cap) = cap.retain_least(0) {
                                let t = *cap.time();
                                output.session(&cap).give_iterator(data.drain(..).map(|d| (d, t, 1)));
                            }
                        })
                    }
                });
            let items = items.as_collection();
            let foods = items.clone().flat_map(|i| match i {
                FoodItem::Food(f) => Some(f),
                FoodItem::Progress { .. } => None,
            });
            let progress = items.flat_map(|i| match i {
                FoodItem::Progress { partition, next_offset } => Some(SinkItem::Offset(partition, next_offset)),
                FoodItem::Food(_) => None,
            });
            let changes = dataflows::food_counts::food_counts(foods).map(|(food, count)| SinkItem::Count(food, count as i64));
            sqlite_sink(changes.concat(progress), kafka.topic, sqlite, view, metrics);
        });
        while worker.step_or_park(Some(Duration::from_millis(tick_ms))) {}
    })
}

/// What the SQLite sink receives: a count's change, or a partition's read offset.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
enum SinkItem {
    Count(String, i64),
    Offset(i32, i64),
}

/// Writes on worker 0: at each closed timestamp one transaction with every count change and offset up to it.
/// A failed commit keeps its changes and is retried at the next timestamp, so nothing is skipped.
fn sqlite_sink<'s>(items: VecCollection<'s, u64, SinkItem>, topic: String, path: PathBuf, view: ViewHandle, metrics: Arc<Metrics>) {
    let is_writer = items.scope().index() == 0;
    let mut sink: Option<SqliteSink> = None;
    let mut pending: Vec<(SinkItem, u64, isize)> = Vec::new();
    let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
    let mut offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let mut last_as_of = 0;
    items.inner.exchange(|_| 0u64).sink(Pipeline, "SqliteSink", move |(input, frontier)| {
        input.for_each(|_cap, data| pending.append(data));
        if !is_writer {
            return;
        }
        let bound = frontier.frontier().first().copied();
        drain_closed(&mut pending, bound, |item, diff| match item {
            SinkItem::Count(food, count) => *deltas.entry(food.clone()).or_default() += count * (*diff as i64),
            SinkItem::Offset(p, o) => {
                let e = offsets.entry(*p).or_insert(*o);
                *e = (*e).max(*o);
            }
        });
        let as_of = bound.map_or(last_as_of, |b| b.saturating_sub(1));
        deltas.retain(|_, d| *d != 0);
        if deltas.is_empty() && offsets.is_empty() {
            if as_of != last_as_of {
                view.publish(as_of, None);
                last_as_of = as_of;
            }
            return;
        }
        if sink.is_none() {
            match SqliteSink::open(&path) {
                Ok(s) => sink = Some(s),
                Err(e) => {
                    tracing::error!(error = %e, "SQLite sink cannot open its file; will retry");
                    return;
                }
            }
        }
        let s = sink.as_mut().expect("opened above");
        match s.commit(&topic, &deltas, &offsets) {
            Ok(rows) => {
                metrics.sink_batches.with_label_values(&["sqlite"]).inc();
                metrics.sink_rows.with_label_values(&["sqlite"]).inc_by(rows as u64);
                deltas.clear();
                offsets.clear();
                match s.render() {
                    Ok(body) => {
                        view.publish(as_of, Some(body));
                        metrics.view_as_of.with_label_values(&["aggregated"]).set(as_of as i64);
                        if let Some(closed_at) = bound {
                            observe_publish_delay(&metrics, "aggregated", closed_at);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "reading back the aggregated table failed"),
                }
                last_as_of = as_of;
            }
            Err(e) => tracing::error!(error = %e, "SQLite commit failed; changes kept and retried"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataflows::money::Money;
    use differential_dataflow::input::Input;

    fn u(started: i64, running: i64, billing: i64) -> Usage {
        Usage { started, running, billing: Money::from_int(billing) }
    }

    /// Feeds `batches` (one closed timestamp each) through `publish` and returns the body after each.
    fn bodies(batches: Vec<Vec<(&'static str, Usage)>>) -> Vec<String> {
        timely::execute_directly(move |worker| {
            let view = ViewHandle::new("{}");
            let published = view.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, usage) = scope.new_collection::<String, Usage>();
                let (probe, usage) = usage.probe();
                publish(usage, "usage", published, Arc::new(Metrics::new()), usage_member);
                (input, probe)
            });
            let mut out = Vec::new();
            for (t, batch) in batches.into_iter().enumerate() {
                for (org, diff) in batch {
                    input.update(org.to_owned(), diff);
                }
                input.advance_to(t as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                worker.step();
                out.push(view.read().1);
            }
            out
        })
    }

    #[test]
    fn the_published_body_is_the_whole_state_rendered_as_of_each_timestamp() {
        let got = bodies(vec![
            vec![("b", u(1, 1, 0)), ("a", u(2, 2, 0))],
            // Only `a` changes: `b`'s kept member must still be in the body.
            vec![("a", u(0, -1, 30))],
            // `b` cancels out to zero and leaves the view; `c` arrives with a name that needs JSON escaping.
            vec![("b", u(-1, -1, 0)), ("c\"q", u(1, 1, 0))],
            vec![("a", u(0, 1, 0)), ("a", u(1, 0, 5))],
        ]);
        let mut state = BTreeMap::new();
        let expected: Vec<String> = [
            vec![("b", u(1, 1, 0)), ("a", u(2, 2, 0))],
            vec![("a", u(0, -1, 30))],
            vec![("b", u(-1, -1, 0)), ("c\"q", u(1, 1, 0))],
            vec![("a", u(0, 1, 0)), ("a", u(1, 0, 5))],
        ]
        .into_iter()
        .map(|batch| {
            for (org, diff) in batch {
                state.entry(org.to_owned()).or_insert_with(Usage::default).plus_equals(&diff);
            }
            state.retain(|_, v: &mut Usage| !v.is_zero());
            render_usage(&state)
        })
        .collect();
        assert_eq!(got, expected);
        assert_eq!(got[3], r#"{"a":{"started":3,"running":2,"billing":35},"c\"q":{"started":1,"running":1,"billing":0}}"#);
    }
}
