//! Generating the workload and producing it into the broker.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;
use tally::tools::sim::debezium_records;
use testkit::{create_topic, send_retrying, Ledger, Workload};

use crate::args::Args;

pub(crate) type Records = Vec<(i32, String, Option<String>)>;

/// Where traffic goes and how it is encoded, for the phases that produce while tally runs.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) brokers: &'a str,
    pub(crate) topic: &'a str,
    pub(crate) partitions: i32,
    pub(crate) schemas: bool,
}

/// Binlog positions handed out in commit order, as a real binlog does: tally treats an event at or before
/// a position it already applied (per partition) as a re-delivery.
pub(crate) static POS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(4);

pub(crate) fn next_pos() -> u64 {
    POS.fetch_add(300, Ordering::Relaxed)
}

pub(crate) fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    producer_config(brokers).create().expect("producer")
}

pub(crate) fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2000000");
    c
}

pub(crate) fn send<C: ProducerContext<DeliveryOpaque = ()> + 'static>(
    p: &ThreadedProducer<C>,
    topic: &str,
    partitions: i32,
    (part, k, v): &(i32, String, Option<String>),
) {
    let mut rec = BaseRecord::<String, String>::to(topic)
        .key(k)
        .partition(part % partitions);
    if let Some(v) = v {
        rec = rec.payload(v);
    }
    send_retrying(p, rec);
}

/// The generated workload, as produced into the broker.
pub(crate) struct Loaded {
    /// Every record, kept only when decode-only will read them again.
    pub(crate) records: Records,
    pub(crate) n: usize,
    pub(crate) bytes: usize,
    /// Generating and producing, until the broker acknowledged the last record.
    pub(crate) produce_s: f64,
    pub(crate) expected: serde_json::Value,
    pub(crate) workload: Workload,
}

/// Creates the topic, then generates the workload and produces it as it goes (holding 10M records would
/// take the memory the broker needs); `keep` also returns the records.
pub(crate) fn generate_and_load(a: &Args, schemas: bool, brokers: &str, topic: &str, keep: bool) -> Loaded {
    // One partition past the workload's, for the freshness probes alone.
    create_topic(brokers, topic, a.partitions + 1);
    let p = producer(brokers);
    let mut workload = Workload::new(42, a.orgs, a.running, a.updates, 50);
    let mut ledger = Ledger::default();
    let mut records = Vec::new();
    let (mut n, mut bytes) = (0, 0);
    let start = Instant::now();
    for _ in 0..a.events {
        let (event, ts) = workload.next_event();
        ledger.apply(&event, ts);
        let id = event.row().id;
        for (k, v) in debezium_records(&event, ts, next_pos(), schemas) {
            n += 1;
            bytes += k.len() + v.as_ref().map_or(0, String::len);
            let rec = ((id % 4) as i32, k, v);
            send(&p, topic, a.partitions, &rec);
            if keep {
                records.push(rec);
            }
        }
    }
    p.flush(Duration::from_secs(600)).expect("flush");
    Loaded {
        records,
        n,
        bytes,
        produce_s: start.elapsed().as_secs_f64(),
        expected: ledger.to_json(),
        workload,
    }
}
