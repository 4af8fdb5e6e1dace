//! A Kafka topic as a timely source operator with two outputs: the decoded records, and the source's
//! progress (how far each partition has been read), as Materialize's sources do.
//!
//! Each worker owns the partitions `p` with `p % peers == index` (deterministic, no group rebalance) and
//! reads them from the stored offsets (else the earliest) with a `BaseConsumer` polled without blocking.
//! Timely time is a processing-time epoch (wall-clock milliseconds rounded down to the tick), so every
//! worker's capability advances even when its partitions are idle: views never stall on a quiet partition.
//! Undecodable messages are counted, logged with coordinates, and dead-lettered; nothing is dropped silently.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{ProbeHandle, Scope, Stream};
use timely::scheduling::SyncActivator;
use tracing::{debug, info, warn};

use super::dead_letter::DeadLetter;
use super::decode::{Decoded, Decoder, Headers, Metadata};
use crate::error::RuntimeError;
use crate::metrics::Metrics;
use crate::runtime::clock::epoch_now;
use crate::runtime::health::{Health, SourceHealth};
use crate::sources::dead_letter::Written;

/// Where and how to read.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// The topic read.
    pub topic: String,
    /// librdkafka's `group.id` (partitions are assigned by tally, not by the group).
    pub group_id: String,
    /// librdkafka's `client.id`.
    pub client_id: String,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub properties: Vec<(String, String)>,
    /// Where to start reading each partition; partitions not listed start at the earliest offset.
    pub start_offsets: HashMap<i32, i64>,
}

/// The Kafka connection flags every pipeline shares.
#[derive(clap::Args, Clone, Debug)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Kafka consumer group.id (tally assigns partitions itself; it does not depend on group rebalances).
    #[arg(long, env = "TALLY_GROUP_ID", default_value = "exoscale")]
    pub group_id: String,
    /// Kafka client.id.
    #[arg(long, env = "TALLY_CLIENT_ID", default_value = "localhost")]
    pub client_id: String,
    /// Extra librdkafka consumer properties, key=value (repeatable), e.g. security.protocol=ssl.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The connection flags with defaults, for a given bootstrap address (demos).
    pub fn with_brokers(brokers: String) -> Self {
        KafkaArgs {
            brokers,
            group_id: "exoscale".into(),
            client_id: "localhost".into(),
            kafka_properties: Vec::new(),
        }
    }

    /// How to read `topic` with these flags, from the earliest offset.
    pub fn config(&self, topic: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic: topic.to_owned(),
            group_id: self.group_id.clone(),
            client_id: self.client_id.clone(),
            properties: self.kafka_properties.clone(),
            start_offsets: HashMap::new(),
        }
    }
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// Every message of `partition` before `next_offset` has been read (decoded, ignored or dead-lettered), and
/// its records were emitted at or before this update's timestamp. A sink that stores offsets with its
/// results stores these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Progress {
    /// The partition.
    pub partition: i32,
    /// The next offset to read.
    pub next_offset: i64,
}

/// Everything the source operator shares with the rest of the process.
#[derive(Clone)]
pub struct SourceContext {
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// Where undecodable messages go.
    pub dead_letter: Arc<DeadLetter>,
    /// Set on SIGTERM: the source stops reading and drops its capabilities.
    pub shutdown: Arc<AtomicBool>,
    /// How often timestamps close, in milliseconds.
    pub tick_ms: u64,
    /// Told when the source has caught up with the watermarks it saw at start, and when it last heard
    /// from the broker.
    pub health: Arc<Health>,
    /// `--max-in-flight`: how many records a source given a probe reads ahead of it ([`kafka_source`]).
    pub max_in_flight: usize,
}

/// A source's outputs.
pub struct Source<'s, T> {
    /// The decoded records.
    pub data: Stream<'s, u64, Vec<T>>,
    /// Per poll batch and partition read: how far it has been read.
    pub progress: Stream<'s, u64, Vec<Progress>>,
}

const POLL_BUDGET: Duration = Duration::from_millis(5);

/// Reads `cfg.topic` into a stream of decoded records and a stream of progress.
///
/// Given `done`, a probe on where the dataflow's work is finished (the pipeline attaches it to what its
/// views and sinks take in, or to a sink's committed frontier), the source reads nothing while
/// `ctx.max_in_flight` of its records are at timestamps the probe has not passed. Without one a replay
/// of a long topic is read into memory as fast as the broker sends it, whatever the dataflow keeps up with.
pub fn kafka_source<'s, D: Decoder>(
    scope: Scope<'s, u64>,
    cfg: KafkaConfig,
    mut decoder: D,
    ctx: SourceContext,
    done: Option<&ProbeHandle<u64>>,
) -> Source<'s, D::Out> {
    let (index, peers) = (scope.index(), scope.peers());
    let done = done.cloned();
    let mut builder = OperatorBuilder::new("KafkaSource".to_owned(), scope);
    let info = builder.operator_info();
    let (data_out, data) = builder.new_output::<Vec<D::Out>>();
    let (progress_out, progress) = builder.new_output::<Vec<Progress>>();
    let mut data_out: OutputBuilder<u64, CapacityContainerBuilder<Vec<D::Out>>> = OutputBuilder::from(data_out);
    let mut progress_out: OutputBuilder<u64, CapacityContainerBuilder<Vec<Progress>>> =
        OutputBuilder::from(progress_out);
    let activator = scope.activator_for(info.address.clone());
    // librdkafka calls this from its own thread when the consumer queue becomes non-empty: the worker
    // wakes as data lands instead of polling on a timer.
    let wake = scope.worker().sync_activator_for(info.address.to_vec());
    builder.build(move |capabilities| {
        let mut caps = Some(capabilities);
        let mut reader: Option<Reader> = None;
        let mut backoff = Duration::from_millis(100);
        let mut next_attempt = Instant::now();
        let tick = Duration::from_millis(ctx.tick_ms.max(1));
        let topic = cfg.topic.clone();
        let health = ctx.health.source(&topic, index);
        let worker_label = index.to_string();
        let in_flight_gauge = ctx.metrics.in_flight.with_label_values(&[topic.as_str(), &worker_label]);
        let paused = ctx.metrics.flow_paused.with_label_values(&[topic.as_str(), &worker_label]);
        // Records given per timestamp the probe has not passed yet, oldest first, and their sum.
        let mut in_flight: VecDeque<(u64, usize)> = VecDeque::new();
        let mut in_flight_total = 0usize;
        move |_frontiers| {
            let Some(capabilities) = caps.as_mut() else { return };
            if ctx.shutdown.load(Ordering::Relaxed) {
                info!(topic = %cfg.topic, worker = index, "shutdown requested: reading stops, what was read is finished");
                caps = None;
                return;
            }
            if reader.is_none() && Instant::now() >= next_attempt {
                match Reader::connect(&cfg, index, peers, ctx.metrics.clone(), wake.clone(), health.clone()) {
                    Ok(r) => {
                        info!(topic = %cfg.topic, worker = index, partitions = ?r.partitions, behind = r.behind(), "assigned partitions");
                        health.behind(r.behind());
                        reader = Some(r);
                    }
                    Err(e) => {
                        warn!(topic = %cfg.topic, worker = index, error = %e, retry_in = ?backoff, "Kafka source not ready");
                        ctx.metrics.kafka_errors.with_label_values(&[topic.as_str()]).inc();
                        next_attempt = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let mut read = 0usize;
            let mut budget = usize::MAX;
            if let Some(done) = &done {
                while let Some(&(t, n)) = in_flight.front() {
                    if done.less_equal(&t) {
                        break;
                    }
                    in_flight.pop_front();
                    in_flight_total -= n;
                }
                budget = ctx.max_in_flight.saturating_sub(in_flight_total);
                if budget == 0 && reader.is_some() {
                    paused.inc();
                }
            }
            if let Some(r) = reader.as_mut().filter(|_| budget > 0) {
                let mut data_handle = data_out.activate();
                let mut session = data_handle.session(&capabilities[0]);
                let started = Instant::now();
                let mut bytes = 0u64;
                let mut per_partition: HashMap<i32, (u64, i64)> = HashMap::new();
                let ages = ctx.metrics.record_age.with_label_values(&[topic.as_str()]).local();
                let now_ms = epoch_now(1) as i64;
                loop {
                    if read >= budget || (read % 256 == 255 && started.elapsed() > POLL_BUDGET) {
                        break;
                    }
                    match r.consumer.poll(Duration::ZERO) {
                        None => break,
                        Some(Err(e)) => {
                            warn!(topic = %topic, worker = index, error = %e, "Kafka poll error");
                            ctx.metrics.kafka_errors.with_label_values(&[topic.as_str()]).inc();
                            break;
                        }
                        Some(Ok(msg)) => {
                            read += 1;
                            let seen = per_partition.entry(msg.partition()).or_default();
                            seen.0 += 1;
                            seen.1 = msg.offset() + 1;
                            let timestamp_ms = msg.timestamp().to_millis();
                            if let Some(ts) = timestamp_ms {
                                ages.observe((now_ms - ts).max(0) as f64 / 1000.0);
                            }
                            let (key, value) = (msg.key(), msg.payload());
                            bytes += (key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len)) as u64;
                            let meta = Metadata {
                                topic: &topic,
                                partition: msg.partition(),
                                offset: msg.offset(),
                                timestamp_ms,
                                headers: Headers::kafka(msg.headers()),
                            };
                            match decoder.decode(key, value, &meta) {
                                Ok(Decoded::Record(rec)) => session.give(rec),
                                Ok(Decoded::Ignored(reason)) => {
                                    ctx.metrics.ignored.with_label_values(&[topic.as_str(), reason]).inc();
                                }
                                Err(e) => {
                                    warn!(topic = %topic, partition = meta.partition, offset = meta.offset, reason = e.reason(), error = %e, "undecodable message dead-lettered");
                                    ctx.metrics.decode_errors.with_label_values(&[topic.as_str(), e.reason()]).inc();
                                    match ctx.dead_letter.write(key, value, &meta, &e) {
                                        Ok(Written::Appended) => {
                                            ctx.metrics.dead_lettered.with_label_values(&[topic.as_str()]).inc();
                                            ctx.health.dead_letter(true);
                                        }
                                        Ok(Written::AlreadyThere) => {
                                            ctx.metrics.dead_letter_skipped.with_label_values(&[topic.as_str()]).inc();
                                        }
                                        Err(io) => {
                                            tracing::error!(topic = %topic, partition = meta.partition, offset = meta.offset, error = %io, "dead-letter write failed: the message's bytes are not kept");
                                            ctx.metrics.dead_letter_errors.with_label_values(&[topic.as_str()]).inc();
                                            ctx.health.dead_letter(false);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                drop(session);
                decoder.idle();
                if done.is_some() && read > 0 {
                    let t = *capabilities[0].time();
                    match in_flight.back_mut() {
                        Some((last, n)) if *last == t => *n += read,
                        _ => in_flight.push_back((t, read)),
                    }
                    in_flight_total += read;
                }
                let mut progress_handle = progress_out.activate();
                let mut progress = progress_handle.session(&capabilities[1]);
                for (p, (n, next_offset)) in per_partition {
                    ctx.metrics.messages.with_label_values(&[topic.as_str(), &p.to_string()]).inc_by(n);
                    progress.give(Progress { partition: p, next_offset });
                    r.positions.insert(p, next_offset);
                    if r.targets.get(&p).is_some_and(|t| next_offset >= *t) {
                        r.targets.remove(&p);
                    }
                }
                ctx.metrics.bytes.with_label_values(&[topic.as_str()]).inc_by(bytes);
                ages.flush();
                if read > 0 {
                    health.heard();
                }
                r.check_positions();
                if r.targets.is_empty() {
                    // Every record read so far was given at this capability's time or before.
                    health.caught_up(*capabilities[0].time());
                } else if read > 0 {
                    health.behind(r.behind());
                }
            }
            let now = epoch_now(ctx.tick_ms);
            for capability in capabilities.iter_mut() {
                if now > *capability.time() {
                    capability.downgrade(&now);
                }
            }
            in_flight_gauge.set(in_flight_total as i64);
            if read > 0 {
                activator.activate();
            } else if budget == 0 {
                // Nothing wakes a paused source when the dataflow catches up: look again soon.
                activator.activate_after(Duration::from_millis(1));
            } else {
                // Data wakes us through the non-empty callback; the tick still advances time.
                activator.activate_after(if reader.is_some() { tick } else { Duration::from_millis(100) });
            }
            debug!(worker = index, read, "source step");
        }
    });
    Source { data, progress }
}

/// Receives librdkafka's statistics (every second) to export per-partition lag without blocking a worker.
struct LagContext {
    metrics: Arc<Metrics>,
    topic: String,
    health: Arc<SourceHealth>,
}

impl ClientContext for LagContext {
    fn stats(&self, stats: Statistics) {
        if stats.brokers.values().any(|b| b.state == "UP") {
            self.health.heard();
        }
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        for (p, part) in &topic.partitions {
            if *p < 0 || part.hi_offset < 0 {
                continue;
            }
            let next = if part.app_offset >= 0 {
                part.app_offset
            } else {
                part.lo_offset.max(0)
            };
            self.metrics
                .lag
                .with_label_values(&[self.topic.as_str(), &p.to_string()])
                .set((part.hi_offset - next).max(0));
        }
    }
}

impl ConsumerContext for LagContext {}

struct Reader {
    consumer: BaseConsumer<LagContext>,
    partitions: Vec<i32>,
    /// Per partition not yet read to it: the high watermark seen when the reader connected.
    targets: HashMap<i32, i64>,
    /// Per partition: the next offset to read.
    positions: HashMap<i32, i64>,
    last_position_check: Instant,
}

impl Reader {
    /// A partition whose fetch position has passed its target has caught up even when no message carries
    /// the last offsets (transaction markers, records compacted away): librdkafka's position moves past
    /// them. Asked at most every 100 ms, and only while some partition has not caught up.
    fn check_positions(&mut self) {
        if self.targets.is_empty() || self.last_position_check.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_position_check = Instant::now();
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for elem in positions.elements() {
            if let Offset::Offset(at) = elem.offset() {
                if self.targets.get(&elem.partition()).is_some_and(|target| at >= *target) {
                    self.targets.remove(&elem.partition());
                }
            }
        }
    }

    /// Messages between the positions and the targets.
    fn behind(&self) -> u64 {
        self.targets
            .iter()
            .map(|(p, t)| (t - self.positions.get(p).copied().unwrap_or(0)).max(0) as u64)
            .sum()
    }
}

impl Reader {
    fn connect(
        cfg: &KafkaConfig,
        index: usize,
        peers: usize,
        metrics: Arc<Metrics>,
        wake: SyncActivator,
        health: Arc<SourceHealth>,
    ) -> Result<Reader, RuntimeError> {
        let context = LagContext {
            metrics,
            topic: cfg.topic.clone(),
            health,
        };
        let mut consumer: BaseConsumer<LagContext> = client_config(cfg)
            .set("statistics.interval.ms", "1000")
            .create_with_context(context)?;
        consumer.set_nonempty_callback(move || {
            // Fails only once the worker is gone, when there is nobody left to wake.
            let _ = wake.activate();
        });
        let metadata = consumer.fetch_metadata(Some(&cfg.topic), Duration::from_secs(5))?;
        let topic = metadata
            .topics()
            .iter()
            .find(|t| t.name() == cfg.topic)
            .ok_or_else(|| RuntimeError::Config(format!("topic {} not in metadata", cfg.topic)))?;
        if let Some(err) = topic.error() {
            return Err(RuntimeError::Config(format!("topic {}: {:?}", cfg.topic, err)));
        }
        if topic.partitions().is_empty() {
            return Err(RuntimeError::Config(format!(
                "topic {} has no partitions yet",
                cfg.topic
            )));
        }
        let partitions: Vec<i32> = topic
            .partitions()
            .iter()
            .map(|p| p.id())
            .filter(|p| (*p as usize) % peers == index)
            .collect();
        let mut tpl = TopicPartitionList::new();
        let (mut targets, mut positions) = (HashMap::new(), HashMap::new());
        for p in &partitions {
            let stored = cfg.start_offsets.get(p).copied();
            let start = stored.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&cfg.topic, *p, start)?;
            // What "caught up" means for this partition: read to the end it has now.
            let (low, high) = consumer.fetch_watermarks(&cfg.topic, *p, Duration::from_secs(5))?;
            let from = stored.unwrap_or(low).max(low);
            positions.insert(*p, from);
            if from < high {
                targets.insert(*p, high);
            }
        }
        consumer.assign(&tpl)?;
        consumer.context().health.heard();
        Ok(Reader {
            consumer,
            partitions,
            targets,
            positions,
            last_position_check: Instant::now(),
        })
    }
}

/// The librdkafka configuration tally uses for every consumer.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("client.id", &cfg.client_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        // librdkafka's 1 MiB per partition and fetch starves a single consumer on small records.
        .set("max.partition.fetch.bytes", "8388608")
        // Once its prefetch queue passes queued.min.messages, librdkafka postpones the next fetch by this
        // much (default 1000 ms) even when the queue drains in a fraction of that: measured here, tally sat
        // idle about 60% of every second while catching up (bench-results/).
        .set("fetch.queue.backoff.ms", "10")
        // The prefetch queue's cap (librdkafka's default is 64 MiB). Measured with benches/event_rate.rs, -w 1,
        // 3M events: 16 MiB reads schemaless records as fast or faster (360k vs 297-332k records/s) with 115
        // instead of 172-179 MB peak RSS; 4 MiB starves a consumer of 2.4 KB schema-carrying records (132k
        // vs 260k/s). A consumer per worker, so the cap is per worker.
        .set("queued.max.messages.kbytes", "16384")
        .set("socket.nagle.disable", "true");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}
