//! The usage pipeline end to end: the real `tally` binary against a real Kafka-protocol broker started by
//! `scripts/broker`, fed genuine Debezium captures and simulator histories; asserts exact JSON.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{capture_records, produce, simulated, Broker, Rec, Tally};
use serde_json::json;

const TOPIC: &str = "topic.cloud.instances";
const WAIT: Duration = Duration::from_secs(60);

/// The expected usage of `captured/mysqlconn-instances_schemas.jsonl`, computed by hand from its rows
/// (`started` columns and `source.ts_ms` of each statement, in epoch seconds).
fn captured_expected() -> serde_json::Value {
    // Organization 3f8e...: rows 1, 2 (snapshot), 6, 7, and 1 again after TRUNCATE (which the connector
    // skips by default, so 2, 6 and 7 still run). Only row 1 was deleted: price 12 from its `started`
    // 2024-01-15T10:00:00Z (1705312800) to the DELETE at 1795417081.
    let a_billing: i64 = 12 * (1_795_417_081 - 1_705_312_800);
    // Organization 7a2d...: rows 3 (snapshot), 4, 5, 8, all deleted at 1795417085.
    let b_billing: i64 = 7 * (1_795_417_085 - 1_795_417_071) // row 3, started 06:57:51
        + 40 * (1_795_417_079 - 1_795_417_076) + 45 * (1_795_417_085 - 1_795_417_079) // row 4: 40 until the UPDATE, then 45
        + 3 * (1_795_417_085 - 1_748_781_296) // row 5, explicit started 2025-06-01 12:34:56
        + 12 * (1_795_417_085 - 1_795_417_082); // row 8
    json!({
        "3f8e1c52-5b7a-4d0e-9a31-6c2f0b9d4e11": {"started": 5, "running": 4, "billing": a_billing},
        "7a2d9e44-1c3b-4f6a-8e5d-2b9c0a7f1e22": {"started": 4, "running": 0, "billing": b_billing},
    })
}

fn usage_args<'a>(broker: &'a Broker, workers: &'a str, dead_letter: &'a str) -> Vec<&'a str> {
    vec![
        "usage",
        "--brokers",
        &broker.addr,
        "--topic",
        TOPIC,
        "-w",
        workers,
        "--dead-letter",
        dead_letter,
    ]
}

#[test]
fn captured_stream_gives_the_hand_computed_bill() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let records = capture_records(
        &common::fixtures().join("captured/mysqlconn-instances_schemas.jsonl"),
        TOPIC,
        |_| 0,
    );
    assert_eq!(records.len(), 23);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("captured");
    let dl = dir.join("dl.jsonl");
    let tally = common::spawn_tally(&usage_args(&broker, "1", dl.to_str().unwrap()));
    tally.wait_for_json("/", &captured_expected(), WAIT);
    let (_, head, _) = tally.get("/");
    let as_of: u64 = common::header(&head, "X-Tally-As-Of")
        .and_then(|v| v.parse().ok())
        .expect("as-of header");
    assert!(
        as_of > 1_700_000_000_000,
        "as-of is an epoch-ms closed timestamp, got {as_of}"
    );
    assert_eq!(
        tally.metric("tally_source_messages_total{partition=\"0\",topic=\"topic.cloud.instances\"}"),
        23.0
    );
    // Freshness parts: every message's age when read (all carry a producer timestamp), and each publish.
    assert_eq!(
        tally.metric("tally_source_record_age_seconds_count{topic=\"topic.cloud.instances\"}"),
        23.0
    );
    assert!(tally.metric("tally_view_publish_delay_seconds_count{view=\"usage\"}") >= 1.0);
    // With mimalloc, tally re-executes itself with one glibc arena for librdkafka (same pid).
    if cfg!(all(feature = "mimalloc", target_os = "linux", target_env = "gnu")) {
        let environ = std::fs::read(format!("/proc/{}/environ", tally.child.id())).expect("environ");
        assert!(
            environ.split(|b| *b == 0).any(|v| v == b"MALLOC_ARENA_MAX=1"),
            "MALLOC_ARENA_MAX=1 not in tally's environment"
        );
    }
    let (status, _, health) = tally.get("/health");
    assert_eq!(status, 200);
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    // Everything read: the lag librdkafka reports (each second) comes down to 0.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health: serde_json::Value = serde_json::from_str(&tally.get("/health").2).unwrap();
        if health["lag_messages"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "lag never reached 0: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(tally.get("/ui").2.contains("<table"));
}

/// A primary-key change (id 42 -> 44) is a delete carrying `__debezium.newkey`, its tombstone, and a
/// create carrying `__debezium.oldkey`: the headers must survive the broker, or the move would count as a
/// new instance started.
#[test]
fn primary_key_change_headers_cross_kafka_and_keep_the_instance_running() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let records: Vec<_> = capture_records(&common::fixtures().join("v2.7/extras/stream.jsonl"), TOPIC, |_| 0)
        .into_iter()
        .take(3)
        .collect();
    assert_eq!(
        records.iter().map(|r| r.headers.len()).collect::<Vec<_>>(),
        [1, 1, 1],
        "fixture: delete, tombstone, create"
    );
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("pk-change");
    let dl = dir.join("dl.jsonl");
    let tally = common::spawn_tally(&usage_args(&broker, "1", dl.to_str().unwrap()));
    // The delete of a row never seen bills its before image: 1234/s from 2024-04-30T10:45:12Z (1714473912)
    // to the delete at 1714572600, 98,688 s. The moved row then runs on without a second start.
    let expected = serde_json::json!({"c2d9e8f7-6a5b-4c3d-9e1f-0a2b3c4d5e6f": {"started": 0, "running": 1, "billing": 121_780_992}});
    tally.wait_for_json("/", &expected, WAIT);
}

#[test]
fn captured_stream_over_four_partitions_with_two_workers_and_redelivery() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    // Each key stays in one partition, as Kafka's partitioner does; order across partitions is lost.
    let by_key = |v: &serde_json::Value| {
        let key = v["key"].as_str().unwrap_or("");
        (key.bytes().map(u32::from).sum::<u32>() % 4) as i32
    };
    let records = capture_records(
        &common::fixtures().join("captured/mysqlconn-instances_noschemas.jsonl"),
        TOPIC,
        by_key,
    );
    let schemas = capture_records(
        &common::fixtures().join("captured/mysqlconn-instances_schemas.jsonl"),
        TOPIC,
        by_key,
    );
    produce(&broker, TOPIC, &schemas);
    // A connector restart re-delivers what it already sent: the whole stream again.
    produce(&broker, TOPIC, &schemas);
    let dir = common::temp_dir("partitions");
    let dl = dir.join("dl.jsonl");
    let tally = common::spawn_tally(&usage_args(&broker, "2", dl.to_str().unwrap()));
    tally.wait_for_json("/", &captured_expected(), WAIT);
    let read: f64 = (0..4)
        .map(|p| {
            tally.metric(&format!(
                "tally_source_messages_total{{partition=\"{p}\",topic=\"{TOPIC}\"}}"
            ))
        })
        .sum();
    assert_eq!(read, 46.0, "both copies read");
    // 23 re-delivered records, of which 5 tombstones (no binlog position): 18 recognised as duplicates.
    tally.wait_for_metric("tally_usage_events_total{kind=\"duplicate\"}", 18.0, WAIT);
    assert_eq!(tally.metric("tally_usage_events_total{kind=\"duplicate\"}"), 18.0);
    tally.wait_for_json("/", &captured_expected(), WAIT);
    // The same statements captured with schemas off decode to the same rows: same JSON modulo times.
    assert_eq!(records.len(), 23);
    // SIGTERM stops both workers' sources; the dataflow completes and tally exits 0.
    let mut tally = tally;
    let (status, _) = tally.terminate();
    assert!(status.success(), "SIGTERM should end tally cleanly, got {status}");
}

#[test]
fn simulated_history_matches_its_ledger_for_one_and_two_workers_and_after_kill() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    let (records, expected) = simulated(3000, 4, 42);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("sim");
    let dl = dir.join("dl.jsonl");
    let dl = dl.to_str().unwrap();
    let one = common::spawn_tally(&usage_args(&broker, "1", dl));
    let body_one = one.wait_for_json("/", &expected, WAIT);
    one.kill();
    let two = common::spawn_tally(&usage_args(&broker, "2", dl));
    let body_two = two.wait_for_json("/", &expected, WAIT);
    assert_eq!(body_one, body_two, "byte-identical JSON for -w 1 and -w 2");
    // kill -9 and start again: state is rebuilt from the earliest offset to the same numbers.
    two.kill();
    let again = common::spawn_tally(&usage_args(&broker, "2", dl));
    assert_eq!(again.wait_for_json("/", &expected, WAIT), body_one);
    assert_eq!(
        std::fs::read_to_string(dl).unwrap_or_default(),
        "",
        "nothing dead-lettered"
    );
}

#[test]
fn malformed_messages_are_counted_dead_lettered_and_do_not_disturb_the_rest() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let good = capture_records(
        &common::fixtures().join("captured/mysqlconn-instances_schemas.jsonl"),
        TOPIC,
        |_| 0,
    );
    let valid = String::from_utf8(good[3].value.clone().unwrap()).unwrap();
    let bad = |value: Vec<u8>| Rec {
        partition: 0,
        key: Some(b"{\"id\":999}".to_vec()),
        value: Some(value),
        headers: vec![],
    };
    let bads = vec![
        bad(vec![0xde, 0xad, 0xbe, 0xef, 0x00]),           // garbage bytes
        bad(valid.as_bytes()[..valid.len() / 3].to_vec()), // truncated JSON
        bad(valid
            .replace("\"price_second\":40", "\"price_second\":[40]")
            .into_bytes()), // wrong type
        bad(valid.replace("\"op\":\"c\"", "\"op\":\"z\"").into_bytes()), // unknown op
        bad(valid.replace("\"source\":", "\"sauce\":").into_bytes()), // missing field
    ];
    // Interleave: a bad message after every fourth good one.
    let mut records = Vec::new();
    let mut bad_iter = bads.into_iter();
    for (i, r) in good.into_iter().enumerate() {
        records.push(r);
        if i % 4 == 3 {
            if let Some(b) = bad_iter.next() {
                records.push(b);
            }
        }
    }
    records.extend(bad_iter);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("malformed");
    let dl = dir.join("dead-letter.jsonl");
    let tally = common::spawn_tally(&usage_args(&broker, "1", dl.to_str().unwrap()));
    tally.wait_for_json("/", &captured_expected(), WAIT);
    let metric = |reason: &str| {
        tally.metric(&format!(
            "tally_source_decode_errors_total{{reason=\"{reason}\",topic=\"topic.cloud.instances\"}}"
        ))
    };
    assert_eq!(metric("malformed"), 1.0);
    assert_eq!(metric("truncated"), 1.0);
    assert_eq!(metric("wrong_type"), 1.0);
    assert_eq!(metric("unknown_op"), 1.0);
    assert_eq!(metric("missing_field"), 1.0);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dl)
        .expect("dead-letter file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 5);
    for l in &lines {
        assert_eq!(l["topic"], TOPIC);
        assert_eq!(l["partition"], 0);
        let offset = l["offset"].as_i64().unwrap();
        assert!(
            records[offset as usize].key.as_deref() == Some(b"{\"id\":999}".as_slice()),
            "offset {offset} is a bad record"
        );
    }
    assert_eq!(lines[0]["value_base64"], "3q2+7wA=", "non-UTF-8 bytes kept as base64");
    assert_eq!(lines[1]["reason"], "truncated");
}

/// A two-process cluster over 1,000 simulated events on 4 partitions, once process 0 shows their ledger:
/// process 0 (serving HTTP) and process 1 (its stderr in `stderr_file`; killed on drop).
fn two_process_cluster(
    broker: &Broker,
    dir: &std::path::Path,
    stderr_file: std::fs::File,
) -> (Tally, common::KillOnDrop) {
    broker.create_topic(TOPIC, 4);
    let (records, expected) = simulated(1000, 4, 7);
    produce(broker, TOPIC, &records);
    let hostfile = common::cluster_hostfile(dir, 2);
    let dl = dir.join("dl.jsonl");
    let (dl, hf) = (dl.to_str().unwrap(), hostfile.to_str().unwrap());
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(usage_args(broker, "1", dl))
        .args([
            "--processes",
            "2",
            "--process",
            "1",
            "--hostfile",
            hf,
            "--listen",
            "127.0.0.1:0",
        ])
        .env("TALLY_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .expect("spawn process 1");
    // Killed on drop, also when an assertion fails.
    let second = common::KillOnDrop(second);
    let mut args = usage_args(broker, "1", dl);
    args.extend(["--processes", "2", "--process", "0", "--hostfile", hf]);
    let first = common::spawn_tally(&args);
    first.wait_for_json("/", &expected, WAIT);
    (first, second)
}

#[test]
fn a_cluster_of_two_processes_matches_one_process() {
    let broker = Broker::start();
    let dir = common::temp_dir("cluster");
    let (mut first, mut second) =
        two_process_cluster(&broker, &dir, std::fs::File::create(dir.join("p1.log")).unwrap());
    // Both stop cleanly once both are signalled (a killed peer would make timely panic in the other).
    let term = std::process::Command::new("kill")
        .args(["-TERM", &second.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let (status, _) = first.terminate();
    assert!(status.success(), "process 0 exited with {status}");
    let status = second.0.wait().unwrap();
    assert!(status.success(), "process 1 exited with {status}");
}

#[test]
fn a_lost_cluster_peer_stops_the_other_with_a_clear_error() {
    let broker = Broker::start();
    let dir = common::temp_dir("cluster-lost");
    let log = dir.join("p1.log");
    let (first, mut second) = two_process_cluster(&broker, &dir, std::fs::File::create(&log).unwrap());
    first.kill();
    // Timely cannot go on without a peer: process 1 must exit, not hang serving a frozen view.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process 1 still running 20 s after losing process 0"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        stderr
            .matches("lost the connection to another process of the cluster")
            .count(),
        1,
        "{stderr}"
    );
}
