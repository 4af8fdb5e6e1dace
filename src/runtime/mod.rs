//! Runs pipelines on timely workers: one process (`-w N`) or a cluster of processes.
//!
//! A pipeline ([`Pipeline`]) says where it serves, prepares its sinks once per process, and builds its
//! dataflow on each worker; the runtime owns the rest: metrics, signals, HTTP on process 0, the one
//! `timely::execute`, the step loop, and shutdown. Views are published at closed timestamps
//! ([`publish::publish`]), so a read never sees a half-applied batch.

pub mod clock;
pub mod cluster;
pub mod health;
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
use crate::http::{self, Limits, Routes, Serving};
use crate::metrics::Metrics;
use crate::sources::dead_letter::DeadLetter;
use crate::sources::kafka::SourceContext;
use health::Health;

/// Where a pipeline serves, where its bad messages go, and how its workers are laid out.
#[derive(Clone, Debug)]
pub struct Common {
    /// HTTP address (served by process 0).
    pub listen: String,
    /// The dead-letter file.
    pub dead_letter: PathBuf,
    /// Workers and processes.
    pub cluster: Cluster,
    /// How it serves and reports health.
    pub ops: OpsArgs,
}

/// The operational flags every pipeline shares: HTTP bounds, readiness, access, dead-letter size.
#[derive(clap::Args, Clone, Debug)]
pub struct OpsArgs {
    /// File holding a bearer token: every endpoint but /health and /ui then asks for
    /// `Authorization: Bearer <token>` (the page takes it as /ui#token=...).
    #[arg(long, env = "TALLY_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve views before tally has caught up with its sources, marked `X-Tally-Partial: true`, instead of
    /// answering 503 with Retry-After.
    #[arg(long, env = "TALLY_SERVE_PARTIAL")]
    pub serve_partial: bool,
    /// /health says degraded once a source has not heard from the broker for this many milliseconds.
    #[arg(long, env = "TALLY_STALE_AFTER_MS", default_value_t = 30_000)]
    pub stale_after_ms: u64,
    /// HTTP connections served at once; more wait in the listen backlog.
    #[arg(long, env = "TALLY_HTTP_MAX_CONNECTIONS", default_value_t = 1024)]
    pub http_max_connections: usize,
    /// HTTP timeout in milliseconds: to send a request head, to idle between requests, and without write
    /// progress on a response (a client that stops reading is dropped).
    #[arg(long, env = "TALLY_HTTP_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_timeout_ms: u64,
    /// After SIGTERM, keep serving this many milliseconds with /health answering 503 `stopping` before
    /// the listener closes, so a load balancer moves traffic away first (requests in flight are always
    /// answered).
    #[arg(long, env = "TALLY_SHUTDOWN_GRACE_MS", default_value_t = 0)]
    pub shutdown_grace_ms: u64,
    /// Size in bytes at which the dead-letter file is rotated to <file>.1 (one older file is kept).
    #[arg(long, env = "TALLY_DEAD_LETTER_MAX_BYTES", default_value_t = crate::sources::dead_letter::DEFAULT_MAX_BYTES)]
    pub dead_letter_max_bytes: u64,
}

/// A flag group with every flag at its default (as the command line would give it), for the demo and
/// tools that run a pipeline without its command line.
pub fn defaults<A: clap::Args + clap::FromArgMatches>() -> A {
    let command = A::augment_args(clap::Command::new("defaults"));
    A::from_arg_matches(&command.get_matches_from(["defaults"])).expect("every flag in the group has a default")
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
    /// Records a source reads ahead of the dataflow ([`crate::sources::kafka::kafka_source`]).
    pub max_in_flight: usize,
    /// Where sources put what they cannot decode.
    pub dead_letter: Arc<DeadLetter>,
    /// What `/health` reports; sources and sinks tell it how they are doing.
    pub health: Arc<Health>,
}

impl Env {
    /// What a Kafka source needs from the process.
    pub fn source(&self) -> SourceContext {
        SourceContext {
            metrics: self.metrics.clone(),
            dead_letter: self.dead_letter.clone(),
            shutdown: self.shutdown.clone(),
            tick_ms: self.tick_ms,
            health: self.health.clone(),
            max_in_flight: self.max_in_flight,
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
    // Each HTTP connection and Kafka socket is a descriptor: take what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(open_files = limit, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
    let metrics = Arc::new(Metrics::new());
    let shutdown = process::stop_on_signals()?;
    let common = pipeline.common();
    let ops = &common.ops;
    let health = Arc::new(Health::new(Duration::from_millis(ops.stale_after_ms)));
    let auth_token = match &ops.auth_token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .map_err(|e| RuntimeError::Config(format!("--auth-token-file {}: {e}", path.display())))?;
            let token = token.trim().to_owned();
            if token.is_empty() {
                return Err(RuntimeError::Config(format!(
                    "--auth-token-file {} is empty",
                    path.display()
                )));
            }
            Some(token)
        }
        None => None,
    };
    let routes = pipeline.prepare(&metrics)?;
    let mut http_thread = None;
    let dead_letter = Arc::new(DeadLetter::open(&common.dead_letter, ops.dead_letter_max_bytes)?);
    if common.cluster.serves_http() {
        let server = http::bind(&common.listen)?;
        println!(
            "tally: {} on http://{}{} (metrics /metrics, page /ui)",
            P::NAME,
            server.addr(),
            routes.home()
        );
        let timeout = Duration::from_millis(ops.http_timeout_ms.max(1));
        let limits = Limits {
            max_connections: ops.http_max_connections,
            header_timeout: timeout,
            write_timeout: timeout,
            view_interval: Duration::from_millis(common.cluster.tick_ms.max(1)),
            shutdown_grace: Duration::from_millis(ops.shutdown_grace_ms),
            ..Limits::default()
        };
        let serving = Serving {
            metrics: metrics.clone(),
            health: health.clone(),
            auth_token,
            serve_partial: ops.serve_partial,
            limits,
        };
        http_thread = Some(http::spawn(server, routes, serving, shutdown.clone()));
    }
    let cluster = common.cluster;
    let tick_ms = cluster.tick_ms.max(1);
    info!(pipeline = P::NAME, workers = cluster.workers, processes = cluster.processes, dead_letter = %dead_letter.path().display(), "starting");
    let env = Env {
        metrics,
        shutdown,
        tick_ms,
        max_in_flight: cluster.max_in_flight.max(1),
        dead_letter,
        health,
    };
    let pipeline = Arc::new(pipeline);
    let result = execute(&cluster, move |worker| {
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
    });
    // The dataflow is done (and its last commit); HTTP answers what is in flight, then the process ends.
    if let Some(thread) = http_thread.filter(|_| result.is_ok()) {
        let _ = thread.join();
    }
    result
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
