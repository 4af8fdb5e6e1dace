//! Event-rate benchmark: how fast tally is, side by side with what users would pick instead, in one run,
//! on the same broker and the same events. Every system's result is checked against the workload's own
//! ledger, so nobody wins by computing less.
//!
//!   cargo bench --bench event_rate -- [--events N] [--running N] [--orgs N] [--updates F] [--workers 1,2]
//!                                     [--schemas on,off] [--rates 0.1,0.25,0.5] [--skip-python] [--skip-engine]
//!                                     [--python kafka-python,pathway,bytewax] [--repeat 3] [--idle-s 5]
//!                                     [--tally-args "..."] [--rate-of N] [--probes N] [--generator-nice N]
//!                                     [--generator-linger-ms N] [--generator-compression lz4|none|...] [--out DIR]
//!
//! The floors and tally's drains run `--repeat` times, interleaved, and report the median run.
//! Measures, per schema setting: producing into the broker; the broker's own consume rate (no parsing);
//! the parse-and-count floor (rdkafka + tally's typed decoder + the upsert logic in a HashMap, no
//! dataflow); tally end to end for each worker count (drain: its first message read until `GET /` equals
//! the ledger, as the other consumers are timed from their first poll; peak RSS and RSS sampled every 200 ms;
//! freshness p50/p99 at fixed offered rates); tally's engine alone (decoded changes fed
//! straight into the dataflow) and decoding alone; and, unless `--skip-python`, the alternatives a user
//! would weigh, each computing the same three numbers (scripts/bench-deps installs them): the spec's
//! stack (a kafka-python consumer, timed from its first poll), Pathway (timed over `pw.run`, static mode)
//! and Bytewax (timed over `run_main`, tail=False). Each reports its own peak RSS.
//! Writes `results.md`, `results.csv`, `rss-*.csv` and (with matplotlib) `throughput.png`, `freshness.png`,
//! `memory.png` to `--out`.

#[path = "support/cpu_ticks.rs"]
mod cpu_ticks;
#[path = "support/proc_status.rs"]
mod proc_status;
#[path = "support/sched.rs"]
mod sched;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use dataflows::usage::{Change, Delta, UpsertState, Usage};
use differential_dataflow::difference::Semigroup;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tally::sim::{debezium_records, Ledger, SimEvent, SimRow, Workload};
use tally::sources::debezium::{DebeziumDecoder, Decoded, Meta};
use tally::sources::kafka::{client_config, KafkaConfig};

/// The allocator tally itself runs with, so the floor and the engine-only rows compare like with like.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Change events to generate (each delete adds a tombstone record).
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Rows kept running (the state tally must hold).
    #[arg(long, default_value_t = 20_000)]
    running: usize,
    /// Organizations.
    #[arg(long, default_value_t = 100)]
    orgs: usize,
    /// Share of events that are price updates (the rest, past the fill, are destroy/deploy pairs).
    #[arg(long, default_value_t = 0.2)]
    updates: f64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Worker counts to measure tally with.
    #[arg(long, default_value = "1,2")]
    workers: String,
    /// Schema settings to measure: on (3.7 KB records), off (0.6 KB).
    #[arg(long, default_value = "on,off")]
    schemas: String,
    /// Offered rates for freshness, as fractions of tally's measured drain rate; "" skips freshness.
    #[arg(long, default_value = "0.1,0.25,0.5")]
    rates: String,
    /// Records/s the --rates fractions apply to, instead of each run's measured drain rate (to compare
    /// settings at the same offered load: drain rates here vary about 30% between runs).
    #[arg(long)]
    rate_of: Option<f64>,
    /// Freshness probes per offered rate.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    #[arg(long)]
    skip_python: bool,
    /// Skip decode-only and engine-only (they hold every record decoded in memory: for very large runs).
    #[arg(long)]
    skip_engine: bool,
    /// Which Python alternatives to run: kafka-python, pathway, bytewax.
    #[arg(long, default_value = "kafka-python,pathway,bytewax")]
    python: String,
    /// Extra arguments for every tally process, whitespace-separated (e.g. "--kafka-property k=v --tick-ms 10").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    tally_args: String,
    /// Timed drains of the floors and of tally per worker count, interleaved; rows report the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// After each drain, keep sampling tally's memory this many seconds with no traffic.
    #[arg(long, default_value_t = 5.0)]
    idle_s: f64,
    /// Niceness of the freshness phases' background generator (its thread and its producer's threads): the
    /// generator stands in for producers on other machines, so it yields the cores to the broker and tally.
    /// 0 keeps it at tally's priority.
    #[arg(long, default_value_t = 19)]
    generator_nice: i32,
    /// How long the background generator's producer batches records (librdkafka `linger.ms`) in the
    /// freshness phases. The broker here (nisshi, in memory) costs about 2 ms of CPU per produce request
    /// whatever its size, on the cores tally uses: at 5 ms it took 0.5-0.6 cores, at 50 ms 0.13-0.25.
    /// The probes are sent at once regardless.
    #[arg(long, default_value_t = 50)]
    generator_linger_ms: u64,
    /// Compression of the background generator's batches (librdkafka `compression.type`: none, lz4, zstd...).
    /// lz4, as a Kafka Connect worker can send (`producer.compression.type`): uncompressed, generator and
    /// broker on this machine's 2 cores delivered only 90k of 155-166k/s 2.4 KB records offered (broker
    /// 0.85-0.87 cores); lz4 delivered 99.7% of 173-177k/s with the broker at 0.36-0.47 cores
    /// (bench-results/generator-compression/). tally then decompresses too: more work for it, not less.
    #[arg(long, default_value = "lz4")]
    generator_compression: String,
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Broker(String);
impl Broker {
    /// The broker's process id, as `scripts/broker pid` reports it.
    fn pid(&self) -> Option<u32> {
        let out = Command::new(root().join("scripts/broker")).args(["pid", &self.0]).stderr(Stdio::inherit()).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|_| out.status.success())
    }

    fn start() -> Broker {
        let out = Command::new(root().join("scripts/broker")).arg("start").stderr(Stdio::inherit()).output().expect("scripts/broker");
        assert!(out.status.success(), "scripts/broker start failed");
        Broker(String::from_utf8_lossy(&out.stdout).lines().last().expect("address").trim().to_owned())
    }
}
impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/broker")).args(["stop", &self.0]).status();
    }
}

/// One measured row of the report.
#[derive(Clone, Debug)]
struct Row {
    system: String,
    schemas: String,
    workers: usize,
    events: usize,
    seconds: f64,
    rss_mb: Option<f64>,
    agrees: Option<bool>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

struct Fresh {
    schemas: String,
    workers: usize,
    offered: f64,
    handed: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    after_p50_ms: f64,
    after_p99_ms: f64,
    /// From tally's histogram over the phase (a bucket's upper bound): timestamp closed -> view shows it.
    publish_p99_ms: f64,
    /// Over the phase: the machine's busy share of all its cores, and the cores tally, the broker and the
    /// harness (background generator, probes and polling) used.
    machine_busy: f64,
    tally_cores: f64,
    broker_cores: f64,
    harness_cores: f64,
}

impl Fresh {
    /// The phase's figures in the CSV's column order.
    fn numbers(&self) -> [f64; 14] {
        [
            self.offered,
            self.handed,
            self.delivered,
            self.p50_ms,
            self.p99_ms,
            self.ack_p50_ms,
            self.ack_p99_ms,
            self.after_p50_ms,
            self.after_p99_ms,
            self.publish_p99_ms,
            self.machine_busy,
            self.tally_cores,
            self.broker_cores,
            self.harness_cores,
        ]
    }
}

/// CPU time so far: the whole machine's busy and total jiffies (/proc/stat), and user+system jiffies of
/// each process asked for (0 for one that is gone or unknown).
struct CpuTimes {
    busy: u64,
    total: u64,
    procs: Vec<u64>,
}

impl CpuTimes {
    fn now(pids: &[Option<u32>]) -> CpuTimes {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        let procs = pids.iter().map(|pid| pid.map_or(0, |p| cpu_ticks::cpu_ticks(&p.to_string()))).collect();
        CpuTimes { busy: total - idle, total, procs }
    }

    /// The machine's busy share since `earlier`, and the cores each process used over `secs`.
    fn since(&self, earlier: &CpuTimes, secs: f64) -> (f64, Vec<f64>) {
        let ticks_per_s = 100.0; // USER_HZ on Linux
        let busy = (self.busy - earlier.busy) as f64 / (self.total - earlier.total).max(1) as f64;
        let cores = self.procs.iter().zip(&earlier.procs).map(|(a, b)| a.saturating_sub(*b) as f64 / ticks_per_s / secs).collect();
        (busy, cores)
    }
}

/// Sets the calling thread's niceness (on Linux niceness is per thread, and threads it starts inherit it),
/// with util-linux `renice` on its thread id: the project forbids `unsafe`, so no `setpriority` here.
fn renice_this_thread(nice: i32) -> Result<(), String> {
    let link = std::fs::read_link("/proc/thread-self").map_err(|e| format!("/proc/thread-self: {e}"))?;
    let tid = link.file_name().and_then(|t| t.to_str()).ok_or("no thread id")?.to_owned();
    let out = Command::new("renice").args(["-n", &nice.to_string(), "-p", &tid]).output().map_err(|e| format!("renice: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("renice: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

type Records = Vec<(i32, String, Option<String>)>;

/// Where traffic goes and how it is encoded, for the phases that produce while tally runs.
#[derive(Clone, Copy)]
struct Target<'a> {
    brokers: &'a str,
    topic: &'a str,
    partitions: i32,
    schemas: bool,
}

/// Binlog positions handed out in commit order, as a real binlog does: tally treats an event at or before
/// a position it already applied (per partition) as a re-delivery.
static POS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(4);
fn next_pos() -> u64 {
    POS.fetch_add(300, Ordering::Relaxed)
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    producer_config(brokers).create().expect("producer")
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "2000000");
    c
}

fn send<C: ProducerContext<DeliveryOpaque = ()> + 'static>(
    p: &ThreadedProducer<C>,
    topic: &str,
    partitions: i32,
    (part, k, v): &(i32, String, Option<String>),
) {
    let mut rec = BaseRecord::<String, String>::to(topic).key(k).partition(part % partitions);
    if let Some(v) = v {
        rec = rec.payload(v);
    }
    let mut rec = rec;
    loop {
        match p.send(rec) {
            Ok(()) => return,
            // The producer's queue is full: wait for deliveries to make room. Any other error would repeat forever.
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                std::thread::sleep(Duration::from_millis(1));
                rec = back;
            }
            Err((e, _)) => panic!("bench: producing to {topic} failed: {e}"),
        }
    }
}

/// The generated workload, as produced into the broker.
struct Loaded {
    /// Every record, kept only when decode-only will read them again.
    records: Records,
    n: usize,
    bytes: usize,
    /// Generating and producing, until the broker acknowledged the last record.
    produce_s: f64,
    expected: serde_json::Value,
    workload: Workload,
}

/// Creates the topic, then generates the workload and produces it as it goes (holding 10M records would
/// take the memory the broker needs); `keep` also returns the records.
fn generate_and_load(a: &Args, schemas: bool, brokers: &str, topic: &str, keep: bool) -> Loaded {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin");
    // One partition past the workload's, for the freshness probes alone.
    let t = NewTopic::new(topic, a.partitions + 1, TopicReplication::Fixed(1));
    for r in futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new())).expect("create topic") {
        r.expect("topic created");
    }
    let p = producer(brokers);
    let mut workload = Workload::new(42, a.orgs, a.running, a.updates, 50);
    let mut ledger = Ledger::default();
    let mut records = Vec::new();
    let (mut n, mut bytes) = (0, 0);
    let start = Instant::now();
    for _ in 0..a.events {
        let (event, ts) = workload.next_event();
        ledger.apply(&event, ts);
        let id = event.row().id;
        for (k, v) in debezium_records(&event, ts, next_pos(), schemas) {
            n += 1;
            bytes += k.len() + v.as_ref().map_or(0, String::len);
            let rec = ((id % 4) as i32, k, v);
            send(&p, topic, a.partitions, &rec);
            if keep {
                records.push(rec);
            }
        }
    }
    p.flush(Duration::from_secs(600)).expect("flush");
    Loaded { records, n, bytes, produce_s: start.elapsed().as_secs_f64(), expected: ledger.to_json(), workload }
}

/// A consumer with tally's own librdkafka settings, so the floors read exactly as tally does.
fn consumer(brokers: &str, topic: &str, partitions: i32) -> BaseConsumer {
    let cfg = KafkaConfig {
        brokers: brokers.into(),
        topic: topic.into(),
        group_id: "bench-floor".into(),
        client_id: "bench-floor".into(),
        properties: Vec::new(),
        start_offsets: HashMap::new(),
    };
    let c: BaseConsumer = client_config(&cfg).create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    c.assign(&tpl).expect("assign");
    c
}

/// The broker's own consume rate: read every record, no parsing.
fn broker_floor(brokers: &str, topic: &str, partitions: i32, n: usize) -> f64 {
    let c = consumer(brokers, topic, partitions);
    let mut seen = 0;
    let mut start = None;
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            std::hint::black_box(m.payload());
            seen += 1;
        }
    }
    start.map_or(0.0, |s| s.elapsed().as_secs_f64())
}

fn render(usage: &HashMap<String, Usage>) -> serde_json::Value {
    let sorted: BTreeMap<String, Usage> =
        usage.iter().filter(|(_, u)| u.started != 0 || u.running != 0 || !u.billing.is_zero()).map(|(k, v)| (k.clone(), *v)).collect();
    serde_json::from_str(&tally::runtime::render_usage(&sorted)).expect("json")
}

fn accumulate(usage: &mut HashMap<String, Usage>, deltas: &mut Vec<(Delta, isize)>) {
    for (d, r) in deltas.drain(..) {
        let (org, u) = match d {
            Delta::Running(org) => (org, Usage { running: r as i64, ..Usage::default() }),
            Delta::Started(org) => (org, Usage { started: r as i64, ..Usage::default() }),
            Delta::Billed(org, amount) => (org, Usage { billing: amount.times(r as i64), ..Usage::default() }),
            Delta::Note(_) => continue,
        };
        usage.entry(org).or_default().plus_equals(&u);
    }
}

/// rdkafka + tally's typed decoder + the upsert logic over a HashMap: the practical limit, no dataflow.
/// Also returns where the harness's threads (this one and its consumer's) spent the time.
fn parse_and_count_floor(brokers: &str, topic: &str, partitions: i32, n: usize) -> (f64, serde_json::Value, String) {
    let c = consumer(brokers, topic, partitions);
    let mut decoder = DebeziumDecoder::new(None);
    let mut state = UpsertState::default();
    let mut usage: HashMap<String, Usage> = HashMap::new();
    let mut deltas = Vec::new();
    let (mut seen, mut start, mut threads0) = (0, None, sched::Snapshot::default());
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(|| {
                threads0 = sched::snapshot("self");
                Instant::now()
            });
            seen += 1;
            let meta = Meta { partition: m.partition(), offset: m.offset(), ..Meta::default() };
            if let Ok(Decoded::Change(change)) = decoder.decode(m.key(), m.payload(), meta) {
                state.apply(change, &mut deltas);
                accumulate(&mut usage, &mut deltas);
            }
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let threads = sched::describe(&sched::between(&threads0, &sched::snapshot("self")), secs);
    (secs, render(&usage), threads)
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    status_mb(pid, "VmHWM:")
}

fn status_mb(pid: u32, field: &str) -> Option<f64> {
    proc_status::status_mb(&pid.to_string(), field)
}

struct TallyProc {
    child: Child,
    http: String,
}
impl Drop for TallyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_tally(brokers: &str, topic: &str, workers: usize, dir: &Path, extra: &str) -> TallyProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["usage", "--brokers", brokers, "--topic", topic, "-w", &workers.to_string(), "--listen", "127.0.0.1:0"])
        .args(["--dead-letter", dir.join("dead-letter.jsonl").to_str().expect("utf-8 path")])
        .args(extra.split_whitespace())
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tally");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("address line");
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let http = line.split("http://").nth(1).and_then(|s| s.split('/').next()).expect("address").to_owned();
    TallyProc { child, http }
}

/// Samples tally's resident memory and records read every 200 ms until dropped, so memory can be told apart
/// as following records or time: `seconds,records_read,rss_mb` rows.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, u64, f64)>>>,
}

impl RssSampler {
    fn start(pid: u32, http: String) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut rows = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let read = http_get(&http, "/metrics").map_or(0, |m| metric_sum(&m, "tally_source_messages_total{"));
                if let Some(rss) = status_mb(pid, "VmRSS:") {
                    rows.push((start.elapsed().as_secs_f64(), read, rss));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            rows
        });
        RssSampler { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<(f64, u64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join().expect("sampler")).unwrap_or_default()
    }
}

/// The sum of every sample of a Prometheus metric whose line starts with `prefix`.
fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() as u64
}

/// The change of a Prometheus histogram between two scrapes: cumulative counts per bucket upper bound.
struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    fn buckets(text: &str, name: &str) -> BTreeMap<u64, f64> {
        let prefix = format!("{name}_bucket{{");
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let le = line.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
            if let (Some(le), Some(count)) = (le, count) {
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
                *out.entry(bound.to_bits()).or_default() += count;
            }
        }
        out
    }

    fn between(before: &str, after: &str, name: &str) -> Histogram {
        let (b, a) = (Self::buckets(before, name), Self::buckets(after, name));
        let mut v: Vec<(f64, f64)> = a.iter().map(|(le, n)| (f64::from_bits(*le), n - b.get(le).copied().unwrap_or(0.0))).collect();
        v.sort_by(|x, y| x.0.total_cmp(&y.0));
        Histogram(v)
    }

    /// The upper bound of the bucket holding quantile `q` (NaN without observations).
    fn quantile(&self, q: f64) -> f64 {
        let total = self.0.last().map_or(0.0, |b| b.1);
        if total <= 0.0 {
            return f64::NAN;
        }
        self.0.iter().find(|(_, n)| *n >= q * total).map_or(f64::NAN, |b| b.0)
    }
}

/// Waits until `GET /` equals `expected`. Returns when that happened and when tally's first message was
/// counted in /metrics (the source counts each poll batch as it ends: at most 5 ms after its first poll).
/// `on_first` runs as the first message is seen counted.
fn wait_equal(http: &str, expected: &serde_json::Value, limit: Duration, mut on_first: impl FnMut()) -> Option<(Instant, Instant)> {
    let mut first = None;
    poll_until(limit, Duration::from_millis(2), || {
        if first.is_none() && http_get(http, "/metrics").is_some_and(|m| metric_sum(&m, "tally_source_messages_total{") > 0) {
            on_first();
            first = Some(Instant::now());
        }
        let body = http_get(http, "/")?;
        (serde_json::from_str::<serde_json::Value>(&body).ok().as_ref() == Some(expected)).then(|| {
            let done = Instant::now();
            (first.unwrap_or(done), done)
        })
    })
}

/// Calls `check` every `every` until it gives a value, or gives up once `limit` has passed.
fn poll_until<T>(limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
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

/// Records when the broker acknowledged the last record sent through this producer.
struct AckClock(Arc<Mutex<Option<Instant>>>);
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
struct Generator {
    nice: i32,
    linger_ms: u64,
    compression: String,
}

/// One freshness phase.
struct Phase {
    /// Background records handed to the producer per second, and those the broker had acknowledged by the
    /// phase's end per second (the rest were still queued in the producer: the generator fell behind).
    handed: f64,
    delivered: f64,
    /// Probe latencies (ms): handed to the producer -> visible in `GET /`; -> acknowledged by the broker;
    /// acknowledged -> visible (tally's fetch, tick and publish, plus the 1 ms polling).
    total: Vec<f64>,
    ack: Vec<f64>,
    after_ack: Vec<f64>,
    missed: usize,
    /// Whether the generator got the niceness asked for.
    reniced: Result<(), String>,
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// Freshness at an offered rate: background workload traffic at `rate` records/s, and one probe at a time
/// (a deploy for a new organization), timed from handing it to the producer until `GET /` shows it, with the
/// broker's acknowledgement in between.
/// `phase_no` numbers the phases on one topic: each tally reads the earlier phases' probes too, so every
/// phase's probes need rows and organizations of their own.
fn freshness(
    target: &Target<'_>,
    http: &str,
    workload: &mut Workload,
    phase_no: usize,
    rate: f64,
    probes: usize,
    generator: &Generator,
) -> Phase {
    let Generator { nice, linger_ms, compression } = generator.clone();
    let Target { brokers, topic, partitions, schemas } = *target;
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
                if let Some(wait) = due.checked_duration_since(Instant::now()).filter(|w| *w > Duration::from_millis(1)) {
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
            http_get(http, "/").filter(|b| b.contains(&org)).map(|_| Instant::now())
        });
        if seen.is_none() {
            missed += 1;
        }
        let seen = seen.unwrap_or_else(Instant::now);
        total.push((seen - t0).as_secs_f64() * 1e3);
        // The delivery report can trail the view by the producer thread's poll; wait for it briefly.
        let acked_at = poll_until(Duration::from_secs(2), Duration::from_millis(1), || *acked.lock().expect("lock"));
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
    Phase { handed: handed as f64 / elapsed, delivered: delivered as f64 / elapsed, total, ack, after_ack, missed, reniced }
}

/// Waits until tally has read every partition to its end: one marker deploy per partition, all visible.
fn catch_up(target: &Target<'_>, http: &str, tag: &str, ts: i64) -> bool {
    let Target { brokers, topic, partitions, schemas } = *target;
    let p = producer(brokers);
    let orgs: Vec<String> = (0..partitions).map(|i| format!("{tag}-{i}")).collect();
    for (i, org) in orgs.iter().enumerate() {
        let row = SimRow { id: 20_000_000_000 + i as u64, org: org.clone(), instance: "sync".into(), price: 1, started_s: ts };
        let (k, v) = debezium_records(&SimEvent::Deploy(row), ts, next_pos(), schemas).remove(0);
        send(&p, topic, partitions, &(i as i32, k, v));
    }
    p.flush(Duration::from_secs(30)).ok();
    let all_visible = || http_get(http, "/").filter(|b| orgs.iter().all(|o| b.contains(o.as_str()))).map(|_| ());
    poll_until(Duration::from_secs(900), Duration::from_millis(20), all_visible).is_some()
}

/// One timed drain of the whole topic by a fresh tally process.
struct Drain {
    /// From its first message counted to `GET /` equal to the ledger.
    secs: f64,
    /// From process start to its first message counted.
    startup_s: f64,
    peak_mb: Option<f64>,
    drained_mb: f64,
    idle_mb: f64,
    ok: bool,
    samples: Vec<(f64, u64, f64)>,
    /// Where tally's threads spent the drain (`sched::describe`).
    threads: String,
}

fn drain_tally(a: &Args, brokers: &str, topic: &str, workers: usize, dir: &Path, expected: &serde_json::Value) -> Drain {
    let start = Instant::now();
    let t = spawn_tally(brokers, topic, workers, dir, &a.tally_args);
    let sampler = RssSampler::start(t.child.id(), t.http.clone());
    let pid = t.child.id().to_string();
    let mut threads0 = sched::Snapshot::default();
    let done = wait_equal(&t.http, expected, Duration::from_secs(900), || threads0 = sched::snapshot(&pid));
    let (first, end) = done.unwrap_or((start, Instant::now()));
    let threads = sched::describe(&sched::between(&threads0, &sched::snapshot(&pid)), (end - first).as_secs_f64());
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

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

/// tally's dataflow alone: decoded changes fed straight in (round-robin over workers by key), until done.
fn engine_only(changes: Arc<Vec<Change>>, workers: usize, expected: &serde_json::Value) -> (f64, bool) {
    use timely::dataflow::operators::Input;
    let result: Arc<Mutex<BTreeMap<String, Usage>>> = Arc::default();
    let start = Instant::now();
    let out = result.clone();
    timely::execute(timely::Config::process(workers), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let out = out.clone();
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Vec<Change>>();
            let views = dataflows::usage::usage(stream);
            let (probe, usage) = views.usage.probe();
            usage.inspect(move |(org, _t, diff)| {
                out.lock().expect("lock").entry(org.clone()).or_default().plus_equals(diff);
            });
            (input, probe)
        });
        // Each worker feeds the partitions it would own; batches of 10,000 at successive timestamps.
        for (i, batch) in changes.chunks(10_000).enumerate() {
            for c in batch.iter().filter(|c| c.partition as usize % peers == index) {
                input.send(c.clone());
            }
            input.advance_to(i as u64 + 1);
            worker.step();
        }
        let done = *input.time();
        drop(input);
        worker.step_while(|| probe.less_than(&done));
    })
    .expect("timely")
    .join();
    let secs = start.elapsed().as_secs_f64();
    let got: HashMap<String, Usage> = result.lock().expect("lock").clone().into_iter().collect();
    (secs, &render(&got) == expected)
}

fn main() {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out).expect("out dir");
    let workers: Vec<usize> = a.workers.split(',').map(|w| w.trim().parse().expect("--workers")).collect();
    let rates: Vec<f64> = a.rates.split(',').map(str::trim).filter(|r| !r.is_empty()).map(|r| r.parse().expect("--rates")).collect();
    let mut rows: Vec<Row> = Vec::new();
    let mut fresh: Vec<Fresh> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for mode in a.schemas.split(',').map(str::trim) {
        let schemas = mode == "on";
        let broker = Broker::start();
        let topic = "topic.cloud.instances";
        let Loaded { records, n, bytes, produce_s, expected, mut workload } =
            generate_and_load(&a, schemas, &broker.0, topic, !a.skip_engine);
        eprintln!("bench: schemas {mode}: {} events -> {n} records, {:.0} MB", a.events, bytes as f64 / 1e6);
        notes.push(format!(
            "schemas {mode}: {n} records ({:.2} KB average) generated and produced in {produce_s:.1} s ({:.0} records/s)",
            bytes as f64 / n as f64 / 1e3,
            n as f64 / produce_s
        ));
        let row = |system: &str, workers: usize, seconds: f64, rss_mb: Option<f64>, agrees: Option<bool>| Row {
            system: system.into(),
            schemas: mode.into(),
            workers,
            events: n,
            seconds,
            rss_mb,
            agrees,
        };
        let dir = std::env::temp_dir().join(format!("tally-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        // Drains repeat, interleaved (floors, then each worker count), so that a slow moment of the machine
        // does not land on one system only; each row is the median run, every run is in the notes.
        let (mut consume, mut floor, mut floor_ok) = (Vec::new(), Vec::new(), true);
        let mut drains: BTreeMap<usize, Vec<Drain>> = BTreeMap::new();
        for run in 0..a.repeat.max(1) {
            consume.push(broker_floor(&broker.0, topic, a.partitions, n));
            let (s, got, threads) = parse_and_count_floor(&broker.0, topic, a.partitions, n);
            floor.push(s);
            floor_ok &= got == expected;
            eprintln!("bench: run {run}: broker consume {:.0}/s, parse-and-count floor {:.0}/s", n as f64 / consume[run], n as f64 / s);
            eprintln!("bench: run {run}: floor's threads: {threads}");
            notes.push(format!("schemas {mode}, run {run}: the floor's threads over its drain: {threads}"));
            for &w in &workers {
                let d = drain_tally(&a, &broker.0, topic, w, &dir, &expected);
                eprintln!(
                    "bench: run {run}: tally -w {w}: {:.0}/s, peak RSS {:.0} MB, agrees {}",
                    n as f64 / d.secs,
                    d.peak_mb.unwrap_or(0.0),
                    d.ok
                );
                eprintln!("bench: run {run}: tally -w {w}'s threads: {}", d.threads);
                notes.push(format!("schemas {mode}, run {run}: tally -w {w}'s threads over its drain: {}", d.threads));
                drains.entry(w).or_default().push(d);
            }
        }
        let per_s = |secs: &[f64]| secs.iter().map(|s| format!("{:.0}", n as f64 / s)).collect::<Vec<_>>().join(", ");
        notes.push(format!(
            "schemas {mode}: broker consume runs {} records/s; parse-and-count floor runs {}",
            per_s(&consume),
            per_s(&floor)
        ));
        rows.push(row("broker consume (no parsing)", 1, median(&consume), None, None));
        rows.push(row("parse-and-count floor (rdkafka+serde+HashMap)", 1, median(&floor), None, Some(floor_ok)));
        let mut max_rate = HashMap::new();
        for (w, mut runs) in drains {
            let all = per_s(&runs.iter().map(|d| d.secs).collect::<Vec<_>>());
            let peak = runs.iter().filter_map(|d| d.peak_mb).reduce(f64::max);
            let ok = runs.iter().all(|d| d.ok);
            runs.sort_by(|x, y| x.secs.total_cmp(&y.secs));
            let mid = runs.swap_remove(runs.len() / 2);
            let csv: String = std::iter::once("seconds,records_read,rss_mb\n".to_owned())
                .chain(mid.samples.iter().map(|(t, r, m)| format!("{t:.1},{r},{m:.1}\n")))
                .collect();
            std::fs::write(a.out.join(format!("rss-schemas-{mode}-w{w}.csv")), csv).expect("write rss samples");
            rows.push(row(&format!("tally -w {w} (end to end)"), w, mid.secs, peak, Some(ok)));
            notes.push(format!(
                "schemas {mode}, tally -w {w}: runs {all} records/s; peak RSS is the highest of the runs. Median run: {:.0} ms from process start to its first message counted, {:.0} records/s counting that too, RSS {:.0} MB once drained and {:.0} MB after {:.0} s idle (samples: rss-schemas-{mode}-w{w}.csv)",
                mid.startup_s * 1e3,
                n as f64 / (mid.secs + mid.startup_s),
                mid.drained_mb,
                mid.idle_mb,
                a.idle_s
            ));
            max_rate.insert(w, n as f64 / mid.secs);
        }
        // Engine only, and decoding only: decode every record once (timed), then feed the dataflow.
        if !a.skip_engine {
            let mut decoder = DebeziumDecoder::new(None);
            let start = Instant::now();
            let mut changes = Vec::with_capacity(n);
            for (i, (p, k, v)) in records.iter().enumerate() {
                let meta = Meta { partition: *p, offset: i as i64, ..Meta::default() };
                if let Ok(Decoded::Change(c)) = decoder.decode(Some(k.as_bytes()), v.as_ref().map(|v| v.as_bytes()), meta) {
                    changes.push(c);
                }
            }
            rows.push(row("decode only (1 core)", 1, start.elapsed().as_secs_f64(), None, None));
            let changes = Arc::new(changes);
            for &w in &workers {
                let (s, ok) = engine_only(changes.clone(), w, &expected);
                eprintln!("bench: engine only -w {w}: {:.0}/s, agrees {ok}", n as f64 / s);
                rows.push(row(&format!("tally engine only -w {w} (decoded, no Kafka)"), w, s, None, Some(ok)));
            }
        }
        drop(records);
        if !a.skip_python {
            let n_s = n.to_string();
            let systems: [(&str, &str, &str, Vec<&str>); 3] = [
                ("kafka-python", "kafka-python consumer (the spec's stack)", "kafka_python_usage.py", vec![&broker.0, topic, &n_s]),
                ("pathway", "Pathway 0.33 (1 thread)", "pathway_usage.py", vec![&broker.0, topic, mode]),
                ("bytewax", "Bytewax 0.21 (1 worker)", "bytewax_usage.py", vec![&broker.0, topic]),
            ];
            let chosen: Vec<&str> = a.python.split(',').map(str::trim).collect();
            for (_, name, script, args) in systems.into_iter().filter(|s| chosen.contains(&s.0)) {
                let log = a.out.join(format!("{}-{mode}.log", script.trim_end_matches(".py")));
                match python_system(script, &args, &log) {
                    Ok((s, rss, got)) => {
                        let agrees = got == expected;
                        eprintln!("bench: {name} {:.0}/s, agrees {agrees}", n as f64 / s);
                        if !agrees {
                            let file = a.out.join(format!("disagreement-{script}-{mode}.json"));
                            std::fs::write(&file, got.to_string()).ok();
                            notes.push(format!("{name} disagreed with the ledger (schemas {mode}); its result is in {}", file.display()));
                        }
                        rows.push(row(name, 1, s, rss, Some(agrees)));
                    }
                    Err(e) => notes.push(format!("{name} not measured (schemas {mode}): {e}")),
                }
            }
        }
        // Freshness last: its traffic extends the topic the drain measurements above read.
        let target = Target { brokers: &broker.0, topic, partitions: a.partitions, schemas };
        let mut phase = 0;
        let generator =
            Generator { nice: a.generator_nice, linger_ms: a.generator_linger_ms, compression: a.generator_compression.clone() };
        // `--rates ""` skips freshness.
        for &w in workers.iter().filter(|_| !rates.is_empty()) {
            let t = spawn_tally(&broker.0, topic, w, &dir, &a.tally_args);
            if !catch_up(&target, &t.http, &format!("sync-{w}"), workload.ts_s) {
                notes.push(format!("freshness -w {w}: tally never caught up"));
                continue;
            }
            for &f in &rates {
                let rate = a.rate_of.unwrap_or(max_rate[&w]) * f;
                let before = http_get(&t.http, "/metrics").unwrap_or_default();
                let pids = [Some(t.child.id()), broker.pid(), Some(std::process::id())];
                let cpu0 = CpuTimes::now(&pids);
                let phase_start = Instant::now();
                let ph = freshness(&target, &t.http, &mut workload, phase, rate, a.probes, &generator);
                phase += 1;
                let after = http_get(&t.http, "/metrics").unwrap_or_default();
                let (machine_busy, cores) = CpuTimes::now(&pids).since(&cpu0, phase_start.elapsed().as_secs_f64());
                let publish = Histogram::between(&before, &after, "tally_view_publish_delay_seconds");
                if let Err(e) = &ph.reniced {
                    notes.push(format!("freshness schemas {mode} -w {w} at {rate:.0}/s: generator kept tally's priority ({e})"));
                }
                if ph.missed > 0 {
                    notes.push(format!("freshness schemas {mode} -w {w} at {rate:.0}/s: {} probes never showed within 10 s", ph.missed));
                }
                let x = Fresh {
                    schemas: mode.into(),
                    workers: w,
                    offered: rate,
                    handed: ph.handed,
                    delivered: ph.delivered,
                    p50_ms: pct(&ph.total, 0.5),
                    p99_ms: pct(&ph.total, 0.99),
                    ack_p50_ms: pct(&ph.ack, 0.5),
                    ack_p99_ms: pct(&ph.ack, 0.99),
                    after_p50_ms: pct(&ph.after_ack, 0.5),
                    after_p99_ms: pct(&ph.after_ack, 0.99),
                    publish_p99_ms: publish.quantile(0.99) * 1e3,
                    machine_busy,
                    tally_cores: cores[0],
                    broker_cores: cores[1],
                    harness_cores: cores[2],
                };
                eprintln!(
                    "bench: freshness -w {w} at {rate:.0}/s offered ({:.0}/s delivered): p50 {:.1} ms, p99 {:.1} ms (broker ack p99 {:.1} ms); machine {:.0}% busy, cores: tally {:.2}, broker {:.2}, harness {:.2}",
                    x.delivered,
                    x.p50_ms,
                    x.p99_ms,
                    x.ack_p99_ms,
                    x.machine_busy * 100.0,
                    x.tally_cores,
                    x.broker_cores,
                    x.harness_cores
                );
                fresh.push(x);
            }
        }
    }
    report(&a, &rows, &fresh, &notes);
}

/// Runs one of the Python comparison scripts in `benches/` under the benchmark venv. Each prints
/// `{"seconds": processing time as it measures it, "rss_mb": its peak RSS, "result": {...}}`.
/// Its stderr (Pathway logs every tombstone as a parse error) goes to `log`.
fn python_system(script: &str, args: &[&str], log: &Path) -> Result<(f64, Option<f64>, serde_json::Value), String> {
    let py = dirs_python();
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(&py)
        .arg(root().join("benches").join(script))
        .args(args)
        .env("PATHWAY_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("{py}: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("{script} exited with {} (its log: {})", out.status, log.display()));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{script} printed no result: {e}"))?;
    Ok((v["seconds"].as_f64().unwrap_or(f64::NAN), v["rss_mb"].as_f64(), v["result"].clone()))
}

/// The benchmark venv's python (scripts/bench-deps installs it), else python3.
fn dirs_python() -> String {
    let venv = std::env::var("HOME").map(|h| format!("{h}/.cache/tally/venv-bench/bin/python")).unwrap_or_default();
    if Path::new(&venv).exists() {
        venv
    } else {
        "python3".into()
    }
}

fn report(a: &Args, rows: &[Row], fresh: &[Fresh], notes: &[String]) {
    let mut csv = String::from("kind,system,schemas,workers,records,seconds,records_per_s,ratio_to_tally,peak_rss_mb,agrees,offered_per_s,handed_per_s,acknowledged_per_s,p50_ms,p99_ms,ack_p50_ms,ack_p99_ms,after_ack_p50_ms,after_ack_p99_ms,publish_delay_p99_ms_le,machine_busy,tally_cores,broker_cores,harness_cores\n");
    let mut md = format!(
        "# tally event-rate benchmark\n\nOne run, one machine ({} cores), one broker (scripts/broker), the same events for every system. Floors and tally drains: the median of {} interleaved runs (every run in the notes).\n\
         Workload: {} change events ({} running rows, {} organizations, {:.0}% price updates, deletes with tombstones), {} partitions.\n\
         Ratio = records/s divided by tally's end-to-end records/s with the same schema setting and `-w 1`.\n\
         Freshness's background generator: nice {}, linger {} ms, compression {}.\n\
         Command: `cargo bench --bench event_rate -- {}`\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.repeat.max(1),
        a.events,
        a.running,
        a.orgs,
        a.updates * 100.0,
        a.partitions,
        a.generator_nice,
        a.generator_linger_ms,
        a.generator_compression,
        std::env::args().skip(1).filter(|x| x != "--bench").map(|x| if x.is_empty() || x.contains(' ') { format!("\"{x}\"") } else { x }).collect::<Vec<_>>().join(" ")
    );
    for mode in ["on", "off"] {
        let group: Vec<&Row> = rows.iter().filter(|r| r.schemas == mode).collect();
        if group.is_empty() {
            continue;
        }
        let tally = group.iter().find(|r| r.system.starts_with("tally -w 1")).map_or(f64::NAN, |r| r.rate());
        md.push_str(&format!(
            "## Schemas {mode}\n\n| system | records/s | ratio to tally -w 1 | peak RSS | agrees with ledger |\n|---|---:|---:|---:|---|\n"
        ));
        for r in group {
            let ratio = r.rate() / tally;
            md.push_str(&format!(
                "| {} | {:.0} | {:.2} | {} | {} |\n",
                r.system,
                r.rate(),
                ratio,
                r.rss_mb.map_or("".into(), |m| format!("{m:.0} MB")),
                r.agrees.map_or("n/a", |b| if b { "yes" } else { "**NO**" })
            ));
            csv.push_str(&format!(
                "throughput,\"{}\",{},{},{},{:.3},{:.0},{:.3},{},{},,,,\n",
                r.system,
                r.schemas,
                r.workers,
                r.events,
                r.seconds,
                r.rate(),
                ratio,
                r.rss_mb.map_or(String::new(), |m| format!("{m:.0}")),
                r.agrees.map_or(String::new(), |b| b.to_string())
            ));
        }
        md.push('\n');
        let f: Vec<&Fresh> = fresh.iter().filter(|f| f.schemas == mode).collect();
        if !f.is_empty() {
            md.push_str(
                "Freshness: one probe at a time over background traffic, from handing it to the producer until `GET /` shows it, \
                 and its two parts: until the broker acknowledged it, and from then until visible (tally's fetch, the tick, publishing, \
                 and the 1 ms polling). Background rate offered, handed to the producer, and acknowledged by the broker by the \
                 phase's end (the rest was still queued in the generator). Publish delay: tally's own histogram (bucket bound). \
                 CPU over the phase: the machine's busy share of all cores (generator, broker and tally share them), and the cores \
                 tally, the broker and the harness (background generator, probes, polling) used.\n\n\
                 | workers | offered /s | handed /s | acknowledged /s | p50 | p99 | broker ack p50 / p99 | ack -> visible p50 / p99 | publish delay p99 | machine busy | cores: tally / broker / harness |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for x in f {
                md.push_str(&format!(
                    "| {} | {:.0} | {:.0} | {:.0} | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | ≤ {:.0} ms | {:.0}% | {:.2} / {:.2} / {:.2} |\n",
                    x.workers,
                    x.offered,
                    x.handed,
                    x.delivered,
                    x.p50_ms,
                    x.p99_ms,
                    x.ack_p50_ms,
                    x.ack_p99_ms,
                    x.after_p50_ms,
                    x.after_p99_ms,
                    x.publish_p99_ms,
                    x.machine_busy * 100.0,
                    x.tally_cores,
                    x.broker_cores,
                    x.harness_cores
                ));
                let numbers: Vec<String> = x.numbers().iter().map(|v| format!("{v:.3}")).collect();
                csv.push_str(&format!("freshness,tally,{},{},,,,,,,{}\n", x.schemas, x.workers, numbers.join(",")));
            }
            md.push('\n');
        }
    }
    md.push_str("Notes:\n");
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    std::fs::write(a.out.join("results.md"), &md).expect("write results.md");
    std::fs::write(a.out.join("results.csv"), &csv).expect("write results.csv");
    let plot = Command::new(dirs_python()).arg(root().join("benches/plot.py")).arg(&a.out).status();
    if !plot.is_ok_and(|s| s.success()) {
        eprintln!("bench: no plot (needs matplotlib: scripts/bench-deps)");
    }
    println!("{md}");
}
