//! Usage checkpoints (`--state`): start to caught-up view from a checkpoint against a rebuild from the
//! earliest offset, what checkpointing costs the drain rate, and the checkpoint's size against the
//! running set. One history is produced once; each repetition runs, interleaved: a rebuild without state,
//! a drain with `--state` at each checkpoint interval (fresh file), and a restart from that file.
//!
//! `cargo bench --bench usage_state -- --events 1000000 --intervals 10s,10s/no-ledger,1s`

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use tally::tools::sim::{debezium_records_at, LogAt};
use testkit::{send_retrying, Broker, Ledger, Tally, Workload};

#[derive(Parser, Debug)]
struct Args {
    /// Change events of history (each delete adds a tombstone record).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Rows kept running.
    #[arg(long, default_value_t = 20_000)]
    running: usize,
    #[arg(long, default_value_t = 100)]
    orgs: usize,
    /// Share of events that are price updates.
    #[arg(long, default_value_t = 0.2)]
    updates: f64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Checkpoint intervals to measure the drain with; `10s/no-ledger` runs with `--bill-ledger false`.
    #[arg(long, default_value = "10s,1s")]
    intervals: String,
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Tombstones after deletes (`tombstones.on.delete`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tombstones: bool,
    /// Where to write the results as JSON.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

const TOPIC: &str = "topic.cloud.instances";

#[path = "support/cpu_ticks.rs"]
mod cpu_ticks;

/// CPU seconds per thread name of process `pid` (threads of one name summed), most first.
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut per_name: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *per_name.entry(name.trim().to_owned()).or_default() += cpu_ticks::cpu_ticks(&format!("{pid}/task/{tid}"));
    }
    let mut out: Vec<(String, f64)> = per_name.into_iter().map(|(n, t)| (n, t as f64 / 100.0)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

fn produce(a: &Args, broker: &Broker) -> (usize, serde_json::Value) {
    broker.create_topic(TOPIC, a.partitions);
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2000000")
        .create()
        .expect("producer");
    let mut workload = Workload::new(42, a.orgs, a.running, a.updates, 50);
    let mut ledger = Ledger::default();
    let mut n = 0;
    for i in 0..a.events {
        let (event, ts) = workload.next_event();
        ledger.apply(&event, ts);
        let partition = (event.row().id % a.partitions as u64) as i32;
        for (k, v) in debezium_records_at(&event, ts, &LogAt::pos(4 + i as u64 * 300), false, a.tombstones) {
            n += 1;
            let mut rec = BaseRecord::<String, String>::to(TOPIC).key(&k).partition(partition);
            if let Some(v) = v.as_ref() {
                rec = rec.payload(v);
            }
            send_retrying(&p, rec);
        }
    }
    p.flush(Duration::from_secs(600)).expect("flush");
    (n, ledger.to_json())
}

fn spawn(broker: &Broker, a: &Args, dir: &Path, extra: &[&str]) -> Tally {
    let dl = dir.join("dl.jsonl");
    let workers = a.workers.to_string();
    let mut args = vec!["usage", "--brokers", &broker.addr, "--topic", TOPIC, "-w", &workers];
    args.extend(["--dead-letter", dl.to_str().expect("utf-8 path")]);
    args.extend(extra);
    Tally::spawn(env!("CARGO_BIN_EXE_tally"), &args)
}

/// Seconds from spawn to a view equal to `expected`.
fn caught_up(t: &Tally, started: Instant, expected: &serde_json::Value) -> f64 {
    t.wait_for_json("/", expected, Duration::from_secs(1800));
    started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = Args::parse();
    let broker = Broker::start();
    let started = Instant::now();
    let (records, expected) = produce(&a, &broker);
    eprintln!("produced {records} records in {:.1} s", started.elapsed().as_secs_f64());
    let dir = testkit::temp_dir("bench-usage-state");
    let intervals: Vec<&str> = a.intervals.split(',').filter(|s| !s.is_empty()).collect();
    let mut rebuild = Vec::new();
    let mut drain: Vec<Vec<f64>> = vec![Vec::new(); intervals.len()];
    let mut restore = Vec::new();
    let mut size = (0u64, 0i64, 0i64, 0i64);
    let mut held = 0u64;
    for r in 0..a.repeat {
        let t0 = Instant::now();
        let t = spawn(&broker, &a, &dir, &[]);
        rebuild.push(caught_up(&t, t0, &expected));
        eprintln!(
            "run {r}: rebuild: CPU seconds by thread at caught-up: {:.2?}",
            thread_cpu(t.child.id())
        );
        t.kill();
        for (i, interval) in intervals.iter().enumerate() {
            let state = dir.join(format!("state-{r}-{i}.db"));
            let _ = std::fs::remove_file(&state);
            let state_arg = state.to_str().expect("utf-8 path").to_owned();
            let t0 = Instant::now();
            let mut t = spawn(
                &broker,
                &a,
                &dir,
                &[
                    "--state",
                    &state_arg,
                    "--checkpoint-interval",
                    interval.trim_end_matches("/no-ledger"),
                    "--bill-ledger",
                    if interval.ends_with("/no-ledger") {
                        "false"
                    } else {
                        "true"
                    },
                ],
            );
            drain[i].push(caught_up(&t, t0, &expected));
            let checkpoints = t.metric("tally_sink_batches_total{sink=\"usage-state\"}");
            let threads = thread_cpu(t.child.id());
            eprintln!("run {r}: --checkpoint-interval {interval}: CPU seconds by thread at caught-up: {threads:.2?}");
            // Metrics refresh every 500 ms: wait for the gauge to show the drained state.
            std::thread::sleep(Duration::from_millis(1100));
            let (_, _, metrics) = t.get("/metrics");
            held = testkit::metric_sum(&metrics, "tally_dataflow_state_records");
            let (status, stop) = t.terminate();
            assert!(status.success());
            eprintln!("run {r}: --checkpoint-interval {interval}: {checkpoints} checkpoints, SIGTERM took {stop:?}");
            if i == 0 {
                let conn = rusqlite::Connection::open(&state).expect("state file");
                let count = |table: &str| -> i64 {
                    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| row.get(0))
                        .expect("count")
                };
                let bytes = std::fs::metadata(&state).map_or(0, |m| m.len())
                    + std::fs::metadata(state.with_extension("db-wal")).map_or(0, |m| m.len());
                size = (bytes, count("usage_keys"), count("usage_bills"), count("usage_marks"));
                let t0 = Instant::now();
                let t = spawn(&broker, &a, &dir, &["--state", &state_arg]);
                restore.push(caught_up(&t, t0, &expected));
                t.kill();
            }
        }
    }
    let rebuild_s = median(rebuild.clone());
    println!(
        "history: {records} records ({} events), {} running rows, {} partitions, -w {}",
        a.events, a.running, a.partitions, a.workers
    );
    println!("| start to caught-up view | median of {} | runs |", a.repeat);
    println!("|---|---|---|");
    println!(
        "| rebuild from the earliest offset (no --state) | {rebuild_s:.2} s ({:.0} records/s) | {rebuild:.2?} |",
        records as f64 / rebuild_s
    );
    for (i, interval) in intervals.iter().enumerate() {
        let s = median(drain[i].clone());
        println!(
            "| first drain with --state, checkpoints every {interval} | {s:.2} s ({:.0} records/s, {:+.1}% time) | {:.2?} |",
            records as f64 / s,
            (s / rebuild_s - 1.0) * 100.0,
            drain[i]
        );
    }
    let restore_s = median(restore.clone());
    println!("| restart from the checkpoint | {restore_s:.2} s | {restore:.2?} |");
    println!(
        "checkpoint: {:.1} MB on disk, {} keys for {} running rows, {} watermarks, {} bills in the ledger; \
         {held} keys held in the dataflow after the drain (tombstones {})",
        size.0 as f64 / 1e6,
        size.1,
        a.running,
        size.3,
        size.2,
        if a.tombstones { "on" } else { "off" }
    );
    if let Some(out) = &a.out {
        let json = serde_json::json!({
            "records": records, "events": a.events, "running": a.running, "partitions": a.partitions,
            "workers": a.workers, "tombstones": a.tombstones,
            "rebuild_s": rebuild, "restore_s": restore,
            "drain_s": intervals.iter().zip(&drain).map(|(i, d)| (i.to_string(), serde_json::json!(d))).collect::<serde_json::Map<_, _>>(),
            "state_bytes": size.0, "state_keys": size.1, "bills": size.2, "watermarks": size.3,
            "keys_held_after_drain": held,
        });
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).expect("results dir");
        }
        std::fs::write(out, serde_json::to_string_pretty(&json).expect("json")).expect("write results");
    }
}
