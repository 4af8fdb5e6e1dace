//! tally: live, exact views over Kafka streams, on timely and differential dataflow.
//!
//! The runtime (this crate) owns everything that touches the outside world: Kafka, HTTP, files,
//! metrics, threads. The dataflow logic lives in the I/O-free `dataflows` crate.

pub mod error;
pub mod http;
pub mod metrics;
pub mod pipelines;
pub mod runtime;
pub mod sinks;
pub mod sources;
pub mod tools;
