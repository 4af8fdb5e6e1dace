//! How the timely computation is laid out: worker threads in this process, and the processes of a cluster.

use std::path::PathBuf;

use timely::{CommunicationConfig, WorkerConfig};

use crate::error::RuntimeError;

/// The layout flags every pipeline shares.
#[derive(clap::Args, Clone, Debug)]
pub struct Cluster {
    /// Worker threads in this process.
    #[arg(short = 'w', long = "workers", env = "TALLY_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Number of tally processes in a timely cluster (each started with its own --process).
    #[arg(long, env = "TALLY_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// This process's index in the cluster, 0-based. Process 0 serves HTTP.
    #[arg(long, env = "TALLY_PROCESS", default_value_t = 0)]
    pub process: usize,
    /// File with one host:port per line, one line per process, for timely's cluster connections.
    #[arg(long, env = "TALLY_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
    /// How often timestamps close, in milliseconds: the HTTP view refreshes at this cadence.
    #[arg(long, env = "TALLY_TICK_MS", default_value_t = 20)]
    pub tick_ms: u64,
    /// Records a worker's source reads ahead of its dataflow: it pauses while this many are in timestamps
    /// the dataflow has not finished, so a replay of a long topic holds a bounded batch, not the topic.
    #[arg(long, env = "TALLY_MAX_IN_FLIGHT", default_value_t = 20_000)]
    pub max_in_flight: usize,
}

impl Cluster {
    /// The timely configuration for this layout.
    pub fn timely_config(&self) -> Result<timely::Config, RuntimeError> {
        if self.workers == 0 {
            return Err(RuntimeError::Config("--workers must be at least 1".into()));
        }
        if self.processes <= 1 {
            return Ok(timely::Config::process(self.workers));
        }
        let hostfile = self
            .hostfile
            .as_ref()
            .ok_or_else(|| RuntimeError::Config("--processes > 1 needs --hostfile".into()))?;
        let text = std::fs::read_to_string(hostfile)?;
        let addresses: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
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
