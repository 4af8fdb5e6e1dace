//! Sinks: where views are written outside tally.
pub mod sqlite;
