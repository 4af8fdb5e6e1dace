//! Producing records into the broker, and reading captures as records.

use std::path::Path;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::services::Broker;

/// One Kafka record to produce.
#[derive(Clone, Debug)]
pub struct Rec {
    /// Its partition.
    pub partition: i32,
    /// Its key (`None`: null).
    pub key: Option<Vec<u8>>,
    /// Its value (`None`: null, a tombstone).
    pub value: Option<Vec<u8>>,
    /// Its headers.
    pub headers: Vec<(String, String)>,
}

/// Sends `record`, waiting while the producer's queue is full for deliveries to make room; any other error
/// would repeat forever, so it panics with the broker's message.
pub fn send_retrying<'a, K, P, C>(producer: &ThreadedProducer<C>, record: BaseRecord<'a, K, P, ()>)
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
    C: ProducerContext<DeliveryOpaque = ()> + 'static,
{
    let mut record = record;
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                std::thread::sleep(Duration::from_millis(1));
                record = back;
            }
            Err((e, back)) => panic!("producing to {} failed: {e}", back.topic),
        }
    }
}

/// Produces records in order and waits until all are acknowledged.
pub fn produce(broker: &Broker, topic: &str, records: &[Rec]) {
    produce_to(&broker.addr, topic, records)
}

/// [`produce`] by bootstrap address, for use from another thread.
pub fn produce_to(addr: &str, topic: &str, records: &[Rec]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .create()
        .expect("producer");
    for r in records {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v.as_slice());
        }
        if !r.headers.is_empty() {
            let mut h = OwnedHeaders::new();
            for (k, v) in &r.headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            rec = rec.headers(h);
        }
        send_retrying(&producer, rec);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Lines of a `.jsonl` capture as records with their headers (topic filter applied), with partition chosen
/// by `partition`.
pub fn capture_records(path: &Path, topic: &str, partition: impl Fn(&serde_json::Value) -> i32) -> Vec<Rec> {
    std::fs::read_to_string(path)
        .expect("read capture")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("jsonl"))
        .filter(|v| v["topic"] == topic)
        .map(|v| Rec {
            partition: partition(&v),
            key: v["key"].as_str().map(|s| s.as_bytes().to_vec()),
            value: v["value"].as_str().map(|s| s.as_bytes().to_vec()),
            headers: v["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    (
                        h["key"].as_str().expect("header key").to_owned(),
                        h["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect(),
        })
        .collect()
}
