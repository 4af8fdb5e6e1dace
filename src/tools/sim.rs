//! The spec's simulator: five organizations; every step deploys an instance (probability 2/3, random
//! organization, price 1..=100 per second) or destroys the oldest one. Its events are encoded exactly as
//! Debezium's MySQL connector with the JsonConverter writes them, so `tally demo`, tests and benchmarks
//! exercise the same decoder as production.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The organizations of the spec's example output.
pub const ORGS: [&str; 5] = [
    "95f8a5e2-0807-448b-b2cd-102d78203c88",
    "ffb0ca88-123b-42f6-a2d2-b13f51dea292",
    "74b23560-55b5-4e9e-9b51-a98097b817f6",
    "37edc843-926f-47ca-9a08-bcc0a54dffd8",
    "0969af61-3d3b-4896-bd13-673f1a840170",
];

/// A row of `cloud.instances` as the simulator holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRow {
    pub id: u64,
    pub org: String,
    pub instance: String,
    pub price: i64,
    /// The `started` column, epoch seconds.
    pub started_s: i64,
}

/// What one simulator step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    Deploy(SimRow),
    Destroy(SimRow),
    /// A price change of a running row (`u`).
    Reprice {
        before: SimRow,
        after: SimRow,
    },
}

impl SimEvent {
    /// The row the event is about (for a price change, its new image).
    pub fn row(&self) -> &SimRow {
        match self {
            SimEvent::Deploy(r) | SimEvent::Destroy(r) | SimEvent::Reprice { after: r, .. } => r,
        }
    }
}

pub struct Simulator {
    rng: StdRng,
    next_id: u64,
    live: VecDeque<SimRow>,
    orgs: Vec<String>,
}

impl Simulator {
    /// A simulator over the spec's five organizations, reproducible from `seed`.
    pub fn new(seed: u64) -> Self {
        Self::with_orgs(seed, ORGS.iter().map(|s| s.to_string()).collect())
    }

    pub fn with_orgs(seed: u64, orgs: Vec<String>) -> Self {
        Simulator {
            rng: StdRng::seed_from_u64(seed),
            next_id: 1,
            live: VecDeque::new(),
            orgs,
        }
    }

    /// One step at database time `now_s` (epoch seconds).
    pub fn step(&mut self, now_s: i64) -> SimEvent {
        if self.live.is_empty() || self.rng.random_range(0..3) < 2 {
            deploy(&mut self.rng, &self.orgs, &mut self.next_id, &mut self.live, now_s)
        } else {
            SimEvent::Destroy(self.live.pop_front().expect("checked non-empty above"))
        }
    }

    pub fn running(&self) -> usize {
        self.live.len()
    }
}

/// Deploys a new row (random organization, new instance uuid, price 1..=100) started at `ts`: appends it
/// to `live` and takes the next id.
pub fn deploy(rng: &mut StdRng, orgs: &[String], next_id: &mut u64, live: &mut VecDeque<SimRow>, ts: i64) -> SimEvent {
    let org = orgs[rng.random_range(0..orgs.len())].clone();
    let row = SimRow {
        id: *next_id,
        org,
        instance: uuid_v4(rng),
        price: rng.random_range(1..=100),
        started_s: ts,
    };
    *next_id += 1;
    live.push_back(row.clone());
    SimEvent::Deploy(row)
}

/// A random version-4 UUID.
pub fn uuid_v4(rng: &mut StdRng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The connector's value schema for `cloud.instances` (INT price, TIMESTAMP started), as JsonConverter
/// writes it with `schemas.enable=true`.
pub const VALUE_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"},{"type":"string","optional":false,"field":"organization_uuid"},{"type":"string","optional":false,"field":"instance_uuid"},{"type":"int32","optional":false,"field":"price_second"},{"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"default":"1970-01-01T00:00:00Z","field":"started"}],"optional":true,"name":"topic.cloud.instances.Value","field":"before"},{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"},{"type":"string","optional":false,"field":"organization_uuid"},{"type":"string","optional":false,"field":"instance_uuid"},{"type":"int32","optional":false,"field":"price_second"},{"type":"string","optional":false,"name":"io.debezium.time.ZonedTimestamp","version":1,"default":"1970-01-01T00:00:00Z","field":"started"}],"optional":true,"name":"topic.cloud.instances.Value","field":"after"},{"type":"struct","fields":[{"type":"string","optional":false,"field":"version"},{"type":"string","optional":false,"field":"connector"},{"type":"string","optional":false,"field":"name"},{"type":"int64","optional":false,"field":"ts_ms"},{"type":"string","optional":true,"name":"io.debezium.data.Enum","version":1,"parameters":{"allowed":"true,last,false,incremental"},"default":"false","field":"snapshot"},{"type":"string","optional":false,"field":"db"},{"type":"string","optional":true,"field":"sequence"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"},{"type":"string","optional":true,"field":"table"},{"type":"int64","optional":false,"field":"server_id"},{"type":"string","optional":true,"field":"gtid"},{"type":"string","optional":false,"field":"file"},{"type":"int64","optional":false,"field":"pos"},{"type":"int32","optional":false,"field":"row"},{"type":"int64","optional":true,"field":"thread"},{"type":"string","optional":true,"field":"query"}],"optional":false,"name":"io.debezium.connector.mysql.Source","field":"source"},{"type":"struct","fields":[{"type":"string","optional":false,"field":"id"},{"type":"int64","optional":false,"field":"total_order"},{"type":"int64","optional":false,"field":"data_collection_order"}],"optional":true,"name":"event.block","version":1,"field":"transaction"},{"type":"string","optional":false,"field":"op"},{"type":"int64","optional":true,"field":"ts_ms"},{"type":"int64","optional":true,"field":"ts_us"},{"type":"int64","optional":true,"field":"ts_ns"}],"optional":false,"name":"topic.cloud.instances.Envelope","version":2}"#;
const KEY_SCHEMA: &str = r#"{"type":"struct","fields":[{"type":"int32","optional":false,"field":"id"}],"optional":false,"name":"topic.cloud.instances.Key"}"#;

/// `2024-05-01T12:34:56Z` for an epoch second, as Debezium writes a ZonedTimestamp.
pub fn zoned_timestamp(epoch_s: i64) -> String {
    jiff::Timestamp::from_second(epoch_s).map_or_else(|_| format!("out of range: {epoch_s}"), |t| t.to_string())
}

fn row_json(r: &SimRow) -> String {
    format!(
        r#"{{"id":{},"organization_uuid":"{}","instance_uuid":"{}","price_second":{},"started":"{}"}}"#,
        r.id,
        r.org,
        r.instance,
        r.price,
        zoned_timestamp(r.started_s)
    )
}

/// A Kafka record: key and value (`None` is a null value, a tombstone).
pub type Record = (String, Option<String>);

/// Where in the server's log an event is, as Debezium's `source` block reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogAt {
    /// `source.server_id`.
    pub server_id: u64,
    /// `source.gtid` (`0-1-42` on MariaDB), if the server runs with GTIDs.
    pub gtid: Option<String>,
    /// The binlog file's number (`mysql-bin.000003` is 3).
    pub file: u64,
    /// `source.pos`.
    pub pos: u64,
}

impl LogAt {
    /// Server 1, file 1, no GTID: what the simulator writes by default.
    pub fn pos(pos: u64) -> Self {
        LogAt {
            server_id: 1,
            gtid: None,
            file: 1,
            pos,
        }
    }
}

/// The records Debezium emits for one simulator event at database time `ts_s` and binlog offset
/// `pos`: a create, or a delete followed by its tombstone.
pub fn debezium_records(event: &SimEvent, ts_s: i64, pos: u64, schemas: bool) -> Vec<Record> {
    debezium_records_at(event, ts_s, &LogAt::pos(pos), schemas, true)
}

/// [`debezium_records`] at a given place in the log, with or without the tombstone after a delete
/// (`tombstones.on.delete`).
pub fn debezium_records_at(event: &SimEvent, ts_s: i64, at: &LogAt, schemas: bool, tombstones: bool) -> Vec<Record> {
    let (id, before, after, op) = match event {
        SimEvent::Deploy(r) => (r.id, "null".to_string(), row_json(r), "c"),
        SimEvent::Destroy(r) => (r.id, row_json(r), "null".to_string(), "d"),
        SimEvent::Reprice { before, after } => (after.id, row_json(before), row_json(after), "u"),
    };
    let ts_ms = ts_s * 1000;
    let gtid = at
        .gtid
        .as_ref()
        .map_or_else(|| "null".to_string(), |g| format!("\"{g}\""));
    let payload = format!(
        r#"{{"before":{before},"after":{after},"source":{{"version":"2.7.4.Final","connector":"mysql","name":"topic","ts_ms":{ts_ms},"snapshot":"false","db":"cloud","sequence":null,"ts_us":{ts_us},"ts_ns":{ts_ns},"table":"instances","server_id":{server_id},"gtid":{gtid},"file":"mysql-bin.{file:06}","pos":{pos},"row":0,"thread":null,"query":null}},"transaction":null,"op":"{op}","ts_ms":{ts_ms},"ts_us":{ts_us},"ts_ns":{ts_ns}}}"#,
        ts_us = ts_ms * 1000,
        ts_ns = ts_ms * 1_000_000,
        server_id = at.server_id,
        file = at.file,
        pos = at.pos,
    );
    let key_payload = format!(r#"{{"id":{id}}}"#);
    let (key, value) = if schemas {
        (
            format!(r#"{{"schema":{KEY_SCHEMA},"payload":{key_payload}}}"#),
            format!(r#"{{"schema":{VALUE_SCHEMA},"payload":{payload}}}"#),
        )
    } else {
        (key_payload, payload)
    };
    let mut out = vec![(key.clone(), Some(value))];
    if op == "d" && tombstones {
        out.push((key, None));
    }
    out
}

/// Runs the simulator against a Kafka topic in a background thread: one step per `interval`, at wall
/// time, Debezium-encoded with schemas, until `stop` is set; then it flushes what it sent and returns.
pub fn spawn_producer(
    brokers: String,
    topic: String,
    interval: std::time::Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    std::thread::Builder::new()
        .name("tally-sim".into())
        .spawn(move || {
            let producer: ThreadedProducer<DefaultProducerContext> = match rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "0")
                .create()
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "simulator cannot create a Kafka producer");
                    return;
                }
            };
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let mut sim = Simulator::new(seed);
            let mut pos = 4;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now_s = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                let event = sim.step(now_s);
                for (key, value) in debezium_records(&event, now_s, pos, true) {
                    let mut rec = BaseRecord::<String, String>::to(&topic).key(&key);
                    if let Some(v) = value.as_ref() {
                        rec = rec.payload(v);
                    }
                    if let Err((e, _)) = producer.send(rec) {
                        tracing::warn!(error = %e, "simulator could not enqueue a record");
                    }
                }
                pos += 300;
                std::thread::sleep(interval);
            }
            let _ = producer.flush(std::time::Duration::from_secs(5));
        })
        .expect("spawning a thread at startup")
}

/// The 107 food names of the original datafeed ("foie gras" is sent as `foie-gras`).
pub const FOODS: &str = include_str!("../../data/foods.txt");

/// The food names as the datafeed sends them.
pub fn foods() -> Vec<String> {
    FOODS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.replace(' ', "-"))
        .collect()
}

/// Produces `{"food": "<name>"}` (unkeyed) to `topic` every `interval`, `count` times or forever.
pub fn food_feed(
    brokers: &str,
    topic: &str,
    interval: std::time::Duration,
    count: Option<u64>,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let names = foods();
    let mut rng = StdRng::from_os_rng();
    let mut sent = 0u64;
    while count.is_none_or(|c| sent < c) {
        let food = &names[rng.random_range(0..names.len())];
        let value = format!(
            "{{\"food\": {}}}",
            serde_json::to_string(food).expect("strings serialize")
        );
        if let Err((e, _)) = producer.send(BaseRecord::<(), String>::to(topic).payload(&value)) {
            tracing::warn!(error = %e, "feed could not enqueue a message");
        } else {
            sent += 1;
        }
        std::thread::sleep(interval);
    }
    producer.flush(std::time::Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_like_debezium() {
        assert_eq!(zoned_timestamp(1_714_566_896), "2024-05-01T12:34:56Z");
        assert_eq!(zoned_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(zoned_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn destroys_the_oldest() {
        let mut sim = Simulator::new(7);
        let mut deployed = Vec::new();
        for t in 0..200 {
            match sim.step(t) {
                SimEvent::Deploy(r) => deployed.push(r),
                SimEvent::Destroy(r) => assert_eq!(r, deployed.remove(0)),
                SimEvent::Reprice { .. } => unreachable!("Simulator::step never reprices"),
            }
        }
        assert_eq!(sim.running(), deployed.len());
    }
}
