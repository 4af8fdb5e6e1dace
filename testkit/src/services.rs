//! Services the project's own scripts start: a fresh broker (scripts/broker) or MariaDB (scripts/mariadb)
//! per test, stopped on drop.

use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use crate::root;

/// Runs `scripts/<script> start` and returns the address it prints last.
fn start_service(script: &str) -> String {
    let out = Command::new(root().join("scripts").join(script))
        .arg("start")
        .stderr(Stdio::inherit())
        .output()
        .expect("run the service script");
    assert!(out.status.success(), "scripts/{script} start failed");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("scripts/{script} prints its address last"))
        .trim()
        .to_owned()
}

/// A fresh, empty Kafka-protocol broker; stopped on drop.
pub struct Broker {
    /// Its bootstrap address.
    pub addr: String,
}

impl Broker {
    /// Starts one (building and caching the binary on first use).
    pub fn start() -> Broker {
        Broker {
            addr: start_service("broker"),
        }
    }

    /// Creates `topic` with `partitions` partitions through the Admin API.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        create_topic(&self.addr, topic, partitions)
    }

    /// The broker's process id, as `scripts/broker pid` reports it.
    pub fn pid(&self) -> Option<u32> {
        let out = Command::new(root().join("scripts/broker"))
            .args(["pid", &self.addr])
            .stderr(Stdio::inherit())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .ok()
            .filter(|_| out.status.success())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/broker"))
            .args(["stop", &self.addr])
            .status();
    }
}

/// Creates `topic` with `partitions` partitions on the broker at `addr`, through the Admin API.
pub fn create_topic(addr: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .expect("admin client");
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = futures::executor::block_on(admin.create_topics(
        [&t],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))
    .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e:?}"));
    }
}

/// A fresh MariaDB with a ROW binlog (scripts/mariadb); stopped on drop.
pub struct MariaDb {
    /// Its `host:port`.
    pub addr: String,
}

impl MariaDb {
    /// Starts one.
    pub fn start() -> MariaDb {
        MariaDb {
            addr: start_service("mariadb"),
        }
    }

    /// The URL `tally simulate` takes.
    pub fn url(&self) -> String {
        format!("mysql://tally:tally@{}", self.addr)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/mariadb"))
            .args(["stop", &self.addr])
            .status();
    }
}
