//! Producers and helpers users run beside the pipelines: the spec's simulators, the food datafeed, and
//! the self-contained demo.
pub mod demo;
pub mod feed;
pub mod prices;
pub mod sim;
pub mod simulate;
