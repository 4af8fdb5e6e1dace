//! CPU cost of the usage dataflow alone, per change: the benchmark workload (schemaless Debezium records)
//! is generated and decoded first, then fed into a fresh one-worker dataflow `REPEAT` times, a timestamp
//! every `PER_TS` events. Times only the feeding, by the wall clock and by this thread's CPU time (which a
//! busy machine disturbs less), so a change to the dataflow can be compared on a noisy machine.
//!
//!   cargo bench --bench engine_cpu -- [EVENTS, default 1000000] [PER_TS, default 2000] [REPEAT, default 5]

#[path = "support/cpu_ticks.rs"]
mod cpu_ticks;
#[path = "support/decoded_workload.rs"]
mod decoded_workload;

use std::collections::HashMap;
use std::time::Instant;

use dataflows::usage::{Change, Usage};
use decoded_workload::DecodedWorkload;
use differential_dataflow::difference::Semigroup;
use timely::dataflow::operators::Input;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let events = args.first().copied().unwrap_or(1_000_000);
    let per_ts = args.get(1).copied().unwrap_or(2000).max(1) as usize;
    let repeat = args.get(2).copied().unwrap_or(5);
    let mut workload = DecodedWorkload::default();
    let (mut batches, mut batch) = (Vec::new(), Vec::new());
    for i in 1..=events {
        workload.next_event(|c| batch.push(c));
        if i as usize % per_ts == 0 {
            batches.push(std::mem::take(&mut batch));
        }
    }
    batches.push(batch);
    let n: usize = batches.iter().map(Vec::len).sum();
    println!("run,changes,wall_s,cpu_s,changes_per_wall_s,changes_per_cpu_s,organizations");
    for run in 0..repeat {
        let batches: Vec<Vec<Change>> = batches.clone();
        let (wall, cpu, orgs) = timely::execute_directly(move |worker| {
            let (mut input, probe, view) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Change>>();
                let (probe, usage) = dataflows::usage::usage(stream).usage.probe();
                let view = std::rc::Rc::new(std::cell::RefCell::new(HashMap::<String, Usage>::new()));
                let sink = view.clone();
                usage.inspect(move |(org, _t, diff)| {
                    sink.borrow_mut().entry(org.clone()).or_default().plus_equals(diff)
                });
                (input, probe, view)
            });
            // This thread's CPU time, in clock ticks of 1/100 s.
            let (start, cpu0) = (Instant::now(), cpu_ticks::cpu_ticks("thread-self"));
            for mut b in batches {
                input.send_batch(&mut b);
                let next = *input.time() + 1;
                input.advance_to(next);
                worker.step_while(|| probe.less_than(&next));
            }
            let orgs = view.borrow().values().filter(|u| u.running > 0).count();
            (
                start.elapsed().as_secs_f64(),
                (cpu_ticks::cpu_ticks("thread-self") - cpu0) as f64 / 100.0,
                orgs,
            )
        });
        println!(
            "{run},{n},{wall:.3},{cpu:.2},{:.0},{:.0},{orgs}",
            n as f64 / wall,
            n as f64 / cpu
        );
    }
}
