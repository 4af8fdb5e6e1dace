//! One folder per pipeline: its flags, decoder and row type, dataflow wiring, sinks, endpoints and
//! metrics, behind [`crate::runtime::Pipeline`]. Adding one: a folder here, its pure dataflow in
//! `dataflows/src/`, and a line in `main.rs`'s `Command` enum.
pub mod availability;
pub mod food;
pub mod rates;
pub mod usage;
