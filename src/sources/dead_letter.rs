//! The dead-letter file: one JSON line per message tally could not decode, with its Kafka coordinates,
//! the reason, and the raw key and value (as text when UTF-8, else base64), so nothing is lost.
//!
//! Bounded: when the file would pass `max_bytes` it is rotated to `<path>.1` (replacing an older one), so
//! at most twice the cap is kept (a single record larger than the cap is still written whole). Not
//! appended twice: on open it reads what both files hold, and `<path>.offsets` (the last offsets written
//! before the latest rotation, so what rotated away is remembered too), and skips every message at or
//! before the last offset of its topic and partition: a pipeline that reads its topic again after a
//! restart does not dead-letter the same messages again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::decode::Metadata;
use crate::error::{DecodeError, RuntimeError};

/// Without `--dead-letter-max-bytes`: 64 MiB per file.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// An append-only, size-capped JSON-lines file of the messages that could not be decoded.
pub struct DeadLetter {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

struct State {
    file: BufWriter<File>,
    size: u64,
    /// Per (topic, partition): the highest offset already in the files.
    last: HashMap<(String, i32), i64>,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The message is in the file now.
    Appended,
    /// An earlier run had already written it.
    AlreadyThere,
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

#[derive(Deserialize)]
struct Coordinates {
    topic: String,
    partition: i32,
    offset: i64,
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

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn rotated(path: &Path) -> PathBuf {
    with_suffix(path, ".1")
}

/// The last offsets as of the latest rotation: `[{"topic":..,"partition":..,"offset":..}]`.
fn offsets_file(path: &Path) -> PathBuf {
    with_suffix(path, ".offsets")
}

/// The highest offset per (topic, partition) in a dead-letter file; lines that do not parse are skipped.
fn scan(path: &Path, last: &mut HashMap<(String, i32), i64>) {
    let Ok(file) = File::open(path) else { return };
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if let Ok(c) = serde_json::from_str::<Coordinates>(&line) {
            let e = last.entry((c.topic, c.partition)).or_insert(c.offset);
            *e = (*e).max(c.offset);
        }
    }
}

impl DeadLetter {
    /// Opens (appends to) the dead-letter file, creating parent directories, and reads which messages it
    /// and its rotated predecessor already hold.
    pub fn open(path: &Path, max_bytes: u64) -> Result<Self, RuntimeError> {
        let err = |source| RuntimeError::DeadLetter {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut last = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(offsets_file(path)) {
            for c in serde_json::from_str::<Vec<Coordinates>>(&text).unwrap_or_default() {
                last.insert((c.topic, c.partition), c.offset);
            }
        }
        scan(&rotated(path), &mut last);
        scan(path, &mut last);
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let state = State {
            file: BufWriter::new(file),
            size,
            last,
        };
        Ok(DeadLetter {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            state: Mutex::new(state),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one message with its coordinates and why it failed, and flushes, so a crash right after
    /// loses nothing; a message an earlier run already wrote is not written again.
    pub fn write(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
        error: &DecodeError,
    ) -> std::io::Result<Written> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .last
            .get(&(meta.topic.to_owned(), meta.partition))
            .is_some_and(|o| *o >= meta.offset)
        {
            return Ok(Written::AlreadyThere);
        }
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
        let mut line = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
        line.push('\n');
        if state.size > 0 && state.size + line.len() as u64 > self.max_bytes {
            state.file.flush()?;
            let offsets: Vec<serde_json::Value> = state
                .last
                .iter()
                .map(|((topic, partition), offset)| serde_json::json!({"topic": topic, "partition": partition, "offset": offset}))
                .collect();
            std::fs::write(offsets_file(&self.path), serde_json::Value::Array(offsets).to_string())?;
            std::fs::rename(&self.path, rotated(&self.path))?;
            let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            state.file = BufWriter::new(file);
            state.size = 0;
        }
        state.file.write_all(line.as_bytes())?;
        state.file.flush()?;
        state.size += line.len() as u64;
        state.last.insert((meta.topic.to_owned(), meta.partition), meta.offset);
        Ok(Written::Appended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn capped_with_one_rotation_and_never_appended_twice() {
        let dir = std::env::temp_dir().join(format!("tally-dead-letter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("dl.jsonl");
        let value = vec![b'x'; 1000];
        let err = DecodeError::Malformed("no".into());
        let dl = DeadLetter::open(&path, 4096).unwrap();
        for offset in 0..10 {
            assert_eq!(
                dl.write(None, Some(&value), &Metadata::at("t", 0, offset), &err)
                    .unwrap(),
                Written::Appended
            );
        }
        drop(dl);
        let (now, before) = (lines(&path), lines(&rotated(&path)));
        assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        assert!(std::fs::metadata(rotated(&path)).unwrap().len() <= 4096);
        let kept: Vec<i64> = before
            .iter()
            .chain(&now)
            .map(|l| l["offset"].as_i64().unwrap())
            .collect();
        assert!(kept.len() < 10, "older rotations are gone: {kept:?}");
        assert_eq!(
            kept,
            ((10 - kept.len() as i64)..10).collect::<Vec<_>>(),
            "the newest, in order"
        );
        // A restart reads the topic again: nothing already there is appended, a new offset is.
        let dl = DeadLetter::open(&path, 4096).unwrap();
        for offset in 0..10 {
            assert_eq!(
                dl.write(None, Some(&value), &Metadata::at("t", 0, offset), &err)
                    .unwrap(),
                Written::AlreadyThere
            );
        }
        assert_eq!(
            dl.write(None, Some(b"\xff"), &Metadata::at("t", 1, 0), &err).unwrap(),
            Written::Appended
        );
        drop(dl);
        assert_eq!(lines(&path).last().unwrap()["value_base64"], "/w==");
        // Partition 1's only entry rotates away behind newer ones of partition 0, and is still remembered.
        let dl = DeadLetter::open(&path, 4096).unwrap();
        for offset in 10..20 {
            dl.write(None, Some(&value), &Metadata::at("t", 0, offset), &err)
                .unwrap();
        }
        drop(dl);
        assert!(!lines(&path)
            .iter()
            .chain(&lines(&rotated(&path)))
            .any(|l| l["partition"] == 1));
        let dl = DeadLetter::open(&path, 4096).unwrap();
        assert_eq!(
            dl.write(None, Some(b"\xff"), &Metadata::at("t", 1, 0), &err).unwrap(),
            Written::AlreadyThere
        );
    }
}
