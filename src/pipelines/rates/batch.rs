//! Price batches on Kafka, staged until complete and valid, then handed to the dataflow whole.
//!
//! A batch is chunk records and one end record, all keyed by the batch id (so one partition, one worker):
//!
//! ```text
//! {"batch_id":"b-7","kind":"items","part":0,"items":[{"orig_code":"CNSGH","dest_code":"NLRTM","day":"2021-02-01","price":1234},...]}
//! {"batch_id":"b-7","kind":"end","parts":50,"items":50000}
//! ```
//!
//! The [`Stager`] is the source's decoder: it keeps each batch outside the dataflow until its end record
//! and every part it announces are in, checks every item, and only then emits the batch as ONE record, so
//! the dataflow inserts all of it at one timestamp. One bad item rejects the batch (nothing of it applies):
//! the rejection is dead-lettered with its reasons, counted, and answered at `/batches/{id}`. A batch that
//! stops arriving expires `--batch-expiry` after its last part, the same way. Atomicity rests on this,
//! not on Kafka transactions (no broker here has them).
//!
//! Offsets: a batch carries the offset to resume its partition from, the first offset of the oldest batch
//! still staged there (else the one after its end record), so a restart reads every staged batch again.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataflows::rates::{format_day, parse_day, Price};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::error::DecodeError;
use crate::metrics::Metrics;
use crate::sources::dead_letter::DeadLetter;
use crate::sources::decode::{reject_array, Decoded, Decoder, Metadata};

/// Reasons kept per rejected batch (the count says how many there were in all).
pub const MAX_REASONS: usize = 100;

/// A complete, valid batch: what the dataflow inserts and the store writes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Batch {
    /// Its id (the Kafka key).
    pub id: String,
    /// SHA-256 of its items in order, hex: the same id with other content is a conflict.
    pub hash: String,
    /// The partition it was read from.
    pub partition: i32,
    /// Offset of its first record.
    pub first_offset: i64,
    /// Offset of its last record (the one that completed it).
    pub end_offset: i64,
    /// Where to resume the partition once this batch is stored.
    pub resume: i64,
    /// Its prices, in part order (shared: the dataflow, the store and the progress all hold the batch).
    pub items: Arc<Vec<Price>>,
}

/// Why a batch was not applied: where and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// The part (`None`: the batch as a whole).
    pub part: Option<u32>,
    /// The item's index in its part.
    pub index: Option<usize>,
    /// The item's field.
    pub field: Option<&'static str>,
    /// What is wrong.
    pub error: String,
}

impl Reason {
    fn batch(error: String) -> Self {
        Reason {
            part: None,
            index: None,
            field: None,
            error,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(p) = self.part {
            write!(f, "part {p} ")?;
        }
        if let Some(i) = self.index {
            write!(f, "item {i} ")?;
        }
        if let Some(field) = self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.error)
    }
}

/// Where a batch stands, as `/batches/{id}` tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Parts are arriving.
    Pending {
        /// Parts in so far.
        parts: usize,
        /// Items in so far.
        items: usize,
        /// What the end record announced, once in.
        expected: Option<(u32, u64)>,
    },
    /// Complete and valid: in the dataflow at `time` (visible once a view's as-of reaches it), in
    /// PostgreSQL once `stored`.
    Accepted {
        /// The dataflow timestamp it was inserted at; `None` until the dataflow has it.
        time: Option<u64>,
        /// Items.
        items: u64,
        /// Its content hash.
        hash: String,
        /// Committed to PostgreSQL (by this process or another).
        stored: bool,
        /// How long its stages took in this process (`None`: read from PostgreSQL at start).
        timing: Option<Timing>,
    },
    /// Not applied: at least one bad item, or counts that do not match.
    Rejected {
        /// The first [`MAX_REASONS`] reasons.
        reasons: Vec<Reason>,
        /// How many reasons in all.
        errors: usize,
    },
    /// Incomplete for longer than the expiry.
    Expired {
        /// What was missing.
        reasons: Vec<Reason>,
    },
}

/// Where a batch's time went, from its first record to visible and stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// When its last record was decoded (the batch complete and checked).
    pub completed: Instant,
    /// Parsing and checking its records, summed.
    pub decode_us: u64,
    /// From complete to visible in the views.
    pub visible_us: Option<u64>,
    /// From complete to committed in PostgreSQL.
    pub stored_us: Option<u64>,
}

/// Finished batches kept for `/batches/{id}` besides the accepted ones (which are all kept: they are the
/// duplicate check).
const KEPT_FINISHED: usize = 10_000;

/// Every batch this process knows of: from PostgreSQL at start, and from the topic since.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    batches: HashMap<String, Status>,
    /// Rejected and expired ids, oldest first, to forget the oldest past [`KEPT_FINISHED`].
    finished: VecDeque<String>,
    /// Accepted batches not visible yet.
    awaiting: Vec<String>,
}

impl Registry {
    fn with<T>(&self, f: impl FnOnce(&mut RegistryInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A batch already stored in PostgreSQL when this process started (as of the snapshot, time 0).
    pub fn stored(&self, id: String, hash: String, items: u64) {
        self.with(|r| {
            r.batches.insert(
                id,
                Status::Accepted {
                    time: Some(0),
                    items,
                    hash,
                    stored: true,
                    timing: None,
                },
            )
        });
    }

    /// Where `id` stands.
    pub fn status(&self, id: &str) -> Option<Status> {
        self.with(|r| r.batches.get(id).cloned())
    }

    /// The hash of `id` if it was accepted.
    fn accepted_hash(&self, id: &str) -> Option<String> {
        self.with(|r| match r.batches.get(id) {
            Some(Status::Accepted { hash, .. }) => Some(hash.clone()),
            _ => None,
        })
    }

    fn set(&self, id: &str, status: Status) {
        self.with(|r| {
            if matches!(r.batches.get(id), Some(Status::Accepted { .. })) {
                // An applied batch stays applied: a later copy is a duplicate or a conflict, counted and
                // dead-lettered on its own, and never changes what is in the views.
                return;
            }
            let finished = matches!(status, Status::Rejected { .. } | Status::Expired { .. });
            if r.batches.insert(id.to_owned(), status).is_none() && finished {
                r.finished.push_back(id.to_owned());
                while r.finished.len() > KEPT_FINISHED {
                    if let Some(old) = r.finished.pop_front() {
                        if matches!(
                            r.batches.get(&old),
                            Some(Status::Rejected { .. } | Status::Expired { .. })
                        ) {
                            r.batches.remove(&old);
                        }
                    }
                }
            }
        });
    }

    /// The dataflow inserted `id` at `time`.
    pub fn inserted(&self, id: &str, at: u64) {
        self.with(|r| {
            if let Some(Status::Accepted { time, .. }) = r.batches.get_mut(id) {
                time.get_or_insert(at);
            }
        });
    }

    /// `id` is committed to PostgreSQL.
    pub fn committed(&self, id: &str) {
        self.with(|r| {
            if let Some(Status::Accepted { stored, timing, .. }) = r.batches.get_mut(id) {
                *stored = true;
                if let Some(t) = timing.as_mut() {
                    t.stored_us.get_or_insert(t.completed.elapsed().as_micros() as u64);
                }
            }
        });
    }

    /// The views show every timestamp up to `as_of`: the batches inserted by then are visible.
    pub fn visible(&self, as_of: u64) {
        self.with(|r| {
            let RegistryInner { batches, awaiting, .. } = r;
            awaiting.retain(|id| match batches.get_mut(id) {
                Some(Status::Accepted {
                    time: Some(t),
                    timing: Some(timing),
                    ..
                }) if *t <= as_of => {
                    timing.visible_us = Some(timing.completed.elapsed().as_micros() as u64);
                    false
                }
                Some(Status::Accepted { .. }) => true,
                _ => false,
            });
        });
    }

    /// A batch is complete and valid.
    fn accept(&self, id: &str, items: u64, hash: String, decode_us: u64) {
        self.set(
            id,
            Status::Accepted {
                time: None,
                items,
                hash,
                stored: false,
                timing: Some(Timing {
                    completed: Instant::now(),
                    decode_us,
                    visible_us: None,
                    stored_us: None,
                }),
            },
        );
        self.with(|r| r.awaiting.push(id.to_owned()));
    }
}

/// The batch counters in `/metrics`.
#[derive(Clone)]
pub struct BatchMetrics {
    /// `tally_rates_batches_total{outcome}`: accepted, duplicate, rejected, expired.
    pub batches: prometheus::IntCounterVec,
    /// `tally_rates_batch_items_total{outcome}`.
    pub items: prometheus::IntCounterVec,
}

impl BatchMetrics {
    /// Registers them.
    pub fn new(metrics: &Metrics) -> Self {
        BatchMetrics {
            batches: metrics.counter(
                "tally_rates_batches_total",
                "Price batches finished, by outcome",
                &["outcome"],
            ),
            items: metrics.counter(
                "tally_rates_batch_items_total",
                "Items of finished price batches, by outcome",
                &["outcome"],
            ),
        }
    }

    fn count(&self, outcome: &str, items: u64) {
        self.batches.with_label_values(&[outcome]).inc();
        self.items.with_label_values(&[outcome]).inc_by(items);
    }
}

#[derive(Deserialize)]
struct Record<'a> {
    batch_id: Option<String>,
    kind: Option<&'a str>,
    part: Option<u32>,
    /// An array of items in a part, their total count in the end record.
    #[serde(borrow)]
    items: Option<&'a RawValue>,
    parts: Option<u32>,
}

#[derive(Deserialize)]
struct RawItem<'a> {
    #[serde(borrow)]
    orig_code: Option<&'a RawValue>,
    #[serde(borrow)]
    dest_code: Option<&'a RawValue>,
    #[serde(borrow)]
    day: Option<&'a RawValue>,
    #[serde(borrow)]
    price: Option<&'a RawValue>,
}

/// A batch being staged.
struct Staged {
    partition: i32,
    first_offset: i64,
    last_seen: Instant,
    /// Per part: its items (empty once the batch has errors: it will be rejected anyway) and their count.
    parts: BTreeMap<u32, (Vec<Price>, usize, [u8; 32])>,
    end: Option<(u32, u64)>,
    reasons: Vec<Reason>,
    errors: usize,
    /// Time spent decoding its records so far.
    decode: Duration,
}

impl Staged {
    fn reject(&mut self, reason: Reason) {
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push(reason);
        }
        self.errors += 1;
    }

    fn items(&self) -> usize {
        self.parts.values().map(|(_, n, _)| n).sum()
    }
}

/// The rates source's decoder: stages batches and emits each complete, valid one whole.
pub struct Stager {
    ports: Arc<HashSet<String>>,
    registry: Arc<Registry>,
    metrics: BatchMetrics,
    dead_letter: Arc<DeadLetter>,
    expiry: Duration,
    staged: HashMap<String, Staged>,
    topic: String,
    /// When the message being decoded started.
    decoding: Instant,
}

impl Stager {
    /// A stager checking port codes against `ports`.
    pub fn new(
        ports: Arc<HashSet<String>>,
        registry: Arc<Registry>,
        metrics: BatchMetrics,
        dead_letter: Arc<DeadLetter>,
        expiry: Duration,
        topic: String,
    ) -> Self {
        Stager {
            ports,
            registry,
            metrics,
            dead_letter,
            expiry,
            staged: HashMap::new(),
            topic,
            decoding: Instant::now(),
        }
    }

    /// Checks one item; an error names the field.
    fn item(&self, raw: &RawValue) -> Result<Price, (Option<&'static str>, String)> {
        let item: RawItem<'_> =
            serde_json::from_str(raw.get()).map_err(|e| (None, format!("not an item object: {e}")))?;
        let code = |field: &'static str, v: Option<&RawValue>| -> Result<String, (Option<&'static str>, String)> {
            let v = v.ok_or((Some(field), "missing".to_owned()))?;
            let code: String =
                serde_json::from_str(v.get()).map_err(|_| (Some(field), format!("not a string: {}", v.get())))?;
            if self.ports.contains(&code) {
                Ok(code)
            } else {
                Err((Some(field), format!("unknown port code {}", v.get())))
            }
        };
        let orig = code("orig_code", item.orig_code)?;
        let dest = code("dest_code", item.dest_code)?;
        let day = item.day.ok_or((Some("day"), "missing".to_owned()))?;
        let day = serde_json::from_str::<String>(day.get())
            .ok()
            .and_then(|d| parse_day(&d))
            .ok_or_else(|| (Some("day"), format!("not a real date as YYYY-MM-DD: {}", day.get())))?;
        let price = item.price.ok_or((Some("price"), "missing".to_owned()))?;
        let price = price
            .get()
            .parse::<i64>()
            .ok()
            .filter(|p| (1..=i64::from(i32::MAX)).contains(p))
            .ok_or_else(|| (Some("price"), format!("not an integer in 1..2^31-1: {}", price.get())))?;
        Ok(Price { orig, dest, day, price })
    }

    /// Decides a batch whose parts are all in: a record to apply, a duplicate, or a rejection.
    fn finish(&mut self, id: String, meta: &Metadata<'_>) -> Result<Decoded<Batch>, DecodeError> {
        let Some(mut staged) = self.staged.remove(&id) else {
            return Ok(Decoded::Ignored("staged_part"));
        };
        let items: usize = staged.items();
        let (parts, announced) = staged.end.expect("finish runs once the end record is in");
        if items as u64 != announced {
            staged.reject(Reason::batch(format!(
                "the end record announces {announced} items in {parts} parts, the parts hold {items}"
            )));
        }
        // Over the items in order, not the parts: the same prices chunked otherwise are the same batch.
        let mut hasher = Sha256::new();
        for (items, _, _) in staged.parts.values() {
            hash_items(&mut hasher, items);
        }
        let hash: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if staged.errors == 0 {
            match self.registry.accepted_hash(&id) {
                Some(h) if h == hash => {
                    self.metrics.count("duplicate", items as u64);
                    tracing::info!(batch = %id, "batch already applied with the same content: nothing to do");
                    return Ok(Decoded::Ignored("duplicate_batch"));
                }
                Some(_) => staged.reject(Reason::batch(
                    "a batch with this id was already applied with different content".to_owned(),
                )),
                None => {}
            }
        }
        if staged.errors > 0 {
            let summary = summary(&id, &staged.reasons, staged.errors);
            // Counted before `/batches/{id}` says rejected, so a reader who sees the status sees the count.
            self.metrics.count("rejected", items as u64);
            self.registry.set(
                &id,
                Status::Rejected {
                    reasons: staged.reasons,
                    errors: staged.errors,
                },
            );
            return Err(DecodeError::Invalid(summary));
        }
        let resume = self
            .staged
            .values()
            .filter(|s| s.partition == meta.partition)
            .map(|s| s.first_offset)
            .min()
            .unwrap_or(meta.offset + 1)
            .min(meta.offset + 1);
        self.metrics.count("accepted", items as u64);
        let decode_us = (staged.decode + self.decoding.elapsed()).as_micros() as u64;
        self.registry.accept(&id, items as u64, hash.clone(), decode_us);
        let items = Arc::new(staged.parts.into_values().flat_map(|(items, _, _)| items).collect());
        Ok(Decoded::Record(Batch {
            id,
            hash,
            partition: meta.partition,
            first_offset: staged.first_offset,
            end_offset: meta.offset,
            resume,
            items,
        }))
    }
}

fn summary(id: &str, reasons: &[Reason], errors: usize) -> String {
    let listed: Vec<String> = reasons.iter().map(Reason::to_string).collect();
    format!(
        "batch {id:?} rejected, nothing of it applied: {errors} error(s){}: {}",
        if errors > reasons.len() {
            format!(" (first {})", reasons.len())
        } else {
            String::new()
        },
        listed.join("; ")
    )
}

/// Feeds items to a hash in a canonical form (so the same prices in other JSON spacing hash alike).
fn hash_items(h: &mut Sha256, items: &[Price]) {
    for p in items {
        h.update(format!("{}\t{}\t{}\t{}\n", p.orig, p.dest, format_day(p.day), p.price).as_bytes());
    }
}

/// Hash of one part's items, to tell a repeated part from a different one under the same number.
fn part_hash(items: &[Price]) -> [u8; 32] {
    let mut h = Sha256::new();
    hash_items(&mut h, items);
    h.finalize().into()
}

impl Decoder for Stager {
    type Out = Batch;

    fn decode(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
    ) -> Result<Decoded<Batch>, DecodeError> {
        self.decoding = Instant::now();
        let (out, id) = self.decode_record(key, value, meta);
        if let Some(staged) = id.and_then(|id| self.staged.get_mut(&id)) {
            staged.decode += self.decoding.elapsed();
        }
        out
    }

    fn idle(&mut self) {
        self.expire();
    }
}

impl Stager {
    /// Decodes one record; also returns its batch id once known (to account its decoding time).
    fn decode_record(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
    ) -> (Result<Decoded<Batch>, DecodeError>, Option<String>) {
        let mut id = None;
        let out = self.decode_staging(key, value, meta, &mut id);
        (out, id)
    }

    fn decode_staging(
        &mut self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        meta: &Metadata<'_>,
        batch: &mut Option<String>,
    ) -> Result<Decoded<Batch>, DecodeError> {
        let value = value.ok_or(DecodeError::MissingField("value"))?;
        reject_array(value)?;
        let record: Record<'_> = serde_json::from_slice(value).map_err(DecodeError::from_json)?;
        let id = record.batch_id.ok_or(DecodeError::MissingField("batch_id"))?;
        *batch = Some(id.clone());
        if id.is_empty() || id.len() > 256 {
            return Err(DecodeError::Invalid(format!(
                "batch_id of {} bytes (1..=256)",
                id.len()
            )));
        }
        if let Some(k) = key.filter(|k| *k != id.as_bytes()) {
            return Err(DecodeError::Invalid(format!(
                "Kafka key {:?} is not the batch id {id:?} (the key keeps a batch on one partition)",
                String::from_utf8_lossy(k)
            )));
        }
        let kind = record.kind.ok_or(DecodeError::MissingField("kind"))?;
        let staged = self.staged.entry(id.clone()).or_insert_with(|| Staged {
            partition: meta.partition,
            first_offset: meta.offset,
            last_seen: Instant::now(),
            parts: BTreeMap::new(),
            end: None,
            reasons: Vec::new(),
            errors: 0,
            decode: Duration::ZERO,
        });
        staged.last_seen = Instant::now();
        match kind {
            "items" => {
                let part = record.part.ok_or(DecodeError::MissingField("part"))?;
                let raw = record.items.ok_or(DecodeError::MissingField("items"))?;
                let raw: Vec<&RawValue> =
                    serde_json::from_str(raw.get()).map_err(|_| DecodeError::WrongType("items"))?;
                let mut items = Vec::with_capacity(raw.len());
                let mut bad = Vec::new();
                for (index, r) in raw.iter().enumerate() {
                    match self.item(r) {
                        Ok(p) => items.push(p),
                        Err((field, error)) => bad.push(Reason {
                            part: Some(part),
                            index: Some(index),
                            field,
                            error,
                        }),
                    }
                }
                let staged = self.staged.get_mut(&id).expect("inserted above");
                let count = raw.len();
                let hash = part_hash(&items);
                for reason in bad {
                    staged.reject(reason);
                }
                match staged.parts.get(&part) {
                    Some((_, _, h)) if *h == hash => return Ok(Decoded::Ignored("repeated_part")),
                    Some(_) => staged.reject(Reason {
                        part: Some(part),
                        index: None,
                        field: None,
                        error: "sent twice with different items".into(),
                    }),
                    None => {}
                }
                if staged.errors > 0 {
                    items = Vec::new();
                    for (held, _, _) in staged.parts.values_mut() {
                        *held = Vec::new();
                    }
                }
                staged.parts.insert(part, (items, count, hash));
            }
            "end" => {
                let parts = record.parts.ok_or(DecodeError::MissingField("parts"))?;
                let announced = record.items.ok_or(DecodeError::MissingField("items"))?;
                let announced: u64 =
                    serde_json::from_str(announced.get()).map_err(|_| DecodeError::WrongType("items"))?;
                staged.end = Some((parts, announced));
            }
            other => {
                return Err(DecodeError::Invalid(format!(
                    "kind {other:?}: expected \"items\" or \"end\""
                )))
            }
        }
        let staged = self.staged.get_mut(&id).expect("inserted above");
        let Some((parts, _)) = staged.end else {
            self.pending(&id);
            return Ok(Decoded::Ignored("staged_part"));
        };
        let beyond = staged.parts.keys().find(|p| **p >= parts).copied();
        if let Some(beyond) = beyond {
            // Decided at once: the batch can never become what its end record says.
            staged.reject(Reason::batch(format!(
                "part {beyond} is beyond the {parts} parts the end record announces"
            )));
        }
        if beyond.is_some() || staged.parts.len() == parts as usize {
            self.finish(id, meta)
        } else {
            self.pending(&id);
            Ok(Decoded::Ignored("staged_part"))
        }
    }

    /// Expires the batches that have waited too long for their next part.
    fn expire(&mut self) {
        let expiry = self.expiry;
        let expired: Vec<String> = self
            .staged
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() >= expiry)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(staged) = self.staged.remove(&id) else {
                continue;
            };
            let mut reasons = Vec::new();
            match staged.end {
                None => reasons.push(Reason::batch("no end record".into())),
                Some((parts, _)) => {
                    let missing: Vec<String> = (0..parts)
                        .filter(|p| !staged.parts.contains_key(p))
                        .map(|p| p.to_string())
                        .collect();
                    reasons.push(Reason::batch(format!(
                        "missing {} of {parts} parts: {}",
                        missing.len(),
                        missing.iter().take(MAX_REASONS).cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            if self.registry.accepted_hash(&id).is_some() {
                // Only the tail of a batch applied before (read again from the resume offset): nothing lost.
                self.metrics.count("fragment_of_applied", staged.items() as u64);
                continue;
            }
            let error = DecodeError::Invalid(format!(
                "batch {id:?} expired after {} s without completing, nothing of it applied: {}",
                expiry.as_secs(),
                reasons.iter().map(Reason::to_string).collect::<Vec<_>>().join("; ")
            ));
            tracing::warn!(batch = %id, partition = staged.partition, first_offset = staged.first_offset, error = %error, "batch expired");
            let meta = Metadata::at(&self.topic, staged.partition, staged.first_offset);
            if let Err(e) = self.dead_letter.write(Some(id.as_bytes()), None, &meta, &error) {
                tracing::error!(batch = %id, error = %e, "dead-letter write failed for an expired batch");
            }
            self.metrics.count("expired", staged.items() as u64);
            self.registry.set(&id, Status::Expired { reasons });
        }
    }
}

impl Stager {
    fn pending(&self, id: &str) {
        if let Some(s) = self.staged.get(id) {
            self.registry.set(
                id,
                Status::Pending {
                    parts: s.parts.len(),
                    items: s.items(),
                    expected: s.end,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stager(expiry: Duration) -> (Stager, Arc<Registry>, Arc<Metrics>) {
        let dir = std::env::temp_dir().join(format!(
            "tally-stager-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let dead_letter = Arc::new(DeadLetter::open(&dir.join("dl.jsonl"), 1 << 20).expect("dead-letter file"));
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(Registry::default());
        let ports = Arc::new(["CNSGH", "NLRTM"].iter().map(|s| s.to_string()).collect());
        let stager = Stager::new(
            ports,
            registry.clone(),
            BatchMetrics::new(&metrics),
            dead_letter,
            expiry,
            "t".into(),
        );
        (stager, registry, metrics)
    }

    fn part(id: &str, part: u32, items: &[(&str, &str, &str, &str)]) -> String {
        let items: Vec<String> = items
            .iter()
            .map(|(o, d, day, p)| format!(r#"{{"orig_code":"{o}","dest_code":"{d}","day":"{day}","price":{p}}}"#))
            .collect();
        format!(
            r#"{{"batch_id":"{id}","kind":"items","part":{part},"items":[{}]}}"#,
            items.join(",")
        )
    }

    fn end(id: &str, parts: u32, items: u64) -> String {
        format!(r#"{{"batch_id":"{id}","kind":"end","parts":{parts},"items":{items}}}"#)
    }

    /// Feeds values at successive offsets of partition 0; returns each answer.
    fn feed(s: &mut Stager, id: &str, from: i64, values: &[String]) -> Vec<Result<Decoded<Batch>, DecodeError>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                s.decode(
                    Some(id.as_bytes()),
                    Some(v.as_bytes()),
                    &Metadata::at("t", 0, from + i as i64),
                )
            })
            .collect()
    }

    const A: (&str, &str, &str, &str) = ("CNSGH", "NLRTM", "2021-02-01", "100");
    const B: (&str, &str, &str, &str) = ("NLRTM", "CNSGH", "2021-02-02", "250");

    #[test]
    fn a_batch_is_emitted_whole_once_its_end_and_every_part_are_in_whatever_the_order() {
        let (mut s, registry, _) = stager(Duration::from_secs(60));
        let out = feed(
            &mut s,
            "b",
            10,
            &[part("b", 1, &[B]), end("b", 2, 3), part("b", 0, &[A, A])],
        );
        assert_eq!(out[0], Ok(Decoded::Ignored("staged_part")));
        assert_eq!(out[1], Ok(Decoded::Ignored("staged_part")));
        let Ok(Decoded::Record(batch)) = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!((batch.first_offset, batch.end_offset, batch.resume), (10, 12, 13));
        let prices: Vec<i64> = batch.items.iter().map(|p| p.price).collect();
        assert_eq!(prices, [100, 100, 250], "in part order");
        assert!(matches!(registry.status("b"), Some(Status::Accepted { items: 3, .. })));
    }

    #[test]
    fn resume_stays_at_the_first_offset_of_a_batch_still_staged() {
        let (mut s, _, _) = stager(Duration::from_secs(60));
        feed(&mut s, "x", 5, &[part("x", 0, &[A])]);
        let out = feed(&mut s, "y", 6, &[part("y", 0, &[B]), end("y", 1, 1)]);
        let Ok(Decoded::Record(y)) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(y.resume, 5, "x is still staged from offset 5");
        let out = feed(&mut s, "x", 8, &[end("x", 1, 1)]);
        let Ok(Decoded::Record(x)) = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(x.resume, 9);
    }

    #[test]
    fn one_bad_item_rejects_the_batch_with_every_reason() {
        let (mut s, registry, metrics) = stager(Duration::from_secs(60));
        let bad = [
            ("CNSGH", "XXXXX", "2021-02-01", "1"),
            ("CNSGH", "NLRTM", "2021-02-29", "1"),
            ("CNSGH", "NLRTM", "2021-02-01", "1.5"),
            ("CNSGH", "NLRTM", "2021-02-01", "2147483648"),
        ];
        let out = feed(
            &mut s,
            "r",
            0,
            &[part("r", 0, &[A]), part("r", 1, &bad), end("r", 2, 5)],
        );
        let Err(DecodeError::Invalid(summary)) = &out[2] else {
            panic!("{out:?}")
        };
        assert!(summary.contains("4 error(s)"), "{summary}");
        let Some(Status::Rejected { reasons, errors: 4 }) = registry.status("r") else {
            panic!()
        };
        let fields: Vec<_> = reasons.iter().map(|r| (r.part, r.index, r.field)).collect();
        assert_eq!(
            fields,
            [
                (Some(1), Some(0), Some("dest_code")),
                (Some(1), Some(1), Some("day")),
                (Some(1), Some(2), Some("price")),
                (Some(1), Some(3), Some("price")),
            ]
        );
        assert!(metrics
            .render()
            .contains("tally_rates_batches_total{outcome=\"rejected\"} 1"));
    }

    #[test]
    fn counts_that_do_not_match_reject() {
        let (mut s, _, _) = stager(Duration::from_secs(60));
        let out = feed(&mut s, "c", 0, &[part("c", 0, &[A]), end("c", 1, 2)]);
        assert!(
            matches!(&out[1], Err(DecodeError::Invalid(m)) if m.contains("announces 2 items")),
            "{out:?}"
        );
        let out = feed(&mut s, "d", 0, &[part("d", 3, &[A]), end("d", 1, 1)]);
        assert!(
            matches!(&out[1], Err(DecodeError::Invalid(m)) if m.contains("beyond")),
            "{out:?}"
        );
        let out = feed(
            &mut s,
            "e",
            0,
            &[part("e", 0, &[A]), part("e", 0, &[B]), end("e", 1, 1)],
        );
        assert!(
            matches!(&out[2], Err(DecodeError::Invalid(m)) if m.contains("sent twice")),
            "{out:?}"
        );
        let wrong_key = s.decode(
            Some(b"other"),
            Some(end("f", 1, 1).as_bytes()),
            &Metadata::at("t", 0, 9),
        );
        assert!(matches!(wrong_key, Err(DecodeError::Invalid(m)) if m.contains("not the batch id")));
    }

    #[test]
    fn the_same_batch_again_is_a_no_op_and_other_content_under_its_id_a_conflict() {
        let (mut s, registry, _) = stager(Duration::from_secs(60));
        let out = feed(&mut s, "g", 0, &[part("g", 0, &[A, B]), end("g", 1, 2)]);
        assert!(matches!(out[1], Ok(Decoded::Record(_))));
        // The same items chunked otherwise.
        let out = feed(
            &mut s,
            "g",
            2,
            &[part("g", 0, &[A]), part("g", 1, &[B]), end("g", 2, 2)],
        );
        assert_eq!(out[2], Ok(Decoded::Ignored("duplicate_batch")));
        let out = feed(&mut s, "g", 5, &[part("g", 0, &[B, A]), end("g", 1, 2)]);
        assert!(
            matches!(&out[1], Err(DecodeError::Invalid(m)) if m.contains("different content")),
            "{out:?}"
        );
        assert!(
            matches!(registry.status("g"), Some(Status::Accepted { items: 2, .. })),
            "still applied"
        );
    }

    #[test]
    fn an_incomplete_batch_expires_and_says_what_is_missing() {
        let (mut s, registry, metrics) = stager(Duration::ZERO);
        feed(&mut s, "h", 0, &[part("h", 0, &[A]), end("h", 3, 3)]);
        s.idle();
        let Some(Status::Expired { reasons }) = registry.status("h") else {
            panic!("{:?}", registry.status("h"))
        };
        assert!(reasons[0].error.contains("missing 2 of 3 parts: 1, 2"), "{reasons:?}");
        assert!(metrics
            .render()
            .contains("tally_rates_batches_total{outcome=\"expired\"} 1"));
        // Nothing of it is held any more: its resume offset no longer holds the partition back.
        let out = feed(&mut s, "i", 7, &[part("i", 0, &[A]), end("i", 1, 1)]);
        let Ok(Decoded::Record(i)) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(i.resume, 9);
    }
}
