//! `tally checker`: checks sites on their slot grids and writes each result as JSON to Kafka, keyed by the
//! site's URL, with an idempotent producer.
//!
//! ```sh
//! tally checker --sites sites.toml --brokers localhost:9092 [--shard 0/2]
//! ```

use std::collections::HashMap;
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
    #[arg(
        long,
        env = "TALLY_SITES",
        required_unless_present = "sites_from_postgres",
        conflicts_with = "sites_from_postgres"
    )]
    pub sites: Option<PathBuf>,
    /// Read the sites from PostgreSQL instead (spec -b's table, active rows only; re-read every
    /// `--sites-poll`, and a site that changed, came or went is restarted, started or stopped).
    #[arg(long, env = "TALLY_SITES_FROM_POSTGRES")]
    pub sites_from_postgres: Option<String>,
    /// The table `--sites-from-postgres` reads.
    #[arg(
        long,
        env = "TALLY_SITES_TABLE",
        default_value = "monitoring.availability_monitor_config"
    )]
    pub sites_table: String,
    /// How often `--sites-from-postgres` is re-read.
    #[arg(long, env = "TALLY_SITES_POLL", default_value = "10s", value_parser = crate::runtime::clock::parse_duration)]
    pub sites_poll: Duration,
    /// Kafka bootstrap servers.
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic of check results (created with --partitions if missing).
    #[arg(long, env = "TALLY_AVAILABILITY_TOPIC", default_value = "website_availability")]
    pub topic: String,
    /// Partitions of the topic when tally creates it.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Do not try to create the topic (it must exist; for brokers without the admin API).
    #[arg(long)]
    pub no_create_topic: bool,
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
        let sites = self.load_sites().map_err(CheckerError::Config)?;
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
            if !self.no_create_topic {
                ensure_topic(&self.brokers, &self.topic, self.partitions).await?;
            }
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
            let mut running: HashMap<u64, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
            let spawn = |site: Site| {
                let (probe, tx) = (probe.clone(), tx.clone());
                tokio::spawn(async move {
                    let grid = Grid::new(site.id, site.interval);
                    let s = site.clone();
                    schedule::run(
                        grid,
                        || crate::runtime::clock::epoch_now(1),
                        move |_slot| {
                            let (probe, s) = (probe.clone(), s.clone());
                            async move { probe.check(&s.url, &s.expect).await }
                        },
                        move |slot| {
                            let _ = tx.send((site.clone(), slot));
                        },
                        std::future::pending::<()>(),
                    )
                    .await;
                })
            };
            for site in sites {
                running.insert(site.id, (sites::fingerprint(&site), spawn(site)));
            }
            let mut reload = tokio::time::interval(self.sites_poll.max(Duration::from_millis(100)));
            reload.tick().await;
            let shard = format!("{}/{}", self.shard.0, self.shard.1);
            let mut sent = 0u64;
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = ticker.tick() => {
                        if shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    }
                    _ = reload.tick(), if self.sites_from_postgres.is_some() => {
                        let args = self.clone();
                        match tokio::task::spawn_blocking(move || args.load_sites()).await {
                            Ok(Ok(now)) => {
                                let (started, stopped) = apply(&mut running, now, &spawn);
                                if started + stopped > 0 {
                                    tracing::info!(started, stopped, sites = running.len(), "sites reloaded");
                                }
                            }
                            Ok(Err(e)) => tracing::warn!(error = %e, "sites not reloaded; the previous ones run on"),
                            Err(e) => tracing::warn!(error = %e, "sites not reloaded"),
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
                    break;
                }
            }
            for (_, (_, task)) in running {
                task.abort();
            }
            Ok(())
        })
    }
}

impl CheckerArgs {
    /// This shard's sites, from the file or the table.
    fn load_sites(&self) -> Result<Vec<Site>, String> {
        let all = match (&self.sites, &self.sites_from_postgres) {
            (_, Some(url)) => sites::from_postgres(url, &self.sites_table)?,
            (Some(path), None) => sites::load(path)?,
            (None, None) => return Err("give --sites FILE or --sites-from-postgres URL".into()),
        };
        Ok(sites::shard(all, self.shard.0, self.shard.1))
    }
}

/// Stops the sites that went or changed and starts the ones that came or changed; returns how many of each.
fn apply(
    running: &mut HashMap<u64, (String, tokio::task::JoinHandle<()>)>,
    now: Vec<Site>,
    spawn: &impl Fn(Site) -> tokio::task::JoinHandle<()>,
) -> (usize, usize) {
    let wanted: HashMap<u64, String> = now.iter().map(|s| (s.id, sites::fingerprint(s))).collect();
    let mut stopped = 0;
    running.retain(|id, (print, task)| {
        let keep = wanted.get(id) == Some(print);
        if !keep {
            task.abort();
            stopped += 1;
        }
        keep
    });
    let mut started = 0;
    for site in now {
        if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(site.id) {
            slot.insert((sites::fingerprint(&site), spawn(site)));
            started += 1;
        }
    }
    (started, stopped)
}

async fn ensure_topic(brokers: &str, topic: &str, partitions: i32) -> Result<(), CheckerError> {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let t = NewTopic::new(topic, partitions.max(1), TopicReplication::Fixed(1));
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    // A broker without the admin API (librdkafka's mock cluster) never answers: then the topic must exist.
    let asked = tokio::time::timeout(Duration::from_secs(15), admin.create_topics([&t], &options)).await;
    let Ok(results) = asked else {
        tracing::warn!(
            topic,
            "the broker did not answer CreateTopics in 15 s; using the topic as it is"
        );
        return Ok(());
    };
    for r in results? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => return Err(CheckerError::Config(format!("creating topic {t}: {e}"))),
        }
    }
    Ok(())
}
