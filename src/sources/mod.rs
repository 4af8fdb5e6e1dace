//! Sources: Kafka inside a timely operator, and the decoders for what it carries.
pub mod dead_letter;
pub mod debezium;
pub mod kafka;
