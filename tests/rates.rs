//! Rates end to end: the real binary, the real broker, a real PostgreSQL holding the dump.
//!
//! The oracle is PostgreSQL itself: for hundreds of random queries in both API forms, the answer it
//! computes over its own tables (a recursive CTE over the regions) is rendered and compared byte for
//! byte with tally's. Batches are checked for atomicity under concurrent reads, rejection, expiry,
//! duplicates and conflicts, a kill -9 mid-batch, and two replicas with one killed.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{header, http_get, poll_until, spawn_tally, Broker, Postgres, Tally};
use postgres::{Client, NoTls};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::tools::prices::{batch_records, dump_pairs, generate, publish, Item};

const TOPIC: &str = "rates.price-batches";
const WAIT: Duration = Duration::from_secs(90);

struct Setup {
    broker: Broker,
    _pg: Postgres,
    db: String,
    dir: PathBuf,
}

fn setup(name: &str) -> Setup {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 2);
    let pg = Postgres::start();
    let db = pg.rates_database(name);
    Setup {
        broker,
        _pg: pg,
        db,
        dir: common::temp_dir(name),
    }
}

impl Setup {
    fn rates(&self, extra: &[&str]) -> Tally {
        let dead_letter = self.dir.join("dead-letter.jsonl");
        let mut args = vec![
            "rates",
            "--brokers",
            &self.broker.addr,
            "--postgres",
            &self.db,
            "--dead-letter",
            dead_letter.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let tally = spawn_tally(&args);
        wait_ready(&tally);
        tally
    }

    fn publish(&self, id: &str, items: &[Item], chunk: usize) {
        publish(&self.broker.addr, TOPIC, id, &batch_records(id, items, chunk)).unwrap();
    }

    fn publish_records(&self, id: &str, records: &[(String, String)]) {
        publish(&self.broker.addr, TOPIC, id, records).unwrap();
    }

    fn client(&self) -> Client {
        Client::connect(&self.db, NoTls).unwrap()
    }

    fn dead_letter(&self) -> String {
        std::fs::read_to_string(self.dir.join("dead-letter.jsonl")).unwrap_or_default()
    }
}

fn wait_ready(tally: &Tally) {
    let ready = poll_until(WAIT, Duration::from_millis(50), || {
        (tally.get("/health").0 == 200).then_some(())
    });
    assert!(ready.is_some(), "not ready: {:?}", tally.get("/health"));
}

/// Waits until `/batches/{id}` says `status` (and, for applied batches, that PostgreSQL has it).
fn wait_batch(tally: &Tally, id: &str, status: &str) -> serde_json::Value {
    let mut last = String::new();
    poll_until(WAIT, Duration::from_millis(50), || {
        let (code, _, body) = tally.get(&format!("/batches/{id}"));
        last = format!("{code} {body}");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == status && (status != "applied" || v["stored"] == true)).then_some(v)
    })
    .unwrap_or_else(|| panic!("batch {id} never became {status}: last {last}"))
}

fn item(orig: &str, dest: &str, day: &str, price: i64) -> Item {
    Item {
        orig_code: orig.into(),
        dest_code: dest.into(),
        day: day.into(),
        price,
    }
}

/// The original app's body for a port pair, rendered from PostgreSQL's own aggregate.
fn oracle_flask(pg: &mut Client, from: &str, to: &str, orig: &str, dest: &str) -> String {
    let rows = pg
        .query(
            "SELECT to_char(d, 'YYYY-MM-DD'), p.n, p.avg::text FROM generate_series($1::text::date, $2::text::date, interval '1 day') d \
             LEFT JOIN (SELECT day, count(*) AS n, avg(price) AS avg FROM prices \
                        WHERE orig_code = $3 AND dest_code = $4 GROUP BY day) p ON p.day = d::date \
             ORDER BY d DESC",
            &[&from, &to, &orig, &dest],
        )
        .unwrap();
    let rates: Vec<String> = rows
        .iter()
        .map(|r| {
            let day: String = r.get(0);
            let n: Option<i64> = r.get(1);
            let avg: Option<String> = r.get(2);
            let price = match (n, avg) {
                (Some(n), Some(avg)) if n >= 3 => {
                    // psycopg2's Decimal -> float -> Python repr.
                    let f: f64 = avg.parse().unwrap();
                    let s = format!("{f}");
                    if s.contains('.') {
                        s
                    } else {
                        format!("{s}.0")
                    }
                }
                _ => "null".into(),
            };
            let count = n.map_or("null".into(), |n| n.to_string());
            format!("{{\"count\":{count},\"day\":\"{day}\",\"price\":{price}}}")
        })
        .collect();
    format!("{{\"rates\":[{}]}}\n", rates.join(","))
}

/// The ratestask body, with the regions expanded by a recursive CTE in PostgreSQL.
fn oracle_ratestask(pg: &mut Client, from: &str, to: &str, origin: &str, destination: &str) -> String {
    let rows = pg
        .query(
            "WITH RECURSIVE tree(slug, root) AS ( \
                 SELECT slug, slug FROM regions \
                 UNION SELECT r.slug, t.root FROM regions r JOIN tree t ON r.parent_slug = t.slug), \
             side(code, root) AS ( \
                 SELECT p.code, t.root FROM ports p JOIN tree t ON p.parent_slug = t.slug \
                 UNION SELECT code, code FROM ports) \
             SELECT to_char(d, 'YYYY-MM-DD'), \
                    CASE WHEN count(pr.price) >= 3 THEN round(avg(pr.price))::bigint END \
             FROM generate_series($1::text::date, $2::text::date, interval '1 day') d \
             LEFT JOIN prices pr ON pr.day = d::date \
                 AND pr.orig_code IN (SELECT code FROM side WHERE root = $3) \
                 AND pr.dest_code IN (SELECT code FROM side WHERE root = $4) \
             GROUP BY d ORDER BY d",
            &[&from, &to, &origin, &destination],
        )
        .unwrap();
    let days: Vec<String> = rows
        .iter()
        .map(|r| {
            let day: String = r.get(0);
            let avg: Option<i64> = r.get(1);
            format!(
                "{{\"day\":\"{day}\",\"average_price\":{}}}",
                avg.map_or("null".into(), |a| a.to_string())
            )
        })
        .collect();
    format!("[{}]", days.join(","))
}

fn rates(tally: &Tally, query: &str) -> (u16, String, String) {
    http_get(&tally.http, &format!("/rates?{query}"))
}

/// A batch of `n` prices from the dump's distribution over January 2021 (so they change its averages).
fn january_batch(n: usize, seed: u64) -> Vec<Item> {
    let pairs = dump_pairs(&common::root().join("data/rates.sql")).unwrap();
    let from = dataflows::rates::parse_day("2021-01-01").unwrap();
    generate(&pairs, n, seed, from, 31)
}

fn date(rng: &mut StdRng) -> String {
    let base = dataflows::rates::parse_day("2020-12-26").unwrap();
    dataflows::rates::format_day(base + rng.random_range(0..45))
}

#[test]
fn every_answer_matches_postgresql_byte_for_byte_in_both_forms() {
    let s = setup("rates_oracle");
    let tally = s.rates(&[]);
    // A batch first, so the oracle also covers prices that arrived through Kafka.
    s.publish("jan-extra", &january_batch(5_000, 3), 1000);
    wait_batch(&tally, "jan-extra", "applied");
    let mut pg = s.client();
    let codes: Vec<String> = pg
        .query("SELECT code FROM ports UNION ALL SELECT slug FROM regions", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pairs: Vec<(String, String)> = pg
        .query("SELECT DISTINCT orig_code, dest_code FROM prices ORDER BY 1, 2", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(pairs.len(), 725);
    let mut rng = StdRng::seed_from_u64(11);
    // The spec's example, the ratestask README's example, and the widest region-to-region query.
    let mut flask = vec![(
        "2021-01-01".to_owned(),
        "2021-01-31".to_owned(),
        "CNGGZ".to_owned(),
        "EETLL".to_owned(),
    )];
    let mut ratestask = vec![
        (
            "2016-01-01".to_owned(),
            "2016-01-10".to_owned(),
            "CNSGH".to_owned(),
            "north_europe_main".to_owned(),
        ),
        (
            "2021-01-01".to_owned(),
            "2021-01-31".to_owned(),
            "china_main".to_owned(),
            "northern_europe".to_owned(),
        ),
    ];
    for _ in 0..200 {
        let (a, b) = (date(&mut rng), date(&mut rng));
        let (from, to) = if a <= b { (a, b) } else { (b, a) };
        let (o, d) = if rng.random_bool(0.8) {
            pairs[rng.random_range(0..pairs.len())].clone()
        } else {
            (
                codes[rng.random_range(0..codes.len())].clone(),
                codes[rng.random_range(0..codes.len())].clone(),
            )
        };
        flask.push((from.clone(), to.clone(), o, d));
        // Half on a priced pair, half any port or region on either side.
        let (o, d) = if rng.random_bool(0.5) {
            pairs[rng.random_range(0..pairs.len())].clone()
        } else {
            (
                codes[rng.random_range(0..codes.len())].clone(),
                codes[rng.random_range(0..codes.len())].clone(),
            )
        };
        ratestask.push((from, to, o, d));
    }
    let mut with_prices = 0;
    for (from, to, o, d) in &flask {
        let expected = oracle_flask(&mut pg, from, to, o, d);
        let (status, head, body) = rates(
            &tally,
            &format!("date_from={from}&date_to={to}&orig_code={o}&dest_code={d}"),
        );
        assert_eq!((status, &body), (200, &expected), "{from}..{to} {o}->{d}");
        assert!(header(&head, "x-tally-as-of").is_some());
        with_prices += usize::from(
            expected
                .split("\"price\":")
                .skip(1)
                .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit())),
        );
    }
    assert!(with_prices > 100, "the random queries hit prices: {with_prices}");
    let mut non_null = 0;
    for (from, to, o, d) in &ratestask {
        let expected = oracle_ratestask(&mut pg, from, to, o, d);
        let (status, _, body) = rates(
            &tally,
            &format!("date_from={from}&date_to={to}&origin={o}&destination={d}"),
        );
        assert_eq!((status, &body), (200, &expected), "{from}..{to} {o}->{d}");
        non_null += usize::from(
            expected
                .split("\"average_price\":")
                .skip(1)
                .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit())),
        );
    }
    assert!(non_null > 50, "the random ratestask queries hit prices: {non_null}");
}

#[test]
fn bad_requests_get_400_with_a_reason() {
    let s = setup("rates_bad_requests");
    let tally = s.rates(&["--max-days", "400"]);
    for (query, says) in [
        (
            "date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
            "date_from is missing",
        ),
        (
            "date_from=2021-02-30&date_to=2021-03-01&orig_code=CNGGZ&dest_code=EETLL",
            "date_from",
        ),
        // Full-width digits: the original accepts them and then answers 500 to every later request.
        (
            "date_from=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%91-01-01&date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
            "ASCII",
        ),
        (
            "date_from=2021-01-01&date_to=2021-01-31&origin=XXXXX&destination=china_main",
            "neither a port",
        ),
        (
            "date_from=2020-01-01&date_to=2021-12-31&orig_code=CNGGZ&dest_code=EETLL",
            "at most 400",
        ),
        ("date_from=2021-01-01&date_to=2021-01-31", "expected orig_code"),
    ] {
        let (status, _, body) = rates(&tally, query);
        assert_eq!(status, 400, "{query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(says), "{query}: {body}");
    }
    // And the API still answers afterwards.
    let (status, _, _) = rates(
        &tally,
        "date_from=2021-01-01&date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
    );
    assert_eq!(status, 200);
}

/// Counts per day of the answer for CNGGZ -> EETLL over `from..=to` (null days as 0).
fn counts(body: &str) -> Vec<i64> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["rates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["count"].as_i64().unwrap_or(0))
        .collect()
}

#[test]
fn a_reader_sees_all_of_a_batch_or_none_of_it() {
    let s = setup("rates_atomic");
    let tally = s.rates(&[]);
    // One price on each of K days where the pair has none: 30 parts, read over many polls.
    let k = 3000;
    let first = dataflows::rates::parse_day("2022-01-01").unwrap();
    let items: Vec<Item> = (0..k)
        .map(|i| {
            item(
                "CNGGZ",
                "EETLL",
                &dataflows::rates::format_day(first + i),
                1000 + i64::from(i),
            )
        })
        .collect();
    let last = dataflows::rates::format_day(first + k - 1);
    let query = format!("date_from=2022-01-01&date_to={last}&orig_code=CNGGZ&dest_code=EETLL");
    let (stop, seen_all, seen_none) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let reader = {
        let (http, query) = (tally.http.clone(), query.clone());
        let (stop, seen_all, seen_none) = (stop.clone(), seen_all.clone(), seen_none.clone());
        std::thread::spawn(move || {
            let mut answers = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, _, body) = http_get(&http, &format!("/rates?{query}"));
                assert_eq!(status, 200);
                let c = counts(&body);
                let ones = c.iter().filter(|n| **n == 1).count();
                assert!(
                    ones == 0 || ones == c.len(),
                    "a half-applied batch: {ones} of {} days",
                    c.len()
                );
                seen_all.fetch_or(ones == c.len(), Ordering::Relaxed);
                seen_none.fetch_or(ones == 0, Ordering::Relaxed);
                answers += 1;
            }
            answers
        })
    };
    // The reader has seen the state before the batch before the batch is sent.
    poll_until(WAIT, Duration::from_millis(5), || {
        seen_none.load(Ordering::Relaxed).then_some(())
    })
    .unwrap();
    s.publish("days", &items, 100);
    wait_batch(&tally, "days", "applied");
    // Reads after the batch is visible, then stop.
    poll_until(WAIT, Duration::from_millis(10), || {
        seen_all.load(Ordering::Relaxed).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let answers = reader.join().unwrap();
    assert!(
        seen_none.load(Ordering::Relaxed) && seen_all.load(Ordering::Relaxed),
        "{answers} answers"
    );
    let stored: i64 = s
        .client()
        .query_one("SELECT count(*) FROM prices WHERE day >= '2022-01-01'", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, i64::from(k));
}

#[test]
fn rejected_expired_duplicate_and_conflicting_batches() {
    let s = setup("rates_rejections");
    let tally = s.rates(&["--batch-expiry", "2s"]);
    let before = rates(
        &tally,
        "date_from=2021-01-01&date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
    )
    .2;
    let mut pg = s.client();
    let base: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);

    // One good item and four bad ones in the second part: nothing applies.
    let mut items = vec![item("CNGGZ", "EETLL", "2021-01-05", 5000); 3];
    items.extend([
        item("CNGGZ", "XXXXX", "2021-01-05", 1000),
        item("CNGGZ", "EETLL", "2021-02-30", 1000),
        item("CNGGZ", "EETLL", "2021-01-05", 0),
        item("CNGGZ", "EETLL", "2021-01-05", 2_147_483_648),
    ]);
    s.publish("bad", &items, 3);
    let v = wait_batch(&tally, "bad", "rejected");
    assert_eq!(v["errors"], 4, "{v}");
    let reasons = v["reasons"].as_array().unwrap();
    assert_eq!(reasons[0]["part"], 1);
    assert_eq!(reasons[0]["index"], 0);
    assert_eq!(reasons[0]["field"], "dest_code");
    assert!(
        reasons[0]["error"].as_str().unwrap().contains("unknown port code"),
        "{v}"
    );
    assert_eq!(reasons[1]["field"], "day");
    assert_eq!(reasons[2]["field"], "price");
    assert_eq!(reasons[3]["field"], "price");
    assert!(s.dead_letter().contains("\\\"bad\\\" rejected"), "{}", s.dead_letter());
    assert_eq!(tally.metric("tally_rates_batches_total{outcome=\"rejected\"}"), 1.0);

    // Parts announced but never sent: expires.
    let records = batch_records("half", &vec![item("CNGGZ", "EETLL", "2021-01-05", 5000); 4], 2);
    s.publish_records("half", &[records[0].clone(), records[2].clone()]);
    let v = wait_batch(&tally, "half", "expired");
    assert!(
        v["reasons"][0]["error"]
            .as_str()
            .unwrap()
            .contains("missing 1 of 2 parts: 1"),
        "{v}"
    );
    assert_eq!(tally.metric("tally_rates_batches_total{outcome=\"expired\"}"), 1.0);

    // A good batch, then the same again (a no-op), then other content under its id (a rejection).
    let good = vec![item("CNGGZ", "EETLL", "2021-01-07", 777); 3];
    s.publish("good", &good, 2);
    wait_batch(&tally, "good", "applied");
    s.publish("good", &good, 1);
    tally.wait_for_metric("tally_rates_batches_total{outcome=\"duplicate\"}", 1.0, WAIT);
    s.publish("good", &[item("CNGGZ", "EETLL", "2021-01-07", 1)], 1);
    tally.wait_for_metric("tally_rates_batches_total{outcome=\"rejected\"}", 2.0, WAIT);
    assert_eq!(wait_batch(&tally, "good", "applied")["items"], 3);

    let after = rates(
        &tally,
        "date_from=2021-01-01&date_to=2021-01-31&orig_code=CNGGZ&dest_code=EETLL",
    )
    .2;
    let (b, a) = (counts(&before), counts(&after));
    // Days descend from the 31st: only the 7th changed, by the good batch's 3 prices.
    for (i, (x, y)) in b.iter().zip(&a).enumerate() {
        assert_eq!(*y - *x, if i == 31 - 7 { 3 } else { 0 }, "day {}", 31 - i);
    }
    let now: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    assert_eq!(now, base + 3);
    let batches: i64 = pg
        .query_one("SELECT count(*) FROM tally_rates_batches", &[])
        .unwrap()
        .get(0);
    assert_eq!(batches, 1);
}

#[test]
fn kill_9_mid_batch_and_a_second_replica_store_each_batch_once() {
    let s = setup("rates_replicas");
    let a = s.rates(&[]);
    let b = s.rates(&[]);
    let mut pg = s.client();
    let base: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    let one = january_batch(2_000, 21);
    s.publish("one", &one, 500);
    wait_batch(&a, "one", "applied");
    wait_batch(&b, "one", "applied");
    let query = "date_from=2021-01-01&date_to=2021-01-31&origin=china_main&destination=northern_europe";
    assert_eq!(rates(&a, query).2, rates(&b, query).2);

    // Half of a batch, kill -9 of replica a, the other half: b applies it; a restarted finds it stored.
    let two = january_batch(3_000, 22);
    let records = batch_records("two", &two, 500);
    s.publish_records("two", &records[..3]);
    poll_until(WAIT, Duration::from_millis(20), || {
        let (_, _, body) = a.get("/batches/two");
        body.contains("pending").then_some(())
    })
    .expect("replica a stages the first parts");
    a.kill();
    s.publish_records("two", &records[3..]);
    wait_batch(&b, "two", "applied");
    let a = s.rates(&[]);
    wait_batch(&a, "two", "applied");
    assert_eq!(rates(&a, query).2, rates(&b, query).2);
    let expected = oracle_ratestask(&mut pg, "2021-01-01", "2021-01-31", "china_main", "northern_europe");
    assert_eq!(rates(&a, query).2, expected);

    let now: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    assert_eq!(now, base + 5_000, "each batch stored exactly once");
    let ids: Vec<String> = pg
        .query("SELECT batch_id FROM tally_rates_batches ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, ["one", "two"]);
    // The stored offsets are past both batches: a restart reads neither again.
    let offsets: i64 = pg
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM tally_rates_offsets",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        offsets,
        (5 + 7) as i64,
        "every record of both batches is behind the stored offsets"
    );
}

/// One request as a load balancer's client makes it: `None` if the replica refused the connection (the
/// balancer then tries another), else the status and body it answered. A connection accepted and then cut
/// is a lost response and fails the test.
fn balanced_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("a response lost: {addr}{path} accepted, then {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a cut response: {raw:?}"));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap();
    Some((status, body.to_owned()))
}

#[test]
fn a_rolling_restart_of_two_replicas_under_load_loses_no_response_and_no_batch() {
    let s = setup("rates_rolling");
    let grace = ["--shutdown-grace-ms", "1000"];
    let mut a = s.rates(&grace);
    let mut b = s.rates(&grace);
    let mut pg = s.client();
    let base: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    // The balancer: replicas whose /health is 200, checked every 20 ms.
    let live = Arc::new(std::sync::Mutex::new(vec![a.http.clone(), b.http.clone()]));
    let candidates = Arc::new(std::sync::Mutex::new(vec![a.http.clone(), b.http.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (live, candidates, stop) = (live.clone(), candidates.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let all = candidates.lock().unwrap().clone();
                let up: Vec<String> = all
                    .into_iter()
                    .filter(|addr| http_get(addr, "/health").0 == 200)
                    .collect();
                *live.lock().unwrap() = up;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let query = "/rates?date_from=2021-01-01&date_to=2021-01-31&origin=china_main&destination=northern_europe";
    let clients: Vec<_> = (0..2)
        .map(|c| {
            let (live, stop) = (live.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut answered, mut refused) = (0u64, 0u64);
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let up = live.lock().unwrap().clone();
                    if up.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    i += 1;
                    match balanced_get(&up[i % up.len()], query) {
                        None => refused += 1,
                        Some((status, body)) => {
                            assert_eq!(status, 200, "{body}");
                            let days: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
                            assert_eq!(days.len(), 31);
                            answered += 1;
                        }
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    let publisher = {
        let (addr, stop) = (s.broker.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("roll-{n}");
                let items = january_batch(1_000, 100 + n);
                publish(&addr, TOPIC, &id, &batch_records(&id, &items, 250)).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            n
        })
    };
    // Restart a, then b: each new replica is ready before the old one gets SIGTERM.
    for old in [&mut a, &mut b] {
        std::thread::sleep(Duration::from_millis(500));
        let new = s.rates(&grace);
        candidates.lock().unwrap().push(new.http.clone());
        let (status, _) = old.terminate();
        assert!(status.success(), "SIGTERM ends tally with 0: {status:?}");
        candidates.lock().unwrap().retain(|addr| *addr != old.http);
        *old = new;
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let published = publisher.join().unwrap();
    checker.join().unwrap();
    let (mut answered, mut refused) = (0, 0);
    for c in clients {
        let (x, y) = c.join().unwrap();
        answered += x;
        refused += y;
    }
    assert!(answered > 100, "{answered} answers, {refused} refused connections");
    for id in (0..published).map(|n| format!("roll-{n}")) {
        wait_batch(&a, &id, "applied");
        wait_batch(&b, &id, "applied");
    }
    assert_eq!(rates(&a, &query[7..]).2, rates(&b, &query[7..]).2);
    let now: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    assert_eq!(now, base + 1_000 * published as i64, "every batch stored exactly once");
    let batches: i64 = pg
        .query_one("SELECT count(*) FROM tally_rates_batches", &[])
        .unwrap()
        .get(0);
    assert_eq!(batches, published as i64);
    eprintln!("rolling restart: {answered} answers, {refused} refused connections retried, {published} batches");
}

#[test]
fn kill_9_during_the_postgresql_commit_stores_the_batch_once_after_the_restart() {
    let s = setup("rates_mid_commit");
    let mut pg = s.client();
    let base: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    let tally = s.rates(&[]);
    // 50,000 prices: visible at once, while the foreign-key checked COPY takes a second or more.
    s.publish("big", &january_batch(50_000, 31), 1000);
    let caught = poll_until(WAIT, Duration::from_millis(2), || {
        let (_, _, body) = tally.get("/batches/big");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "applied").then(|| v["stored"] == false)
    })
    .unwrap();
    tally.kill();
    let stored_before: i64 = pg
        .query_one("SELECT count(*) FROM tally_rates_batches", &[])
        .unwrap()
        .get(0);
    let tally = s.rates(&[]);
    wait_batch(&tally, "big", "applied");
    let now: i64 = pg.query_one("SELECT count(*) FROM prices", &[]).unwrap().get(0);
    assert_eq!(
        now,
        base + 50_000,
        "the batch stored exactly once (killed mid-commit: {caught})"
    );
    let ids: i64 = pg
        .query_one("SELECT count(*) FROM tally_rates_batches", &[])
        .unwrap()
        .get(0);
    assert_eq!(ids, 1);
    // The kill came while the batch was visible but not yet committed (the COPY takes over a second, the
    // poll 2 ms); whether the commit squeezed in before the kill or not, the batch is there once.
    assert!(caught, "the kill should come before the commit");
    eprintln!("batches stored when killed: {stored_before}");
}
