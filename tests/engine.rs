//! The usage dataflow with several timely workers, fed decoded Debezium records of a workload with
//! creates, price updates, deletes and tombstones over four partitions: every worker count must give the
//! ledger's numbers. (Exercises the exchange between workers, which must keep each key's order.)
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use dataflows::usage::{Change, Usage};
use differential_dataflow::difference::{IsZero, Semigroup};
use tally::pipelines::usage::{render_usage, UsageDecoder};
use tally::sources::decode::{Decoded, Decoder, Metadata};
use tally::tools::sim::debezium_records;
use testkit::{Ledger, Workload};
use timely::dataflow::operators::Input;

fn workload(events: usize) -> (Vec<Change>, serde_json::Value) {
    let mut w = Workload::new(9, 20, 500, 0.3, 7);
    let mut ledger = Ledger::default();
    let mut decoder = UsageDecoder::new(None);
    let mut offsets = [0i64; 4];
    let mut changes = Vec::new();
    for i in 0..events {
        let (event, ts) = w.next_event();
        ledger.apply(&event, ts);
        let id = event.row().id;
        let partition = (id % 4) as i32;
        for (k, v) in debezium_records(&event, ts, 4 + i as u64 * 10, i % 3 == 0) {
            let meta = Metadata::at("topic.cloud.instances", partition, offsets[partition as usize]);
            offsets[partition as usize] += 1;
            let Decoded::Record(c) = decoder
                .decode(Some(k.as_bytes()), v.as_deref().map(str::as_bytes), &meta)
                .unwrap()
            else {
                panic!()
            };
            changes.push(c);
        }
    }
    (changes, ledger.to_json())
}

/// Each worker feeds the partitions it owns (as the Kafka source does), in `batch`-sized steps.
fn run(changes: Arc<Vec<Change>>, workers: usize, batch: usize) -> serde_json::Value {
    let result: Arc<Mutex<BTreeMap<String, Usage>>> = Arc::default();
    let out = result.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let out = out.clone();
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Change>>();
            dataflows::usage::usage(stream).usage.inspect(move |(org, _t, diff)| {
                out.lock().unwrap().entry(org.clone()).or_default().plus_equals(diff);
            });
            input
        });
        for (t, chunk) in changes.chunks(batch).enumerate() {
            for c in chunk.iter().filter(|c| c.partition as usize % peers == index) {
                input.send(c.clone());
            }
            input.advance_to(t as u64 + 1);
            worker.step();
        }
    })
    .unwrap()
    .join();
    let map = result.lock().unwrap().clone();
    let live: BTreeMap<String, Usage> = map.into_iter().filter(|(_, u)| !u.is_zero()).collect();
    serde_json::from_str(&render_usage(&live)).unwrap()
}

#[test]
fn one_two_and_three_workers_match_the_ledger() {
    let (changes, expected) = workload(20_000);
    let changes = Arc::new(changes);
    for workers in [1, 2, 3] {
        for batch in [13, 5000] {
            assert_eq!(
                run(changes.clone(), workers, batch),
                expected,
                "{workers} workers, batches of {batch}"
            );
        }
    }
}
