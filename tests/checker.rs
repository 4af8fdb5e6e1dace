//! `tally checker` end to end: two shards of one sites file against targets on loopback, results read back
//! from the real broker.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const TOPIC: &str = "website_availability";

/// A target on loopback: `/ok` answers 200 "all ok", anything else 503.
fn target() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let n = s.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if head.starts_with("GET /ok") {
                    ("200 OK", "all ok")
                } else {
                    ("503 Service Unavailable", "down")
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

fn read_all(broker: &Broker, want: usize) -> Vec<serde_json::Value> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", "checker-test")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    while out.len() < want && started.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(v["url"], key, "keyed by the configured URL");
            out.push(v);
        }
    }
    out
}

#[test]
fn two_shards_check_every_site_once_per_slot_on_the_grid() {
    let broker = Broker::start();
    let port = target();
    let dir = common::temp_dir("checker");
    let sites: String = (1..=6)
        .map(|i| {
            let path = if i == 6 { "/down" } else { "/ok" };
            format!("[[site]]\nurl = \"http://127.0.0.1:{port}{path}?site={i}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nregex = \"ok\"\n")
        })
        .collect();
    let file = dir.join("sites.toml");
    std::fs::write(&file, sites).unwrap();
    // Three sites each, three results per site.
    let run = |shard: &str| {
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["checker", "--sites", file.to_str().unwrap(), "--brokers", &broker.addr])
            .args(["--partitions", "2", "--shard", shard, "--count", "9"])
            .env("TALLY_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (run("0/2"), run("1/2"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let results = read_all(&broker, 18);
    assert_eq!(results.len(), 18);
    let mut per_site: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &results {
        let id = r["site_id"].as_u64().unwrap();
        let shard: Vec<u64> = r["shard"]
            .as_str()
            .unwrap()
            .split('/')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(id % 2, shard[0], "site {id} checked by its own shard only");
        per_site
            .entry(id)
            .or_default()
            .push(r["scheduled_at_ms"].as_u64().unwrap());
        if id == 6 {
            assert_eq!(
                (r["outcome"].as_str(), r["error_class"].as_str()),
                (Some("down"), Some("http_status"))
            );
            assert_eq!(r["http_status"], 503);
        } else {
            assert_eq!(r["outcome"], "up", "{r}");
            assert_eq!(
                (r["http_status"].as_u64(), r["regex_matched"].as_bool()),
                (Some(200), Some(true))
            );
            assert_eq!(r["dns_us"], 0, "an IP literal needs no lookup");
            assert!(r["connect_us"].as_u64().unwrap() > 0 && r["ttfb_us"].as_u64().unwrap() > 0);
        }
    }
    assert_eq!(per_site.keys().copied().collect::<BTreeSet<_>>(), (1..=6).collect());
    for (id, mut slots) in per_site {
        slots.sort_unstable();
        assert_eq!(slots.len(), 3, "site {id}");
        for w in slots.windows(2) {
            assert_eq!(w[1] - w[0], 1000, "site {id}: consecutive slots of its grid");
        }
    }
}

#[test]
fn sites_from_postgres_follow_the_table_as_it_changes() {
    let broker = Broker::start();
    let pg = common::Postgres::start();
    let db = pg.database("checker_sites");
    let port = target();
    let mut client = postgres::Client::connect(&db, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA monitoring; {};",
            tally::pipelines::availability::sites::MONITOR_CONFIG_DDL
                .replace("{table}", "monitoring.availability_monitor_config")
        ))
        .unwrap();
    let url = |i: i64| format!("http://127.0.0.1:{port}/ok?site={i}");
    for (id, active) in [(1i64, true), (2, true), (3, false)] {
        client
            .execute(
                "INSERT INTO monitoring.availability_monitor_config (amc_id, amc_url, amc_active, amc_interval_s, amc_timeout_s, amc_regex) VALUES ($1, $2, $3, 1, 1, 'ok')",
                &[&id, &url(id), &active],
            )
            .unwrap();
    }
    let mut checker = common::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "checker",
                "--sites-from-postgres",
                &db,
                "--sites-poll",
                "200ms",
                "--brokers",
                &broker.addr,
            ])
            .args(["--partitions", "2"])
            .env("TALLY_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    // Sites 1 and 2 are checked; then 1 is switched off and 3 on.
    let first = read_all(&broker, 8);
    let ids: BTreeSet<u64> = first.iter().map(|r| r["site_id"].as_u64().unwrap()).collect();
    assert!(ids.is_subset(&BTreeSet::from([1, 2])), "only the active rows: {ids:?}");
    client
        .batch_execute("UPDATE monitoring.availability_monitor_config SET amc_active = (amc_id <> 1)")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut want = first.len() + 1;
    let all = loop {
        let all = read_all(&broker, want);
        want = all.len() + 1;
        let third = all.iter().filter(|r| r["site_id"] == 3).count();
        if third >= 3 {
            break all;
        }
        assert!(Instant::now() < deadline, "site 3 was never checked");
    };
    let slots = |id: u64| -> Vec<u64> {
        all.iter()
            .filter(|r| r["site_id"] == id)
            .map(|r| r["scheduled_at_ms"].as_u64().unwrap())
            .collect()
    };
    // Site 1 stopped at the reload that started site 3: none of its slots comes after site 3's first.
    let three_from = *slots(3).iter().min().unwrap();
    assert!(
        slots(1).iter().all(|s| *s < three_from),
        "site 1 went on: {:?} vs {three_from}",
        slots(1)
    );
    assert!(
        slots(2).iter().any(|s| *s > three_from),
        "site 2 (unchanged) kept its task"
    );
    let _ = checker.0.kill();
}
