//! Availability (the website-availability specs): a checker that times every phase of every check on a
//! fixed slot grid and writes the results to Kafka, and a writer that stores them in PostgreSQL exactly
//! once and serves live views of them.
//!
//! The check itself is [`probe`] (DNS, connect, TLS, first byte, transfer, each in microseconds, with an
//! error class and phase for every failure), the slot grid [`schedule`], the sites file and sharding
//! [`sites`], the `tally checker` command [`checker`]. `tally availability` is [`writer`] (Kafka into
//! `check_result` and its hourly rollups, one transaction per closed timestamp, and the reload of the views
//! at start) and [`views`] (`/availability`, `/availability/incidents`, per-site gauges, `/ui`, over the
//! window in `dataflows::availability`).

pub mod checker;
pub mod probe;
pub mod schedule;
pub mod sites;
pub mod views;
pub mod writer;
