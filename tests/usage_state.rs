//! Usage checkpoints and the bill ledger (`--state`), end to end: the real binary, the project's broker,
//! simulator histories billed independently of tally. A checkpoint plus what compaction or retention
//! leaves of a topic gives the same bytes as the full history; kill -9 anywhere loses and doubles no bill;
//! a checkpoint restores into any number of workers; new history after a binlog reset, a failover or a
//! stray position is billed while re-deliveries are still recognised.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{produce, simulated_steps, Broker, Rec, Tally};
use rusqlite::Connection;
use tally::tools::sim::LogAt;

const WAIT: Duration = Duration::from_secs(90);

fn spawn(broker: &Broker, topic: &str, workers: &str, dir: &Path, state: Option<&Path>, extra: &[&str]) -> Tally {
    let dl = dir.join("dl.jsonl");
    let mut args = vec![
        "usage",
        "--brokers",
        &broker.addr,
        "--topic",
        topic,
        "-w",
        workers,
        "--dead-letter",
        dl.to_str().unwrap(),
    ];
    let state = state.map(|s| s.to_str().unwrap().to_owned());
    if let Some(s) = &state {
        args.extend(["--state", s.as_str()]);
    }
    args.extend(extra);
    common::spawn_tally(&args)
}

/// One server's binlog, one position per step: the usual history.
fn in_order(step: usize) -> LogAt {
    LogAt::pos(1000 + step as u64 * 10)
}

/// What Kafka's log compaction leaves: per key, only its latest record, and no key whose latest record is
/// a tombstone (once `delete.retention.ms` has passed). Survivors keep their order.
fn compacted(records: &[Rec]) -> Vec<Rec> {
    let mut latest: BTreeMap<(i32, Vec<u8>), usize> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        latest.insert((r.partition, r.key.clone().unwrap()), i);
    }
    let keep: HashSet<usize> = latest.values().copied().collect();
    records
        .iter()
        .enumerate()
        .filter(|(i, r)| keep.contains(i) && r.value.is_some())
        .map(|(_, r)| r.clone())
        .collect()
}

/// What retention leaves: the newest half of each partition.
fn retained(records: &[Rec], partitions: i32) -> Vec<Rec> {
    let mut out = Vec::new();
    for p in 0..partitions {
        let part: Vec<&Rec> = records.iter().filter(|r| r.partition == p).collect();
        out.extend(part[part.len() / 2..].iter().map(|r| (*r).clone()));
    }
    out
}

fn per_partition(records: &[Rec], partitions: i32) -> Vec<i64> {
    (0..partitions)
        .map(|p| records.iter().filter(|r| r.partition == p).count() as i64)
        .collect()
}

/// Points a checkpoint at another topic holding the same records at other offsets. Kafka's compaction and
/// retention keep every surviving record's offset; the broker here can do neither, so the test writes what
/// they would leave to a new topic and moves the stored offsets to the same records there.
fn repoint(state: &Path, topic: &str, next_offsets: &[i64]) {
    let conn = Connection::open(state).unwrap();
    conn.execute("UPDATE usage_checkpoint SET topic = ?1", [topic]).unwrap();
    conn.execute("DELETE FROM tally_offsets", []).unwrap();
    for (p, o) in next_offsets.iter().enumerate() {
        conn.execute(
            "INSERT INTO tally_offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)",
            rusqlite::params![topic, p as i64, o],
        )
        .unwrap();
    }
}

/// A bill as the ledger identifies it: organization, key, when it ended.
type BillId = (String, String, i64);

/// The ledger's bills, and the sum of amounts per organization.
fn ledger(state: &Path) -> (Vec<BillId>, BTreeMap<String, i128>) {
    let conn = Connection::open(state).unwrap();
    let mut stmt = conn
        .prepare("SELECT org, key, ended_ms, amount FROM usage_bills")
        .unwrap();
    let rows: Vec<(String, String, i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut sums = BTreeMap::new();
    for (org, _, _, amount) in &rows {
        *sums.entry(org.clone()).or_insert(0) +=
            amount.parse::<i128>().expect("whole-number prices bill whole amounts");
    }
    (rows.into_iter().map(|(o, k, e, _)| (o, k, e)).collect(), sums)
}

fn billing_per_org(expected: &serde_json::Value) -> BTreeMap<String, i128> {
    expected
        .as_object()
        .unwrap()
        .iter()
        .map(|(org, u)| (org.clone(), i128::from(u["billing"].as_i64().unwrap())))
        .filter(|(_, b)| *b != 0)
        .collect()
}

fn checkpoint_and_stop(mut tally: Tally) {
    let (status, _) = tally.terminate();
    assert!(
        status.success(),
        "SIGTERM writes the last checkpoint and exits 0, got {status}"
    );
}

#[test]
fn a_checkpoint_and_what_compaction_or_retention_leave_give_the_full_history_bytes() {
    let broker = Broker::start();
    let partitions = 4;
    let (steps, expected) = simulated_steps(3000, partitions, 7, in_order, true);
    let (first, second) = steps.split_at(2000);
    let first: Vec<Rec> = first.iter().flatten().cloned().collect();
    let second: Vec<Rec> = second.iter().flatten().cloned().collect();

    // The full history, rebuilt from the earliest offset without state: the reference bytes.
    broker.create_topic("full", partitions);
    produce(&broker, "full", &first);
    produce(&broker, "full", &second);
    let dir = common::temp_dir("compaction");
    let full = spawn(&broker, "full", "2", &dir, None, &[]).wait_for_json("/", &expected, WAIT);

    // The first part read with --state; SIGTERM writes the checkpoint.
    broker.create_topic("before", partitions);
    produce(&broker, "before", &first);
    let state = dir.join("state.db");
    let (_, first_expected) = simulated_steps(2000, partitions, 7, in_order, true);
    let tally = spawn(&broker, "before", "2", &dir, Some(&state), &[]);
    tally.wait_for_json("/", &first_expected, WAIT);
    checkpoint_and_stop(tally);

    for (name, leftover) in [
        ("compacted", compacted(&first)),
        ("retained", retained(&first, partitions)),
    ] {
        assert!(leftover.len() < first.len() * 3 / 4, "{name} drops history");
        broker.create_topic(name, partitions);
        produce(&broker, name, &leftover);
        produce(&broker, name, &second);
        // Without the checkpoint, what is left bills less: the loss the checkpoint prevents.
        let rebuilt = spawn(&broker, name, "2", &dir, None, &[]);
        let total = (leftover.len() + second.len()) as u64;
        let body = common::poll_until(WAIT, Duration::from_millis(100), || {
            let (_, _, metrics) = rebuilt.get("/metrics");
            let (status, _, body) = rebuilt.get("/");
            (status == 200 && common::metric_sum(&metrics, "tally_source_messages_total") == total).then_some(body)
        })
        .expect("the rebuild reads every record");
        assert_ne!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            expected,
            "{name}: rebuilt from what is left"
        );
        drop(rebuilt);
        let copy = dir.join(format!("{name}.db"));
        std::fs::copy(&state, &copy).unwrap();
        repoint(&copy, name, &per_partition(&leftover, partitions));
        let resumed = spawn(&broker, name, "2", &dir, Some(&copy), &[]);
        assert_eq!(
            resumed.wait_for_json("/", &expected, WAIT),
            full,
            "{name}: byte-identical GET /"
        );
    }
}

#[test]
fn kill_9_ten_times_loses_and_doubles_no_bill() {
    let broker = Broker::start();
    let partitions = 4;
    let (steps, expected) = simulated_steps(4000, partitions, 11, in_order, true);
    let destroyed: usize = steps.iter().filter(|s| s.len() == 2).count();
    broker.create_topic("history", partitions);
    let dir = common::temp_dir("kill9");
    let state = dir.join("state.db");
    // Ten runs, each fed a tenth of the history and killed at a different point after its first
    // checkpoint (between checkpoints or during one, with checkpoints every 100 ms).
    for (run, chunk) in steps.chunks(400).enumerate() {
        let records: Vec<Rec> = chunk.iter().flatten().cloned().collect();
        produce(&broker, "history", &records);
        let tally = spawn(
            &broker,
            "history",
            "2",
            &dir,
            Some(&state),
            &["--checkpoint-interval", "100ms"],
        );
        let checkpoints = "tally_sink_batches_total{sink=\"usage-state\"}";
        tally.wait_for_metric(checkpoints, 1.0, WAIT);
        std::thread::sleep(Duration::from_millis(37 * (run as u64 % 7)));
        tally.kill();
    }
    let tally = spawn(&broker, "history", "2", &dir, Some(&state), &[]);
    let body = tally.wait_for_json("/", &expected, WAIT);
    let reference = spawn(&broker, "history", "1", &dir, None, &[]).wait_for_json("/", &expected, WAIT);
    assert_eq!(body, reference, "byte-identical to an uninterrupted rebuild");
    checkpoint_and_stop(tally);
    let (bills, sums) = ledger(&state);
    assert_eq!(bills.len(), destroyed, "one bill per destroyed instance");
    let unique: HashSet<_> = bills.iter().collect();
    assert_eq!(unique.len(), bills.len(), "no bill twice");
    assert_eq!(sums, billing_per_org(&expected), "the ledger sums to billing");
}

#[test]
fn a_two_worker_checkpoint_restores_into_one_and_four_workers() {
    let broker = Broker::start();
    let partitions = 4;
    let (steps, expected) = simulated_steps(2400, partitions, 5, in_order, true);
    let (first, second) = steps.split_at(1500);
    let (_, first_expected) = simulated_steps(1500, partitions, 5, in_order, true);
    broker.create_topic("instances", partitions);
    produce(
        &broker,
        "instances",
        &first.iter().flatten().cloned().collect::<Vec<_>>(),
    );
    let dir = common::temp_dir("workers");
    let state = dir.join("state.db");
    let tally = spawn(&broker, "instances", "2", &dir, Some(&state), &[]);
    tally.wait_for_json("/", &first_expected, WAIT);
    checkpoint_and_stop(tally);
    // The connector re-sends the last 200 steps before the checkpoint, then goes on.
    let mut rest: Vec<Rec> = first[1300..].iter().flatten().cloned().collect();
    rest.extend(second.iter().flatten().cloned());
    produce(&broker, "instances", &rest);
    let mut bodies = Vec::new();
    for workers in ["1", "4"] {
        let copy = dir.join(format!("state-{workers}.db"));
        std::fs::copy(&state, &copy).unwrap();
        let tally = spawn(&broker, "instances", workers, &dir, Some(&copy), &[]);
        bodies.push(tally.wait_for_json("/", &expected, WAIT));
        checkpoint_and_stop(tally);
        let (_, sums) = ledger(&copy);
        assert_eq!(
            sums,
            billing_per_org(&expected),
            "-w {workers}: the ledger sums to billing"
        );
    }
    assert_eq!(bodies[0], bodies[1], "identical bytes for -w 1 and -w 4");
    // And into a cluster of two processes (one worker each) sharing the file: process 0 restores it.
    let copy = dir.join("state-cluster.db");
    std::fs::copy(&state, &copy).unwrap();
    let hostfile = common::cluster_hostfile(&dir, 2);
    let cluster = |process: &str| {
        vec![
            "--state".to_owned(),
            copy.to_str().unwrap().to_owned(),
            "--processes".to_owned(),
            "2".to_owned(),
            "--process".to_owned(),
            process.to_owned(),
            "--hostfile".to_owned(),
            hostfile.to_str().unwrap().to_owned(),
        ]
    };
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "usage",
            "--brokers",
            &broker.addr,
            "--topic",
            "instances",
            "-w",
            "1",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--dead-letter", dir.join("dl1.jsonl").to_str().unwrap()])
        .args(cluster("1"))
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("p1.log")).unwrap())
        .spawn()
        .unwrap();
    let _second = common::KillOnDrop(second);
    let first_args = cluster("0");
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let first = spawn(&broker, "instances", "1", &dir, None, &first_args);
    assert_eq!(
        first.wait_for_json("/", &expected, WAIT),
        bodies[0],
        "identical bytes in a cluster"
    );
}

#[test]
fn new_history_after_a_reset_a_failover_or_a_stray_position_is_billed_and_replays_are_not() {
    let broker = Broker::start();
    let partitions = 2;
    // Steps 0..800 on server 1 in binlog file 3; a stray far-ahead position at step 300; RESET MASTER at
    // step 800 (file 1 again); failover at 1600 to server 2; MariaDB GTIDs on a new domain from 2000.
    let log = |i: usize| match i {
        300 => LogAt {
            server_id: 1,
            gtid: None,
            file: 3,
            pos: 4_000_000_000,
        },
        0..800 => LogAt {
            server_id: 1,
            gtid: None,
            file: 3,
            pos: 1000 + i as u64 * 10,
        },
        800..1600 => LogAt {
            server_id: 1,
            gtid: None,
            file: 1,
            pos: 4 + (i as u64 - 800) * 10,
        },
        1600..2000 => LogAt {
            server_id: 2,
            gtid: None,
            file: 1,
            pos: 4 + (i as u64 - 1600) * 10,
        },
        _ => LogAt {
            server_id: 2,
            gtid: Some(format!("5-2-{}", i - 1999)),
            file: 1,
            pos: 4 + (i as u64 - 1600) * 10,
        },
    };
    let (steps, expected) = simulated_steps(2400, partitions, 3, log, true);
    broker.create_topic("instances", partitions);
    let all: Vec<Rec> = steps.iter().flatten().cloned().collect();
    produce(&broker, "instances", &all);
    // Then the connector re-sends steps 700..900 (across the reset) and 1900..2100 (across the switch to
    // GTIDs): every one of them a duplicate, tombstones aside (they carry no position).
    let replay: Vec<Rec> = steps[700..900]
        .iter()
        .chain(&steps[1900..2100])
        .flatten()
        .cloned()
        .collect();
    let replayed = replay.iter().filter(|r| r.value.is_some()).count() as f64;
    produce(&broker, "instances", &replay);
    let dir = common::temp_dir("history");
    let state = dir.join("state.db");
    let tally = spawn(&broker, "instances", "2", &dir, Some(&state), &[]);
    let total = (all.len() + replay.len()) as u64;
    common::poll_until(WAIT, Duration::from_millis(100), || {
        let (_, _, metrics) = tally.get("/metrics");
        (common::metric_sum(&metrics, "tally_source_messages_total") == total).then_some(())
    })
    .expect("every record read");
    tally.wait_for_json("/", &expected, WAIT);
    tally.wait_for_metric("tally_usage_events_total{kind=\"duplicate\"}", replayed, WAIT);
    assert_eq!(tally.metric("tally_usage_events_total{kind=\"duplicate\"}"), replayed);
    assert!(tally.metric("tally_usage_events_total{kind=\"new_history\"}") >= 1.0);
    checkpoint_and_stop(tally);
    let (_, sums) = ledger(&state);
    assert_eq!(sums, billing_per_org(&expected), "the ledger sums to billing");
}

#[test]
fn bills_answer_per_organization_with_their_price_periods() {
    let broker = Broker::start();
    let (steps, expected) = simulated_steps(600, 1, 9, in_order, true);
    broker.create_topic("instances", 1);
    produce(
        &broker,
        "instances",
        &steps.iter().flatten().cloned().collect::<Vec<_>>(),
    );
    let dir = common::temp_dir("bills");
    let state = dir.join("state.db");
    let tally = spawn(
        &broker,
        "instances",
        "1",
        &dir,
        Some(&state),
        &["--checkpoint-interval", "50ms"],
    );
    tally.wait_for_json("/", &expected, WAIT);
    let billing = billing_per_org(&expected);
    for (org, total) in &billing {
        let answer = common::poll_until(WAIT, Duration::from_millis(100), || {
            let (status, _, body) = tally.get(&format!("/bills?org={org}"));
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["total"].as_i64().map(i128::from) == Some(*total)).then_some(v)
        })
        .unwrap_or_else(|| panic!("/bills for {org} never summed to {total}"));
        let bills = answer["bills"].as_array().unwrap();
        assert_eq!(answer["count"].as_u64().unwrap() as usize, bills.len());
        for bill in bills {
            let periods = bill["periods"].as_array().unwrap();
            assert!(!periods.is_empty());
            let sum: i64 = periods.iter().map(|p| p["amount"].as_i64().unwrap()).sum();
            assert_eq!(
                sum,
                bill["amount"].as_i64().unwrap(),
                "periods add up to the bill: {bill}"
            );
            for p in periods {
                assert_eq!(
                    p["amount"].as_i64().unwrap(),
                    p["price"].as_i64().unwrap() * p["seconds"].as_i64().unwrap()
                );
            }
        }
        // A window: only bills that ended in it.
        let first_end = bills[0]["ended"].as_str().unwrap().to_owned();
        let (_, _, body) = tally.get(&format!("/bills?org={org}&from={first_end}&to={first_end}"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["count"], 0, "to is exclusive");
    }
    let (status, _, body) = tally.get("/bills");
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = tally.get("/bills?org=x&from=yesterday");
    assert_eq!(status, 400, "{body}");
    checkpoint_and_stop(tally);
    // The same file for another topic would apply that topic's whole history over this one's state.
    let other = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "usage",
            "--brokers",
            &broker.addr,
            "--topic",
            "other",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--state", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("holds a checkpoint of topic \"instances\""), "{stderr}");
    // Without the ledger the checkpoint keeps the state alone: the same view, and /bills says it is off.
    let tally = spawn(
        &broker,
        "instances",
        "1",
        &dir,
        Some(&state),
        &["--bill-ledger", "false"],
    );
    tally.wait_for_json("/", &expected, WAIT);
    let (status, _, body) = tally.get("/bills?org=x");
    assert_eq!(status, 404);
    assert!(body.contains("--bill-ledger false"), "{body}");
}
