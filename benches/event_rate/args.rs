//! The benchmark's flags.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
pub(crate) struct Args {
    /// Change events to generate (each delete adds a tombstone record).
    #[arg(long, default_value_t = 300_000)]
    pub(crate) events: usize,
    /// Rows kept running (the state tally must hold).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) running: usize,
    /// Organizations.
    #[arg(long, default_value_t = 100)]
    pub(crate) orgs: usize,
    /// Share of events that are price updates (the rest, past the fill, are destroy/deploy pairs).
    #[arg(long, default_value_t = 0.2)]
    pub(crate) updates: f64,
    #[arg(long, default_value_t = 4)]
    pub(crate) partitions: i32,
    /// Worker counts to measure tally with.
    #[arg(long, default_value = "1,2")]
    pub(crate) workers: String,
    /// Schema settings to measure: on (3.7 KB records), off (0.6 KB).
    #[arg(long, default_value = "on,off")]
    pub(crate) schemas: String,
    /// Offered rates for freshness, as fractions of tally's measured drain rate; "" skips freshness.
    #[arg(long, default_value = "0.1,0.25,0.5")]
    pub(crate) rates: String,
    /// Records/s the --rates fractions apply to, instead of each run's measured drain rate (to compare
    /// settings at the same offered load: drain rates here vary about 30% between runs).
    #[arg(long)]
    pub(crate) rate_of: Option<f64>,
    /// Freshness probes per offered rate.
    #[arg(long, default_value_t = 100)]
    pub(crate) probes: usize,
    #[arg(long)]
    pub(crate) skip_python: bool,
    /// Skip decode-only and engine-only (they hold every record decoded in memory: for very large runs).
    #[arg(long)]
    pub(crate) skip_engine: bool,
    /// Which Python alternatives to run: kafka-python, pathway, bytewax.
    #[arg(long, default_value = "kafka-python,pathway,bytewax")]
    pub(crate) python: String,
    /// Extra arguments for every tally process, whitespace-separated (e.g. "--kafka-property k=v --tick-ms 10").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub(crate) tally_args: String,
    /// Timed drains of the floors and of tally per worker count, interleaved; rows report the median.
    #[arg(long, default_value_t = 3)]
    pub(crate) repeat: usize,
    /// After each drain, keep sampling tally's memory this many seconds with no traffic.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) idle_s: f64,
    /// HTTP load phase (0 skips it): one more drain per worker count with this many wrk clients polling
    /// `GET /` throughout, then wrk for --http-secs against the caught-up view.
    #[arg(long, default_value_t = 0)]
    pub(crate) http_clients: usize,
    /// Seconds of wrk against the caught-up view in the HTTP load phase.
    #[arg(long, default_value_t = 10)]
    pub(crate) http_secs: u64,
    /// Niceness of the freshness phases' background generator (its thread and its producer's threads): the
    /// generator stands in for producers on other machines, so it yields the cores to the broker and tally.
    /// 0 keeps it at tally's priority.
    #[arg(long, default_value_t = 19)]
    pub(crate) generator_nice: i32,
    /// How long the background generator's producer batches records (librdkafka `linger.ms`) in the
    /// freshness phases. The broker here (nisshi, in memory) costs about 2 ms of CPU per produce request
    /// whatever its size, on the cores tally uses: at 5 ms it took 0.5-0.6 cores, at 50 ms 0.13-0.25.
    /// The probes are sent at once regardless.
    #[arg(long, default_value_t = 50)]
    pub(crate) generator_linger_ms: u64,
    /// Compression of the background generator's batches (librdkafka `compression.type`: none, lz4, zstd...).
    /// lz4, as a Kafka Connect worker can send (`producer.compression.type`): uncompressed, generator and
    /// broker on this machine's 2 cores delivered only 90k of 155-166k/s 2.4 KB records offered (broker
    /// 0.85-0.87 cores); lz4 delivered 99.7% of 173-177k/s with the broker at 0.36-0.47 cores
    /// (bench-results/generator-compression/). tally then decompresses too: more work for it, not less.
    #[arg(long, default_value = "lz4")]
    pub(crate) generator_compression: String,
    #[arg(long, default_value = "bench-results")]
    pub(crate) out: PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub(crate) bench: bool,
}
