//! Event-rate benchmark: how fast tally is, side by side with what users would pick instead, in one run,
//! on the same broker and the same events. Every system's result is checked against the workload's own
//! ledger, so nobody wins by computing less.
//!
//!   cargo bench --bench event_rate -- [--events N] [--running N] [--orgs N] [--updates F] [--workers 1,2]
//!                                     [--schemas on,off] [--rates 0.1,0.25,0.5] [--skip-python] [--skip-engine]
//!                                     [--python kafka-python,pathway,bytewax] [--repeat 3] [--idle-s 5]
//!                                     [--tally-args "..."] [--rate-of N] [--probes N] [--generator-nice N]
//!                                     [--generator-linger-ms N] [--generator-compression lz4|none|...] [--out DIR]
//!
//! The floors and tally's drains run `--repeat` times, interleaved, and report the median run.
//! Measures, per schema setting: producing into the broker; the broker's own consume rate (no parsing);
//! the parse-and-count floor (rdkafka + tally's typed decoder + the upsert logic in a HashMap, no
//! dataflow); tally end to end for each worker count (drain: its first message read until `GET /` equals
//! the ledger, as the other consumers are timed from their first poll; peak RSS and RSS sampled every 200 ms;
//! freshness p50/p99 at fixed offered rates); tally's engine alone (decoded changes fed
//! straight into the dataflow) and decoding alone; and, unless `--skip-python`, the alternatives a user
//! would weigh, each computing the same three numbers (scripts/bench-deps installs them): the spec's
//! stack (a kafka-python consumer, timed from its first poll), Pathway (timed over `pw.run`, static mode)
//! and Bytewax (timed over `run_main`, tail=False). Each reports its own peak RSS.
//! Writes `results.md`, `results.csv`, `rss-*.csv` and (with matplotlib) `throughput.png`, `freshness.png`,
//! `memory.png` to `--out`.

#[path = "../support/cpu_ticks.rs"]
mod cpu_ticks;
#[path = "../support/proc_status.rs"]
mod proc_status;
#[path = "../support/sched.rs"]
mod sched;

mod args;
mod drain;
mod floors;
mod freshness;
mod load;
mod polling;
mod python;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::pipelines::usage::UsageDecoder;
use tally::sources::decode::{Decoded, Decoder, Metadata};
use testkit::{http_body, Broker};

use args::Args;
use clap::Parser;
use drain::*;
use floors::*;
use freshness::*;
use load::*;
use python::*;
use report::*;

/// The allocator tally itself runs with, so the floor and the engine-only rows compare like with like.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The repository's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out).expect("out dir");
    let workers: Vec<usize> = a
        .workers
        .split(',')
        .map(|w| w.trim().parse().expect("--workers"))
        .collect();
    let rates: Vec<f64> = a
        .rates
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.parse().expect("--rates"))
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    let mut fresh: Vec<Fresh> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for mode in a.schemas.split(',').map(str::trim) {
        let schemas = mode == "on";
        let broker = Broker::start();
        let topic = "topic.cloud.instances";
        let Loaded {
            records,
            n,
            bytes,
            produce_s,
            expected,
            mut workload,
        } = generate_and_load(&a, schemas, &broker.addr, topic, !a.skip_engine);
        eprintln!(
            "bench: schemas {mode}: {} events -> {n} records, {:.0} MB",
            a.events,
            bytes as f64 / 1e6
        );
        notes.push(format!(
            "schemas {mode}: {n} records ({:.2} KB average) generated and produced in {produce_s:.1} s ({:.0} records/s)",
            bytes as f64 / n as f64 / 1e3,
            n as f64 / produce_s
        ));
        let row = |system: &str, workers: usize, seconds: f64, rss_mb: Option<f64>, agrees: Option<bool>| Row {
            system: system.into(),
            schemas: mode.into(),
            workers,
            events: n,
            seconds,
            rss_mb,
            agrees,
        };
        let dir = std::env::temp_dir().join(format!("tally-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        // Drains repeat, interleaved (floors, then each worker count), so that a slow moment of the machine
        // does not land on one system only; each row is the median run, every run is in the notes.
        let (mut consume, mut floor, mut floor_ok) = (Vec::new(), Vec::new(), true);
        let mut drains: BTreeMap<usize, Vec<Drain>> = BTreeMap::new();
        for run in 0..a.repeat.max(1) {
            consume.push(broker_floor(&broker.addr, topic, a.partitions, n));
            let (s, got, threads) = parse_and_count_floor(&broker.addr, topic, a.partitions, n);
            floor.push(s);
            floor_ok &= got == expected;
            eprintln!(
                "bench: run {run}: broker consume {:.0}/s, parse-and-count floor {:.0}/s",
                n as f64 / consume[run],
                n as f64 / s
            );
            eprintln!("bench: run {run}: floor's threads: {threads}");
            notes.push(format!(
                "schemas {mode}, run {run}: the floor's threads over its drain: {threads}"
            ));
            for &w in &workers {
                let d = drain_tally(&a, &broker.addr, topic, w, &dir, &expected);
                eprintln!(
                    "bench: run {run}: tally -w {w}: {:.0}/s, peak RSS {:.0} MB, agrees {}",
                    n as f64 / d.secs,
                    d.peak_mb.unwrap_or(0.0),
                    d.ok
                );
                eprintln!("bench: run {run}: tally -w {w}'s threads: {}", d.threads);
                notes.push(format!(
                    "schemas {mode}, run {run}: tally -w {w}'s threads over its drain: {}",
                    d.threads
                ));
                drains.entry(w).or_default().push(d);
            }
        }
        let per_s = |secs: &[f64]| {
            secs.iter()
                .map(|s| format!("{:.0}", n as f64 / s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        notes.push(format!(
            "schemas {mode}: broker consume runs {} records/s; parse-and-count floor runs {}",
            per_s(&consume),
            per_s(&floor)
        ));
        rows.push(row("broker consume (no parsing)", 1, median(&consume), None, None));
        rows.push(row(
            "parse-and-count floor (rdkafka+serde+HashMap)",
            1,
            median(&floor),
            None,
            Some(floor_ok),
        ));
        let mut max_rate = HashMap::new();
        for (w, mut runs) in drains {
            let all = per_s(&runs.iter().map(|d| d.secs).collect::<Vec<_>>());
            let peak = runs.iter().filter_map(|d| d.peak_mb).reduce(f64::max);
            let ok = runs.iter().all(|d| d.ok);
            runs.sort_by(|x, y| x.secs.total_cmp(&y.secs));
            let mid = runs.swap_remove(runs.len() / 2);
            let csv: String = std::iter::once("seconds,records_read,rss_mb\n".to_owned())
                .chain(mid.samples.iter().map(|(t, r, m)| format!("{t:.1},{r},{m:.1}\n")))
                .collect();
            std::fs::write(a.out.join(format!("rss-schemas-{mode}-w{w}.csv")), csv).expect("write rss samples");
            rows.push(row(&format!("tally -w {w} (end to end)"), w, mid.secs, peak, Some(ok)));
            notes.push(format!(
                "schemas {mode}, tally -w {w}: runs {all} records/s; peak RSS is the highest of the runs. Median run: {:.0} ms from process start to its first message counted, {:.0} records/s counting that too, RSS {:.0} MB once drained and {:.0} MB after {:.0} s idle (samples: rss-schemas-{mode}-w{w}.csv)",
                mid.startup_s * 1e3,
                n as f64 / (mid.secs + mid.startup_s),
                mid.drained_mb,
                mid.idle_mb,
                a.idle_s
            ));
            max_rate.insert(w, n as f64 / mid.secs);
        }
        // HTTP load: a drain with wrk polling throughout, then wrk against the caught-up view.
        for &w in workers.iter().filter(|_| a.http_clients > 0) {
            let clients = a.http_clients;
            let t = spawn_tally(&broker.addr, topic, w, &dir, &a.tally_args);
            let during = match polling::Wrk::start(&t.http, clients, 3600) {
                Ok(wrk) => wrk,
                Err(e) => {
                    notes.push(format!("HTTP load not measured: {e}"));
                    break;
                }
            };
            let done = wait_equal(&t.http, &expected, Duration::from_secs(900), || {});
            let during = during.stop();
            let Some((first, end)) = done else {
                notes.push(format!(
                    "schemas {mode}, tally -w {w} under {clients} polling clients: never equal to the ledger"
                ));
                continue;
            };
            let secs = (end - first).as_secs_f64();
            let body = http_body(&t.http, "/").map_or(0, |b| b.len());
            let steady = polling::Wrk::start(&t.http, clients, a.http_secs)
                .map(polling::Wrk::finish)
                .unwrap_or_default();
            eprintln!(
                "bench: tally -w {w} with {clients} clients polling: {:.0}/s; during {during:?}; caught up {steady:?}",
                n as f64 / secs
            );
            rows.push(row(
                &format!("tally -w {w}, {clients} clients polling GET / (end to end)"),
                w,
                secs,
                None,
                Some(true),
            ));
            notes.push(format!(
                "schemas {mode}, tally -w {w} with {clients} wrk clients polling GET / ({} tally flags): drained at {:.0} records/s ({:.2}x the unloaded median {:.0}); during the drain {:.0} requests/s, p50 {:.1} ms, p99 {:.1} ms, {} answered non-2xx (503 while catching up), socket errors: {}; against the caught-up view ({body} bytes) for {} s: {:.0} requests/s, p50 {:.1} ms, p99 {:.1} ms, socket errors: {}",
                if a.tally_args.is_empty() { "default" } else { a.tally_args.as_str() },
                n as f64 / secs,
                n as f64 / secs / max_rate[&w],
                max_rate[&w],
                during.requests_per_s,
                during.p50_ms,
                during.p99_ms,
                during.non_2xx,
                if during.socket_errors.is_empty() { "none" } else { during.socket_errors.as_str() },
                a.http_secs,
                steady.requests_per_s,
                steady.p50_ms,
                steady.p99_ms,
                if steady.socket_errors.is_empty() { "none" } else { steady.socket_errors.as_str() },
            ));
        }
        // Engine only, and decoding only: decode every record once (timed), then feed the dataflow.
        if !a.skip_engine {
            let mut decoder = UsageDecoder::new(None);
            let start = Instant::now();
            let mut changes = Vec::with_capacity(n);
            for (i, (p, k, v)) in records.iter().enumerate() {
                let meta = Metadata::at(topic, *p, i as i64);
                if let Ok(Decoded::Record(c)) =
                    decoder.decode(Some(k.as_bytes()), v.as_ref().map(|v| v.as_bytes()), &meta)
                {
                    changes.push(c);
                }
            }
            rows.push(row(
                "decode only (1 core)",
                1,
                start.elapsed().as_secs_f64(),
                None,
                None,
            ));
            let changes = Arc::new(changes);
            for &w in &workers {
                let (s, ok) = engine_only(changes.clone(), w, &expected);
                eprintln!("bench: engine only -w {w}: {:.0}/s, agrees {ok}", n as f64 / s);
                rows.push(row(
                    &format!("tally engine only -w {w} (decoded, no Kafka)"),
                    w,
                    s,
                    None,
                    Some(ok),
                ));
            }
        }
        drop(records);
        if !a.skip_python {
            let n_s = n.to_string();
            let systems: [(&str, &str, &str, Vec<&str>); 3] = [
                (
                    "kafka-python",
                    "kafka-python consumer (the spec's stack)",
                    "kafka_python_usage.py",
                    vec![&broker.addr, topic, &n_s],
                ),
                (
                    "pathway",
                    "Pathway 0.33 (1 thread)",
                    "pathway_usage.py",
                    vec![&broker.addr, topic, mode],
                ),
                (
                    "bytewax",
                    "Bytewax 0.21 (1 worker)",
                    "bytewax_usage.py",
                    vec![&broker.addr, topic],
                ),
            ];
            let chosen: Vec<&str> = a.python.split(',').map(str::trim).collect();
            for (_, name, script, args) in systems.into_iter().filter(|s| chosen.contains(&s.0)) {
                let log = a.out.join(format!("{}-{mode}.log", script.trim_end_matches(".py")));
                match python_system(script, &args, &log) {
                    Ok((s, rss, got)) => {
                        let agrees = got == expected;
                        eprintln!("bench: {name} {:.0}/s, agrees {agrees}", n as f64 / s);
                        if !agrees {
                            let file = a.out.join(format!("disagreement-{script}-{mode}.json"));
                            std::fs::write(&file, got.to_string()).ok();
                            notes.push(format!(
                                "{name} disagreed with the ledger (schemas {mode}); its result is in {}",
                                file.display()
                            ));
                        }
                        rows.push(row(name, 1, s, rss, Some(agrees)));
                    }
                    Err(e) => notes.push(format!("{name} not measured (schemas {mode}): {e}")),
                }
            }
        }
        // Freshness last: its traffic extends the topic the drain measurements above read.
        let target = Target {
            brokers: &broker.addr,
            topic,
            partitions: a.partitions,
            schemas,
        };
        let mut phase = 0;
        let generator = Generator {
            nice: a.generator_nice,
            linger_ms: a.generator_linger_ms,
            compression: a.generator_compression.clone(),
        };
        // `--rates ""` skips freshness.
        for &w in workers.iter().filter(|_| !rates.is_empty()) {
            let t = spawn_tally(&broker.addr, topic, w, &dir, &a.tally_args);
            if !catch_up(&target, &t.http, &format!("sync-{w}"), workload.ts_s) {
                notes.push(format!("freshness -w {w}: tally never caught up"));
                continue;
            }
            for &f in &rates {
                let rate = a.rate_of.unwrap_or(max_rate[&w]) * f;
                let before = http_body(&t.http, "/metrics").unwrap_or_default();
                let pids = [Some(t.child.id()), broker.pid(), Some(std::process::id())];
                let cpu0 = CpuTimes::now(&pids);
                let phase_start = Instant::now();
                let ph = freshness(&target, &t.http, &mut workload, phase, rate, a.probes, &generator);
                phase += 1;
                let after = http_body(&t.http, "/metrics").unwrap_or_default();
                let (machine_busy, cores) = CpuTimes::now(&pids).since(&cpu0, phase_start.elapsed().as_secs_f64());
                let publish = Histogram::between(&before, &after, "tally_view_publish_delay_seconds");
                if let Err(e) = &ph.reniced {
                    notes.push(format!(
                        "freshness schemas {mode} -w {w} at {rate:.0}/s: generator kept tally's priority ({e})"
                    ));
                }
                if ph.missed > 0 {
                    notes.push(format!(
                        "freshness schemas {mode} -w {w} at {rate:.0}/s: {} probes never showed within 10 s",
                        ph.missed
                    ));
                }
                let x = Fresh {
                    schemas: mode.into(),
                    workers: w,
                    offered: rate,
                    handed: ph.handed,
                    delivered: ph.delivered,
                    p50_ms: pct(&ph.total, 0.5),
                    p99_ms: pct(&ph.total, 0.99),
                    ack_p50_ms: pct(&ph.ack, 0.5),
                    ack_p99_ms: pct(&ph.ack, 0.99),
                    after_p50_ms: pct(&ph.after_ack, 0.5),
                    after_p99_ms: pct(&ph.after_ack, 0.99),
                    publish_p99_ms: publish.quantile(0.99) * 1e3,
                    machine_busy,
                    tally_cores: cores[0],
                    broker_cores: cores[1],
                    harness_cores: cores[2],
                };
                eprintln!(
                    "bench: freshness -w {w} at {rate:.0}/s offered ({:.0}/s delivered): p50 {:.1} ms, p99 {:.1} ms (broker ack p99 {:.1} ms); machine {:.0}% busy, cores: tally {:.2}, broker {:.2}, harness {:.2}",
                    x.delivered,
                    x.p50_ms,
                    x.p99_ms,
                    x.ack_p99_ms,
                    x.machine_busy * 100.0,
                    x.tally_cores,
                    x.broker_cores,
                    x.harness_cores
                );
                fresh.push(x);
            }
        }
    }
    report(&a, &rows, &fresh, &notes);
}
