//! HTTP and health as an operator sees them, against the real binary: descriptors running out, readiness
//! during a rebuild, with no broker and during an outage, a failing sink, and the dead-letter file's bound
//! across a restart.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{produce, simulated, Broker, Rec, Tally};

const TOPIC: &str = "topic.cloud.instances";
const WAIT: Duration = Duration::from_secs(90);

fn usage_args<'a>(broker: &'a str, dead_letter: &'a str) -> Vec<&'a str> {
    vec![
        "usage",
        "--brokers",
        broker,
        "--topic",
        TOPIC,
        "--dead-letter",
        dead_letter,
    ]
}

/// Polls until `check` holds, or fails with `what` after `WAIT`.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let held = common::poll_until(WAIT, Duration::from_millis(50), || check().then_some(()));
    assert!(held.is_some(), "timed out waiting until {what}");
}

fn health(tally: &Tally) -> (u16, serde_json::Value) {
    let (status, _, body) = tally.get("/health");
    (status, serde_json::from_str(&body).unwrap_or_default())
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn http_survives_running_out_of_descriptors_and_raises_the_soft_limit() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let (records, expected) = simulated(50, 1, 3);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("fd");
    let dl = dir.join("dl.jsonl");
    let tally_exe = env!("CARGO_BIN_EXE_tally");
    // The soft limit is raised to the hard one at start.
    let mut args = vec!["--nofile=128:4096", tally_exe];
    args.extend(usage_args(&broker.addr, dl.to_str().unwrap()));
    let raised = Tally::spawn("prlimit", &args);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", raised.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    assert_eq!(line.split_whitespace().nth(3), Some("4096"), "{line}");
    raised.kill();
    // A hard limit of 128: idle clients exhaust it (each connection is a descriptor).
    let mut args = vec!["--nofile=128:128", tally_exe];
    args.extend(usage_args(&broker.addr, dl.to_str().unwrap()));
    args.extend(["--http-timeout-ms", "600000"]);
    let tally = Tally::spawn("prlimit", &args);
    tally.wait_for_json("/", &expected, WAIT);
    let pid = tally.child.id();
    let addr: std::net::SocketAddr = tally.http.parse().unwrap();
    // Idle clients until the table is full (then connects queue in the listen backlog, and once that is
    // full they hang: stop at the first that does not complete).
    let mut idle = Vec::new();
    while idle.len() < 400 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    wait_until("tally's descriptor table is full", || open_files(pid) >= 126);
    // While full, a request may not be answered; once the idle clients go, HTTP must come back.
    drop(idle);
    wait_until("HTTP answers again after the descriptors were freed", || {
        tally.get("/health").0 == 200
    });
    assert!(
        tally.metric("tally_http_accept_errors_total") >= 1.0,
        "accept never failed: the test did not exhaust descriptors"
    );
    tally.wait_for_json("/", &expected, WAIT);
}

#[test]
fn a_rebuild_never_answers_a_partial_view_as_complete() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 4);
    let (records, expected) = simulated(20_000, 4, 11);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("rebuild");
    let dl = dir.join("dl.jsonl");
    let tally = common::spawn_tally(&usage_args(&broker.addr, dl.to_str().unwrap()));
    let (mut catching_up, mut complete) = (0, 0);
    wait_until("the view is complete", || {
        let (status, head, body) = tally.get("/");
        match status {
            200 => {
                let view: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(view, expected, "a 200 answer during the rebuild was not the whole view");
                complete += 1;
            }
            503 => {
                assert_eq!(common::header(&head, "Retry-After"), Some("1"), "{head}");
                let progress: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(progress["status"], "catching_up", "{progress}");
                catching_up += 1;
            }
            other => panic!("GET / answered {other}: {body}"),
        }
        complete > 0
    });
    let (status, body) = health(&tally);
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")), "{body}");
    eprintln!("rebuild: {catching_up} answers said catching up before the complete view");
}

#[test]
fn without_a_broker_nothing_says_ok() {
    // Port 1 takes root to bind and nothing here listens on it: connections are refused, and no test's
    // broker can come to own it (a port freed by the test could be handed to one).
    let addr = "127.0.0.1:1".to_owned();
    let dir = common::temp_dir("no-broker");
    let dl = dir.join("dl.jsonl");
    let mut args = usage_args(&addr, dl.to_str().unwrap());
    args.extend(["--stale-after-ms", "1000"]);
    let tally = common::spawn_tally(&args);
    wait_until("health explains the missing broker", || {
        health(&tally).1["reasons"].to_string().contains("no broker reached")
    });
    let (status, body) = health(&tally);
    assert_eq!((status, body["status"].as_str()), (503, Some("catching_up")), "{body}");
    assert_eq!(tally.get("/").0, 503, "an empty view must not look complete");
}

#[test]
fn a_broker_outage_degrades_health_while_the_last_exact_view_is_still_served() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let (records, expected) = simulated(100, 1, 5);
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("outage");
    let dl = dir.join("dl.jsonl");
    let mut args = usage_args(&broker.addr, dl.to_str().unwrap());
    args.extend(["--stale-after-ms", "2000"]);
    let tally = common::spawn_tally(&args);
    tally.wait_for_json("/", &expected, WAIT);
    wait_until("health is ok", || health(&tally).0 == 200);
    drop(broker);
    wait_until("health says degraded", || {
        let (status, body) = health(&tally);
        status == 503 && body["status"] == "degraded"
    });
    assert!(health(&tally).1["reasons"]
        .to_string()
        .contains("no word from the broker"));
    let (status, _, body) = tally.get("/");
    assert_eq!(status, 200, "the view stays served: it is exact as of its timestamp");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap(), expected);
}

fn food(value: &str) -> Rec {
    Rec {
        partition: 0,
        key: None,
        value: Some(value.as_bytes().to_vec()),
        headers: vec![],
    }
}

#[test]
fn failing_sink_commits_degrade_health_until_they_succeed() {
    let broker = Broker::start();
    broker.create_topic("message", 1);
    produce(&broker, "message", &[food(r#"{"food":"pie"}"#)]);
    let dir = common::temp_dir("sink-fails");
    let (db, dl) = (dir.join("data.db"), dir.join("dl.jsonl"));
    let tally = common::spawn_tally(&[
        "food",
        "--brokers",
        &broker.addr,
        "--sqlite",
        db.to_str().unwrap(),
        "--dead-letter",
        dl.to_str().unwrap(),
    ]);
    let counted = |n: i64| move |t: &Tally| t.get("/aggregated").2 == format!(r#"[{{"count":{n},"food":"pie"}}]"#);
    wait_until("pie counted once", || counted(1)(&tally));
    wait_until("health is ok", || health(&tally).0 == 200);
    // Another writer holds the database: every commit fails (busy) until it lets go.
    let mut blocker = rusqlite::Connection::open(&db).unwrap();
    let lock = blocker
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    produce(&broker, "message", &[food(r#"{"food":"pie"}"#)]);
    wait_until("health says the sink fails", || {
        let (status, body) = health(&tally);
        status == 503 && body["status"] == "degraded" && body["reasons"].to_string().contains("sink sqlite")
    });
    lock.commit().unwrap();
    wait_until("pie counted twice, committed after all", || counted(2)(&tally));
    wait_until("health is ok again", || health(&tally).0 == 200);
}

#[test]
fn the_dead_letter_file_is_capped_and_not_appended_again_after_a_restart() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 1);
    let (mut records, expected) = simulated(40, 1, 9);
    // 30 bad records of 10 KB, not valid UTF-8 (kept as base64), between the good ones.
    for i in 0..30 {
        records.insert(
            i * 2,
            Rec {
                partition: 0,
                key: None,
                value: Some(vec![0xff; 10_000]),
                headers: vec![],
            },
        );
    }
    produce(&broker, TOPIC, &records);
    let dir = common::temp_dir("dead-letter-cap");
    let dl = dir.join("dl.jsonl");
    let cap = 65_536u64;
    let mut args = usage_args(&broker.addr, dl.to_str().unwrap());
    let cap_arg = cap.to_string();
    args.extend(["--dead-letter-max-bytes", &cap_arg]);
    let first = common::spawn_tally(&args);
    first.wait_for_json("/", &expected, WAIT);
    first.wait_for_metric(
        "tally_source_dead_letter_total{topic=\"topic.cloud.instances\"}",
        30.0,
        WAIT,
    );
    first.kill();
    let rotated = dir.join("dl.jsonl.1");
    let sizes = || {
        (
            std::fs::metadata(&dl).unwrap().len(),
            std::fs::metadata(&rotated).unwrap().len(),
        )
    };
    let (now, before) = sizes();
    assert!(
        now <= cap && before <= cap,
        "files of {now} and {before} bytes over a cap of {cap}"
    );
    let last_offset = |path: &std::path::Path| -> i64 {
        let text = std::fs::read_to_string(path).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        last["offset"].as_i64().unwrap()
    };
    assert_eq!(last_offset(&dl), 58, "the newest bad record (offset 58) is kept");
    // The usage views rebuild from the earliest offset: the same bad records are read again.
    let second = common::spawn_tally(&args);
    second.wait_for_json("/", &expected, WAIT);
    second.wait_for_metric(
        "tally_source_dead_letter_skipped_total{topic=\"topic.cloud.instances\"}",
        30.0,
        WAIT,
    );
    assert_eq!(
        second.metric("tally_source_dead_letter_total{topic=\"topic.cloud.instances\"}"),
        0.0
    );
    assert_eq!(sizes(), (now, before), "nothing appended again");
}
