//! `tally availability` (the writer) end to end: check results on the real broker into a real PostgreSQL,
//! exactly once through replays and a kill -9, day partitions and retention.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{poll_until, produce, spawn_tally, Broker, Postgres, Rec};
use postgres::{Client, NoTls};

const TOPIC: &str = "website_availability";
const HOUR_MS: i64 = 3_600_000;
/// 2021-03-01T00:00:00Z.
const T0: i64 = 1_614_556_800_000;

fn result(site: i64, slot: i64, partitions: i32) -> Rec {
    let url = format!("https://site{site}.test/health");
    let down = slot % 7 == 3;
    let value = serde_json::json!({
        "site_id": site, "url": url, "scheduled_at_ms": T0 + slot * HOUR_MS, "shard": "0/1",
        "outcome": if down { "down" } else { "up" },
        "error_class": if down { Some("http_status") } else { None },
        "error_phase": None::<String>, "error": None::<String>,
        "http_status": if down { 503 } else { 200 }, "regex_matched": !down, "final_url": url, "redirects": 0,
        "dns_us": 100 + slot, "connect_us": 200, "tls_us": 300, "ttfb_us": 400, "transfer_us": 50,
        "total_us": 1_050 + slot, "cert_not_after_ms": T0 + 90 * 24 * HOUR_MS,
    });
    Rec {
        partition: (site as i32) % partitions,
        key: Some(url.into_bytes()),
        value: Some(value.to_string().into_bytes()),
        headers: vec![],
    }
}

fn count(pg: &mut Client) -> i64 {
    pg.query_one("SELECT count(*) FROM check_result", &[]).unwrap().get(0)
}

fn wait_rows(pg: &mut Client, n: i64) {
    let got = poll_until(Duration::from_secs(90), Duration::from_millis(50), || {
        let c = count(pg);
        (c == n).then_some(c)
    });
    assert_eq!(got, Some(n), "check_result has {} rows", count(pg));
}

#[test]
fn results_are_stored_once_through_replays_and_a_kill_9() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 2);
    let pg = Postgres::start();
    let db = pg.database("availability_test");
    let dir = common::temp_dir("availability");
    let dead_letter = dir.join("dead-letter.jsonl");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["availability", "--setup", "--postgres", &db])
        .status()
        .unwrap();
    assert!(status.success());
    let args = [
        "availability",
        "--brokers",
        &broker.addr,
        "--postgres",
        &db,
        "--dead-letter",
        dead_letter.to_str().unwrap(),
        // The source waits for PostgreSQL every 7 records: nothing may be lost or doubled by pausing.
        "--max-in-flight",
        "7",
    ];

    // 4 sites x 60 hourly slots; the first 30 slots, a bad message and a re-sent range first.
    let all: Vec<Rec> = (0..60)
        .flat_map(|slot| (1..=4).map(move |site| result(site, slot, 2)))
        .collect();
    let mut first: Vec<Rec> = all[..120].to_vec();
    first.push(Rec {
        partition: 0,
        key: None,
        value: Some(b"{\"url\": 42}".to_vec()),
        headers: vec![],
    });
    first.extend_from_slice(&all[40..80]);
    produce(&broker, TOPIC, &first);
    let mut pg_client = Client::connect(&db, NoTls).unwrap();
    let writer = spawn_tally(&args);
    wait_rows(&mut pg_client, 120);
    writer.kill();

    // The rest, the whole first half again (a replay), and a restart after the kill.
    let mut rest: Vec<Rec> = all[120..].to_vec();
    rest.extend_from_slice(&all[..120]);
    rest.push(Rec {
        partition: 1,
        key: None,
        value: Some(b"{\"url\":\"https://x/\",\"scheduled_at_ms\":1,\"site_id\":1,\"outcome\":\"sideways\"}".to_vec()),
        headers: vec![],
    });
    produce(&broker, TOPIC, &rest);
    let writer = spawn_tally(&args);
    wait_rows(&mut pg_client, 240);
    // It did pause: 280 messages do not fit in 7.
    writer.wait_for_metric(
        "tally_source_flow_paused_total{topic=\"website_availability\",worker=\"0\"}",
        1.0,
        Duration::from_secs(30),
    );
    // The two bad messages: one dead-lettered by each run (a message already in the file is not appended
    // again when the restart re-reads it).
    writer.wait_for_metric(
        "tally_source_dead_letter_total{topic=\"website_availability\"}",
        1.0,
        Duration::from_secs(30),
    );
    let lines = std::fs::read_to_string(&dead_letter).unwrap();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.contains("sideways") || lines.contains("outcome"), "{lines}");

    let row = pg_client
        .query_one(
            "SELECT outcome, error_class, http_status, regex_matched, dns_us, total_us, \
             extract(epoch FROM scheduled_at)::bigint, extract(epoch FROM cert_not_after)::bigint \
             FROM check_result WHERE url = 'https://site2.test/health' AND scheduled_at = '2021-03-01T03:00:00Z'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "down");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("http_status"));
    assert_eq!(row.get::<_, Option<i32>>(2), Some(503));
    assert_eq!(row.get::<_, Option<bool>>(3), Some(false));
    assert_eq!((row.get::<_, i64>(4), row.get::<_, i64>(5)), (103, 1_053));
    assert_eq!(row.get::<_, i64>(6), (T0 + 3 * HOUR_MS) / 1000);
    assert_eq!(row.get::<_, i64>(7), (T0 + 90 * 24 * HOUR_MS) / 1000);
    let per_site: Vec<i64> = pg_client
        .query("SELECT count(*) FROM check_result GROUP BY url ORDER BY url", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(per_site, [60, 60, 60, 60], "one row per scheduled check");
    // 60 hours from 2021-03-01: three day partitions.
    let partitions: i64 = pg_client
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'check_result'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(partitions, 3);
    drop(writer);

    // Retention: keep 0 days before the newest result's day, then a result on 2021-03-05.
    let mut args = args.to_vec();
    args.extend(["--retention-days", "0"]);
    let writer = spawn_tally(&args);
    produce(&broker, TOPIC, &[result(1, 4 * 24 + 5, 2)]);
    wait_rows(&mut pg_client, 1);
    let names: Vec<String> = pg_client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'check_result'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["check_result_20210305"]);
    drop(writer);
}

// ---- The live views ----

/// 30 s slots from an hour boundary (2021-03-01T00:00:00Z), three hours of them.
const SLOT_MS: i64 = 30_000;
const SLOTS: i64 = 360;

/// What site `s` found at slot `k`: site 1 is down at 100..=106 (one incident) and missed slot 200, site 2
/// fails every 10th check (never three in a row), site 3 is down from slot 340 on (an open incident).
fn outcome(s: i64, k: i64) -> &'static str {
    match s {
        1 if (100..=106).contains(&k) => "down",
        1 if k == 200 => "missed",
        2 if k % 10 == 0 => "down",
        3 if k >= 340 => "down",
        _ => "up",
    }
}

fn slot_result(s: i64, k: i64) -> Rec {
    let url = format!("https://site{s}.test/");
    let o = outcome(s, k);
    let down = o == "down";
    let value = serde_json::json!({
        "site_id": s, "url": url, "scheduled_at_ms": T0 + k * SLOT_MS, "shard": "0/1", "interval_ms": SLOT_MS,
        "outcome": o, "error_class": if down { Some(if s == 3 { "connect_refused" } else { "http_status" }) } else { None },
        "error_phase": if down { Some("connect") } else { None }, "error": None::<String>,
        "http_status": if o == "up" { Some(200) } else { None }, "regex_matched": None::<bool>, "final_url": url, "redirects": 0,
        "dns_us": 10 + k, "connect_us": 100 + s, "tls_us": 0, "ttfb_us": 2_000 + 3 * k, "transfer_us": 40,
        "total_us": 2_150 + 4 * k, "cert_not_after_ms": None::<i64>,
    });
    Rec {
        partition: (s as i32) % 2,
        key: Some(url.into_bytes()),
        value: Some(value.to_string().into_bytes()),
        headers: vec![],
    }
}

/// The expected counts `[up, down, missed]` of site `s` in the slots `from..SLOTS`.
fn counts(s: i64, from: i64) -> [i64; 3] {
    let mut c = [0; 3];
    for k in from..SLOTS {
        c[match outcome(s, k) {
            "up" => 0,
            "down" => 1,
            _ => 2,
        }] += 1;
    }
    c
}

/// p95 of `value(k)` over the up slots of the last hour, as the views report it (nearest rank, the
/// histogram bucket's upper bound).
fn p95(s: i64, value: impl Fn(i64) -> i64) -> i64 {
    let mut v: Vec<i64> = (SLOTS - 120..SLOTS)
        .filter(|k| outcome(s, *k) == "up")
        .map(value)
        .collect();
    v.sort_unstable();
    let rank = (v.len() as i64 * 950 + 999) / 1000;
    let x = v[(rank - 1) as usize];
    dataflows::availability::Hist::upper(dataflows::availability::Hist::bucket(x))
}

fn setup(db: &str) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["availability", "--setup", "--postgres", db])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until `/availability` reflects every slot of every site and returns its body.
fn settled(tally: &common::Tally) -> String {
    poll_until(Duration::from_secs(90), Duration::from_millis(50), || {
        let (status, _, body) = tally.get("/availability");
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let done = (1..=3).all(|s| {
            v[format!("https://site{s}.test/")]["last"]["scheduled_at"] == serde_json::json!("2021-03-01T02:59:30Z")
                && v[format!("https://site{s}.test/")]["uptime"]["7d"]["up"]
                    .as_i64()
                    .unwrap_or(0)
                    + v[format!("https://site{s}.test/")]["uptime"]["7d"]["down"]
                        .as_i64()
                        .unwrap_or(0)
                    + v[format!("https://site{s}.test/")]["uptime"]["7d"]["missed"]
                        .as_i64()
                        .unwrap_or(0)
                    == SLOTS
        });
        (status == 200 && done).then_some(body)
    })
    .unwrap_or_else(|| panic!("the views never settled: {}", tally.get("/availability").2))
}

#[test]
fn views_are_exact_and_the_same_bytes_after_a_replay_and_a_restart() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 2);
    let pg = Postgres::start();
    let dir = common::temp_dir("availability-views");
    let dead_letter = dir.join("dead-letter.jsonl");
    // Every result, then the second hour again (a checker that re-sent).
    let mut records: Vec<Rec> = (0..SLOTS)
        .flat_map(|k| (1..=3).map(move |s| slot_result(s, k)))
        .collect();
    records.extend((120..240).flat_map(|k| (1..=3).map(move |s| slot_result(s, k))));
    produce(&broker, TOPIC, &records);

    let run = |db: &str, workers: &str| {
        spawn_tally(&[
            "availability",
            "--brokers",
            &broker.addr,
            "--postgres",
            db,
            "--dead-letter",
            dead_letter.to_str().unwrap(),
            "-w",
            workers,
        ])
    };
    let db = pg.database("availability_views");
    setup(&db);
    let tally = run(&db, "1");
    let body = settled(&tally);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let site = |s: i64| &v[format!("https://site{s}.test/")];
    for s in 1..=3 {
        let [up, down, missed] = counts(s, SLOTS - 120);
        let hour = &site(s)["uptime"]["1h"];
        assert_eq!(
            (hour["up"].as_i64(), hour["down"].as_i64(), hour["missed"].as_i64()),
            (Some(up), Some(down), Some(missed)),
            "site {s}"
        );
        let [up, down, missed] = counts(s, 0);
        for w in ["24h", "7d"] {
            let win = &site(s)["uptime"][w];
            assert_eq!(
                (win["up"].as_i64(), win["down"].as_i64(), win["missed"].as_i64()),
                (Some(up), Some(down), Some(missed)),
                "site {s} {w}"
            );
        }
        assert_eq!(
            site(s)["latency_us"]["total"]["p95"].as_i64(),
            Some(p95(s, |k| 2_150 + 4 * k)),
            "site {s}"
        );
        assert_eq!(
            site(s)["latency_us"]["ttfb"]["p95"].as_i64(),
            Some(p95(s, |k| 2_000 + 3 * k)),
            "site {s}"
        );
        assert_eq!(site(s)["strip"].as_array().map(Vec::len), Some(50));
    }
    // Ratio from the integers: site 2 has 108 of 120 up in the last hour.
    assert_eq!(site(2)["uptime"]["1h"]["ratio"].as_f64(), Some(0.9));
    assert_eq!(site(1)["state"], "up");
    assert_eq!(
        site(1)["since"],
        "2021-03-01T00:53:30Z",
        "slot 107, the first up after the outage"
    );
    assert_eq!(site(2)["since"], "2021-03-01T02:55:30Z", "slot 351");
    assert_eq!(site(3)["state"], "down");
    assert_eq!(site(3)["since"], "2021-03-01T02:50:00Z", "slot 340");
    assert_eq!(site(3)["last"]["error_class"], "connect_refused");
    // The incidents view publishes on its own: wait for it rather than read it once.
    tally.wait_for_json(
        "/availability/incidents",
        &serde_json::json!({
            "https://site1.test/": [{"started": "2021-03-01T00:50:00Z", "ended": "2021-03-01T00:53:30Z", "open": false, "failures": 7, "error_class": "http_status"}],
            "https://site3.test/": [{"started": "2021-03-01T02:50:00Z", "ended": null, "open": true, "failures": 20, "error_class": "connect_refused"}],
        }),
        Duration::from_secs(30),
    );
    assert_eq!(
        tally.metric("tally_availability_site_up{url=\"https://site3.test/\"}"),
        0.0
    );
    assert_eq!(
        tally.metric("tally_availability_site_up{url=\"https://site1.test/\"}"),
        1.0
    );
    tally.wait_for_metric(
        "tally_availability_duplicates_total{worker=\"0\"}",
        360.0,
        Duration::from_secs(30),
    );
    // The rollups count what check_result holds.
    let mut client = Client::connect(&db, NoTls).unwrap();
    wait_rows(&mut client, 3 * SLOTS);
    let stored: Vec<(String, i64)> = client
        .query("SELECT outcome, count(*) FROM check_result GROUP BY 1 ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rolled = client
        .query_one(
            "SELECT sum(down)::bigint, sum(missed)::bigint, sum(up)::bigint FROM check_rollup_hourly",
            &[],
        )
        .unwrap();
    assert_eq!(
        stored,
        [
            ("down".to_string(), rolled.get::<_, i64>(0)),
            ("missed".into(), rolled.get(1)),
            ("up".into(), rolled.get(2))
        ]
    );
    let (incidents_before, _) = (tally.get("/availability/incidents").2, ());

    // kill -9 and a restart: the views come back from the rollups and the last two hours, the same bytes.
    tally.kill();
    let tally = run(&db, "2");
    assert_eq!(settled(&tally), body, "after a restart from PostgreSQL");
    drop(tally);

    // A replay of the whole topic into a new database with 3 workers: the same bytes, incidents too.
    let db2 = pg.database("availability_views_replay");
    setup(&db2);
    let tally = run(&db2, "3");
    assert_eq!(settled(&tally), body, "after a replay");
    let expected: serde_json::Value = serde_json::from_str(&incidents_before).unwrap();
    let replayed = tally.wait_for_json("/availability/incidents", &expected, Duration::from_secs(30));
    assert_eq!(replayed, incidents_before, "the same bytes");
}
