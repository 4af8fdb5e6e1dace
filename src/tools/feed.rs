//! `tally feed`: the food datafeed's traffic, `{"food": <random name from foods.txt>}` to topic `message`.

use std::time::Duration;

/// `tally feed`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct FeedArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic to write to.
    #[arg(long, default_value = "message")]
    pub topic: String,
    /// Messages per second (the original datafeed sends one every 1-2 s).
    #[arg(long, default_value_t = 0.67)]
    pub rate: f64,
    /// Stop after this many messages (default: run forever).
    #[arg(long)]
    pub count: Option<u64>,
}

/// Why the feed stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The rate cannot be used.
    #[error("--rate must be positive, got {0}")]
    Rate(f64),
    /// The producer failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl FeedArgs {
    /// Produces until `--count` messages are sent (or forever).
    pub fn run(self) -> Result<(), FeedError> {
        if self.rate.is_nan() || self.rate <= 0.0 {
            return Err(FeedError::Rate(self.rate));
        }
        let interval = Duration::from_secs_f64(1.0 / self.rate);
        eprintln!(
            "tally feed: {:.2} messages/s to {} on {}",
            self.rate, self.topic, self.brokers
        );
        super::sim::food_feed(&self.brokers, &self.topic, interval, self.count)?;
        Ok(())
    }
}
