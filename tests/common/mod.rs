//! The shared test support lives in the `testkit` crate (tests and benches use the same); this adds the
//! one thing only a test of this package knows: where cargo built the `tally` binary.
#![allow(dead_code, unused_imports)]

pub(crate) use testkit::*;

/// Starts the `tally` binary built for these tests with `args` (HTTP on an ephemeral port).
pub(crate) fn spawn_tally(args: &[&str]) -> Tally {
    Tally::spawn(env!("CARGO_BIN_EXE_tally"), args)
}
