//! Freshness at fixed offered rates: probes over background traffic, and where the CPU went.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::producer::{DefaultProducerContext, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tally::tools::sim::{debezium_records, SimEvent, SimRow};
use testkit::{http_body, poll_until, Workload};

use crate::cpu_ticks;
use crate::load::*;

/// CPU time so far: the whole machine's busy and total jiffies (/proc/stat), and user+system jiffies of
/// each process asked for (0 for one that is gone or unknown).
pub(crate) struct CpuTimes {
    pub(crate) busy: u64,
    pub(crate) total: u64,
    pub(crate) procs: Vec<u64>,
}

impl CpuTimes {
    pub(crate) fn now(pids: &[Option<u32>]) -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let procs = pids
            .iter()
            .map(|pid| pid.map_or(0, |p| cpu_ticks::cpu_ticks(&p.to_string())))
            .collect();
        CpuTimes {
            busy: total - idle,
            total,
            procs,
        }
    }

    /// The machine's busy share since `earlier`, and the cores each process used over `secs`.
    pub(crate) fn since(&self, earlier: &CpuTimes, secs: f64) -> (f64, Vec<f64>) {
        let ticks_per_s = 100.0; // USER_HZ on Linux
        let busy = (self.busy - earlier.busy) as f64 / (self.total - earlier.total).max(1) as f64;
        let cores = self
            .procs
            .iter()
            .zip(&earlier.procs)
            .map(|(a, b)| a.saturating_sub(*b) as f64 / ticks_per_s / secs)
            .collect();
        (busy, cores)
    }
}

/// Sets the calling thread's niceness (on Linux niceness is per thread, and threads it starts inherit it),
/// with util-linux `renice` on its thread id: the project forbids `unsafe`, so no `setpriority` here.
pub(crate) fn renice_this_thread(nice: i32) -> Result<(), String> {
    let link = std::fs::read_link("/proc/thread-self").map_err(|e| format!("/proc/thread-self: {e}"))?;
    let tid = link
        .file_name()
        .and_then(|t| t.to_str())
        .ok_or("no thread id")?
        .to_owned();
    let out = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &tid])
        .output()
        .map_err(|e| format!("renice: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("renice: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The change of a Prometheus histogram between two scrapes: cumulative counts per bucket upper bound.
pub(crate) struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    pub(crate) fn buckets(text: &str, name: &str) -> BTreeMap<u64, f64> {
        let prefix = format!("{name}_bucket{{");
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
            if let (Some(le), Some(count)) = (le, count) {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                *out.entry(bound.to_bits()).or_default() += count;
            }
        }
        out
    }

    pub(crate) fn between(before: &str, after: &str, name: &str) -> Histogram {
        let (b, a) = (Self::buckets(before, name), Self::buckets(after, name));
        let mut v: Vec<(f64, f64)> = a
            .iter()
            .map(|(le, n)| (f64::from_bits(*le), n - b.get(le).copied().unwrap_or(0.0)))
            .collect();
        v.sort_by(|x, y| x.0.total_cmp(&y.0));
        Histogram(v)
    }

    /// The upper bound of the bucket holding quantile `q` (NaN without observations).
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        let total = self.0.last().map_or(0.0, |b| b.1);
        if total <= 0.0 {
            return f64::NAN;
        }
        self.0.iter().find(|(_, n)| *n >= q * total).map_or(f64::NAN, |b| b.0)
    }
}

/// Records when the broker acknowledged the last record sent through this producer.
pub(crate) struct AckClock(Arc<Mutex<Option<Instant>>>);

impl ClientContext for AckClock {}

impl ProducerContext for AckClock {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            *self.0.lock().expect("lock") = Some(Instant::now());
        }
    }
}

/// How the freshness phases' background generator runs (see the --generator-* options).
#[derive(Clone)]
pub(crate) struct Generator {
    pub(crate) nice: i32,
    pub(crate) linger_ms: u64,
    pub(crate) compression: String,
}

/// One freshness phase.
pub(crate) struct Phase {
    /// Background records handed to the producer per second, and those the broker had acknowledged by the
    /// phase's end per second (the rest were still queued in the producer: the generator fell behind).
    pub(crate) handed: f64,
    pub(crate) delivered: f64,
    /// Probe latencies (ms): handed to the producer -> visible in `GET /`; -> acknowledged by the broker;
    /// acknowledged -> visible (tally's fetch, tick and publish, plus the 1 ms polling).
    pub(crate) total: Vec<f64>,
    pub(crate) ack: Vec<f64>,
    pub(crate) after_ack: Vec<f64>,
    pub(crate) missed: usize,
    /// Whether the generator got the niceness asked for.
    pub(crate) reniced: Result<(), String>,
}

/// Freshness at an offered rate: background workload traffic at `rate` records/s, and one probe at a time
/// (a deploy for a new organization), timed from handing it to the producer until `GET /` shows it, with the
/// broker's acknowledgement in between.
/// `phase_no` numbers the phases on one topic: each tally reads the earlier phases' probes too, so every
/// phase's probes need rows and organizations of their own.
pub(crate) fn freshness(
    target: &Target<'_>,
    http: &str,
    workload: &mut Workload,
    phase_no: usize,
    rate: f64,
    probes: usize,
    generator: &Generator,
) -> Phase {
    let Generator {
        nice,
        linger_ms,
        compression,
    } = generator.clone();
    let Target {
        brokers,
        topic,
        partitions,
        schemas,
    } = *target;
    let stop = Arc::new(AtomicBool::new(false));
    // Probes go to their own partition (the topic has one past the workload's) through their own producer:
    // behind the background producer's backlog, a probe measured the load generator, not tally; and on a
    // shared partition a probe's binlog position could overtake background events, which tally then drops
    // as re-deliveries. One request in flight keeps each producer's records in position order on retries.
    // The background thread generates as it sends (holding a phase of 2.4 KB records at 200k/s ran the
    // machine out of memory) and hands the workload back at the end, with (handed, delivered) counts. It
    // lowers its priority before it creates its producer, whose threads inherit it.
    let probe_ts = workload.ts_s;
    let mut owned = std::mem::replace(workload, Workload::new(0, 1, 1, 0.0, 1));
    let bg = std::thread::spawn({
        let (stop, topic, brokers) = (stop.clone(), topic.to_owned(), brokers.to_owned());
        move || {
            let reniced = if nice == 0 { Ok(()) } else { renice_this_thread(nice) };
            let p: ThreadedProducer<DefaultProducerContext> = producer_config(&brokers)
                .set("max.in.flight.requests.per.connection", "1")
                .set("linger.ms", linger_ms.to_string())
                .set("compression.type", &compression)
                .create()
                .expect("producer");
            let start = Instant::now();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // Paced in 1 ms slices: sleeping per record cannot reach tens of thousands per second.
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(wait) = due
                    .checked_duration_since(Instant::now())
                    .filter(|w| *w > Duration::from_millis(1))
                {
                    std::thread::sleep(wait);
                }
                let (event, ts) = owned.next_event();
                let id = event.row().id;
                for (k, v) in debezium_records(&event, ts, next_pos(), schemas) {
                    send(&p, &topic, partitions, &((id % 4) as i32, k, v));
                    i += 1;
                }
            }
            let delivered = i.saturating_sub(p.in_flight_count().max(0) as usize);
            p.flush(Duration::from_secs(60)).ok();
            (owned, i, delivered, reniced)
        }
    });
    // The probe is sent at once (no linger): its latency is tally's and the broker's, not batching's.
    let acked = Arc::new(Mutex::new(None));
    let p: ThreadedProducer<AckClock> = producer_config(brokers)
        .set("max.in.flight.requests.per.connection", "1")
        .set("linger.ms", "0")
        .create_with_context(AckClock(acked.clone()))
        .expect("producer");
    let (mut total, mut ack, mut after_ack, mut missed) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let phase = Instant::now();
    for k in 0..probes {
        let org = format!("probe-{phase_no}-{k:04}");
        let row = SimRow {
            id: 10_000_000_000 + phase_no as u64 * 1_000_000 + k as u64,
            org: org.clone(),
            instance: "probe".into(),
            price: 1,
            started_s: probe_ts,
        };
        let rec = debezium_records(&SimEvent::Deploy(row.clone()), probe_ts, next_pos(), schemas).remove(0);
        *acked.lock().expect("lock") = None;
        let t0 = Instant::now();
        send(&p, topic, partitions + 1, &(partitions, rec.0, rec.1));
        p.flush(Duration::from_secs(0)).ok();
        let seen = poll_until(Duration::from_secs(10), Duration::from_millis(1), || {
            http_body(http, "/")
                .filter(|b| b.contains(&org))
                .map(|_| Instant::now())
        });
        if seen.is_none() {
            missed += 1;
        }
        let seen = seen.unwrap_or_else(Instant::now);
        total.push((seen - t0).as_secs_f64() * 1e3);
        // The delivery report can trail the view by the producer thread's poll; wait for it briefly.
        let acked_at = poll_until(Duration::from_secs(2), Duration::from_millis(1), || {
            *acked.lock().expect("lock")
        });
        if let Some(at) = acked_at {
            ack.push((at - t0).as_secs_f64() * 1e3);
            after_ack.push(seen.saturating_duration_since(at).as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = phase.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (owned, handed, delivered, reniced) = bg.join().expect("background producer");
    *workload = owned;
    for v in [&mut total, &mut ack, &mut after_ack] {
        v.sort_by(f64::total_cmp);
    }
    Phase {
        handed: handed as f64 / elapsed,
        delivered: delivered as f64 / elapsed,
        total,
        ack,
        after_ack,
        missed,
        reniced,
    }
}

/// Waits until tally has read every partition to its end: one marker deploy per partition, all visible.
pub(crate) fn catch_up(target: &Target<'_>, http: &str, tag: &str, ts: i64) -> bool {
    let Target {
        brokers,
        topic,
        partitions,
        schemas,
    } = *target;
    let p = producer(brokers);
    let orgs: Vec<String> = (0..partitions).map(|i| format!("{tag}-{i}")).collect();
    for (i, org) in orgs.iter().enumerate() {
        let row = SimRow {
            id: 20_000_000_000 + i as u64,
            org: org.clone(),
            instance: "sync".into(),
            price: 1,
            started_s: ts,
        };
        let (k, v) = debezium_records(&SimEvent::Deploy(row), ts, next_pos(), schemas).remove(0);
        send(&p, topic, partitions, &(i as i32, k, v));
    }
    p.flush(Duration::from_secs(30)).ok();
    let all_visible = || {
        http_body(http, "/")
            .filter(|b| orgs.iter().all(|o| b.contains(o.as_str())))
            .map(|_| ())
    };
    poll_until(Duration::from_secs(900), Duration::from_millis(20), all_visible).is_some()
}
