//! `tally prices`: publish a price batch in the batch format the rates pipeline reads, and generate
//! realistic batches from the dump's distribution for tests, benchmarks and staging copies.
//!
//! ```text
//! tally prices generate --items 50000 --seed 7 > batch.csv
//! tally prices publish --batch-id 2021-02-01-a batch.csv
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};

/// Items per chunk record: about 80 KB of JSON, well under Kafka's default 1 MB message limit.
pub const CHUNK_ITEMS: usize = 1000;

/// One price as the batch format carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Origin port code.
    pub orig_code: String,
    /// Destination port code.
    pub dest_code: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    /// The price.
    pub price: i64,
}

/// `tally prices`.
#[derive(clap::Args, Clone, Debug)]
pub struct PricesArgs {
    #[command(subcommand)]
    pub command: PricesCommand,
}

/// The `tally prices` subcommands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum PricesCommand {
    /// Publish FILE (CSV with header orig_code,dest_code,day,price, or JSON lines) as one batch.
    Publish {
        /// The batch id (also the Kafka key, so the batch stays on one partition).
        #[arg(long)]
        batch_id: String,
        /// The items.
        file: PathBuf,
        /// Kafka bootstrap servers.
        #[arg(long, env = "TALLY_BROKERS", default_value = "localhost:9092")]
        brokers: String,
        /// Topic of price batches.
        #[arg(long, env = "TALLY_RATES_TOPIC", default_value = "rates.price-batches")]
        topic: String,
        /// Items per chunk record.
        #[arg(long, default_value_t = CHUNK_ITEMS)]
        chunk_items: usize,
    },
    /// Write a CSV batch of prices drawn from the dump's port pairs and their price ranges.
    Generate {
        /// How many items.
        #[arg(long, default_value_t = 50_000)]
        items: usize,
        /// Random seed (the same seed gives the same batch).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// First day of the prices.
        #[arg(long, default_value = "2021-02-01")]
        from: String,
        /// Days the prices spread over.
        #[arg(long, default_value_t = 28)]
        days: i32,
        /// The dump whose pairs and price ranges to follow.
        #[arg(long, default_value = "data/rates.sql")]
        dump: PathBuf,
        /// Where to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Why a prices command failed.
#[derive(Debug, thiserror::Error)]
pub enum PricesError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// A line of the input is not an item.
    #[error("{file} line {line}: {error}")]
    Line {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        error: String,
    },
    /// Kafka refused.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
}

impl PricesArgs {
    /// Runs the subcommand.
    pub fn run(self) -> Result<(), PricesError> {
        match self.command {
            PricesCommand::Publish {
                batch_id,
                file,
                brokers,
                topic,
                chunk_items,
            } => {
                let items = read_items(&file)?;
                let records = batch_records(&batch_id, &items, chunk_items.max(1));
                publish(&brokers, &topic, &batch_id, &records)?;
                eprintln!(
                    "tally prices: batch {batch_id:?} of {} items in {} records sent to {topic}; see GET /batches/{batch_id}",
                    items.len(),
                    records.len()
                );
                Ok(())
            }
            PricesCommand::Generate {
                items,
                seed,
                from,
                days,
                dump,
                out,
            } => {
                let from = dataflows::rates::parse_day(&from)
                    .ok_or_else(|| PricesError::Usage(format!("--from {from:?} is not YYYY-MM-DD")))?;
                let pairs = dump_pairs(&dump)?;
                let batch = generate(&pairs, items, seed, from, days.max(1));
                let write = |w: &mut dyn Write| write_csv(w, &batch);
                match out {
                    Some(path) => {
                        let mut f = std::io::BufWriter::new(
                            std::fs::File::create(&path).map_err(|e| PricesError::Io(path.display().to_string(), e))?,
                        );
                        write(&mut f).map_err(|e| PricesError::Io(path.display().to_string(), e))
                    }
                    None => write(&mut std::io::stdout().lock()).map_err(|e| PricesError::Io("stdout".into(), e)),
                }
            }
        }
    }
}

/// Writes items as CSV with the header.
pub fn write_csv(w: &mut dyn Write, items: &[Item]) -> std::io::Result<()> {
    writeln!(w, "orig_code,dest_code,day,price")?;
    for i in items {
        writeln!(w, "{},{},{},{}", i.orig_code, i.dest_code, i.day, i.price)?;
    }
    w.flush()
}

/// Reads a CSV (header `orig_code,dest_code,day,price`) or JSON-lines file of items.
pub fn read_items(path: &Path) -> Result<Vec<Item>, PricesError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| PricesError::Io(name.clone(), e))?;
    let mut items = Vec::new();
    let mut csv_columns: Option<Vec<String>> = None;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| PricesError::Io(name.clone(), e))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |error: String| PricesError::Line {
            file: name.clone(),
            line: n + 1,
            error,
        };
        if line.starts_with('{') {
            items.push(serde_json::from_str(line).map_err(|e| bad(e.to_string()))?);
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let Some(columns) = &csv_columns else {
            let header: Vec<String> = fields.iter().map(|f| f.to_ascii_lowercase()).collect();
            for want in ["orig_code", "dest_code", "day", "price"] {
                if !header.iter().any(|h| h == want) {
                    return Err(bad(format!(
                        "a CSV header orig_code,dest_code,day,price is expected first; column {want} is missing"
                    )));
                }
            }
            csv_columns = Some(header);
            continue;
        };
        if fields.len() != columns.len() {
            return Err(bad(format!(
                "{} fields, the header has {}",
                fields.len(),
                columns.len()
            )));
        }
        let get = |want: &str| {
            columns
                .iter()
                .position(|c| c == want)
                .map(|i| fields[i].to_owned())
                .unwrap_or_default()
        };
        let price = get("price");
        items.push(Item {
            orig_code: get("orig_code"),
            dest_code: get("dest_code"),
            day: get("day"),
            price: price
                .parse()
                .map_err(|_| bad(format!("price {price:?} is not an integer")))?,
        });
    }
    Ok(items)
}

/// The batch's Kafka records, `(key, value)`: its chunks, then the end record.
pub fn batch_records(batch_id: &str, items: &[Item], chunk_items: usize) -> Vec<(String, String)> {
    let mut records: Vec<(String, String)> = items
        .chunks(chunk_items.max(1))
        .enumerate()
        .map(|(part, chunk)| {
            let value = serde_json::json!({"batch_id": batch_id, "kind": "items", "part": part, "items": chunk});
            (batch_id.to_owned(), value.to_string())
        })
        .collect();
    let end = serde_json::json!({"batch_id": batch_id, "kind": "end", "parts": records.len(), "items": items.len()});
    records.push((batch_id.to_owned(), end.to_string()));
    records
}

/// The idempotent producer batches are published with.
pub fn producer(brokers: &str) -> Result<ThreadedProducer<DefaultProducerContext>, PricesError> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.max.bytes", "1000000")
        .create()?)
}

/// Sends records in order with an idempotent producer and waits until every one is acknowledged.
pub fn publish(brokers: &str, topic: &str, batch_id: &str, records: &[(String, String)]) -> Result<(), PricesError> {
    publish_with(&producer(brokers)?, topic, batch_id, records)
}

/// [`publish`] through a producer the caller keeps (a service publishing many batches).
pub fn publish_with(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    batch_id: &str,
    records: &[(String, String)],
) -> Result<(), PricesError> {
    for (key, value) in records {
        let mut record = BaseRecord::<String, String>::to(topic).key(key).payload(value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
                Err((e, _)) => {
                    return Err(PricesError::Usage(format!("batch {batch_id:?}: producing failed: {e}")));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(())
}

/// A port pair of the dump and the range of its prices.
#[derive(Clone, Debug)]
pub struct PairRange {
    /// Origin.
    pub orig: String,
    /// Destination.
    pub dest: String,
    /// Lowest price.
    pub min: i64,
    /// Highest price.
    pub max: i64,
    /// Prices the dump holds for it (how often the pair is drawn).
    pub weight: usize,
}

/// The port pairs of the dump's `COPY public.prices` block with their price ranges.
pub fn dump_pairs(dump: &Path) -> Result<Vec<PairRange>, PricesError> {
    let name = dump.display().to_string();
    let text = std::fs::read_to_string(dump).map_err(|e| PricesError::Io(name.clone(), e))?;
    let mut pairs: BTreeMap<(String, String), (i64, i64, usize)> = BTreeMap::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("COPY public.prices ") {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if line == "\\." {
            break;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if let [orig, dest, _day, price] = f[..] {
            if let Ok(price) = price.parse::<i64>() {
                let e = pairs
                    .entry((orig.to_owned(), dest.to_owned()))
                    .or_insert((price, price, 0));
                e.0 = e.0.min(price);
                e.1 = e.1.max(price);
                e.2 += 1;
            }
        }
    }
    if pairs.is_empty() {
        return Err(PricesError::Usage(format!(
            "{name}: no COPY public.prices block with prices"
        )));
    }
    Ok(pairs
        .into_iter()
        .map(|((orig, dest), (min, max, weight))| PairRange {
            orig,
            dest,
            min,
            max,
            weight,
        })
        .collect())
}

/// `items` prices over `days` days from `from`: pairs drawn as often as the dump has them, prices uniform
/// in the pair's range. The same arguments give the same batch.
pub fn generate(pairs: &[PairRange], items: usize, seed: u64, from: i32, days: i32) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    let total: usize = pairs.iter().map(|p| p.weight).sum();
    (0..items)
        .map(|_| {
            let mut pick = rng.random_range(0..total);
            let pair = pairs
                .iter()
                .find(|p| {
                    if pick < p.weight {
                        true
                    } else {
                        pick -= p.weight;
                        false
                    }
                })
                .expect("the pick is below the total weight");
            Item {
                orig_code: pair.orig.clone(),
                dest_code: pair.dest.clone(),
                day: dataflows::rates::format_day(from + rng.random_range(0..days)),
                price: rng.random_range(pair.min..=pair.max),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_its_chunks_and_an_end_record_that_counts_them() {
        let items: Vec<Item> = (0..2500)
            .map(|i| Item {
                orig_code: "CNSGH".into(),
                dest_code: "NLRTM".into(),
                day: "2021-02-01".into(),
                price: 1000 + i,
            })
            .collect();
        let records = batch_records("b1", &items, 1000);
        assert_eq!(records.len(), 4);
        assert!(records.iter().all(|(k, _)| k == "b1"));
        let end: serde_json::Value = serde_json::from_str(&records[3].1).expect("JSON");
        assert_eq!(
            end,
            serde_json::json!({"batch_id":"b1","kind":"end","parts":3,"items":2500})
        );
        let last: serde_json::Value = serde_json::from_str(&records[2].1).expect("JSON");
        assert_eq!(last["part"], 2);
        assert_eq!(last["items"].as_array().map(Vec::len), Some(500));
        assert!(records.iter().all(|(_, v)| v.len() < 1_000_000));
    }

    #[test]
    fn generated_batches_follow_the_dump_and_repeat_by_seed() {
        let dump = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/rates.sql");
        let pairs = dump_pairs(&dump).expect("the dump reads");
        assert_eq!(pairs.len(), 725, "the dump's port pairs");
        let a = generate(&pairs, 2000, 9, 18_659, 10);
        assert_eq!(a, generate(&pairs, 2000, 9, 18_659, 10));
        assert_ne!(a, generate(&pairs, 2000, 10, 18_659, 10));
        for item in &a {
            let p = pairs
                .iter()
                .find(|p| p.orig == item.orig_code && p.dest == item.dest_code)
                .expect("a pair of the dump");
            assert!((p.min..=p.max).contains(&item.price));
        }
    }
}
