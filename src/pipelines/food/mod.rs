//! Food counts: `{"food": ...}` events on topic `message` counted into the existing SQLite table
//! `aggregated(food TEXT PRIMARY KEY, count INTEGER)`, exactly once, served at GET/POST /aggregated in
//! the original API's shape.

pub mod decode;
pub mod sink;

use std::path::PathBuf;
use std::sync::Arc;

pub use decode::FoodDecoder;
pub use sink::FoodSink;

use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

use crate::error::RuntimeError;
use crate::http::{Routes, Ui, ViewHandle};
use crate::metrics::Metrics;
use crate::runtime::{Cluster, Common, Env, OpsArgs, Pipeline, StateSize};
use crate::sinks::{tx_sink, TxSink};
use crate::sources::inserts;
use crate::sources::kafka::{kafka_source, KafkaArgs, KafkaConfig};

/// `tally food`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct FoodArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic of food events.
    #[arg(long, env = "TALLY_FOOD_TOPIC", default_value = "message")]
    pub topic: String,
    /// The SQLite file holding table `aggregated` (created with the original DDL if missing).
    #[arg(long, env = "TALLY_SQLITE", default_value = "data/data.db")]
    pub sqlite: PathBuf,
    /// HTTP address for GET/POST /aggregated, /metrics, /health and /ui.
    #[arg(long, env = "TALLY_FOOD_LISTEN", default_value = "0.0.0.0:5000")]
    pub listen: String,
    /// File where undecodable messages are appended (JSON lines with topic/partition/offset and raw bytes).
    #[arg(long, env = "TALLY_DEAD_LETTER", default_value = "tally-food-dead-letter.jsonl")]
    pub dead_letter: PathBuf,
    #[command(flatten)]
    pub cluster: Cluster,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// The food counts pipeline, ready to run.
pub struct FoodPipeline {
    args: FoodArgs,
    kafka: KafkaConfig,
    view: ViewHandle,
    metrics: Option<Arc<Metrics>>,
}

impl FoodPipeline {
    /// The pipeline for these flags.
    pub fn new(args: FoodArgs) -> Self {
        let kafka = args.kafka.config(&args.topic);
        FoodPipeline {
            args,
            kafka,
            view: ViewHandle::new("[]"),
            metrics: None,
        }
    }
}

impl Pipeline for FoodPipeline {
    const NAME: &'static str = "food counts";

    fn common(&self) -> Common {
        Common {
            listen: self.args.listen.clone(),
            dead_letter: self.args.dead_letter.clone(),
            cluster: self.args.cluster.clone(),
            ops: self.args.ops.clone(),
        }
    }

    /// Checks (or creates) the table, publishes it as stored, and resumes the source from its offsets.
    fn prepare(&mut self, metrics: &Arc<Metrics>) -> Result<Routes, RuntimeError> {
        let path = &self.args.sqlite;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let config = |e: &dyn std::fmt::Display| RuntimeError::Config(e.to_string());
        let mut sink = FoodSink::open(path).map_err(|e| config(&e))?;
        let offsets = sink.offsets(&self.args.topic).map_err(|e| config(&e))?;
        self.view.publish(0, Some(sink.render().map_err(|e| config(&e))?));
        tracing::info!(sqlite = %path.display(), resume_from = ?offsets, "food counts: resuming from stored offsets");
        self.kafka.start_offsets = offsets.into_iter().collect();
        self.metrics = Some(metrics.clone());
        Ok(Routes::new().view("/aggregated", self.view.clone()).ui(Ui {
            title: "food counts".into(),
            path: "/aggregated".into(),
            key: "food".into(),
            key_field: Some("food".into()),
            page: None,
        }))
    }

    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize> {
        let (path, view) = (self.args.sqlite.clone(), self.view.clone());
        let metrics = self.metrics.clone().expect("prepare runs before build");
        worker.dataflow_named::<u64, _, _>("food", |scope| {
            // Read ahead of the stored counts by at most --max-in-flight messages.
            let done = ProbeHandle::new();
            let source = kafka_source(scope, self.kafka.clone(), FoodDecoder, env.source(), Some(&done));
            // A count's change as the change of the stored count: -(food, old) +(food, new) is new - old.
            let deltas =
                dataflows::food_counts::food_counts(inserts(source.data)).explode(|(food, count)| Some((food, count)));
            tx_sink(deltas, source.progress, self.kafka.topic.clone(), env, move || {
                FoodSink::open(&path).map(|s| s.publishing(view.clone(), metrics.clone()))
            })
            .probe_with(&done);
        });
        Vec::new()
    }
}
