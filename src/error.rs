//! Error types, one per subsystem.

/// Why a message could not be decoded. Bad input is data: it is counted by [`DecodeError::reason`],
/// dead-lettered with its coordinates, and processing goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated JSON: {0}")]
    Truncated(String),
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("JSON does not match the expected shape: {0}")]
    Shape(String),
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("wrong type for `{0}`")]
    WrongType(&'static str),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
    #[error("bad decimal: {0}")]
    BadDecimal(String),
    #[error("bad timestamp")]
    BadTimestamp,
    #[error("invalid value: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated(_) => "truncated",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Shape(_) => "shape",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::UnknownOp(_) => "unknown_op",
            DecodeError::BadDecimal(_) => "bad_decimal",
            DecodeError::BadTimestamp => "bad_timestamp",
            DecodeError::Invalid(_) => "invalid",
        }
    }

    pub fn from_json(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        let msg = e.to_string();
        match e.classify() {
            Category::Eof => DecodeError::Truncated(msg),
            Category::Syntax | Category::Io => DecodeError::Malformed(msg),
            Category::Data => DecodeError::Shape(msg),
        }
    }
}

/// Failures of the runtime around the dataflows.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot bind HTTP on {addr}: {source}")]
    Bind {
        addr: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("timely: {0}")]
    Timely(String),
    #[error("cannot open dead-letter file {path}: {source}")]
    DeadLetter { path: String, source: std::io::Error },
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
