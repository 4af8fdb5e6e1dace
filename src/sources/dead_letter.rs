//! The dead-letter file: one JSON line per message tally could not decode, with its Kafka coordinates,
//! the reason, and the raw key and value (as text when UTF-8, else base64), so nothing is lost.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use serde::Serialize;

use super::decode::Metadata;
use crate::error::{DecodeError, RuntimeError};

/// An append-only JSON-lines file of the messages that could not be decoded.
pub struct DeadLetter {
    path: PathBuf,
    file: Mutex<BufWriter<File>>,
}

#[derive(Serialize)]
struct Entry<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    reason: &'static str,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

fn split(raw: Option<&[u8]>) -> (Option<&str>, Option<String>) {
    match raw {
        None => (None, None),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => (Some(s), None),
            Err(_) => (None, Some(base64::engine::general_purpose::STANDARD.encode(b))),
        },
    }
}

impl DeadLetter {
    /// Opens (appends to) the dead-letter file, creating parent directories.
    pub fn open(path: &Path) -> Result<Self, RuntimeError> {
        let err = |source| RuntimeError::DeadLetter {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        Ok(DeadLetter {
            path: path.to_owned(),
            file: Mutex::new(BufWriter::new(file)),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one message with its coordinates and why it failed, and flushes, so a crash right after
    /// loses nothing.
    pub fn write(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
        error: &DecodeError,
    ) -> std::io::Result<()> {
        let (key, key_base64) = split(key);
        let (value, value_base64) = split(value);
        let entry = Entry {
            topic: meta.topic,
            partition: meta.partition,
            offset: meta.offset,
            reason: error.reason(),
            error: error.to_string(),
            key,
            key_base64,
            value,
            value_base64,
        };
        let line = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        writeln!(f, "{line}")?;
        f.flush()
    }
}
