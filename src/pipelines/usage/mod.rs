//! Usage billing from Debezium CDC of MariaDB's `cloud.instances` (topic `topic.cloud.instances`): per
//! organization the instances `started`, those `running`, and the `billing` of the destroyed ones, served
//! as the spec's JSON at `GET /` (port 12000).

pub mod bills;
pub mod decode;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use dataflows::usage::{CheckpointAt, Note, Options, Saved, SavedDiff, Usage};
use prometheus::IntCounterVec;
use timely::dataflow::operators::Inspect;

pub use decode::UsageDecoder;
pub use store::StateStore;

use timely::dataflow::ProbeHandle;

use crate::error::RuntimeError;
use crate::http::{Routes, Ui, ViewHandle};
use crate::metrics::Metrics;
use crate::runtime::publish::{json_object, publish};
use crate::runtime::{Cluster, Common, Env, OpsArgs, Pipeline, StateSize};
use crate::sinks::{tx_sink_every, TxSink};
use crate::sources::kafka::{kafka_source, KafkaArgs, KafkaConfig};

/// `tally usage`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct UsageArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic carrying Debezium change events of cloud.instances.
    #[arg(long, env = "TALLY_TOPIC", default_value = "topic.cloud.instances")]
    pub topic: String,
    /// HTTP address for the view (GET /), /metrics, /health and /ui.
    #[arg(long, env = "TALLY_LISTEN", default_value = "0.0.0.0:12000")]
    pub listen: String,
    /// File where undecodable messages are appended (JSON lines with topic/partition/offset and raw bytes).
    #[arg(long, env = "TALLY_DEAD_LETTER", default_value = "tally-dead-letter.jsonl")]
    pub dead_letter: PathBuf,
    /// Scale of DECIMAL prices when the connector runs with schemas off (the scale travels in the schema).
    #[arg(long, env = "TALLY_DECIMAL_SCALE")]
    pub decimal_scale: Option<u32>,
    /// SQLite file for checkpoints and the bill ledger. With it, tally resumes from the last checkpoint
    /// instead of rebuilding from the earliest offset (so compaction or retention of the topic loses no
    /// bill), and serves every closed bill at GET /bills. Without it, state is rebuilt from the topic.
    #[arg(long, env = "TALLY_STATE")]
    pub state: Option<PathBuf>,
    /// With --state, write every closed bill with its price periods to the ledger (GET /bills). Most of
    /// what a checkpoint writes: `false` keeps the checkpoint to the state alone.
    #[arg(long, env = "TALLY_BILL_LEDGER", default_value_t = true, action = clap::ArgAction::Set)]
    pub bill_ledger: bool,
    /// How often the state is checkpointed with --state (also at SIGTERM): `10s`, `500ms`, `1m`.
    #[arg(long, env = "TALLY_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = parse_interval_ms)]
    pub checkpoint_interval: u64,
    /// Re-deliveries in a row on one partition beyond which a warning is logged (a connector restart
    /// re-sends what it sent since its last offset flush).
    #[arg(long, env = "TALLY_DUPLICATE_RUN_WARN", default_value_t = 10_000)]
    pub duplicate_run_warn: u64,
    #[command(flatten)]
    pub cluster: Cluster,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// `10s`, `250ms`, `1m` -> milliseconds (at least 1).
fn parse_interval_ms(text: &str) -> Result<u64, String> {
    let d = crate::runtime::clock::parse_duration(text)?;
    Ok((d.as_millis() as u64).max(1))
}

/// The usage pipeline, ready to run.
pub struct UsagePipeline {
    args: UsageArgs,
    kafka: KafkaConfig,
    view: ViewHandle,
    notes: Option<IntCounterVec>,
    /// The checkpoint loaded in `prepare`, handed to worker 0 to restore.
    restore: Mutex<Option<Vec<(Saved, SavedDiff)>>>,
}

impl UsagePipeline {
    /// The pipeline for these flags.
    pub fn new(args: UsageArgs) -> Self {
        let kafka = args.kafka.config(&args.topic);
        UsagePipeline {
            args,
            kafka,
            view: ViewHandle::new("{}"),
            notes: None,
            restore: Mutex::new(None),
        }
    }

    /// Opens the state file, loads its checkpoint for the dataflow and resumes the source from its offsets.
    fn load_state(&mut self, path: &std::path::Path) -> Result<(), RuntimeError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let config = |e: &dyn std::fmt::Display| RuntimeError::Config(e.to_string());
        let mut store = StateStore::open(path).map_err(|e| config(&e))?;
        let offsets = store.offsets(&self.args.topic).map_err(|e| config(&e))?;
        let last = store.last_checkpoint().map_err(|e| config(&e))?;
        if let Some((_, topic)) = last.as_ref().filter(|(_, t)| t != &self.args.topic) {
            return Err(RuntimeError::Config(format!(
                "--state {}: it holds a checkpoint of topic {topic:?}, not {:?}; use another file for another topic",
                path.display(),
                self.args.topic
            )));
        }
        let as_of = last.map(|(as_of, _)| as_of);
        let started = std::time::Instant::now();
        let records = store.load().map_err(|e| config(&e))?;
        let keys = records.iter().filter(|(r, _)| matches!(r, Saved::Key { .. })).count();
        let orgs = records.iter().filter(|(r, _)| matches!(r, Saved::Org(_))).count();
        tracing::info!(
            state = %path.display(),
            checkpoint_as_of = ?as_of,
            keys,
            organizations = orgs,
            read_ms = started.elapsed().as_millis() as u64,
            resume_from = ?offsets,
            "usage: resuming from the checkpoint"
        );
        self.kafka.start_offsets = offsets.into_iter().collect();
        *self.restore.lock().expect("not poisoned") = Some(records);
        Ok(())
    }
}

impl Pipeline for UsagePipeline {
    const NAME: &'static str = "usage";

    fn common(&self) -> Common {
        Common {
            listen: self.args.listen.clone(),
            dead_letter: self.args.dead_letter.clone(),
            cluster: self.args.cluster.clone(),
            ops: self.args.ops.clone(),
        }
    }

    fn prepare(&mut self, metrics: &Arc<Metrics>) -> Result<Routes, RuntimeError> {
        self.notes = Some(metrics.counter(
            "tally_usage_events_total",
            "Notable change events (duplicates, new history, deletes of unseen rows, ...)",
            &["kind"],
        ));
        let routes = Routes::new().view("/", self.view.clone());
        if let Some(path) = self.args.state.clone() {
            self.load_state(&path)?;
        }
        let off = |why: &'static str| move |_: &crate::http::Request<'_>| crate::http::Reply::error(404, why);
        let routes = match self.args.state.clone() {
            Some(path) if self.args.bill_ledger => {
                let ledger = bills::Bills { path };
                routes.at("/bills", move |r: &crate::http::Request<'_>| ledger.respond(r))
            }
            Some(_) => routes.at("/bills", off("the bill ledger is off (--bill-ledger false)")),
            None => routes.at("/bills", off("the bill ledger needs --state FILE")),
        };
        Ok(routes.ui(Ui {
            title: "usage per organization".into(),
            path: "/".into(),
            key: "organization".into(),
            key_field: None,
            page: None,
        }))
    }

    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize> {
        let decoder = UsageDecoder::new(self.args.decimal_scale);
        let notes = self.notes.clone().expect("prepare runs before build");
        let every = self.args.checkpoint_interval.max(1);
        let topic = self.args.topic.clone();
        let (mut restore_in, state_size) = worker.dataflow_named::<u64, _, _>("usage", |scope| {
            // Read ahead of the published view by at most --max-in-flight events (not of the checkpoint:
            // it commits only every --checkpoint-interval, and waiting for it would stall the source).
            let done = ProbeHandle::new();
            let source = kafka_source(scope, self.kafka.clone(), decoder, env.source(), Some(&done));
            let (restore_in, restore) = timely::dataflow::operators::Input::new_input(&scope);
            let options = Options {
                restore: Some(restore),
                checkpoint_at: self
                    .args
                    .state
                    .as_ref()
                    .map(|_| Rc::new(move |t: &u64| t.div_ceil(every) * every) as CheckpointAt<u64>),
                duplicate_run: self.args.duplicate_run_warn,
                ledger: self.args.bill_ledger,
            };
            let views = dataflows::usage::usage_with(source.data, options);
            views.notes.inspect(move |(note, _t, diff)| {
                notes
                    .with_label_values(&[note_label(*note)])
                    .inc_by((*diff).max(0) as u64);
            });
            views.duplicate_runs.inner.inspect(|(run, _t, _diff)| {
                tracing::warn!(
                    partition = run.partition,
                    offset = run.offset,
                    position = ?run.pos,
                    duplicates = run.length,
                    "a long run of re-delivered events: more than a connector restart re-sends; check the \
                     connector's offsets and the server's binlog (a restore or failover is new history only \
                     with newer source timestamps, a new server id or a new GTID domain)"
                );
            });
            publish(
                views.usage.probe_with(&done),
                "usage",
                self.view.clone(),
                env.metrics.clone(),
                usage_member,
            );
            if let Some(path) = self.args.state.clone() {
                tx_sink_every(views.checkpoint, source.progress, topic, env, Some(every), move || {
                    StateStore::open(&path)
                });
            }
            (restore_in, views.state_size)
        });
        // The checkpoint goes in once the dataflow is built, on worker 0, and the input closes at once.
        if worker.index() == 0 {
            if let Some(mut records) = self.restore.lock().expect("not poisoned").take() {
                restore_in.send_batch(&mut records);
            }
        }
        drop(restore_in);
        vec![("usage", state_size)]
    }
}

/// Renders the usage view as the spec's JSON: `{"<org>": {"started": N, "running": N, "billing": N}}`.
pub fn render_usage(state: &BTreeMap<String, Usage>) -> String {
    json_object(state.iter().map(|(org, u)| usage_member(org, u)))
}

/// One member of the usage view's JSON object: `"<org>":{"started":N,"running":N,"billing":N}`.
pub fn usage_member(org: &String, u: &Usage) -> String {
    let key = serde_json::to_string(org).expect("strings always serialize");
    format!(
        "{key}:{{\"started\":{},\"running\":{},\"billing\":{}}}",
        u.started, u.running, u.billing
    )
}

fn note_label(n: Note) -> &'static str {
    match n {
        Note::Duplicate => "duplicate",
        Note::NewHistory => "new_history",
        Note::DeleteUnseen => "delete_unseen",
        Note::DeleteRepeated => "delete_repeated",
        Note::UpdateUnseen => "update_unseen",
        Note::Replaced => "replaced",
    }
}
