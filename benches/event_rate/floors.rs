//! What tally is compared against on the same records: the broker's own consume rate, the parse-and-count
//! floor, and tally's engine alone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataflows::usage::{Change, Delta, UpsertState, Usage};
use differential_dataflow::difference::Semigroup;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally::pipelines::usage::{render_usage, UsageDecoder};
use tally::sources::decode::{Decoded, Decoder, Metadata};
use tally::sources::kafka::{client_config, KafkaConfig};

use crate::sched;

/// A consumer with tally's own librdkafka settings, so the floors read exactly as tally does.
pub(crate) fn consumer(brokers: &str, topic: &str, partitions: i32) -> BaseConsumer {
    let cfg = KafkaConfig {
        brokers: brokers.into(),
        topic: topic.into(),
        group_id: "bench-floor".into(),
        client_id: "bench-floor".into(),
        properties: Vec::new(),
        start_offsets: HashMap::new(),
    };
    let c: BaseConsumer = client_config(&cfg).create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    c
}

/// The broker's own consume rate: read every record, no parsing.
pub(crate) fn broker_floor(brokers: &str, topic: &str, partitions: i32, n: usize) -> f64 {
    let c = consumer(brokers, topic, partitions);
    let mut seen = 0;
    let mut start = None;
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            std::hint::black_box(m.payload());
            seen += 1;
        }
    }
    start.map_or(0.0, |s| s.elapsed().as_secs_f64())
}

pub(crate) fn render(usage: &HashMap<String, Usage>) -> serde_json::Value {
    let sorted: BTreeMap<String, Usage> = usage
        .iter()
        .filter(|(_, u)| u.started != 0 || u.running != 0 || !u.billing.is_zero())
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    serde_json::from_str(&render_usage(&sorted)).expect("json")
}

/// Adds the upsert's deltas to the per-organization usage, as the dataflow's consolidation does.
pub(crate) fn accumulate(usage: &mut HashMap<String, Usage>, deltas: &mut Vec<(Delta, isize)>) {
    for (delta, diff) in deltas.drain(..) {
        if let Ok((org, u)) = delta.into_usage(diff) {
            usage.entry(org).or_default().plus_equals(&u);
        }
    }
}

/// rdkafka + tally's typed decoder + the upsert logic over a HashMap: the practical limit, no dataflow.
/// Also returns where the harness's threads (this one and its consumer's) spent the time.
pub(crate) fn parse_and_count_floor(
    brokers: &str,
    topic: &str,
    partitions: i32,
    n: usize,
) -> (f64, serde_json::Value, String) {
    let c = consumer(brokers, topic, partitions);
    let mut decoder = UsageDecoder::new(None);
    let mut state = UpsertState::default();
    let mut usage: HashMap<String, Usage> = HashMap::new();
    let mut deltas = Vec::new();
    let (mut seen, mut start, mut threads0) = (0, None, sched::Snapshot::default());
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(|| {
                threads0 = sched::snapshot("self");
                Instant::now()
            });
            seen += 1;
            let meta = Metadata::at(topic, m.partition(), m.offset());
            if let Ok(Decoded::Record(change)) = decoder.decode(m.key(), m.payload(), &meta) {
                state.apply(change, &mut deltas);
                accumulate(&mut usage, &mut deltas);
            }
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let threads = sched::describe(&sched::between(&threads0, &sched::snapshot("self")), secs);
    (secs, render(&usage), threads)
}

/// tally's dataflow alone: decoded changes fed straight in (round-robin over workers by key), until done.
pub(crate) fn engine_only(changes: Arc<Vec<Change>>, workers: usize, expected: &serde_json::Value) -> (f64, bool) {
    use timely::dataflow::operators::Input;
    let result: Arc<Mutex<BTreeMap<String, Usage>>> = Arc::default();
    let start = Instant::now();
    let out = result.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let out = out.clone();
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Change>>();
            let views = dataflows::usage::usage(stream);
            let (probe, usage) = views.usage.probe();
            usage.inspect(move |(org, _t, diff)| {
                out.lock()
                    .expect("lock")
                    .entry(org.clone())
                    .or_default()
                    .plus_equals(diff);
            });
            (input, probe)
        });
        // Each worker feeds the partitions it would own; batches of 10,000 at successive timestamps.
        for (i, batch) in changes.chunks(10_000).enumerate() {
            for c in batch.iter().filter(|c| c.partition as usize % peers == index) {
                input.send(c.clone());
            }
            input.advance_to(i as u64 + 1);
            worker.step();
        }
        let done = *input.time();
        drop(input);
        worker.step_while(|| probe.less_than(&done));
    })
    .expect("timely")
    .join();
    let secs = start.elapsed().as_secs_f64();
    let got: HashMap<String, Usage> = result.lock().expect("lock").clone().into_iter().collect();
    (secs, &render(&got) == expected)
}
