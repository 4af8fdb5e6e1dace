//! Test helpers: a real broker started by the project's own `scripts/broker`, the real `tally` binary,
//! and a plain HTTP client. Nothing here skips: a missing service is a loud failure.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    let dir = root().join("tests/fixtures/debezium");
    assert!(dir.is_dir(), "fixtures missing at {}", dir.display());
    dir
}

/// Runs `scripts/<script> start` and returns the address it prints last.
fn start_service(script: &str) -> String {
    let out =
        Command::new(root().join("scripts").join(script)).arg("start").stderr(Stdio::inherit()).output().expect("run the service script");
    assert!(out.status.success(), "scripts/{script} start failed");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    stdout.lines().last().unwrap_or_else(|| panic!("scripts/{script} prints its address last")).trim().to_owned()
}

/// A fresh, empty broker for one test; stopped on drop.
pub struct Broker {
    pub addr: String,
}

/// A fresh MariaDB with a ROW binlog (scripts/mariadb); stopped on drop.
pub struct MariaDb {
    pub addr: String,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        MariaDb { addr: start_service("mariadb") }
    }

    /// The URL `tally simulate` takes.
    pub fn url(&self) -> String {
        format!("mysql://tally:tally@{}", self.addr)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/mariadb")).args(["stop", &self.addr]).status();
    }
}

impl Broker {
    pub fn start() -> Broker {
        Broker { addr: start_service("broker") }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.addr).create().expect("admin client");
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let res =
            futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))))
                .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e:?}"));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/broker")).args(["stop", &self.addr]).status();
    }
}

/// One Kafka record to produce.
#[derive(Clone, Debug)]
pub struct Rec {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

/// Produces records in order and waits until all are acknowledged.
pub fn produce(broker: &Broker, topic: &str, records: &[Rec]) {
    produce_to(&broker.addr, topic, records)
}

/// [`produce`] by bootstrap address, for use from another thread.
pub fn produce_to(addr: &str, topic: &str, records: &[Rec]) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .set("linger.ms", "5")
        .set("acks", "all")
        .set("enable.idempotence", "false")
        .create()
        .expect("producer");
    for r in records {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(r.partition);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            rec = rec.payload(v.as_slice());
        }
        if !r.headers.is_empty() {
            let mut h = OwnedHeaders::new();
            for (k, v) in &r.headers {
                h = h.insert(Header { key: k, value: Some(v.as_str()) });
            }
            rec = rec.headers(h);
        }
        let mut rec = rec;
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, back)) => {
                    assert!(
                        matches!(e, rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)),
                        "produce: {e}"
                    );
                    producer.poll(Duration::from_millis(10));
                    rec = back;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Lines of a `.jsonl` capture as records with their headers (topic filter applied), with partition chosen by
/// `partition`.
pub fn capture_records(path: &Path, topic: &str, partition: impl Fn(&serde_json::Value) -> i32) -> Vec<Rec> {
    std::fs::read_to_string(path)
        .expect("read capture")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("jsonl"))
        .filter(|v| v["topic"] == topic)
        .map(|v| Rec {
            partition: partition(&v),
            key: v["key"].as_str().map(|s| s.as_bytes().to_vec()),
            value: v["value"].as_str().map(|s| s.as_bytes().to_vec()),
            headers: v["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| (h["key"].as_str().expect("header key").to_owned(), h["value"].as_str().unwrap_or_default().to_owned()))
                .collect(),
        })
        .collect()
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `tally` process; killed on drop.
pub struct Tally {
    pub child: Child,
    pub http: String,
}

impl Tally {
    /// Starts `tally <args>` with HTTP on an ephemeral port and waits for it to announce the address.
    pub fn spawn(args: &[&str]) -> Tally {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tally");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("tally announces its address");
        // Keep draining stdout (timely reports cluster connection retries there).
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let http =
            line.split("http://").nth(1).and_then(|s| s.split('/').next()).unwrap_or_else(|| panic!("no address in {line:?}")).to_owned();
        Tally { child, http }
    }

    pub fn get(&self, path: &str) -> (u16, String, String) {
        http_get(&self.http, path)
    }

    /// Polls `GET /` until the body equals `expected` (parsed JSON), or fails with the last body seen.
    pub fn wait_for_json(&self, path: &str, expected: &serde_json::Value, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let (status, _, body) = self.get(path);
            if status == 200 {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                    if &v == expected {
                        return body;
                    }
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {path} to equal\n  {expected}\nlast body:\n  {last}");
    }

    /// Waits until `metric` reaches `value` (metrics update per batch, after the view may already show it).
    pub fn wait_for_metric(&self, metric: &str, value: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.metric(metric) < value {
            assert!(Instant::now() < deadline, "{metric} stayed at {} (< {value})", self.metric(metric));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, _, body) = self.get("/metrics");
        body.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
    }

    /// SIGTERM, then waits (at most 15 s) for tally to exit; returns its status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let term = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill(1)");
        assert!(term.success(), "kill -TERM failed");
        let sent = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, sent.elapsed());
            }
            assert!(sent.elapsed() < Duration::from_secs(15), "tally still running 15 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` over HTTP/1.0: (status, headers, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(addr) else { return (0, String::new(), String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write request");
    let mut raw = String::new();
    if s.read_to_string(&mut raw).is_err() {
        return (0, String::new(), String::new());
    }
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
