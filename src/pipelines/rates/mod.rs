//! Rates: price batches from Kafka applied all-or-nothing, PostgreSQL as the system of record, and the
//! rates API answered from the dataflow at a closed timestamp.
//!
//! At start the ports, regions, prices and applied batches are read from PostgreSQL in one snapshot
//! ([`store::load`]) and inserted at time 0; the topic is then followed from the stored offsets. The
//! [`batch::Stager`] holds each batch back until it is complete and valid and emits it whole, so all of it
//! lands at one timestamp. The dataflow keeps prices per pair and day with `(sum, count)` as the
//! difference, expands the region tree with `iterate`, and publishes an immutable [`index::Index`] per
//! closed timestamp that `/rates` reads. The same batches go to PostgreSQL through the transactional sink,
//! in the background: visibility does not wait for the commit.

pub mod api;
pub mod batch;
pub mod index;
pub mod numeric;
pub mod store;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataflows::rates::{ports_under, prices_by_day, Price};
use differential_dataflow::input::Input;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Inspect;

use crate::error::RuntimeError;
use crate::http::{Routes, ViewHandle};
use crate::metrics::Metrics;
use crate::runtime::{Cluster, Common, Env, OpsArgs, Pipeline, StateSize};
use crate::sinks::tx_sink;
use crate::sources::inserts;
use crate::sources::kafka::{kafka_source, KafkaArgs, KafkaConfig, Progress};
use batch::{BatchMetrics, Registry, Stager};
use index::SharedIndex;
use store::{RatesStore, Snapshot};

/// `tally rates`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct RatesArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic of price batches (key: the batch id).
    #[arg(long, env = "TALLY_RATES_TOPIC", default_value = "rates.price-batches")]
    pub topic: String,
    /// PostgreSQL database holding the dump's tables (ports, regions, prices); tally adds its own two.
    #[arg(
        long,
        env = "TALLY_RATES_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432/rates"
    )]
    pub postgres: String,
    /// HTTP address for /rates, /batches/{id}, /rates/summary, /metrics and /health.
    #[arg(long, env = "TALLY_RATES_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: String,
    /// A batch still incomplete this long after its last part expires (nothing of it applied).
    #[arg(long, env = "TALLY_BATCH_EXPIRY", default_value = "10m", value_parser = crate::runtime::clock::parse_duration)]
    pub batch_expiry: Duration,
    /// Longest date range one /rates request may ask for, in days.
    #[arg(long, env = "TALLY_RATES_MAX_DAYS", default_value_t = 3660)]
    pub max_days: i64,
    /// File where undecodable messages and rejected or expired batches are appended (JSON lines).
    #[arg(long, env = "TALLY_DEAD_LETTER", default_value = "tally-rates-dead-letter.jsonl")]
    pub dead_letter: PathBuf,
    #[command(flatten)]
    pub cluster: Cluster,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// The rates pipeline, ready to run.
pub struct RatesPipeline {
    args: RatesArgs,
    kafka: KafkaConfig,
    registry: Arc<Registry>,
    index: SharedIndex,
    summary: ViewHandle,
    ports: Arc<HashSet<String>>,
    /// The start snapshot, handed to worker 0 to insert.
    snapshot: Mutex<Option<Snapshot>>,
    metrics: Option<(Arc<Metrics>, BatchMetrics)>,
}

impl RatesPipeline {
    /// The pipeline for these flags.
    pub fn new(args: RatesArgs) -> Self {
        let kafka = args.kafka.config(&args.topic);
        RatesPipeline {
            args,
            kafka,
            registry: Arc::new(Registry::default()),
            index: SharedIndex::default(),
            summary: ViewHandle::new("{}"),
            ports: Arc::default(),
            snapshot: Mutex::new(None),
            metrics: None,
        }
    }
}

/// The URL without its password, for logs and errors.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

impl Pipeline for RatesPipeline {
    const NAME: &'static str = "rates";

    fn common(&self) -> Common {
        Common {
            listen: self.args.listen.clone(),
            dead_letter: self.args.dead_letter.clone(),
            cluster: self.args.cluster.clone(),
            ops: self.args.ops.clone(),
        }
    }

    /// Reads the snapshot, resumes the source from the stored offsets, and serves the API over the index.
    fn prepare(&mut self, metrics: &Arc<Metrics>) -> Result<Routes, RuntimeError> {
        let started = std::time::Instant::now();
        let snapshot = store::load(&self.args.postgres, &self.args.topic).map_err(|e| {
            RuntimeError::Config(format!(
                "rates: cannot read the snapshot from {}: {e} (the database must hold the dump's ports, regions and prices tables)",
                redacted(&self.args.postgres)
            ))
        })?;
        if snapshot.ports.is_empty() {
            return Err(RuntimeError::Config(format!(
                "rates: table ports in {} is empty: load the dump first",
                redacted(&self.args.postgres)
            )));
        }
        tracing::info!(
            ports = snapshot.ports.len(),
            regions = snapshot.regions.len(),
            prices = snapshot.prices.len(),
            batches = snapshot.batches.len(),
            resume_from = ?snapshot.offsets,
            took_ms = started.elapsed().as_millis() as u64,
            "rates: snapshot read from PostgreSQL"
        );
        self.ports = Arc::new(snapshot.ports.iter().map(|(c, _)| c.clone()).collect());
        let regions = Arc::new(snapshot.regions.iter().map(|(s, _)| s.clone()).collect());
        self.index = SharedIndex::new(self.ports.clone(), regions);
        for (id, hash, items) in &snapshot.batches {
            self.registry.stored(id.clone(), hash.clone(), *items);
        }
        self.kafka.start_offsets = snapshot.offsets.iter().map(|(p, o)| (*p, *o)).collect();
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        self.metrics = Some((metrics.clone(), BatchMetrics::new(metrics)));
        Ok(Routes::new()
            .view("/rates/summary", self.summary.clone())
            .query(
                "/rates",
                api::Rates {
                    index: self.index.clone(),
                    max_days: self.args.max_days,
                },
            )
            .under(
                "/batches/",
                api::Batches {
                    registry: self.registry.clone(),
                    index: self.index.clone(),
                },
            ))
    }

    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize> {
        let (metrics, batch_metrics) = self.metrics.clone().expect("prepare runs before build");
        let snapshot = if worker.index() == 0 {
            self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).take()
        } else {
            None
        };
        let stager = Stager::new(
            self.ports.clone(),
            self.registry.clone(),
            batch_metrics,
            env.dead_letter.clone(),
            self.args.batch_expiry,
            self.args.topic.clone(),
        );
        let (registry, url) = (self.registry.clone(), self.args.postgres.clone());
        let (index, summary) = (self.index.clone(), self.summary.clone());
        let (mut prices_in, mut ports_in, mut regions_in) = worker.dataflow_named::<u64, _, _>("rates", |scope| {
            let source = kafka_source(scope, self.kafka.clone(), stager, env.source(), None);
            let batches = inserts(source.data);
            let inserted = registry.clone();
            let progress = batches
                .inner
                .clone()
                .inspect(move |(b, t, _)| inserted.inserted(&b.id, *t))
                .map(|(b, _, _)| Progress {
                    partition: b.partition,
                    next_offset: b.resume,
                });
            let (prices_in, stored) = scope.new_collection::<Price, isize>();
            let (ports_in, ports) = scope.new_collection::<(String, String), isize>();
            let (regions_in, regions) = scope.new_collection::<(String, Option<String>), isize>();
            let arrived = batches
                .clone()
                .flat_map(|b| b.items.iter().cloned().collect::<Vec<_>>());
            let visible = registry.clone();
            index::publish_index(
                prices_by_day(stored.concat(arrived)),
                ports_under(ports, regions),
                index,
                summary,
                metrics,
                move |as_of| visible.visible(as_of),
            );
            let store_registry = registry.clone();
            tx_sink(batches, progress, self.kafka.topic.clone(), env, move || {
                RatesStore::open(&url, store_registry.clone())
            });
            (prices_in, ports_in, regions_in)
        });
        // Sent after the dataflow is built: inputs fed inside the closure hold the frontier back.
        if let Some(s) = snapshot {
            for p in s.prices {
                prices_in.insert(p);
            }
            for p in s.ports {
                ports_in.insert(p);
            }
            for r in s.regions {
                regions_in.insert(r);
            }
        }
        drop((prices_in, ports_in, regions_in));
        Vec::new()
    }
}
