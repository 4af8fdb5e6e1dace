//! A Kafka topic as a timely source operator.
//!
//! Each worker owns the partitions `p` with `p % peers == index` (deterministic, no group rebalance) and
//! reads them from the earliest offset with a `BaseConsumer` polled without blocking. Timely time is a
//! processing-time epoch (wall-clock milliseconds rounded down to the tick), so every worker's capability
//! advances even when its partitions are idle: views never stall on a quiet partition.
//! Undecodable messages are counted, logged with coordinates, and dead-lettered; nothing is dropped silently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::{Scope, Stream};
use timely::scheduling::SyncActivator;
use tracing::{debug, info, warn};

use super::dead_letter::DeadLetter;
use crate::error::{DecodeError, RuntimeError};
use crate::metrics::Metrics;

/// Where and how to read.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub client_id: String,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub properties: Vec<(String, String)>,
    /// Where to start reading each partition; partitions not listed start at the earliest offset.
    pub start_offsets: HashMap<i32, i64>,
}

/// What a decoder makes of one message.
pub enum Decoded<T> {
    Record(T),
    /// Not data (a schema change, a heartbeat, ...): counted under this reason.
    Ignored(&'static str),
}

/// Turns one Kafka message into a record. Implementations keep whatever state makes that cheap.
pub trait Decoder: 'static {
    type Out: Clone + 'static;
    fn decode(&mut self, msg: &BorrowedMessage<'_>) -> Result<Decoded<Self::Out>, DecodeError>;

    /// A record saying every message of `partition` before `next_offset` has been read (decoded, ignored
    /// or dead-lettered), emitted once per partition per poll batch. Sinks that store offsets with their
    /// results use it; the default emits nothing.
    fn progress(&mut self, _partition: i32, _next_offset: i64) -> Option<Self::Out> {
        None
    }
}

/// The processing-time epoch now: wall-clock milliseconds rounded down to `tick_ms`.
pub fn epoch_now(tick_ms: u64) -> u64 {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    ms - ms % tick_ms.max(1)
}

/// Everything the source operator shares with the rest of the process.
#[derive(Clone)]
pub struct SourceContext {
    pub metrics: Arc<Metrics>,
    pub dead_letter: Arc<DeadLetter>,
    pub shutdown: Arc<AtomicBool>,
    pub tick_ms: u64,
}

const POLL_BUDGET: Duration = Duration::from_millis(5);

/// Reads `cfg.topic` into a stream of decoded records.
pub fn kafka_source<'s, D: Decoder>(
    scope: Scope<'s, u64>,
    cfg: KafkaConfig,
    mut decoder: D,
    ctx: SourceContext,
) -> Stream<'s, u64, Vec<D::Out>> {
    let (index, peers) = (scope.index(), scope.peers());
    source::<_, timely::container::CapacityContainerBuilder<Vec<D::Out>>, _, _>(scope, "KafkaSource", move |cap, info| {
        let activator = scope.activator_for(info.address.clone());
        // librdkafka calls this from its own thread when the consumer queue becomes non-empty: the worker
        // wakes as data lands instead of polling on a timer.
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let mut cap = Some(cap);
        let mut reader: Option<Reader> = None;
        let mut backoff = Duration::from_millis(100);
        let mut next_attempt = Instant::now();
        let tick = Duration::from_millis(ctx.tick_ms.max(1));
        let topic = cfg.topic.clone();
        let worker = index.to_string();
        move |output| {
            let Some(capability) = cap.as_mut() else { return };
            if ctx.shutdown.load(Ordering::Relaxed) {
                info!(topic = %cfg.topic, worker = index, "shutdown requested: reading stops, what was read is finished");
                cap = None;
                return;
            }
            if reader.is_none() && Instant::now() >= next_attempt {
                match Reader::connect(&cfg, index, peers, ctx.metrics.clone(), wake.clone()) {
                    Ok(r) => {
                        info!(topic = %cfg.topic, worker = index, partitions = ?r.partitions, "assigned partitions");
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
            if let Some(r) = reader.as_mut() {
                let mut session = output.session(&*capability);
                let started = Instant::now();
                let mut bytes = 0u64;
                let mut per_partition: HashMap<i32, (u64, i64)> = HashMap::new();
                let ages = ctx.metrics.record_age.with_label_values(&[topic.as_str()]).local();
                let now_ms = epoch_now(1) as i64;
                loop {
                    if read % 256 == 255 && started.elapsed() > POLL_BUDGET {
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
                            if let Some(ts) = msg.timestamp().to_millis() {
                                ages.observe((now_ms - ts).max(0) as f64 / 1000.0);
                            }
                            bytes += (msg.key().map_or(0, <[u8]>::len) + msg.payload().map_or(0, <[u8]>::len)) as u64;
                            match decoder.decode(&msg) {
                                Ok(Decoded::Record(rec)) => session.give(rec),
                                Ok(Decoded::Ignored(reason)) => {
                                    ctx.metrics.ignored.with_label_values(&[topic.as_str(), reason]).inc();
                                }
                                Err(e) => {
                                    warn!(topic = %topic, partition = msg.partition(), offset = msg.offset(), reason = e.reason(), error = %e, "undecodable message dead-lettered");
                                    ctx.metrics.decode_errors.with_label_values(&[topic.as_str(), e.reason()]).inc();
                                    if let Err(io) = ctx.dead_letter.write(&msg, &e) {
                                        tracing::error!(topic = %topic, partition = msg.partition(), offset = msg.offset(), error = %io, "dead-letter write failed: message lost");
                                    } else {
                                        ctx.metrics.dead_lettered.with_label_values(&[topic.as_str()]).inc();
                                    }
                                }
                            }
                        }
                    }
                }
                for (p, (n, next_offset)) in per_partition {
                    ctx.metrics.messages.with_label_values(&[topic.as_str(), &p.to_string()]).inc_by(n);
                    if let Some(rec) = decoder.progress(p, next_offset) {
                        session.give(rec);
                    }
                }
                ctx.metrics.bytes.with_label_values(&[topic.as_str()]).inc_by(bytes);
                ages.flush();
            }
            let now = epoch_now(ctx.tick_ms);
            if now > *capability.time() {
                capability.downgrade(&now);
            }
            if read > 0 {
                activator.activate();
            } else {
                // Data wakes us through the non-empty callback; the tick still advances time.
                activator.activate_after(if reader.is_some() { tick } else { Duration::from_millis(100) });
            }
            debug!(worker = %worker, read, "source step");
        }
    })
}

/// Receives librdkafka's statistics (every second) to export per-partition lag without blocking a worker.
struct LagContext {
    metrics: Arc<Metrics>,
    topic: String,
}

impl ClientContext for LagContext {
    fn stats(&self, stats: Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else { return };
        for (p, part) in &topic.partitions {
            if *p < 0 || part.hi_offset < 0 {
                continue;
            }
            let next = if part.app_offset >= 0 { part.app_offset } else { part.lo_offset.max(0) };
            self.metrics.lag.with_label_values(&[self.topic.as_str(), &p.to_string()]).set((part.hi_offset - next).max(0));
        }
    }
}

impl ConsumerContext for LagContext {}

struct Reader {
    consumer: BaseConsumer<LagContext>,
    partitions: Vec<i32>,
}

impl Reader {
    fn connect(cfg: &KafkaConfig, index: usize, peers: usize, metrics: Arc<Metrics>, wake: SyncActivator) -> Result<Reader, RuntimeError> {
        let context = LagContext { metrics, topic: cfg.topic.clone() };
        let mut consumer: BaseConsumer<LagContext> =
            client_config(cfg).set("statistics.interval.ms", "1000").create_with_context(context)?;
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
            return Err(RuntimeError::Config(format!("topic {} has no partitions yet", cfg.topic)));
        }
        let partitions: Vec<i32> = topic.partitions().iter().map(|p| p.id()).filter(|p| (*p as usize) % peers == index).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let start = cfg.start_offsets.get(p).map_or(Offset::Beginning, |o| Offset::Offset(*o));
            tpl.add_partition_offset(&cfg.topic, *p, start)?;
        }
        consumer.assign(&tpl)?;
        Ok(Reader { consumer, partitions })
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

/// Which of Debezium's primary-key-change headers (`__debezium.newkey`, `__debezium.oldkey`) the message
/// carries. One pass: librdkafka parses a consumed message's headers on each request (profiled at about 7%
/// of a worker when asked twice per message).
pub fn key_change_headers(msg: &BorrowedMessage<'_>) -> (bool, bool) {
    let (mut newkey, mut oldkey) = (false, false);
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            match h.key {
                "__debezium.newkey" => newkey = true,
                "__debezium.oldkey" => oldkey = true,
                _ => {}
            }
        }
    }
    (newkey, oldkey)
}

/// The Debezium decoder as a Kafka [`Decoder`].
impl Decoder for super::debezium::DebeziumDecoder {
    type Out = dataflows::usage::Change;
    fn decode(&mut self, msg: &BorrowedMessage<'_>) -> Result<Decoded<Self::Out>, DecodeError> {
        let (has_newkey, has_oldkey) = key_change_headers(msg);
        let meta = super::debezium::Meta { partition: msg.partition(), offset: msg.offset(), has_newkey, has_oldkey };
        Ok(match super::debezium::DebeziumDecoder::decode(self, msg.key(), msg.payload(), meta)? {
            super::debezium::Decoded::Change(c) => Decoded::Record(c),
            super::debezium::Decoded::Ignored(r) => Decoded::Ignored(r),
        })
    }
}
