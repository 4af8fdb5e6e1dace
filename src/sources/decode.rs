//! What a source hands its decoder: a message's key, value and metadata, in tally's own types (no rdkafka
//! type reaches a decoder), and what a decoder answers.

use rdkafka::message::{BorrowedHeaders, Headers as _};

use crate::error::DecodeError;

/// Where a message came from, and what travelled with it besides key and value.
#[derive(Clone, Copy, Debug)]
pub struct Metadata<'a> {
    /// The topic it was read from.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The Kafka timestamp (producer or broker clock), epoch milliseconds, when the message carries one.
    pub timestamp_ms: Option<i64>,
    /// Its headers.
    pub headers: Headers<'a>,
}

impl<'a> Metadata<'a> {
    /// Metadata with no timestamp and no headers (tests, tools, replays from files).
    pub fn at(topic: &'a str, partition: i32, offset: i64) -> Self {
        Metadata {
            topic,
            partition,
            offset,
            timestamp_ms: None,
            headers: Headers::NONE,
        }
    }
}

/// A message's headers, read lazily in one pass (librdkafka parses them again on every request).
#[derive(Clone, Copy)]
pub struct Headers<'a>(HeaderSource<'a>);

impl std::fmt::Debug for Headers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(k, v)| (k, v.map(String::from_utf8_lossy))))
            .finish()
    }
}

#[derive(Clone, Copy)]
enum HeaderSource<'a> {
    None,
    Kafka(&'a BorrowedHeaders),
    List(&'a [(&'a str, Option<&'a [u8]>)]),
}

impl<'a> Headers<'a> {
    /// No headers.
    pub const NONE: Headers<'static> = Headers(HeaderSource::None);

    /// Headers from a list of (name, value) pairs.
    pub fn list(headers: &'a [(&'a str, Option<&'a [u8]>)]) -> Self {
        Headers(HeaderSource::List(headers))
    }

    pub(crate) fn kafka(headers: Option<&'a BorrowedHeaders>) -> Self {
        Headers(headers.map_or(HeaderSource::None, HeaderSource::Kafka))
    }

    /// Every header as (name, value), in order.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> {
        let (kafka, list) = match self.0 {
            HeaderSource::None => (None, None),
            HeaderSource::Kafka(h) => (Some(h), None),
            HeaderSource::List(l) => (None, Some(l)),
        };
        let kafka = kafka.into_iter().flat_map(|h| h.iter().map(|h| (h.key, h.value)));
        kafka.chain(list.into_iter().flatten().copied())
    }
}

/// What a decoder makes of one message.
#[derive(Debug, PartialEq)]
pub enum Decoded<T> {
    /// A record for the dataflow.
    Record(T),
    /// Not data (a schema change, a heartbeat, ...): counted under this reason.
    Ignored(&'static str),
}

/// Turns one message into a record. Implementations keep whatever state makes that cheap (a schema seen
/// before, say). Bad input is an `Err`: the source counts it, dead-letters the raw message and goes on.
pub trait Decoder: 'static {
    /// The record type the source emits.
    type Out: Clone + 'static;

    /// Decodes one message; `key`/`value` are `None` for a null key or value.
    fn decode(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
    ) -> Result<Decoded<Self::Out>, DecodeError>;

    /// Called once per source step, messages or not: a decoder that holds messages back (a batch staged
    /// until complete) expires what waited too long here.
    fn idle(&mut self) {}
}

/// Refuses a top-level JSON array: serde would otherwise fill a struct from it by position.
pub fn reject_array(bytes: &[u8]) -> Result<(), DecodeError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => Err(DecodeError::Shape("expected a JSON object, found an array".into())),
        _ => Ok(()),
    }
}
