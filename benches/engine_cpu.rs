//! CPU cost of the usage dataflow alone, per change: the benchmark workload (schemaless Debezium records)
//! is generated and decoded first, then fed into a fresh one-worker dataflow `REPEAT` times, a timestamp
//! every `PER_TS` events. Times only the feeding, by the wall clock and by this thread's CPU time (which a
//! busy machine disturbs less), so a change to the dataflow can be compared on a noisy machine.
//!
//!   cargo bench --bench engine_cpu -- [EVENTS, default 1000000] [PER_TS, default 2000] [REPEAT, default 5]

use std::collections::HashMap;
use std::time::Instant;

use dataflows::usage::{Change, Usage};
use differential_dataflow::difference::Semigroup;
use tally::sim::{debezium_records, Workload};
use tally::sources::debezium::{DebeziumDecoder, Decoded, Meta};
use timely::dataflow::operators::Input;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// This thread's user + system CPU seconds (`/proc/thread-self/stat`, in clock ticks of 1/100 s).
fn thread_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command name, from the state: utime and stime are the 12th and 13th.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) as f64 / 100.0
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let events = args.first().copied().unwrap_or(1_000_000);
    let per_ts = args.get(1).copied().unwrap_or(2000).max(1) as usize;
    let repeat = args.get(2).copied().unwrap_or(5);
    let mut workload = Workload::new(42, 100, 20_000, 0.2, 50);
    let mut decoder = DebeziumDecoder::new(None);
    let (mut batches, mut batch, mut offset, mut n) = (Vec::new(), Vec::new(), 0i64, 0usize);
    for i in 1..=events {
        let (event, ts) = workload.next_event();
        for (k, v) in debezium_records(&event, ts, i * 300, false) {
            offset += 1;
            let meta = Meta { partition: (event.row().id % 4) as i32, offset, ..Meta::default() };
            if let Ok(Decoded::Change(c)) = decoder.decode(Some(k.as_bytes()), v.as_ref().map(|v| v.as_bytes()), meta) {
                batch.push(c);
                n += 1;
            }
        }
        if i as usize % per_ts == 0 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    batches.push(batch);
    println!("run,changes,wall_s,cpu_s,changes_per_wall_s,changes_per_cpu_s,organizations");
    for run in 0..repeat {
        let batches: Vec<Vec<Change>> = batches.clone();
        let (wall, cpu, orgs) = timely::execute_directly(move |worker| {
            let (mut input, probe, view) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Change>>();
                let (probe, usage) = dataflows::usage::usage(stream).usage.probe();
                let view = std::rc::Rc::new(std::cell::RefCell::new(HashMap::<String, Usage>::new()));
                let sink = view.clone();
                usage.inspect(move |(org, _t, diff)| sink.borrow_mut().entry(org.clone()).or_default().plus_equals(diff));
                (input, probe, view)
            });
            let (start, cpu0) = (Instant::now(), thread_cpu_s());
            for mut b in batches {
                input.send_batch(&mut b);
                let next = *input.time() + 1;
                input.advance_to(next);
                worker.step_while(|| probe.less_than(&next));
            }
            let orgs = view.borrow().values().filter(|u| u.running > 0).count();
            (start.elapsed().as_secs_f64(), thread_cpu_s() - cpu0, orgs)
        });
        println!("{run},{n},{wall:.3},{cpu:.2},{:.0},{:.0},{orgs}", n as f64 / wall, n as f64 / cpu);
    }
}
