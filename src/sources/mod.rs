//! Sources: Kafka inside a timely operator, and the decoders for what it carries.
pub mod dead_letter;
pub mod debezium;
pub mod food;
pub mod kafka;

use crate::error::DecodeError;

/// Refuses a top-level JSON array: serde would otherwise fill a struct from it by position.
pub(crate) fn reject_array(bytes: &[u8]) -> Result<(), DecodeError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Err(DecodeError::Shape("expected a JSON object, found an array".into())),
        _ => Ok(()),
    }
}
