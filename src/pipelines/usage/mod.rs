//! Usage billing from Debezium CDC of MariaDB's `cloud.instances` (topic `topic.cloud.instances`): per
//! organization the instances `started`, those `running`, and the `billing` of the destroyed ones, served
//! as the spec's JSON at `GET /` (port 12000).

pub mod decode;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use dataflows::usage::{Note, Usage};
use prometheus::IntCounterVec;

pub use decode::UsageDecoder;

use crate::error::RuntimeError;
use crate::http::{Routes, Ui, ViewHandle};
use crate::metrics::Metrics;
use crate::runtime::publish::{json_object, publish};
use crate::runtime::{Cluster, Common, Env, OpsArgs, Pipeline, StateSize};
use crate::sources::kafka::{kafka_source, KafkaArgs};

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
    #[command(flatten)]
    pub cluster: Cluster,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// The usage pipeline, ready to run.
pub struct UsagePipeline {
    args: UsageArgs,
    view: ViewHandle,
    notes: Option<IntCounterVec>,
}

impl UsagePipeline {
    /// The pipeline for these flags.
    pub fn new(args: UsageArgs) -> Self {
        UsagePipeline {
            args,
            view: ViewHandle::new("{}"),
            notes: None,
        }
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
            "Notable change events (duplicates, deletes of unseen rows, ...)",
            &["kind"],
        ));
        Ok(Routes::new().view("/", self.view.clone()).ui(Ui {
            title: "usage per organization".into(),
            path: "/".into(),
            key: "organization".into(),
            key_field: None,
        }))
    }

    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize> {
        let kafka = self.args.kafka.config(&self.args.topic);
        let decoder = UsageDecoder::new(self.args.decimal_scale);
        let notes = self.notes.clone().expect("prepare runs before build");
        let state_size = worker.dataflow_named::<u64, _, _>("usage", |scope| {
            let source = kafka_source(scope, kafka, decoder, env.source());
            let views = dataflows::usage::usage(source.data);
            views.notes.inspect(move |(note, _t, diff)| {
                notes
                    .with_label_values(&[note_label(*note)])
                    .inc_by((*diff).max(0) as u64);
            });
            publish(
                views.usage,
                "usage",
                self.view.clone(),
                env.metrics.clone(),
                usage_member,
            );
            views.state_size
        });
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
        Note::DeleteUnseen => "delete_unseen",
        Note::DeleteRepeated => "delete_repeated",
        Note::UpdateUnseen => "update_unseen",
        Note::Replaced => "replaced",
    }
}
