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
