//! The rates pipeline measured end to end against what users run today.
//!
//! 1. Offer to visible: a batch of 5k, 50k and 500k prices published to the broker, until `/batches/{id}`
//!    says applied (every read from then on sees it), split into publish (producer acked), decode (parse
//!    and check, summed over its records), and complete-to-visible (apply and publish the index). Also when
//!    PostgreSQL had committed it (in the background: visibility does not wait for it).
//! 2. Requests/s and p50/p99 with wrk at 1, 4 and 16 connections for a port-to-port, a port-to-region and
//!    the widest region-to-region query, idle and while a 50k batch lands every 10 s; the original Flask +
//!    psycopg2 app under gunicorn (`benches/rates_flask/rates.py`, with an index on prices) for the
//!    port-to-port query; and PostgreSQL's own time for the region-to-region query.
//!
//! `cargo bench --bench rates -- [--sizes 5000,50000,500000] [--repeat 5] [--seconds 10] [--skip-flask]
//!  [--out FILE]`. Needs scripts/bench-deps (wrk) and the venv it makes for Flask
//! (`~/.cache/tally/venv-rates`, see README).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use tally::tools::prices::{batch_records, dump_pairs, generate, producer, publish, publish_with, PairRange};
use testkit::{poll_until, Broker, Postgres, Tally};

const TOPIC: &str = "rates.price-batches";

struct Args {
    sizes: Vec<usize>,
    repeat: usize,
    seconds: u64,
    skip_flask: bool,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        sizes: vec![5_000, 50_000, 500_000],
        repeat: 5,
        seconds: 10,
        skip_flask: false,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--sizes" => a.sizes = it.next().unwrap().split(',').map(|s| s.parse().unwrap()).collect(),
            "--repeat" => a.repeat = it.next().unwrap().parse().unwrap(),
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--skip-flask" => a.skip_flask = true,
            "--out" => a.out = it.next(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn batch_status(tally: &Tally, id: &str) -> serde_json::Value {
    let (_, _, body) = tally.get(&format!("/batches/{id}"));
    serde_json::from_str(&body).unwrap_or_default()
}

type Producer = rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>;

/// One batch offered through a producer already connected, and timed: (total, publish, decode,
/// complete-to-visible) in ms.
fn offer(producer: &Producer, tally: &Tally, pairs: &[PairRange], id: &str, size: usize, seed: u64) -> [f64; 4] {
    let from = dataflows::rates::parse_day("2021-03-01").unwrap() + (seed % 300) as i32;
    let items = generate(pairs, size, seed, from, 28);
    let records = batch_records(id, &items, 1000);
    let t0 = Instant::now();
    publish_with(producer, TOPIC, id, &records).unwrap();
    let published = t0.elapsed();
    let v = poll_until(Duration::from_secs(300), Duration::from_millis(2), || {
        let v = batch_status(tally, id);
        (v["status"] == "applied").then_some(v)
    })
    .unwrap_or_else(|| panic!("{id} never applied: {}", batch_status(tally, id)));
    let total = t0.elapsed();
    let t = &v["timing_ms"];
    [
        total.as_secs_f64() * 1e3,
        published.as_secs_f64() * 1e3,
        t["decode"].as_f64().unwrap_or(f64::NAN),
        t["visible_after"].as_f64().unwrap_or(f64::NAN),
    ]
}

/// wrk at `connections` for `seconds`: (requests/s, p50 ms, p99 ms).
fn wrk(url: &str, connections: usize, seconds: u64) -> (f64, f64, f64) {
    let out = Command::new("wrk")
        .args([
            "-t",
            &connections.min(2).to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            url,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("wrk (scripts/bench-deps installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |v: &str| -> f64 {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = num.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1e3,
            "ms" => n,
            "s" => n * 1e3,
            _ => f64::NAN,
        }
    };
    let mut rps = f64::NAN;
    let (mut p50, mut p99) = (f64::NAN, f64::NAN);
    let mut errors = 0u64;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("50%") {
            p50 = ms(v.trim());
        } else if let Some(v) = l.strip_prefix("99%") {
            p99 = ms(v.trim());
        } else if l.starts_with("Non-2xx") || l.starts_with("Socket errors") {
            errors += 1;
        }
    }
    assert_eq!(errors, 0, "wrk saw errors:\n{text}");
    (rps, p50, p99)
}

/// PostgreSQL's p50 (ms, 30 runs) for china_main -> northern_europe over January 2021, written two ways: the
/// oracle's recursive CTE joined per day, and the regions expanded first into arrays over the prices.
fn postgres_widest(client: &mut Client) -> [f64; 2] {
    let tree = "WITH RECURSIVE tree(slug, root) AS (SELECT slug, slug FROM regions UNION SELECT r.slug, t.root FROM regions r JOIN tree t ON r.parent_slug = t.slug), \
                side(code, root) AS (SELECT p.code, t.root FROM ports p JOIN tree t ON p.parent_slug = t.slug UNION SELECT code, code FROM ports)";
    let cte = format!(
        "{tree} SELECT d::date, CASE WHEN count(pr.price) >= 3 THEN round(avg(pr.price))::bigint END FROM generate_series('2021-01-01'::date, '2021-01-31'::date, interval '1 day') d \
         LEFT JOIN prices pr ON pr.day = d::date AND pr.orig_code IN (SELECT code FROM side WHERE root = 'china_main') AND pr.dest_code IN (SELECT code FROM side WHERE root = 'northern_europe') GROUP BY d ORDER BY d"
    );
    let expanded = format!(
        "{tree}, p AS (SELECT day, count(*) AS n, avg(price) AS a FROM prices \
             WHERE orig_code = ANY (ARRAY(SELECT code FROM side WHERE root = 'china_main')) \
               AND dest_code = ANY (ARRAY(SELECT code FROM side WHERE root = 'northern_europe')) \
               AND day BETWEEN '2021-01-01' AND '2021-01-31' GROUP BY day) \
         SELECT d::date, CASE WHEN p.n >= 3 THEN round(p.a)::bigint END FROM generate_series('2021-01-01'::date, '2021-01-31'::date, interval '1 day') d \
         LEFT JOIN p ON p.day = d::date ORDER BY 1"
    );
    let answer = |client: &mut Client, sql: &str| -> Vec<Option<i64>> {
        client.query(sql, &[]).unwrap().iter().map(|r| r.get(1)).collect()
    };
    assert_eq!(
        answer(client, &cte),
        answer(client, &expanded),
        "both ways give the same answer"
    );
    [cte, expanded].map(|sql| {
        let mut times: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                client.query(sql.as_str(), &[]).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        pct(&times, 0.5)
    })
}

fn main() {
    let a = args();
    let broker = Broker::start();
    broker.create_topic(TOPIC, 2);
    let pg = Postgres::start();
    let db = pg.rates_database("rates_bench");
    let pairs = dump_pairs(&testkit::root().join("data/rates.sql")).unwrap();
    let dir = testkit::temp_dir("rates-bench");
    let dead_letter = dir.join("dead-letter.jsonl");
    let tally = Tally::spawn(
        env!("CARGO_BIN_EXE_tally"),
        &[
            "rates",
            "--brokers",
            &broker.addr,
            "--postgres",
            &db,
            "--dead-letter",
            dead_letter.to_str().unwrap(),
        ],
    );
    poll_until(Duration::from_secs(120), Duration::from_millis(20), || {
        (tally.get("/health").0 == 200).then_some(())
    })
    .expect("tally rates ready");
    let mut report = serde_json::Map::new();
    let mut client = Client::connect(&db, NoTls).unwrap();
    let on_dump = postgres_widest(&mut client);
    println!(
        "PostgreSQL region_to_region on the dump (56,689 prices, no index), one client, 30 runs: CTE p50 {:.2} ms, expanded IN lists p50 {:.2} ms",
        on_dump[0], on_dump[1]
    );
    report.insert(
        "postgres_region_to_region_on_dump_p50_ms".into(),
        serde_json::json!({"cte": on_dump[0], "expanded": on_dump[1]}),
    );
    let started = Instant::now();
    let producer = producer(&broker.addr).unwrap();
    // The producer connects (and gets its idempotent producer id) with its first batch: warm it up.
    let warm = batch_records("warm-up", &generate(&pairs, 10, 0, 18_900, 1), 1000);
    publish_with(&producer, TOPIC, "warm-up", &warm).unwrap();
    println!(
        "a new idempotent producer's first batch (10 items) took {:.0} ms: connect and producer id",
        started.elapsed().as_secs_f64() * 1e3
    );

    // 1. Offer to visible.
    println!("offer to visible (ms), {} runs each", a.repeat);
    println!(
        "{:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "items", "p50", "p99", "publish", "decode", "apply", "stored p50"
    );
    let mut seed = 1u64;
    let mut offers = Vec::new();
    for &size in &a.sizes {
        let runs = if size >= 500_000 { a.repeat.min(3) } else { a.repeat };
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        for r in 0..runs {
            let id = format!("bench-{size}-{r}");
            rows.push(offer(&producer, &tally, &pairs, &id, size, seed));
            ids.push(id);
            seed += 1;
        }
        let stored: Vec<f64> = ids
            .iter()
            .map(|id| {
                poll_until(Duration::from_secs(600), Duration::from_millis(20), || {
                    let v = batch_status(&tally, id);
                    v["timing_ms"]["stored_after"].as_f64()
                })
                .unwrap()
            })
            .collect();
        let col = |i: usize| {
            let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let mut stored_sorted = stored.clone();
        stored_sorted.sort_by(f64::total_cmp);
        let total = col(0);
        println!(
            "{size:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.1}",
            pct(&total, 0.5),
            pct(&total, 0.99),
            pct(&col(1), 0.5),
            pct(&col(2), 0.5),
            pct(&col(3), 0.5),
            pct(&stored_sorted, 0.5)
        );
        offers.push(serde_json::json!({
            "items": size, "runs": runs, "total_ms": total, "publish_ms": col(1), "decode_ms": col(2),
            "complete_to_visible_ms": col(3), "stored_after_ms": stored,
        }));
    }
    report.insert("offer_to_visible".into(), offers.into());
    let status = std::fs::read_to_string(format!("/proc/{}/status", tally.child.id())).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let held: serde_json::Value = serde_json::from_str(&tally.get("/rates/summary").2).unwrap_or_default();
    println!(
        "tally RSS after the batches: {:.0} MB, holding {} prices in {} pair-days",
        rss_kb as f64 / 1024.0,
        held["prices"],
        held["pair_days"]
    );
    report.insert("rss_mb_after_batches".into(), (rss_kb as f64 / 1024.0).into());
    report.insert("held".into(), held.clone());

    // 2. Requests.
    let base = format!("http://{}", tally.http);
    let queries = [
        (
            "port_to_port",
            "date_from=2021-01-01&date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
        ),
        (
            "port_to_region",
            "date_from=2021-01-01&date_to=2021-01-31&origin=CNSGH&destination=north_europe_main",
        ),
        (
            "region_to_region",
            "date_from=2021-01-01&date_to=2021-01-31&origin=china_main&destination=northern_europe",
        ),
    ];
    let mut loads = Vec::new();
    println!("\nrequests (wrk, {} s each): requests/s, p50 ms, p99 ms", a.seconds);
    for landing in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let lander = landing.then(|| {
            let (stop, addr, pairs, http) = (stop.clone(), broker.addr.clone(), pairs.clone(), tally.http.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let id = format!("landing-{n}");
                    let items = generate(&pairs, 50_000, 1000 + n, 18_800, 28);
                    publish(&addr, TOPIC, &id, &batch_records(&id, &items, 1000)).unwrap();
                    poll_until(Duration::from_secs(60), Duration::from_millis(5), || {
                        testkit::http_body(&http, &format!("/batches/{id}")).filter(|b| b.contains("\"applied\""))
                    });
                    n += 1;
                    while started.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                n
            })
        });
        for (name, q) in queries {
            for c in [1, 4, 16] {
                let (rps, p50, p99) = wrk(&format!("{base}/rates?{q}"), c, a.seconds);
                let label = if landing { "50k batch every 10 s" } else { "idle" };
                println!("tally {name:<17} {label:<21} c={c:<3} {rps:>10.0} {p50:>8.3} {p99:>8.3}");
                loads.push(serde_json::json!({"system": "tally", "query": name, "load": label, "connections": c, "rps": rps, "p50_ms": p50, "p99_ms": p99}));
            }
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(l) = lander {
            let landed = l.join().unwrap();
            println!("(batches landed during the runs: {landed})");
        }
    }

    // PostgreSQL's own time for the widest query now, with the index the Flask stack gets too.
    client
        .batch_execute("CREATE INDEX IF NOT EXISTS prices_pair_day ON prices (orig_code, dest_code, day) INCLUDE (price); ANALYZE prices")
        .unwrap();
    let after = postgres_widest(&mut client);
    println!(
        "\nPostgreSQL region_to_region after the batches ({} prices, indexed), one client, 30 runs: CTE p50 {:.2} ms, expanded IN lists p50 {:.2} ms",
        held["prices"], after[0], after[1]
    );
    report.insert(
        "postgres_region_to_region_after_batches_p50_ms".into(),
        serde_json::json!({"cte": after[0], "expanded": after[1]}),
    );

    if !a.skip_flask {
        let venv = std::env::var("TALLY_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tally"))
            .join("venv-rates");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut gunicorn = testkit::KillOnDrop(
            Command::new(venv.join("bin/gunicorn"))
                .args(["-w", "2", "-b", &format!("127.0.0.1:{port}"), "rates:app"])
                .current_dir(testkit::root().join("benches/rates_flask"))
                .env("DATABASE_URL", &db)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("gunicorn from ~/.cache/tally/venv-rates (see README)"),
        );
        let flask = format!("127.0.0.1:{port}");
        let q = queries[0].1;
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            testkit::http_body(&flask, &format!("/rates?{q}"))
        })
        .expect("gunicorn answers");
        // Byte for byte on the same data, before timing either.
        let mut same = 0;
        for (o, d) in pairs.iter().take(200).map(|p| (&p.orig, &p.dest)) {
            let path = format!("/rates?date_from=2021-01-01&date_to=2021-03-31&orig_code={o}&dest_code={d}");
            let f = testkit::http_body(&flask, &path).unwrap();
            let t = testkit::http_body(&tally.http, &path).unwrap();
            assert_eq!(f, t, "{path}");
            same += 1;
        }
        println!("\nFlask and tally answered {same} of {same} port-to-port queries byte for byte");
        for c in [1, 4, 16] {
            let (rps, p50, p99) = wrk(&format!("http://{flask}/rates?{q}"), c, a.seconds);
            println!("flask port_to_port      idle                  c={c:<3} {rps:>10.0} {p50:>8.3} {p99:>8.3}");
            loads.push(serde_json::json!({"system": "flask+psycopg2 (gunicorn -w 2, indexed)", "query": "port_to_port", "load": "idle", "connections": c, "rps": rps, "p50_ms": p50, "p99_ms": p99}));
        }
        let _ = gunicorn.0.kill();
        report.insert("flask_byte_identical_queries".into(), same.into());
    }
    report.insert("requests".into(), loads.into());
    if let Some(out) = a.out {
        std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("\nwritten to {out}");
    }
}
