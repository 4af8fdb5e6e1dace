//! `tally demo`: everything in one process, no external service: an in-process Kafka broker (librdkafka's
//! mock cluster), the spec's simulator writing Debezium events into it, and the usage pipeline reading them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use crate::error::RuntimeError;
use crate::pipelines::usage::{UsageArgs, UsagePipeline};
use crate::runtime::{defaults, Cluster};
use crate::sources::kafka::KafkaArgs;

/// `tally demo`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// HTTP address for the view.
    #[arg(long, default_value = "0.0.0.0:12000")]
    pub listen: String,
    /// Milliseconds between simulator steps (the spec's simulator uses 500).
    #[arg(long, default_value_t = 500)]
    pub interval_ms: u64,
    /// Worker threads.
    #[arg(short = 'w', long = "workers", default_value_t = 1)]
    pub workers: usize,
}

impl DemoArgs {
    /// Runs the demo until SIGTERM or Ctrl-C.
    pub fn run(self) -> Result<(), RuntimeError> {
        let topic = "topic.cloud.instances";
        let mock = MockCluster::new(1)?;
        mock.create_topic(topic, 1, 1)?;
        let brokers = mock.bootstrap_servers();
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(self.interval_ms);
        let simulator = super::sim::spawn_producer(brokers.clone(), topic.to_owned(), interval, stop.clone());
        eprintln!(
            "tally demo: in-process broker at {brokers}; simulator deploys/destroys an instance every {} ms",
            self.interval_ms
        );
        let usage = UsageArgs {
            kafka: KafkaArgs { brokers, ..defaults() },
            topic: topic.into(),
            listen: self.listen,
            dead_letter: std::env::temp_dir().join("tally-demo-dead-letter.jsonl"),
            decimal_scale: None,
            // The demo's broker lives in memory: a checkpoint would outlive the history it points into.
            state: None,
            checkpoint_interval: 10_000,
            bill_ledger: true,
            duplicate_run_warn: 10_000,
            cluster: Cluster {
                workers: self.workers,
                ..defaults()
            },
            ops: defaults(),
        };
        let result = crate::runtime::run(UsagePipeline::new(usage));
        // The simulator's producer goes before the broker it talks to (else librdkafka logs "all brokers down").
        stop.store(true, Ordering::Relaxed);
        let _ = simulator.join();
        drop(mock);
        result
    }
}
