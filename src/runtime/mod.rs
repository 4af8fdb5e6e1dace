//! Runs pipelines on timely workers: one process (`-w N`) or a cluster of processes.
//!
//! A pipeline ([`Pipeline`]) says where it serves, prepares its sinks once per process, and builds its
//! dataflow on each worker; the runtime owns the rest: metrics, signals, HTTP on process 0, the one
//! `timely::execute`, the step loop, and shutdown. Views are published at closed timestamps
//! ([`publish::publish`]), so a read never sees a half-applied batch.

pub mod clock;
pub mod cluster;
pub mod process;
pub mod publish;

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

pub use cluster::Cluster;

use crate::error::RuntimeError;
use crate::http::{self, Routes};
use crate::metrics::Metrics;
use crate::sources::dead_letter::DeadLetter;
use crate::sources::kafka::SourceContext;

/// Where a pipeline serves, where its bad messages go, and how its workers are laid out.
#[derive(Clone, Debug)]
pub struct Common {
    /// HTTP address (served by process 0).
    pub listen: String,
    /// The dead-letter file.
    pub dead_letter: PathBuf,
    /// Workers and processes.
    pub cluster: Cluster,
}

/// What the runtime gives a pipeline's dataflow on each worker.
#[derive(Clone)]
pub struct Env {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Set on SIGTERM.
    pub shutdown: Arc<AtomicBool>,
    /// How often timestamps close, in milliseconds.
    pub tick_ms: u64,
    /// Where sources put what they cannot decode.
    pub dead_letter: Arc<DeadLetter>,
}

impl Env {
    /// What a Kafka source needs from the process.
    pub fn source(&self) -> SourceContext {
        SourceContext {
            metrics: self.metrics.clone(),
            dead_letter: self.dead_letter.clone(),
            shutdown: self.shutdown.clone(),
            tick_ms: self.tick_ms,
        }
    }
}

/// A size the runtime exports as `tally_dataflow_state_records{dataflow, worker}`, refreshed as it runs.
pub type StateSize = (&'static str, Rc<Cell<usize>>);

/// One pipeline: a source, a pure dataflow from `dataflows`, and what it serves and stores.
pub trait Pipeline: Send + Sync + 'static {
    /// Its name in logs and in the line announcing its address.
    const NAME: &'static str;

    /// Where it serves, its dead-letter file, its layout.
    fn common(&self) -> Common;

    /// Once per process, before the workers start: open and check sinks, read stored offsets (to resume
    /// the sources from), publish what is already stored. Returns what HTTP serves (on process 0).
    fn prepare(&mut self, metrics: &Arc<Metrics>) -> Result<Routes, RuntimeError>;

    /// Builds the pipeline's dataflow on one worker.
    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize>;
}

/// Runs `pipeline` until SIGTERM (or until its sources complete).
pub fn run<P: Pipeline>(mut pipeline: P) -> Result<(), RuntimeError> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = process::stop_on_signals()?;
    let common = pipeline.common();
    let routes = pipeline.prepare(&metrics)?;
    let dead_letter = Arc::new(DeadLetter::open(&common.dead_letter)?);
    if common.cluster.serves_http() {
        let server = http::bind(&common.listen)?;
        println!(
            "tally: {} on http://{}{} (metrics /metrics, page /ui)",
            P::NAME,
            server.addr(),
            routes.home()
        );
        http::spawn(server, routes, metrics.clone(), shutdown.clone());
    }
    let cluster = common.cluster;
    let tick_ms = cluster.tick_ms.max(1);
    info!(pipeline = P::NAME, workers = cluster.workers, processes = cluster.processes, dead_letter = %dead_letter.path().display(), "starting");
    let env = Env {
        metrics,
        shutdown,
        tick_ms,
        dead_letter,
    };
    let pipeline = Arc::new(pipeline);
    execute(&cluster, move |worker| {
        let sizes = pipeline.build(worker, &env);
        let worker_label = worker.index().to_string();
        let mut last_report = Instant::now();
        while worker.step_or_park(Some(Duration::from_millis(tick_ms))) {
            if last_report.elapsed() > Duration::from_millis(500) {
                last_report = Instant::now();
                for (dataflow, size) in &sizes {
                    env.metrics
                        .state_records
                        .with_label_values(&[*dataflow, worker_label.as_str()])
                        .set(size.get() as i64);
                }
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
