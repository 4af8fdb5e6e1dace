//! The usage spec's whole chain, for real and without Docker: `tally simulate` writes to a real MariaDB
//! (ROW binlog), real Debezium (3.6.3 embedded engine, MySQL connector, JsonConverter) captures it and a
//! bridge produces its records to the project's broker, and `tally usage` serves the view. The expected
//! JSON is billed independently from the simulator's audit (what it did, at which database second),
//! and must hold exactly after a restart of tally and after a kill -9 of the connector (which re-delivers
//! what it had not flushed, or re-snapshots).
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Broker, MariaDb};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// Bills the audit as CDC can see it. `before_snapshot`: what happened before the connector's first
/// snapshot, of which only the rows still live are visible (as snapshot reads, at their current price,
/// billed from their `started` column). `audit`: what happened after, all streamed. Per organization:
/// rows seen appearing, running rows, and for each destroyed row each price for the seconds it was in
/// force (from `started` or the price change's second, to the delete's).
fn reference(before_snapshot: &Path, audit: &Path) -> serde_json::Value {
    struct Live {
        org: String,
        price: i64,
        since: i64,
        accrued: i64,
    }
    let mut live: BTreeMap<i64, Live> = BTreeMap::new();
    let mut per_org: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    // Replay what preceded the snapshot only to learn which rows it reads, and at what price.
    let mut snapshot: BTreeMap<i64, (String, i64, i64)> = BTreeMap::new();
    for line in std::fs::read_to_string(before_snapshot).expect("audit").lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("audit line");
        let id = e["id"].as_i64().unwrap();
        match e["op"].as_str().unwrap() {
            "deploy" => {
                snapshot.insert(
                    id,
                    (
                        e["org"].as_str().unwrap().to_owned(),
                        e["price"].as_i64().unwrap(),
                        e["started"].as_i64().unwrap(),
                    ),
                );
            }
            "price" => snapshot.get_mut(&id).expect("live row").1 = e["price"].as_i64().unwrap(),
            _ => {
                snapshot.remove(&id);
            }
        }
    }
    for (id, (org, price, started)) in snapshot {
        per_org.entry(org.clone()).or_default().0 += 1;
        live.insert(
            id,
            Live {
                org,
                price,
                since: started,
                accrued: 0,
            },
        );
    }
    for line in std::fs::read_to_string(audit).expect("audit").lines() {
        let e: serde_json::Value = serde_json::from_str(line).expect("audit line");
        let (id, ts) = (e["id"].as_i64().unwrap(), e["ts"].as_i64().unwrap());
        match e["op"].as_str().unwrap() {
            "deploy" => {
                let org = e["org"].as_str().unwrap().to_owned();
                per_org.entry(org.clone()).or_default().0 += 1;
                live.insert(
                    id,
                    Live {
                        org,
                        price: e["price"].as_i64().unwrap(),
                        since: e["started"].as_i64().unwrap(),
                        accrued: 0,
                    },
                );
            }
            "price" => {
                let row = live.get_mut(&id).expect("price change of a live row");
                row.accrued += row.price * (ts - row.since);
                row.price = e["price"].as_i64().unwrap();
                row.since = ts;
            }
            "destroy" => {
                let row = live.remove(&id).expect("destroy of a live row");
                per_org.entry(row.org.clone()).or_default().2 += row.accrued + row.price * (ts - row.since);
            }
            other => panic!("unknown audit op {other}"),
        }
    }
    for row in live.values() {
        per_org.entry(row.org.clone()).or_default().1 += 1;
    }
    serde_json::Value::Object(
        per_org
            .into_iter()
            .map(|(o, (s, r, b))| (o, json!({"started": s, "running": r, "billing": b})))
            .collect(),
    )
}

fn simulate(db: &MariaDb, audit: &Path, steps: u32, interval_ms: u32, seed: u32) {
    let status = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "simulate",
            "--mariadb-url",
            &db.url(),
            "--steps",
            &steps.to_string(),
            "--interval-ms",
            &interval_ms.to_string(),
        ])
        .args([
            "--price-change",
            "0.15",
            "--seed",
            &seed.to_string(),
            "--audit",
            audit.to_str().unwrap(),
        ])
        .env("TALLY_LOG", "warn")
        .status()
        .expect("run tally simulate");
    assert!(status.success(), "tally simulate failed");
}

/// The Debezium bridge (scripts/debezium run), killed -9 on drop.
fn start_bridge(db: &MariaDb, broker: &Broker, state: &Path, log: &Path) -> common::KillOnDrop {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("bridge log");
    let child = Command::new(common::root().join("scripts/debezium"))
        .args([
            "run",
            &db.addr,
            &broker.addr,
            state.to_str().unwrap(),
            "--flush-ms",
            "1000",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the Debezium bridge");
    common::KillOnDrop(child)
}

#[test]
fn mariadb_debezium_kafka_tally_equals_the_audit_through_restarts() {
    let db = MariaDb::start();
    let broker = Broker::start();
    let dir = common::temp_dir("chain");
    let (before, audit) = (dir.join("before-snapshot.jsonl"), dir.join("audit.jsonl"));
    let (state, log) = (dir.join("debezium"), dir.join("bridge.log"));
    std::fs::write(&audit, "").unwrap();
    let expected = || reference(&before, &audit);
    let dl = dir.join("dl.jsonl");
    let args = [
        "usage",
        "--brokers",
        &broker.addr,
        "-w",
        "2",
        "--dead-letter",
        dl.to_str().unwrap(),
    ];

    // Rows that exist before the connector starts reach tally as snapshot reads.
    simulate(&db, &before, 40, 10, 1);
    let bridge = start_bridge(&db, &broker, &state, &log);
    let tally = common::spawn_tally(&args);
    tally.wait_for_json("/", &expected(), WAIT); // the snapshot is in: from here on everything streams
    simulate(&db, &audit, 150, 20, 2);
    let first = tally.wait_for_json("/", &expected(), WAIT);

    // Restart tally: it rebuilds from the earliest offset to the same bytes.
    tally.kill();
    let tally = common::spawn_tally(&args);
    assert_eq!(tally.wait_for_json("/", &expected(), WAIT), first);

    // A connector crash: records it delivered after its last offset flush are delivered again on restart.
    // Made deterministic by keeping the offsets of a settled moment, letting a burst be delivered, then
    // kill -9 and restoring those older offsets (exactly what a crash before the next flush leaves).
    std::thread::sleep(Duration::from_millis(2500)); // > --flush-ms: everything so far is flushed
    let offsets = state.join("offsets.dat");
    let settled = std::fs::read(&offsets).expect("the connector flushed its offsets");
    simulate(&db, &audit, 40, 5, 3);
    tally.wait_for_json("/", &expected(), WAIT); // the burst has been delivered
    drop(bridge);
    std::fs::write(&offsets, settled).unwrap();
    simulate(&db, &audit, 40, 10, 4); // while it is down
    let _bridge = start_bridge(&db, &broker, &state, &log);
    simulate(&db, &audit, 60, 20, 5);
    tally.wait_for_json("/", &expected(), WAIT);
    let duplicates = tally.metric("tally_usage_events_total{kind=\"duplicate\"}");
    assert!(
        duplicates >= 20.0,
        "the burst was re-delivered and recognised ({duplicates} duplicates)"
    );
    let audit_lines = std::fs::read_to_string(&audit).unwrap().lines().count();
    let read = tally.metric("tally_source_messages_total{partition=\"0\",topic=\"topic.cloud.instances\"}");
    eprintln!("audit: {audit_lines} statements; tally read {read} records, recognised {duplicates} re-delivered ones");
    assert_eq!(
        std::fs::read_to_string(&dl).unwrap_or_default(),
        "",
        "real Debezium output never dead-letters"
    );
}
