//! Availability (the website-availability specs): a checker that times every phase of every check on a
//! fixed slot grid and writes the results to Kafka.
//!
//! Built so far: the check itself ([`probe`]: DNS, connect, TLS, first byte, transfer, each in
//! microseconds, with an error class and phase for every failure), the slot grid ([`schedule`]), the sites
//! file and sharding ([`sites`]) and the `tally checker` command ([`checker`]). Not built yet: the writer
//! into PostgreSQL and the live views (`tally availability`).

pub mod checker;
pub mod probe;
pub mod schedule;
pub mod sites;
pub mod writer;
