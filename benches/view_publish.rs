//! Cost of publishing the usage view with many organizations: a full render of the whole view (what
//! every tick did before members were kept), against a publish through `tally::runtime::publish::publish` where
//! each tick changes `CHANGED` organizations (their members redone, then all joined).
//!
//!   cargo bench --bench view_publish -- [ORGS, default 50000] [CHANGED, default 100] [TICKS, default 50]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dataflows::money::Money;
use dataflows::usage::Usage;
use differential_dataflow::input::Input;
use tally::http::ViewHandle;
use tally::metrics::Metrics;
use tally::pipelines::usage::{render_usage, usage_member};
use tally::runtime::publish::publish;

/// The allocator tally itself runs with.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let orgs = args.first().copied().unwrap_or(50_000);
    let changed = args.get(1).copied().unwrap_or(100).min(orgs);
    let ticks = args.get(2).copied().unwrap_or(50).max(1);
    let org = |i: usize| format!("{i:08x}-3d3b-4896-bd13-673f1a840170");
    let usage = Usage {
        started: 12,
        running: 3,
        billing: Money::from_int(123_456),
    };

    let state: BTreeMap<String, Usage> = (0..orgs).map(|i| (org(i), usage)).collect();
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..ticks {
        bytes = render_usage(&state).len();
    }
    let full_ms = start.elapsed().as_secs_f64() * 1e3 / ticks as f64;

    let kept_ms = timely::execute_directly(move |worker| {
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, view) = scope.new_collection::<String, Usage>();
            let (probe, view) = view.probe();
            publish(
                view,
                "usage",
                ViewHandle::new("{}"),
                Arc::new(Metrics::new()),
                usage_member,
            );
            (input, probe)
        });
        for i in 0..orgs {
            input.update(org(i), usage);
        }
        input.advance_to(1);
        input.flush();
        worker.step_while(|| probe.less_than(input.time()));
        worker.step();
        let start = Instant::now();
        for t in 0..ticks {
            for k in 0..changed {
                input.update(
                    org((t * changed + k) % orgs),
                    Usage {
                        started: 1,
                        ..Usage::default()
                    },
                );
            }
            input.advance_to(t as u64 + 2);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
            worker.step();
        }
        start.elapsed().as_secs_f64() * 1e3 / ticks as f64
    });
    println!("organizations,changed_per_tick,body_bytes,full_render_ms,publish_with_kept_members_ms");
    println!("{orgs},{changed},{bytes},{full_ms:.3},{kept_ms:.3}");
}
