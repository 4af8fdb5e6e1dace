//! `tally demo`: everything in one process, no external service: an in-process Kafka broker (librdkafka's
//! mock cluster), the spec's simulator writing Debezium events into it, and the usage pipeline reading them.
//! `tally demo availability`: the same broker, built-in targets on loopback, `tally checker` checking them
//! and the availability views over its results (no PostgreSQL).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;

use crate::error::RuntimeError;
use crate::pipelines::availability::checker::CheckerArgs;
use crate::pipelines::availability::writer::{AvailabilityArgs, AvailabilityPipeline};
use crate::pipelines::usage::{UsageArgs, UsagePipeline};
use crate::runtime::{defaults, Cluster};
use crate::sources::kafka::KafkaArgs;

/// What the demo runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Demo {
    /// Usage billing over the spec's simulator (port 12000).
    #[default]
    Usage,
    /// The checker against built-in local targets, and the availability views (port 8080).
    Availability,
}

/// `tally demo`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// Which pipeline.
    #[arg(value_enum, default_value_t = Demo::Usage)]
    pub pipeline: Demo,
    /// HTTP address for the views (default 0.0.0.0:12000 for usage, 0.0.0.0:8080 for availability).
    #[arg(long)]
    pub listen: Option<String>,
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
        if self.pipeline == Demo::Availability {
            return self.availability();
        }
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
            listen: self.listen.unwrap_or_else(|| "0.0.0.0:12000".into()),
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

impl DemoArgs {
    /// `tally demo availability`.
    fn availability(self) -> Result<(), RuntimeError> {
        let topic = "website_availability";
        let mock = MockCluster::new(1)?;
        mock.create_topic(topic, 3, 1)?;
        let brokers = mock.bootstrap_servers();
        let target = targets::start()?;
        let dir = std::env::temp_dir().join(format!("tally-demo-availability-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sites = dir.join("sites.toml");
        std::fs::write(&sites, targets::sites_toml(target))?;
        eprintln!(
            "tally demo availability: in-process broker at {brokers}; checking {} every 2 s (sites in {})",
            targets::PATHS.map(|(p, _)| p).join(", "),
            sites.display()
        );
        let checker = CheckerArgs {
            sites: Some(sites),
            sites_from_postgres: None,
            sites_table: String::new(),
            sites_poll: Duration::from_secs(10),
            brokers: brokers.clone(),
            topic: topic.into(),
            partitions: 3,
            no_create_topic: true,
            shard: (0, 1),
            max_redirects: 5,
            ca_files: Vec::new(),
            dns_servers: Vec::new(),
            count: None,
        };
        let checking = std::thread::Builder::new()
            .name("tally-demo-checker".into())
            .spawn(move || {
                if let Err(e) = checker.run() {
                    tracing::error!(error = %e, "demo checker stopped");
                }
            })?;
        let args = AvailabilityArgs {
            kafka: KafkaArgs { brokers, ..defaults() },
            topic: topic.into(),
            views_only: true,
            listen: self.listen.unwrap_or_else(|| "0.0.0.0:8080".into()),
            dead_letter: dir.join("dead-letter.jsonl"),
            cluster: Cluster {
                workers: self.workers,
                ..defaults()
            },
            ..defaults()
        };
        let result = crate::runtime::run(AvailabilityPipeline::new(args));
        let _ = checking.join();
        drop(mock);
        result
    }
}

/// The demo's targets: one loopback server whose paths behave like sites do.
mod targets {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Path and what it does.
    pub(super) const PATHS: [(&str, &str); 5] = [
        ("/ok", "200 with a body the regex matches"),
        ("/slow", "200 after 300 ms before the headers"),
        ("/flaky", "503 one check in four"),
        ("/wrong-body", "200 with a body the regex does not match"),
        ("/broken", "500"),
    ];

    /// Serves the paths on 127.0.0.1 on an ephemeral port.
    pub(super) fn start() -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let flaky = Arc::new(AtomicU64::new(0));
        std::thread::Builder::new()
            .name("tally-demo-targets".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut s) = stream else { continue };
                    let flaky = flaky.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 2048];
                        let n = s.read(&mut buf).unwrap_or(0);
                        let head = String::from_utf8_lossy(&buf[..n]);
                        let path = head.split_whitespace().nth(1).unwrap_or("/");
                        let (status, body) = match path {
                            "/ok" => ("200 OK", "status: ok"),
                            "/slow" => {
                                std::thread::sleep(Duration::from_millis(300));
                                ("200 OK", "status: ok, slowly")
                            }
                            "/flaky" if flaky.fetch_add(1, Ordering::Relaxed) % 4 == 3 => {
                                ("503 Service Unavailable", "busy")
                            }
                            "/flaky" => ("200 OK", "status: ok"),
                            "/wrong-body" => ("200 OK", "status: degraded"),
                            _ => ("500 Internal Server Error", "oops"),
                        };
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    });
                }
            })?;
        Ok(addr)
    }

    /// The sites file for them, and one closed port (connection refused).
    pub(super) fn sites_toml(addr: SocketAddr) -> String {
        let closed = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(1, |a| a.port());
        let mut out = String::new();
        for (path, _) in PATHS {
            out.push_str(&format!(
                "[[site]]\nurl = \"http://{addr}{path}\"\ninterval = \"2s\"\ntimeout = \"1s\"\nregex = \"status: ok\"\n\n"
            ));
        }
        out.push_str(&format!(
            "[[site]]\nurl = \"http://127.0.0.1:{closed}/\"\ninterval = \"2s\"\ntimeout = \"1s\"\n"
        ));
        out
    }
}
