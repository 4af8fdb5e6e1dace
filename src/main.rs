//! The `tally` command line: parse, wire, run.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tally::http::{Routes, ViewHandle};
use tally::metrics::Metrics;
use tally::runtime::{self, Cluster, FoodConfig, UsageConfig};

/// Decoding and the dataflow allocate small strings per record; glibc's malloc cost tally about a third of
/// its worker time in the event-rate benchmark (perf, bench-results/).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tally::sources::kafka::KafkaConfig;

/// Live, exact views over Kafka streams.
#[derive(Parser)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Usage billing from Debezium CDC of `cloud.instances`: per organization started/running/billing.
    Usage(UsageArgs),
    /// Food counts: `{"food": ...}` events on topic `message` counted into the SQLite table `aggregated`,
    /// exactly once, served at GET/POST /aggregated.
    Food(FoodArgs),
    /// The spec's simulator against a real MariaDB: creates cloud.instances if missing, then deploys
    /// (probability 2/3) or destroys the oldest instance every interval.
    Simulate(SimulateArgs),
    /// Produces the food datafeed's traffic: `{"food": <random name from foods.txt>}` to topic `message`.
    Feed(FeedArgs),
    /// Everything in one process, no external service: an in-process Kafka broker, the spec's simulator
    /// writing Debezium events into it, and the usage pipeline reading them on :12000.
    Demo(DemoArgs),
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Kafka consumer group.id (tally assigns partitions itself; it does not depend on group rebalances).
    #[arg(long, env = "TALLY_GROUP_ID", default_value = "exoscale")]
    group_id: String,
    /// Kafka client.id.
    #[arg(long, env = "TALLY_CLIENT_ID", default_value = "localhost")]
    client_id: String,
    /// Extra librdkafka consumer properties, key=value (repeatable), e.g. security.protocol=ssl.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
}

impl KafkaArgs {
    fn config(&self, topic: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic: topic.to_owned(),
            group_id: self.group_id.clone(),
            client_id: self.client_id.clone(),
            properties: self.kafka_properties.clone(),
            start_offsets: Default::default(),
        }
    }
}

#[derive(Args, Clone)]
struct FoodArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic of food events.
    #[arg(long, env = "TALLY_FOOD_TOPIC", default_value = "message")]
    topic: String,
    /// The SQLite file holding table `aggregated` (created with the original DDL if missing).
    #[arg(long, env = "TALLY_SQLITE", default_value = "data/data.db")]
    sqlite: PathBuf,
    /// HTTP address for GET/POST /aggregated, /metrics, /health and /ui.
    #[arg(long, env = "TALLY_FOOD_LISTEN", default_value = "0.0.0.0:5000")]
    listen: String,
    /// File where undecodable messages are appended (JSON lines with topic/partition/offset and raw bytes).
    #[arg(long, env = "TALLY_DEAD_LETTER", default_value = "tally-food-dead-letter.jsonl")]
    dead_letter: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args, Clone)]
struct SimulateArgs {
    /// MariaDB URL, mysql://user:password@host:port.
    #[arg(long, env = "TALLY_MARIADB_URL", default_value = "mysql://root@127.0.0.1:3306")]
    mariadb_url: String,
    /// Milliseconds between steps (the spec's simulator uses 500).
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Stop after this many steps (default: run until stopped).
    #[arg(long)]
    steps: Option<u64>,
    /// Probability that a step changes a running instance's price instead (0 = the spec's behaviour).
    #[arg(long, default_value_t = 0.0)]
    price_change: f64,
    /// Append what each step did, with its database time, to this JSON-lines file.
    #[arg(long)]
    audit: Option<PathBuf>,
    /// Seed for reproducible choices.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args, Clone)]
struct FeedArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic to write to.
    #[arg(long, default_value = "message")]
    topic: String,
    /// Messages per second (the original datafeed sends one every 1-2 s).
    #[arg(long, default_value_t = 0.67)]
    rate: f64,
    /// Stop after this many messages (default: run forever).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args, Clone)]
struct ClusterArgs {
    /// Worker threads in this process.
    #[arg(short = 'w', long = "workers", env = "TALLY_WORKERS", default_value_t = 1)]
    workers: usize,
    /// Number of tally processes in a timely cluster (each started with its own --process).
    #[arg(long, env = "TALLY_PROCESSES", default_value_t = 1)]
    processes: usize,
    /// This process's index in the cluster, 0-based. Process 0 serves HTTP.
    #[arg(long, env = "TALLY_PROCESS", default_value_t = 0)]
    process: usize,
    /// File with one host:port per line, one line per process, for timely's cluster connections.
    #[arg(long, env = "TALLY_HOSTFILE")]
    hostfile: Option<PathBuf>,
    /// How often timestamps close, in milliseconds: the HTTP view refreshes at this cadence.
    #[arg(long, env = "TALLY_TICK_MS", default_value_t = 20)]
    tick_ms: u64,
}

impl ClusterArgs {
    fn cluster(&self) -> Cluster {
        Cluster {
            workers: self.workers,
            processes: self.processes,
            process: self.process,
            hostfile: self.hostfile.clone(),
            tick_ms: self.tick_ms,
        }
    }
}

#[derive(Args, Clone)]
struct UsageArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Topic carrying Debezium change events of cloud.instances.
    #[arg(long, env = "TALLY_TOPIC", default_value = "topic.cloud.instances")]
    topic: String,
    /// HTTP address for the view (GET /), /metrics, /health and /ui.
    #[arg(long, env = "TALLY_LISTEN", default_value = "0.0.0.0:12000")]
    listen: String,
    /// File where undecodable messages are appended (JSON lines with topic/partition/offset and raw bytes).
    #[arg(long, env = "TALLY_DEAD_LETTER", default_value = "tally-dead-letter.jsonl")]
    dead_letter: PathBuf,
    /// Scale of DECIMAL prices when the connector runs with schemas off (the scale travels in the schema).
    #[arg(long, env = "TALLY_DECIMAL_SCALE")]
    decimal_scale: Option<u32>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args, Clone)]
struct DemoArgs {
    /// HTTP address for the view.
    #[arg(long, default_value = "0.0.0.0:12000")]
    listen: String,
    /// Milliseconds between simulator steps (the spec's simulator uses 500).
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Worker threads.
    #[arg(short = 'w', long = "workers", default_value_t = 1)]
    workers: usize,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned())).ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// With mimalloc serving Rust, glibc's malloc serves only librdkafka's threads, which it spreads over an
/// arena each: measured with the benchmark (10M events, `-w 1`), RSS then drifted up by about 15 MB over
/// 14M records, and with `MALLOC_ARENA_MAX=1` it stayed flat. glibc reads that variable only at start-up,
/// so tally re-executes itself once with it set (same pid, arguments and streams). A value set by the user
/// wins; if the re-exec fails, tally runs on as it is.
#[cfg(all(feature = "mimalloc", target_os = "linux", target_env = "gnu"))]
fn one_glibc_arena() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("MALLOC_ARENA_MAX", "1").exec();
        eprintln!("tally: re-executing with MALLOC_ARENA_MAX=1 failed ({err}); running on");
    }
}

/// Timely has no recovery from a lost cluster peer: its network threads panic ("timely communication
/// error: ... socket closed"), and the process then exits with a cascade of panics. This says what happened
/// and what to do, once, before them.
fn explain_lost_peers() {
    let default = std::panic::take_hook();
    let said = std::sync::atomic::AtomicBool::new(false);
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload().downcast_ref::<String>().map(String::as_str).or_else(|| info.payload().downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("timely communication error")) && !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                cause = msg.unwrap_or_default(),
                "lost the connection to another process of the cluster (it exited or the network failed); the \
                 cluster cannot continue without it, so this process exits too: restart every process"
            );
        }
        default(info);
    }));
}

fn main() -> anyhow::Result<()> {
    #[cfg(all(feature = "mimalloc", target_os = "linux", target_env = "gnu"))]
    one_glibc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    explain_lost_peers();
    match Cli::parse().command {
        Command::Usage(args) => usage(args),
        Command::Food(args) => food(args),
        Command::Feed(args) => feed(args),
        Command::Simulate(args) => {
            let cfg = tally::simulate::SimulateConfig {
                url: args.mariadb_url,
                interval: Duration::from_millis(args.interval_ms),
                steps: args.steps,
                price_change: args.price_change,
                audit: args.audit,
                seed: args.seed,
            };
            let steps = tally::simulate::simulate(&cfg).context("simulator failed")?;
            eprintln!("tally simulate: {steps} steps done");
            Ok(())
        }
        Command::Demo(args) => demo(args),
    }
}

fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = stop_on_signals()?;
    let view = ViewHandle::new("{}");
    let cluster = args.cluster.cluster();
    if cluster.serves_http() {
        let (server, addr) = runtime::bind(&args.listen)?;
        println!("tally: usage view on http://{addr}/ (metrics /metrics, page /ui)");
        let routes = Routes {
            views: vec![("/".into(), view.clone())],
            metrics: metrics.clone(),
            ui_title: "usage per organization".into(),
            ui_key: "organization".into(),
        };
        runtime::spawn_http(server, routes, shutdown.clone());
    }
    let cfg =
        UsageConfig { kafka: args.kafka.config(&args.topic), dead_letter: args.dead_letter, decimal_scale: args.decimal_scale, cluster };
    runtime::run_usage(cfg, metrics, view, shutdown).context("usage pipeline failed")
}

fn demo(args: DemoArgs) -> anyhow::Result<()> {
    use rdkafka::mocking::MockCluster;
    let topic = "topic.cloud.instances";
    let mock = MockCluster::new(1).context("starting the in-process Kafka broker")?;
    mock.create_topic(topic, 1, 1).context("creating the demo topic")?;
    let brokers = mock.bootstrap_servers();
    let stop = Arc::new(AtomicBool::new(false));
    let simulator = tally::sim::spawn_producer(brokers.clone(), topic.to_owned(), Duration::from_millis(args.interval_ms), stop.clone());
    eprintln!("tally demo: in-process broker at {brokers}; simulator deploys/destroys an instance every {} ms", args.interval_ms);
    let result = usage(UsageArgs {
        kafka: KafkaArgs { brokers, group_id: "exoscale".into(), client_id: "localhost".into(), kafka_properties: Vec::new() },
        topic: topic.into(),
        listen: args.listen,
        dead_letter: std::env::temp_dir().join("tally-demo-dead-letter.jsonl"),
        decimal_scale: None,
        cluster: ClusterArgs { workers: args.workers, processes: 1, process: 0, hostfile: None, tick_ms: 20 },
    });
    // The simulator's producer goes before the broker it talks to (else librdkafka logs "all brokers down").
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = simulator.join();
    drop(mock);
    result
}

fn food(args: FoodArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let shutdown = stop_on_signals()?;
    let view = ViewHandle::new("[]");
    let cluster = args.cluster.cluster();
    if let Some(dir) = args.sqlite.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if cluster.serves_http() {
        let (server, addr) = runtime::bind(&args.listen)?;
        println!("tally: food counts on http://{addr}/aggregated (metrics /metrics, page /ui)");
        let routes = Routes {
            views: vec![("/aggregated".into(), view.clone())],
            metrics: metrics.clone(),
            ui_title: "food counts".into(),
            ui_key: "food".into(),
        };
        runtime::spawn_http(server, routes, shutdown.clone());
    }
    let cfg = FoodConfig { kafka: args.kafka.config(&args.topic), sqlite: args.sqlite, dead_letter: args.dead_letter, cluster };
    runtime::run_food(cfg, metrics, view, shutdown).context("food counts pipeline failed")
}

/// SIGTERM or Ctrl-C sets the returned flag: the sources stop reading, the dataflow finishes what was read
/// (the food sink commits it with its offsets), and the pipeline returns, so tally exits 0. A second signal
/// exits at once with status 1. In cluster mode every process needs the signal: the dataflow completes
/// only when all sources have stopped.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 1, shutdown.clone()).context("installing a signal handler")?;
        signal_hook::flag::register(signal, shutdown.clone()).context("installing a signal handler")?;
    }
    Ok(shutdown)
}

fn feed(args: FeedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    eprintln!("tally feed: {:.2} messages/s to {} on {}", args.rate, args.topic, args.brokers);
    tally::sim::food_feed(&args.brokers, &args.topic, interval, args.count)?;
    Ok(())
}
