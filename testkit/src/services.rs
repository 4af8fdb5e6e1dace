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

/// A PostgreSQL server for a test: the one `TALLY_TEST_POSTGRES` names (an admin URL), else a private
/// one from scripts/postgres, stopped on drop. Each test makes its own databases on it.
pub struct Postgres {
    /// Admin URL (`postgres://postgres@127.0.0.1:PORT/postgres`).
    pub url: String,
    private: bool,
}

impl Postgres {
    /// Uses `TALLY_TEST_POSTGRES` or starts a private server.
    pub fn start() -> Postgres {
        match std::env::var("TALLY_TEST_POSTGRES") {
            Ok(url) if !url.is_empty() => Postgres { url, private: false },
            _ => Postgres {
                url: start_service("postgres"),
                private: true,
            },
        }
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        match self.url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => format!("{}/{name}", self.url),
        }
    }

    /// A fresh, empty database (dropped first if a previous run left it); its URL.
    pub fn database(&self, name: &str) -> String {
        let mut admin = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to the test PostgreSQL");
        // Two statements: a multi-statement string runs as one transaction, which DROP DATABASE refuses.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .expect("drop a test database a previous run left");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create the test database");
        self.url_of(name)
    }

    /// A fresh database holding the rates dump; its URL.
    pub fn rates_database(&self, name: &str) -> String {
        let url = self.database(name);
        let out = Command::new("psql")
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(root().join("data/rates.sql"))
            .arg(&url)
            .stdout(Stdio::null())
            .output()
            .expect("run psql (scripts/postgres install provides it)");
        assert!(
            out.status.success(),
            "loading data/rates.sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        url
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.private {
            let _ = Command::new(root().join("scripts/postgres"))
                .args(["stop", &self.url])
                .status();
        }
    }
}
