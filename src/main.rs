//! The `tally` command line: one subcommand per pipeline or tool, dispatched to it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tally::pipelines::{availability, food, rates, usage};
use tally::runtime::{self, process};
use tally::tools::{demo, feed, prices, simulate};

/// Decoding and the dataflow allocate small strings per record; glibc's malloc cost tally about a third of
/// its worker time in the event-rate benchmark (perf, bench-results/).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Usage(usage::UsageArgs),
    /// Food counts: `{"food": ...}` events on topic `message` counted into the SQLite table `aggregated`,
    /// exactly once, served at GET/POST /aggregated.
    Food(food::FoodArgs),
    /// Rates: price batches applied all-or-nothing, PostgreSQL of record, the /rates API (port 3000).
    Rates(rates::RatesArgs),
    /// Publish a price batch to the rates topic, or generate one from the dump's distribution.
    Prices(prices::PricesArgs),
    /// Check websites on a fixed slot grid, every phase timed, results to Kafka (availability spec).
    Checker(availability::checker::CheckerArgs),
    /// Check results from Kafka into PostgreSQL exactly once (`--setup` creates the schema).
    Availability(availability::writer::AvailabilityArgs),
    /// The spec's simulator against a real MariaDB: creates cloud.instances if missing, then deploys
    /// (probability 2/3) or destroys the oldest instance every interval.
    Simulate(simulate::SimulateArgs),
    /// Produces the food datafeed's traffic: `{"food": <random name from foods.txt>}` to topic `message`.
    Feed(feed::FeedArgs),
    /// Everything in one process, no external service: an in-process Kafka broker, the spec's simulator
    /// writing Debezium events into it, and the usage pipeline reading them on :12000.
    Demo(demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    #[cfg(all(feature = "mimalloc", target_os = "linux", target_env = "gnu"))]
    process::one_glibc_arena();
    process::init_logging();
    process::explain_lost_peers();
    match Cli::parse().command {
        Command::Usage(args) => runtime::run(usage::UsagePipeline::new(args)).context("usage pipeline failed"),
        Command::Food(args) => runtime::run(food::FoodPipeline::new(args)).context("food counts pipeline failed"),
        Command::Rates(args) => runtime::run(rates::RatesPipeline::new(args)).context("rates pipeline failed"),
        Command::Simulate(args) => {
            let steps = simulate::simulate(&args).context("simulator failed")?;
            eprintln!("tally simulate: {steps} steps done");
            Ok(())
        }
        Command::Feed(args) => args.run().context("feed failed"),
        Command::Prices(args) => args.run().context("prices failed"),
        Command::Checker(args) => args.run().context("checker failed"),
        Command::Availability(args) => availability::writer::run(args).context("availability writer failed"),
        Command::Demo(args) => args.run().context("demo failed"),
    }
}
