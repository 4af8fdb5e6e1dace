//! Support shared by tally's tests and benchmarks (dev-only): a real broker started by the project's own
//! `scripts/broker`, the real `tally` binary as a child process, producing records, a plain HTTP client,
//! and the workloads with their independent ledgers. Nothing here skips: a missing service is a loud
//! failure.

pub mod http;
pub mod process;
pub mod produce;
pub mod services;
pub mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use http::{header, http_body, http_get, metric_sum};
pub use process::{KillOnDrop, Tally};
pub use produce::{capture_records, produce, produce_to, send_retrying, Rec};
pub use services::{create_topic, Broker, MariaDb, Postgres};
pub use workload::{simulated, simulated_steps, Ledger, Workload};

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Debezium fixtures (generated and captured), inside the repository.
pub fn fixtures() -> PathBuf {
    let dir = root().join("tests/fixtures/debezium");
    assert!(dir.is_dir(), "fixtures missing at {}", dir.display());
    dir
}

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A timely hostfile in `dir` for a cluster of `processes` on loopback, each at a port the system just
/// handed out (then freed: timely binds them itself, so another process could take one in between).
pub fn cluster_hostfile(dir: &std::path::Path, processes: usize) -> PathBuf {
    let hosts: String = (0..processes)
        .map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            format!("127.0.0.1:{port}\n")
        })
        .collect();
    let path = dir.join("hosts");
    std::fs::write(&path, hosts).expect("write the hostfile");
    path
}

/// Calls `check` every `every` until it gives a value, or gives up once `limit` has passed.
pub fn poll_until<T>(limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}
