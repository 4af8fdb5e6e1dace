//! `tally availability`: check results from Kafka into PostgreSQL, exactly once, with raw SQL.
//!
//! Per closed timestamp ONE transaction through the shared transactional sink: `COPY` the results into a
//! temporary staging table, `INSERT ... SELECT ... ON CONFLICT DO NOTHING` into `check_result` (primary key
//! `(url, scheduled_at)`: a re-sent or replayed result is one row), and the Kafka offsets. On start the
//! source resumes from the stored offsets, so a kill -9 anywhere loses and doubles nothing.
//!
//! `check_result` is partitioned by day of `scheduled_at`; partitions are created as results arrive and, with
//! `--retention-days`, the ones entirely older than that many days before the newest result are dropped.
//! `--setup` creates the schema and a least-privilege role and exits.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use dataflows::availability::{Check, IncidentRule, Input, Outcome};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concat, Input as _, Probe};
use timely::dataflow::ProbeHandle;

use postgres::{Client, NoTls};
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, RuntimeError};
use crate::http::Routes;
use crate::metrics::Metrics;
use crate::runtime::clock::rfc3339;
use crate::runtime::{Cluster, Common, Env, OpsArgs, Pipeline, StateSize};
use crate::sinks::postgres::{copy_field, load_offsets, offsets_ddl, store_offsets};
use crate::sinks::{tx_sink, Offsets, TxSink};
use crate::sources::decode::{reject_array, Decoded, Decoder, Metadata};
use crate::sources::inserts;
use crate::sources::kafka::{kafka_source, KafkaArgs, KafkaConfig};

use super::views::{self, check_of, Views, WindowMetrics};

/// `tally availability`: the flags.
#[derive(clap::Args, Clone, Debug)]
pub struct AvailabilityArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic of check results.
    #[arg(long, env = "TALLY_AVAILABILITY_TOPIC", default_value = "website_availability")]
    pub topic: String,
    /// PostgreSQL database for `check_result`.
    #[arg(
        long,
        env = "TALLY_AVAILABILITY_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432/availability"
    )]
    pub postgres: String,
    /// Create the tables, partitions' parent and the role `tally_availability_writer`, then exit.
    #[arg(long)]
    pub setup: bool,
    /// No PostgreSQL: the views only, built from the topic's beginning at every start (what
    /// `tally demo availability` runs).
    #[arg(long, conflicts_with = "setup")]
    pub views_only: bool,
    /// Drop day partitions entirely older than this many days before the newest result (default: keep all).
    #[arg(long, env = "TALLY_AVAILABILITY_RETENTION_DAYS")]
    pub retention_days: Option<u32>,
    /// HTTP address for /availability, /availability/incidents, /ui, /metrics and /health.
    #[arg(long, env = "TALLY_AVAILABILITY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Consecutive failed checks that open an incident.
    #[arg(long, env = "TALLY_AVAILABILITY_OPEN_AFTER", default_value_t = 3)]
    pub open_after: u32,
    /// Consecutive successful checks that close it.
    #[arg(long, env = "TALLY_AVAILABILITY_CLOSE_AFTER", default_value_t = 2)]
    pub close_after: u32,
    /// File where undecodable results are appended (JSON lines with topic/partition/offset and raw bytes).
    #[arg(
        long,
        env = "TALLY_DEAD_LETTER",
        default_value = "tally-availability-dead-letter.jsonl"
    )]
    pub dead_letter: PathBuf,
    #[command(flatten)]
    pub cluster: Cluster,
    #[command(flatten)]
    pub ops: OpsArgs,
}

/// tally's offsets of the results topic.
const OFFSETS: &str = "tally_availability_offsets";

/// The schema besides the offsets table. `check_result` is partitioned by range of `scheduled_at`; its day partitions are made by
/// the writer. The role may insert and read, not alter or drop.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS check_result (
    url text NOT NULL,
    scheduled_at timestamptz NOT NULL,
    site_id bigint NOT NULL,
    shard text NOT NULL,
    interval_ms bigint,
    outcome text NOT NULL CHECK (outcome IN ('up', 'down', 'missed')),
    error_class text,
    error_phase text,
    error text,
    http_status integer,
    regex_matched boolean,
    final_url text,
    redirects integer NOT NULL DEFAULT 0,
    dns_us bigint NOT NULL DEFAULT 0,
    connect_us bigint NOT NULL DEFAULT 0,
    tls_us bigint NOT NULL DEFAULT 0,
    ttfb_us bigint NOT NULL DEFAULT 0,
    transfer_us bigint NOT NULL DEFAULT 0,
    total_us bigint NOT NULL DEFAULT 0,
    cert_not_after timestamptz,
    PRIMARY KEY (url, scheduled_at)
) PARTITION BY RANGE (scheduled_at);
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tally_availability_writer') THEN
        CREATE ROLE tally_availability_writer LOGIN;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS check_rollup_hourly (
    url text NOT NULL,
    hour timestamptz NOT NULL,
    up bigint NOT NULL,
    down bigint NOT NULL,
    missed bigint NOT NULL,
    up_total_us bigint NOT NULL,
    PRIMARY KEY (url, hour)
);
GRANT SELECT, INSERT ON check_result TO tally_availability_writer;
GRANT SELECT, INSERT, UPDATE ON check_rollup_hourly TO tally_availability_writer;
GRANT SELECT, INSERT, UPDATE ON tally_availability_offsets TO tally_availability_writer;
";

/// One check result as the checker writes it (`tally checker`'s JSON).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckRow {
    /// The configured URL.
    pub url: String,
    /// The slot, epoch ms.
    pub scheduled_at_ms: i64,
    /// The site's id.
    pub site_id: i64,
    /// The checker's shard.
    #[serde(default)]
    pub shard: String,
    /// The site's check interval, ms (older checkers did not say).
    #[serde(default)]
    pub interval_ms: Option<i64>,
    /// up, down, missed.
    pub outcome: String,
    /// Why it is down.
    pub error_class: Option<String>,
    /// In which phase.
    pub error_phase: Option<String>,
    /// What the error said.
    pub error: Option<String>,
    /// The final status.
    pub http_status: Option<i32>,
    /// Whether the body matched.
    pub regex_matched: Option<bool>,
    /// The URL after redirects.
    pub final_url: Option<String>,
    /// Redirects followed.
    #[serde(default)]
    pub redirects: i32,
    /// Phase timings, microseconds.
    #[serde(default)]
    pub dns_us: i64,
    /// TCP connect.
    #[serde(default)]
    pub connect_us: i64,
    /// TLS handshake.
    #[serde(default)]
    pub tls_us: i64,
    /// To the response head.
    #[serde(default)]
    pub ttfb_us: i64,
    /// The body.
    #[serde(default)]
    pub transfer_us: i64,
    /// The whole check.
    #[serde(default)]
    pub total_us: i64,
    /// The certificate's notAfter, epoch ms.
    pub cert_not_after_ms: Option<i64>,
}

/// Decodes check results; anything else is dead-lettered.
pub struct CheckDecoder;

impl Decoder for CheckDecoder {
    type Out = CheckRow;

    fn decode(
        &mut self,
        _key: Option<&[u8]>,
        value: Option<&[u8]>,
        _meta: &Metadata<'_>,
    ) -> Result<Decoded<CheckRow>, DecodeError> {
        let value = value.ok_or(DecodeError::MissingField("value"))?;
        reject_array(value)?;
        let row: CheckRow = serde_json::from_slice(value).map_err(DecodeError::from_json)?;
        if row.url.is_empty() || row.url.len() > 2048 {
            return Err(DecodeError::Invalid(format!(
                "url of {} bytes (1..=2048)",
                row.url.len()
            )));
        }
        if !matches!(row.outcome.as_str(), "up" | "down" | "missed") {
            return Err(DecodeError::Invalid(format!(
                "outcome {:?}: expected up, down or missed",
                row.outcome
            )));
        }
        // Years 1970..=9999 in ms: what timestamptz and the day partitions take.
        if !(0..253_402_300_800_000).contains(&row.scheduled_at_ms) {
            return Err(DecodeError::Invalid(format!(
                "scheduled_at_ms {} out of range",
                row.scheduled_at_ms
            )));
        }
        Ok(Decoded::Record(row))
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// PostgreSQL said no.
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// A COPY stream failed.
    #[error("copy: {0}")]
    Io(#[from] std::io::Error),
}

/// The writer's side: one connection.
pub struct CheckStore {
    client: Client,
    retention_days: Option<u32>,
    partitions: BTreeSet<i32>,
}

const DAY_MS: i64 = 86_400_000;

impl CheckStore {
    /// Connects.
    pub fn open(url: &str, retention_days: Option<u32>) -> Result<Self, WriterError> {
        let mut client = Client::connect(url, NoTls)?;
        client.batch_execute("SET TimeZone = 'UTC'; SET application_name = 'tally availability'")?;
        Ok(CheckStore {
            client,
            retention_days,
            partitions: BTreeSet::new(),
        })
    }
}

fn day_text(day: i32) -> String {
    dataflows::rates::format_day(day)
}

impl TxSink for CheckStore {
    type Data = CheckRow;
    type Diff = isize;
    type Error = WriterError;
    const NAME: &'static str = "availability-postgres";

    fn offsets(&mut self, topic: &str) -> Result<Offsets, WriterError> {
        Ok(load_offsets(&mut self.client, OFFSETS, topic)?)
    }

    fn commit(
        &mut self,
        _as_of: u64,
        topic: &str,
        changes: &[(CheckRow, isize)],
        offsets: &Offsets,
    ) -> Result<usize, WriterError> {
        let mut tx = self.client.transaction()?;
        let days: BTreeSet<i32> = changes
            .iter()
            .filter(|(_, d)| *d > 0)
            .map(|(r, _)| r.scheduled_at_ms.div_euclid(DAY_MS) as i32)
            .collect();
        for day in days.iter().filter(|d| !self.partitions.contains(d)) {
            let name = format!("check_result_{}", day_text(*day).replace('-', ""));
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF check_result FOR VALUES FROM ('{}') TO ('{}')",
                day_text(*day),
                day_text(day + 1)
            ))?;
        }
        let mut rows = 0;
        if !changes.is_empty() {
            tx.batch_execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS check_stage (LIKE check_result INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
            )?;
            let mut copy = tx.copy_in(
                "COPY check_stage (url, scheduled_at, site_id, shard, interval_ms, outcome, error_class, error_phase, error, http_status, \
                 regex_matched, final_url, redirects, dns_us, connect_us, tls_us, ttfb_us, transfer_us, total_us, cert_not_after) FROM STDIN",
            )?;
            let mut buf = Vec::with_capacity(64 * 1024);
            for (r, diff) in changes {
                if *diff <= 0 {
                    continue;
                }
                let fields: [Option<String>; 20] = [
                    Some(r.url.clone()),
                    Some(rfc3339(r.scheduled_at_ms)),
                    Some(r.site_id.to_string()),
                    Some(r.shard.clone()),
                    r.interval_ms.map(|i| i.to_string()),
                    Some(r.outcome.clone()),
                    r.error_class.clone(),
                    r.error_phase.clone(),
                    r.error.clone(),
                    r.http_status.map(|s| s.to_string()),
                    r.regex_matched.map(|b| b.to_string()),
                    r.final_url.clone(),
                    Some(r.redirects.to_string()),
                    Some(r.dns_us.to_string()),
                    Some(r.connect_us.to_string()),
                    Some(r.tls_us.to_string()),
                    Some(r.ttfb_us.to_string()),
                    Some(r.transfer_us.to_string()),
                    Some(r.total_us.to_string()),
                    r.cert_not_after_ms.map(rfc3339),
                ];
                for (i, f) in fields.iter().enumerate() {
                    if i > 0 {
                        buf.push(b'\t');
                    }
                    copy_field(&mut buf, f.as_deref());
                }
                buf.push(b'\n');
                if buf.len() > 60 * 1024 {
                    copy.write_all(&buf)?;
                    buf.clear();
                }
            }
            copy.write_all(&buf)?;
            copy.finish()?;
            // The rows that were new (not a repeat of a stored result) also go into their hour's rollup, so
            // the rollups count exactly what check_result holds. A repeat inside the batch is skipped like a
            // stored one (DO NOTHING also sees the rows this statement inserted), so the stage needs no sort.
            let counted = tx.query_one(
                "WITH inserted AS (INSERT INTO check_result SELECT * FROM check_stage \
                 ON CONFLICT (url, scheduled_at) DO NOTHING \
                 RETURNING url, scheduled_at, outcome, total_us), \
                 rolled AS (INSERT INTO check_rollup_hourly AS r \
                 SELECT url, date_trunc('hour', scheduled_at), count(*) FILTER (WHERE outcome = 'up'), \
                 count(*) FILTER (WHERE outcome = 'down'), count(*) FILTER (WHERE outcome = 'missed'), \
                 coalesce(sum(total_us) FILTER (WHERE outcome = 'up'), 0) FROM inserted GROUP BY 1, 2 \
                 ON CONFLICT (url, hour) DO UPDATE SET up = r.up + EXCLUDED.up, down = r.down + EXCLUDED.down, \
                 missed = r.missed + EXCLUDED.missed, up_total_us = r.up_total_us + EXCLUDED.up_total_us \
                 RETURNING 1) SELECT count(*) FROM inserted",
                &[],
            )?;
            rows = counted.get::<_, i64>(0) as usize;
        }
        store_offsets(&mut tx, OFFSETS, topic, offsets)?;
        let mut dropped = Vec::new();
        if let (Some(keep), Some(newest)) = (self.retention_days, days.iter().next_back()) {
            let horizon = newest - keep as i32;
            for row in tx.query(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'check_result'",
                &[],
            )? {
                let name: String = row.get(0);
                let day = name
                    .strip_prefix("check_result_")
                    .filter(|d| d.len() == 8)
                    .and_then(|d| dataflows::rates::parse_day(&format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..])));
                if let Some(day) = day.filter(|d| *d < horizon) {
                    tx.batch_execute(&format!("DROP TABLE {name}"))?;
                    dropped.push(day);
                }
            }
        }
        tx.commit()?;
        self.partitions.extend(days);
        for d in dropped {
            self.partitions.remove(&d);
            tracing::info!(day = %day_text(d), "check_result partition dropped by --retention-days");
        }
        Ok(rows)
    }
}

/// What a start reads back for the views: per site the rollups of its last 7 days' hours but the last two,
/// then the results of those two hours (enough for the 1 h window, the status and the strip), in slot
/// order, all in one REPEATABLE READ snapshot with the offsets they are consistent with.
pub fn reload(client: &mut Client, topic: &str) -> Result<(Offsets, Vec<Input>), WriterError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()?;
    let offsets = load_offsets(&mut tx, OFFSETS, topic)?;
    let mut inputs = Vec::new();
    let newest = "WITH newest AS (SELECT url, max(hour) AS hour FROM check_rollup_hourly GROUP BY url)";
    for row in tx.query(
        &format!(
            "{newest} SELECT r.url, (extract(epoch FROM r.hour) / 3600)::bigint, r.up, r.down, r.missed \
             FROM check_rollup_hourly r JOIN newest n USING (url) \
             WHERE r.hour < n.hour - interval '1 hour' AND r.hour > n.hour - interval '168 hours' ORDER BY 1, 2"
        ),
        &[],
    )? {
        inputs.push(Input::Rollup(
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
        ));
    }
    let ms = |col: &str| format!("(extract(epoch FROM {col}) * 1000)::bigint");
    for row in tx.query(
        &format!(
            "{newest} SELECT c.url, {}, c.interval_ms, c.outcome, c.error_class, c.error_phase, c.http_status, \
             c.dns_us, c.connect_us, c.tls_us, c.ttfb_us, c.transfer_us, c.total_us, {} \
             FROM check_result c JOIN newest n USING (url) WHERE c.scheduled_at >= n.hour - interval '1 hour' \
             ORDER BY c.url, c.scheduled_at",
            ms("c.scheduled_at"),
            ms("c.cert_not_after")
        ),
        &[],
    )? {
        let outcome: &str = row.get(3);
        inputs.push(Input::Check(Check {
            url: row.get(0),
            scheduled_at_ms: row.get(1),
            interval_ms: row.get(2),
            outcome: match outcome {
                "up" => Outcome::Up,
                "down" => Outcome::Down,
                _ => Outcome::Missed,
            },
            error_class: row.get(4),
            error_phase: row.get(5),
            http_status: row.get(6),
            phases_us: [
                row.get(7),
                row.get(8),
                row.get(9),
                row.get(10),
                row.get(11),
                row.get(12),
            ],
            cert_not_after_ms: row.get(13),
        }));
    }
    // A site whose current run covers every reloaded result began it earlier: when, from check_result.
    let mut runs: Vec<(String, Outcome, bool)> = Vec::new();
    for input in &inputs {
        let Input::Check(c) = input else { continue };
        if c.outcome == Outcome::Missed {
            continue;
        }
        match runs.last_mut() {
            Some((url, state, whole)) if *url == c.url => {
                if *state != c.outcome {
                    (*state, *whole) = (c.outcome, false);
                }
            }
            _ => runs.push((c.url.clone(), c.outcome, true)),
        }
    }
    let (urls, states): (Vec<String>, Vec<&str>) = runs
        .into_iter()
        .filter(|(_, _, whole)| *whole)
        .map(|(url, state, _)| (url, state.as_str()))
        .unzip();
    if !urls.is_empty() {
        for row in tx.query(
            &format!(
                "SELECT u.url, u.state, {} FROM unnest($1::text[], $2::text[]) AS u(url, state) \
                 JOIN LATERAL (SELECT min(c.scheduled_at) AS first FROM check_result c WHERE c.url = u.url \
                 AND c.outcome = u.state AND c.scheduled_at > coalesce((SELECT max(d.scheduled_at) FROM check_result d \
                 WHERE d.url = u.url AND d.outcome IN ('up', 'down') AND d.outcome <> u.state), '-infinity')) f ON true \
                 WHERE f.first IS NOT NULL",
                ms("f.first")
            ),
            &[&urls, &states],
        )? {
            let state = if row.get::<_, &str>(1) == "up" { Outcome::Up } else { Outcome::Down };
            inputs.push(Input::Since(row.get(0), state, row.get(2)));
        }
    }
    tx.commit()?;
    Ok((offsets, inputs))
}

/// The writer pipeline.
pub struct AvailabilityPipeline {
    args: AvailabilityArgs,
    kafka: KafkaConfig,
    views: Views,
    /// What `prepare` read back, fed on worker 0.
    reloaded: Mutex<Option<Vec<Input>>>,
    window_metrics: Option<(Arc<Metrics>, WindowMetrics)>,
}

impl AvailabilityPipeline {
    /// The pipeline for these flags.
    pub fn new(args: AvailabilityArgs) -> Self {
        let kafka = args.kafka.config(&args.topic);
        AvailabilityPipeline {
            args,
            kafka,
            views: Views::new(),
            reloaded: Mutex::new(None),
            window_metrics: None,
        }
    }
}

/// `--setup`: the schema and the role.
pub fn setup(url: &str) -> Result<(), RuntimeError> {
    let mut client =
        Client::connect(url, NoTls).map_err(|e| RuntimeError::Config(format!("availability --setup: {e}")))?;
    client
        .batch_execute(&format!("{}\n{SCHEMA}", offsets_ddl(OFFSETS)))
        .map_err(|e| RuntimeError::Config(format!("availability --setup: {e}")))
}

impl Pipeline for AvailabilityPipeline {
    const NAME: &'static str = "availability";

    fn common(&self) -> Common {
        Common {
            listen: self.args.listen.clone(),
            dead_letter: self.args.dead_letter.clone(),
            cluster: self.args.cluster.clone(),
            ops: self.args.ops.clone(),
        }
    }

    fn prepare(&mut self, metrics: &Arc<Metrics>) -> Result<Routes, RuntimeError> {
        let config = |e: &dyn std::fmt::Display| {
            RuntimeError::Config(format!("availability: {e} (run `tally availability --setup` first)"))
        };
        self.window_metrics = Some((metrics.clone(), WindowMetrics::register(metrics)));
        if self.args.views_only {
            return Ok(self.views.routes());
        }
        let started = std::time::Instant::now();
        let mut store = CheckStore::open(&self.args.postgres, None).map_err(|e| config(&e))?;
        let (offsets, inputs) = reload(&mut store.client, &self.args.topic).map_err(|e| config(&e))?;
        tracing::info!(
            resume_from = ?offsets,
            reloaded = inputs.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "availability: resuming from stored offsets, views reloaded from rollups and the last two hours"
        );
        self.kafka.start_offsets = offsets.into_iter().collect();
        *self.reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(inputs);
        Ok(self.views.routes())
    }

    fn build(&self, worker: &mut timely::worker::Worker, env: &Env) -> Vec<StateSize> {
        let (url, retention) = (self.args.postgres.clone(), self.args.retention_days);
        let (metrics, window_metrics) = self.window_metrics.clone().expect("prepare runs before build");
        let reloaded = if worker.index() == 0 {
            self.reloaded.lock().unwrap_or_else(|p| p.into_inner()).take()
        } else {
            None
        };
        let (mut reload_in, size) = worker.dataflow_named::<u64, _, _>("availability", |scope| {
            // The source reads ahead of the views and the sink by at most --max-in-flight records.
            let done = ProbeHandle::new();
            let source = kafka_source(scope, self.kafka.clone(), CheckDecoder, env.source(), Some(&done));
            let (reload_in, reloaded) = scope.new_input::<Vec<Input>>();
            let arrived = source.data.clone().map(|r| Input::Check(check_of(&r)));
            let size = views::build(
                reloaded.concat(arrived),
                self.rule(),
                &self.views,
                &metrics,
                &window_metrics,
                &done,
            );
            if self.args.views_only {
                return (reload_in, size);
            }
            // In flight until PostgreSQL has it: the sink's own queue is bounded by the same limit.
            tx_sink(
                inserts(source.data),
                source.progress,
                self.kafka.topic.clone(),
                env,
                move || CheckStore::open(&url, retention),
            )
            .probe_with(&done);
            (reload_in, size)
        });
        // Sent after the dataflow is built: inputs fed inside the closure hold the frontier back.
        if let Some(mut inputs) = reloaded {
            reload_in.send_batch(&mut inputs);
        }
        drop(reload_in);
        vec![size]
    }
}

impl AvailabilityPipeline {
    fn rule(&self) -> IncidentRule {
        IncidentRule {
            open_after: self.args.open_after,
            close_after: self.args.close_after,
        }
    }
}

/// Runs `tally availability`: `--setup` and exit, or the writer.
pub fn run(args: AvailabilityArgs) -> Result<(), RuntimeError> {
    if args.setup {
        setup(&args.postgres)?;
        eprintln!("tally availability: schema and role tally_availability_writer ready");
        return Ok(());
    }
    crate::runtime::run(AvailabilityPipeline::new(args))
}
