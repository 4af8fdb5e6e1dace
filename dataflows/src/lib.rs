//! tally's pure, I/O-free dataflow builders: each is a function over differential collections (or timely
//! streams) that the runtime feeds and reads, so it tests in milliseconds without Kafka, HTTP or a database.

pub mod availability;
pub mod food_counts;
pub mod money;
pub mod rates;
pub mod usage;
