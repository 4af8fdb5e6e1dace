//! The availability writer measured end to end.
//!
//! 1. Rows/s into PostgreSQL: `--results` check results (10,000 sites, 60 s slots) on the real broker,
//!    from the writer's start until `check_result` holds them all, against the way the specs write: a
//!    kafka-python consumer with one INSERT and one commit per message through psycopg2
//!    (`benches/availability_baseline/consumer.py`, venv `~/.cache/tally/venv-availability`), over the
//!    first `--baseline-results` of them (its rate is one round trip and one commit per row, whatever the
//!    count: 1,000,000 would take it about ten minutes).
//! 2. Memory: the writer's peak RSS (VmHWM) with the views over 1 h and 24 h of results for `--sites`
//!    sites checked every `--interval-s` (300): the views hold sites × window buckets, so the two should
//!    match once the windows are full (at 60 s the 1 h window and the strip of 50 are full after 1 h).
//!
//! `cargo bench --bench availability -- [--results 1000000] [--baseline-results 100000] [--sites 10000]
//!  [--skip-rows] [--skip-baseline] [--skip-memory] [--interval-s 300] [--out FILE]`. Needs the venv (see README "Benchmarks").
#![allow(clippy::unwrap_used)]

#[path = "support/proc_status.rs"]
mod proc_status;

use std::process::Command;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use testkit::{metric_sum, poll_until, produce_to, Broker, Postgres, Rec, Tally};

const T0: i64 = 1_614_556_800_000; // 2021-03-01T00:00:00Z

struct Args {
    results: usize,
    baseline_results: usize,
    sites: i64,
    skip_baseline: bool,
    skip_rows: bool,
    skip_memory: bool,
    interval_s: i64,

    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        results: 1_000_000,
        baseline_results: 100_000,
        sites: 10_000,
        skip_baseline: false,
        skip_rows: false,
        skip_memory: false,
        interval_s: 300,

        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--results" => a.results = it.next().unwrap().parse().unwrap(),
            "--baseline-results" => a.baseline_results = it.next().unwrap().parse().unwrap(),
            "--sites" => a.sites = it.next().unwrap().parse().unwrap(),
            "--skip-baseline" => a.skip_baseline = true,
            "--skip-rows" => a.skip_rows = true,
            "--interval-s" => a.interval_s = it.next().unwrap().parse().unwrap(),

            "--skip-memory" => a.skip_memory = true,
            "--out" => a.out = it.next(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Result `i` of a run over `sites` sites every `interval_ms`: site `i % sites`, slot `i / sites`.
fn result(i: i64, sites: i64, interval_ms: i64) -> Rec {
    let (site, slot) = (i % sites, i / sites);
    let url = format!("https://site{site}.example/health");
    let down = (site * 31 + slot) % 97 == 0;
    let value = serde_json::json!({
        "site_id": site, "url": url, "scheduled_at_ms": T0 + (site * 7919) % interval_ms + slot * interval_ms,
        "interval_ms": interval_ms, "shard": "0/1", "outcome": if down { "down" } else { "up" },
        "error_class": if down { Some("timeout") } else { None }, "http_status": if down { None } else { Some(200) },
        "final_url": url, "dns_us": 800 + slot % 50, "connect_us": 1_200 + site % 300, "tls_us": 4_000 + slot % 700,
        "ttfb_us": 20_000 + (site * slot) % 9_000, "transfer_us": 300, "total_us": 26_300 + (site * slot) % 10_000,
    });
    Rec {
        partition: (site % 3) as i32,
        key: Some(url.into_bytes()),
        value: Some(value.to_string().into_bytes()),
        headers: vec![],
    }
}

fn produce_results(broker: &Broker, topic: &str, n: usize, sites: i64, interval_ms: i64) -> f64 {
    broker.create_topic(topic, 3);
    let started = Instant::now();
    let chunk = 200_000;
    for from in (0..n).step_by(chunk) {
        let records: Vec<Rec> = (from..(from + chunk).min(n))
            .map(|i| result(i as i64, sites, interval_ms))
            .collect();
        produce_to(&broker.addr, topic, &records);
    }
    started.elapsed().as_secs_f64()
}

fn setup(db: &str) {
    let ok = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["availability", "--setup", "--postgres", db])
        .status()
        .unwrap()
        .success();
    assert!(ok, "availability --setup");
}

fn rows(db: &str) -> i64 {
    let mut c = Client::connect(db, NoTls).unwrap();
    c.query_one("SELECT count(*) FROM check_result", &[]).unwrap().get(0)
}

fn main() {
    let a = args();
    let broker = Broker::start();
    let pg = Postgres::start();
    let mut report = serde_json::Map::new();

    // 1. Rows per second into PostgreSQL.
    let dir = testkit::temp_dir("bench-availability");
    if !a.skip_rows {
        let topic = "website_availability";
        let produce_s = produce_results(&broker, topic, a.results, a.sites, 60_000);
        println!("produced {} results in {produce_s:.1} s", a.results);
        let db = pg.database("bench_availability");
        setup(&db);
        let started = Instant::now();
        let tally = Tally::spawn(
            env!("CARGO_BIN_EXE_tally"),
            &[
                "availability",
                "--brokers",
                &broker.addr,
                "--postgres",
                &db,
                "--dead-letter",
                dir.join("dl.jsonl").to_str().unwrap(),
            ],
        );
        let n = a.results as i64;
        // Polled on the offsets committed with the rows (a count(*) every 100 ms would take PostgreSQL's
        // time from the writer being measured, and /metrics with 10,000 sites' gauges the writer's), then
        // checked in the table.
        let mut c = Client::connect(&db, NoTls).unwrap();
        poll_until(Duration::from_secs(3600), Duration::from_millis(50), || {
            let read: i64 = c
                .query_one(
                    "SELECT coalesce(sum(next_offset), 0)::bigint FROM tally_availability_offsets WHERE topic = $1",
                    &[&topic],
                )
                .unwrap()
                .get(0);
            (read >= n).then_some(())
        })
        .unwrap();
        let tally_s = started.elapsed().as_secs_f64();
        assert_eq!(rows(&db), n, "tally stored every result once");
        let tally_rate = n as f64 / tally_s;
        let tally_rss = proc_status::status_mb(&tally.child.id().to_string(), "VmHWM:").unwrap_or(f64::NAN);
        drop(tally);
        println!("tally availability: {n} rows in {tally_s:.2} s = {tally_rate:.0} rows/s (peak RSS {tally_rss:.0} MB, views on)");
        report.insert(
            "tally".into(),
            serde_json::json!({"rows": n, "seconds": tally_s, "rows_per_s": tally_rate, "peak_rss_mb": tally_rss}),
        );

        if !a.skip_baseline {
            let db2 = pg.database("bench_availability_psycopg2");
            setup(&db2);
            // The baseline does not make partitions: give it the days the results fall on.
            let mut c = Client::connect(&db2, NoTls).unwrap();
            let days = (a.results as i64 / a.sites + 1) * 60_000 / 86_400_000 + 2;
            for d in 0..days {
                let day = |k: i64| dataflows::rates::format_day((T0 / 86_400_000) as i32 + k as i32);
                c.batch_execute(&format!(
                    "CREATE TABLE check_result_d{d} PARTITION OF check_result FOR VALUES FROM ('{}') TO ('{}')",
                    day(d),
                    day(d + 1)
                ))
                .unwrap();
            }
            let python = dirs_venv().join("bin/python");
            let script = testkit::root().join("benches/availability_baseline/consumer.py");
            let out = Command::new(&python)
                .args([
                    script.to_str().unwrap(),
                    "--brokers",
                    &broker.addr,
                    "--topic",
                    topic,
                    "--dsn",
                    &db2,
                    "--count",
                    &a.baseline_results.to_string(),
                ])
                .output()
                .unwrap_or_else(|e| panic!("{}: {e} (see README: the availability venv)", python.display()));
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let secs = v["seconds"].as_f64().unwrap();
            let rate = v["rows"].as_f64().unwrap() / secs;
            let m = a.baseline_results as i64;
            assert_eq!(rows(&db2), m, "the baseline stored every row it read");
            println!(
                "kafka-python + psycopg2, INSERT+commit per message: {m} rows in {secs:.1} s = {rate:.0} rows/s; tally {:.1}x",
                tally_rate / rate
            );
            report.insert(
                "psycopg2".into(),
                serde_json::json!({"rows": m, "seconds": secs, "rows_per_s": rate, "tally_speedup": tally_rate / rate}),
            );
        }
    }

    // 2. Memory with the views over 1 h and 24 h of results.
    if !a.skip_memory {
        let mut memory = Vec::new();
        for hours in [1i64, 24] {
            let topic = format!("website_availability_{hours}h");
            let n = (a.sites * hours * 3600 / a.interval_s) as usize;
            let produce_s = produce_results(&broker, &topic, n, a.sites, a.interval_s * 1000);
            let started = Instant::now();
            let tally = Tally::spawn(
                env!("CARGO_BIN_EXE_tally"),
                &[
                    "availability",
                    "--views-only",
                    "--brokers",
                    &broker.addr,
                    "--topic",
                    &topic,
                    "--dead-letter",
                    dir.join(format!("dl-{hours}.jsonl")).to_str().unwrap(),
                ],
            );
            // Every result read, and the views published with all sites.
            poll_until(Duration::from_secs(3600), Duration::from_millis(1000), || {
                let (_, _, m) = tally.get("/metrics");
                let read = metric_sum(&m, "tally_source_messages_total{");
                let rows = metric_sum(&m, "tally_view_rows{view=\"availability\"}");
                (read >= n as u64 && rows >= a.sites as u64 && tally.get("/availability").0 == 200).then_some(())
            })
            .unwrap();
            let took = started.elapsed().as_secs_f64();
            let pid = tally.child.id().to_string();
            let hwm = proc_status::status_mb(&pid, "VmHWM:").unwrap();
            let rss = proc_status::status_mb(&pid, "VmRSS:").unwrap();
            let body = tally.get("/availability").2.len();
            println!(
                "views over {hours:>2} h: {n} results ({} sites, every {} s) produced in {produce_s:.0} s, read in {took:.1} s ({:.0}/s); peak RSS {hwm:.0} MB, RSS {rss:.0} MB; /availability {} KB",
                a.sites,
                a.interval_s,
                n as f64 / took,
                body / 1024
            );
            memory.push(serde_json::json!({"hours": hours, "interval_s": a.interval_s, "results": n, "seconds": took, "peak_rss_mb": hwm, "rss_mb": rss, "body_bytes": body}));
        }
        let (h1, h24) = (
            memory[0]["peak_rss_mb"].as_f64().unwrap(),
            memory[1]["peak_rss_mb"].as_f64().unwrap(),
        );
        println!("peak RSS 24 h / 1 h: {:.3}", h24 / h1);
        report.insert("memory".into(), serde_json::Value::Array(memory));
    }
    if let Some(path) = a.out {
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    }
}

fn dirs_venv() -> std::path::PathBuf {
    std::env::var_os("TALLY_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tally"))
        .join("venv-availability")
}
