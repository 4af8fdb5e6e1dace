//! `tally checker`: checks sites on their slot grids and writes each result as JSON to Kafka, keyed by the
//! site's URL, with an idempotent producer.
//!
//! ```sh
//! tally checker --sites sites.toml --brokers localhost:9092 [--shard 0/2]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;

use super::probe::{self, Outcome, Probe};
use super::schedule::{self, Grid, Slot};
use super::sites::{self, Site};

/// `tally checker`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct CheckerArgs {
    /// The sites file (TOML, `[[site]]` tables; see README).
    #[arg(long, env = "TALLY_SITES")]
    pub sites: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic of check results (created with --partitions if missing).
    #[arg(long, env = "TALLY_AVAILABILITY_TOPIC", default_value = "website_availability")]
    pub topic: String,
    /// Partitions of the topic when tally creates it.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Check only the sites with `id mod N == I`: `I/N`. Run N checkers with 0/N .. N-1/N to cover every
    /// site exactly once.
    #[arg(long, default_value = "0/1", value_parser = parse_shard)]
    pub shard: (u64, u64),
    /// Redirects followed at most.
    #[arg(long, default_value_t = 5)]
    pub max_redirects: u32,
    /// Extra trusted CA certificates (PEM), besides the bundled Mozilla roots (repeatable).
    #[arg(long = "ca-file")]
    pub ca_files: Vec<PathBuf>,
    /// DNS servers to ask instead of /etc/resolv.conf's (`host:port`, repeatable).
    #[arg(long = "dns-server")]
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// Stop after this many results (tests and trials; default: run until SIGTERM).
    #[arg(long)]
    pub count: Option<u64>,
}

fn parse_shard(text: &str) -> Result<(u64, u64), String> {
    let (i, n) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected I/N, e.g. 0/2"))?;
    let (i, n): (u64, u64) = (
        i.parse().map_err(|_| format!("{text:?}: I is not a number"))?,
        n.parse().map_err(|_| format!("{text:?}: N is not a number"))?,
    );
    if n == 0 || i >= n {
        return Err(format!("{text:?}: need 0 <= I < N"));
    }
    Ok((i, n))
}

/// One result as it goes to Kafka.
#[derive(Serialize)]
pub struct CheckMessage<'a> {
    /// The site's id.
    pub site_id: u64,
    /// The configured URL (the key).
    pub url: &'a str,
    /// The slot, epoch ms.
    pub scheduled_at_ms: u64,
    /// `I/N` of the checker that made it.
    pub shard: String,
    /// The site's interval, ms: its slots are `scheduled_at_ms` modulo this apart.
    pub interval_ms: u64,
    /// What it found (`outcome` is `missed` for a slot the previous check still held).
    #[serde(flatten)]
    pub result: Outcome,
}

/// Why the checker stopped.
#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Kafka refused.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl CheckerArgs {
    /// Runs until SIGTERM (or `--count` results).
    pub fn run(self) -> Result<(), CheckerError> {
        let sites = sites::shard(
            sites::load(&self.sites).map_err(CheckerError::Config)?,
            self.shard.0,
            self.shard.1,
        );
        let mut pems = Vec::new();
        for f in &self.ca_files {
            pems.push(std::fs::read(f).map_err(|e| CheckerError::Config(format!("{}: {e}", f.display())))?);
        }
        let tls = Arc::new(probe::tls_config(&pems).map_err(CheckerError::Config)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tally-checker")
            .enable_all()
            .build()
            .map_err(|e| CheckerError::Config(format!("starting the runtime: {e}")))?;
        let shutdown = crate::runtime::process::stop_on_signals().map_err(|e| CheckerError::Config(e.to_string()))?;
        runtime.block_on(async move {
            let resolver = if self.dns_servers.is_empty() {
                probe::system_resolver().map_err(CheckerError::Config)?
            } else {
                probe::resolver_for(&self.dns_servers, Duration::from_secs(2))
            };
            let probe = Probe {
                resolver: Arc::new(resolver),
                tls,
                max_redirects: self.max_redirects,
            };
            ensure_topic(&self.brokers, &self.topic, self.partitions).await?;
            let producer: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "5")
                .create()?;
            eprintln!(
                "tally checker: {} sites (shard {}/{}) -> {} on {}",
                sites.len(),
                self.shard.0,
                self.shard.1,
                self.topic,
                self.brokers
            );
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Site, Slot<Outcome>)>();
            let stop = Arc::new(tokio::sync::Notify::new());
            let mut tasks = Vec::new();
            for site in sites {
                let (probe, tx, stop) = (probe.clone(), tx.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let grid = Grid::new(site.id, site.interval);
                    let s = site.clone();
                    let emit_site = site.clone();
                    schedule::run(
                        grid,
                        || crate::runtime::clock::epoch_now(1),
                        move |_slot| {
                            let (probe, s) = (probe.clone(), s.clone());
                            async move { probe.check(&s.url, &s.expect).await }
                        },
                        move |slot| {
                            let _ = tx.send((emit_site.clone(), slot));
                        },
                        async move { stop.notified().await },
                    )
                    .await;
                }));
            }
            drop(tx);
            let shard = format!("{}/{}", self.shard.0, self.shard.1);
            let mut sent = 0u64;
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = ticker.tick() => {
                        if shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                            stop.notify_waiters();
                        }
                        continue;
                    }
                };
                let Some((site, slot)) = next else { break };
                let (scheduled_at_ms, result) = match slot {
                    Slot::Checked(at, outcome) => (at, outcome),
                    Slot::Missed(at) => (
                        at,
                        Outcome {
                            outcome: "missed".into(),
                            final_url: site.url.clone(),
                            ..Outcome::default()
                        },
                    ),
                };
                let message = CheckMessage {
                    site_id: site.id,
                    url: &site.url,
                    scheduled_at_ms,
                    shard: shard.clone(),
                    interval_ms: site.interval.as_millis() as u64,
                    result,
                };
                let payload = serde_json::to_string(&message).expect("a check result serializes");
                let record = FutureRecord::to(&self.topic).key(&site.url).payload(&payload);
                if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
                    tracing::error!(site = %site.url, error = %e, "a check result could not be written to Kafka");
                } else {
                    sent += 1;
                }
                if self.count.is_some_and(|c| sent >= c) {
                    stop.notify_waiters();
                    break;
                }
            }
            for t in tasks {
                t.abort();
            }
            Ok(())
        })
    }
}

async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), CheckerError> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    // A topic that exists is left as it is (and a broker without the admin API, as librdkafka's mock
    // cluster, is never asked).
    let admin = Arc::new(admin);
    let (probe, name) = (admin.clone(), topic.to_owned());
    let exists = tokio::task::spawn_blocking(move || {
        probe
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            })
    })
    .await
    .map_err(|e| CheckerError::Config(format!("metadata: {e}")))??;
    if exists {
        return Ok(());
    }
    let t = NewTopic::new(topic, partitions.max(1), TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(CheckerError::Config(format!("creating topic {t}: {e}"))),
        }
    }
    Ok(())
}
