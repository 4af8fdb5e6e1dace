//! Memory of the usage pipeline without Kafka: the benchmark workload (running set constant) encoded as
//! schemaless Debezium records, decoded by tally's decoder and fed into the usage dataflow on one worker,
//! a timestamp every `per_ts` events (about a 20 ms tick at 100k events/s). Prints this process's RSS
//! every million events, so growth that follows events shows apart from the Kafka client's buffers.
//!
//!   cargo bench --bench engine_memory -- [EVENTS, default 10000000] [PER_TS, default 2000]

#[path = "support/decoded_workload.rs"]
mod decoded_workload;
#[path = "support/proc_status.rs"]
mod proc_status;

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
    let events = args.first().copied().unwrap_or(10_000_000);
    let per_ts = args.get(1).copied().unwrap_or(2000).max(1);
    timely::execute(timely::Config::process(1), move |worker| {
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Change>>();
            let views = dataflows::usage::usage(stream);
            let (probe, usage) = views.usage.probe();
            // The served view's equivalent: one accumulated record per organization.
            let mut view: HashMap<String, Usage> = HashMap::new();
            usage.inspect(move |(org, _t, diff)| view.entry(org.clone()).or_default().plus_equals(diff));
            (input, probe)
        });
        let mut workload = DecodedWorkload::default();
        let start = Instant::now();
        println!("events,seconds,rss_mb,peak_mb");
        for i in 1..=events {
            workload.next_event(|c| input.send(c));
            if i % per_ts == 0 {
                let next = *input.time() + 1;
                input.advance_to(next);
                worker.step_while(|| probe.less_than(&next));
            }
            if i % 1_000_000 == 0 {
                let rss = proc_status::status_mb("self", "VmRSS:").unwrap_or(0.0);
                let peak = proc_status::status_mb("self", "VmHWM:").unwrap_or(0.0);
                println!("{i},{:.1},{rss:.1},{peak:.1}", start.elapsed().as_secs_f64());
            }
        }
    })
    .expect("timely")
    .join();
}
