//! Timing a fresh tally process as it drains the whole topic, with its memory sampled.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{http_body, metric_sum, poll_until, Tally};

use crate::args::Args;
use crate::{proc_status, sched};

/// A fresh `tally usage` on `topic` with `workers` workers (HTTP on an ephemeral port) and `extra` flags.
pub(crate) fn spawn_tally(brokers: &str, topic: &str, workers: usize, dir: &Path, extra: &str) -> Tally {
    let (workers, dead_letter) = (workers.to_string(), dir.join("dead-letter.jsonl"));
    let mut args = vec!["usage", "--brokers", brokers, "--topic", topic, "-w", &workers];
    args.extend(["--dead-letter", dead_letter.to_str().expect("utf-8 path")]);
    args.extend(extra.split_whitespace());
    Tally::spawn(env!("CARGO_BIN_EXE_tally"), &args)
}

pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

pub(crate) fn status_mb(pid: u32, field: &str) -> Option<f64> {
    proc_status::status_mb(&pid.to_string(), field)
}

/// Samples tally's resident memory and records read every 200 ms until dropped, so memory can be told apart
/// as following records or time: `seconds,records_read,rss_mb` rows.
pub(crate) struct RssSampler {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: Option<std::thread::JoinHandle<Vec<(f64, u64, f64)>>>,
}

impl RssSampler {
    pub(crate) fn start(pid: u32, http: String) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut rows = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let read = http_body(&http, "/metrics").map_or(0, |m| metric_sum(&m, "tally_source_messages_total{"));
                if let Some(rss) = status_mb(pid, "VmRSS:") {
                    rows.push((start.elapsed().as_secs_f64(), read, rss));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            rows
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn finish(mut self) -> Vec<(f64, u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("sampler"))
            .unwrap_or_default()
    }
}

/// Waits until `GET /` equals `expected`. Returns when that happened and when tally's first message was
/// counted in /metrics (the source counts each poll batch as it ends: at most 5 ms after its first poll).
/// `on_first` runs as the first message is seen counted.
pub(crate) fn wait_equal(
    http: &str,
    expected: &serde_json::Value,
    limit: Duration,
    mut on_first: impl FnMut(),
) -> Option<(Instant, Instant)> {
    let mut first = None;
    poll_until(limit, Duration::from_millis(2), || {
        if first.is_none()
            && http_body(http, "/metrics").is_some_and(|m| metric_sum(&m, "tally_source_messages_total{") > 0)
        {
            on_first();
            first = Some(Instant::now());
        }
        let body = http_body(http, "/")?;
        (serde_json::from_str::<serde_json::Value>(&body).ok().as_ref() == Some(expected)).then(|| {
            let done = Instant::now();
            (first.unwrap_or(done), done)
        })
    })
}

/// One timed drain of the whole topic by a fresh tally process.
pub(crate) struct Drain {
    /// From its first message counted to `GET /` equal to the ledger.
    pub(crate) secs: f64,
    /// From process start to its first message counted.
    pub(crate) startup_s: f64,
    pub(crate) peak_mb: Option<f64>,
    pub(crate) drained_mb: f64,
    pub(crate) idle_mb: f64,
    pub(crate) ok: bool,
    pub(crate) samples: Vec<(f64, u64, f64)>,
    /// Where tally's threads spent the drain (`sched::describe`).
    pub(crate) threads: String,
}

pub(crate) fn drain_tally(
    a: &Args,
    brokers: &str,
    topic: &str,
    workers: usize,
    dir: &Path,
    expected: &serde_json::Value,
) -> Drain {
    let start = Instant::now();
    let t = spawn_tally(brokers, topic, workers, dir, &a.tally_args);
    let sampler = RssSampler::start(t.child.id(), t.http.clone());
    let pid = t.child.id().to_string();
    let mut threads0 = sched::Snapshot::default();
    let done = wait_equal(&t.http, expected, Duration::from_secs(900), || {
        threads0 = sched::snapshot(&pid)
    });
    let (first, end) = done.unwrap_or((start, Instant::now()));
    let threads = sched::describe(
        &sched::between(&threads0, &sched::snapshot(&pid)),
        (end - first).as_secs_f64(),
    );
    let peak_mb = peak_rss_mb(t.child.id());
    let drained_mb = status_mb(t.child.id(), "VmRSS:").unwrap_or(0.0);
    std::thread::sleep(Duration::from_secs_f64(a.idle_s));
    let idle_mb = status_mb(t.child.id(), "VmRSS:").unwrap_or(0.0);
    Drain {
        secs: (end - first).as_secs_f64(),
        startup_s: (first - start).as_secs_f64(),
        peak_mb,
        drained_mb,
        idle_mb,
        ok: done.is_some(),
        samples: sampler.finish(),
        threads,
    }
}
