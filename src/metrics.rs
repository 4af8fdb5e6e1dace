//! Prometheus metrics: one registry per process, rendered as text at `/metrics`.
//! Names are `tally_<area>_<what>`; labels are bounded (topic, partition, reason, view, worker). The
//! metrics here are the generic ones (sources, views, sinks); a pipeline registers its own with
//! [`Metrics::counter`].

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// The process's metrics.
pub struct Metrics {
    registry: Registry,
    pub messages: IntCounterVec,
    pub bytes: IntCounterVec,
    pub decode_errors: IntCounterVec,
    pub ignored: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub dead_letter_skipped: IntCounterVec,
    pub dead_letter_errors: IntCounterVec,
    pub http_accept_errors: prometheus::IntCounter,
    pub kafka_errors: IntCounterVec,
    pub lag: IntGaugeVec,
    pub in_flight: IntGaugeVec,
    pub flow_paused: IntCounterVec,
    pub record_age: HistogramVec,
    pub publish_delay: HistogramVec,
    pub view_as_of: IntGaugeVec,
    pub view_rows: IntGaugeVec,
    pub view_updates: IntCounterVec,
    pub state_records: IntGaugeVec,
    pub sink_batches: IntCounterVec,
    pub sink_rows: IntCounterVec,
    pub sink_errors: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition is valid");
    registry.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

/// Latency buckets from 1 ms to about 33 s, doubling.
fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = prometheus::exponential_buckets(0.001, 2.0, 16).expect("static buckets are valid");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("static metric definition is valid");
    registry.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid");
    registry.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

impl Metrics {
    /// The generic metrics, registered on a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        Metrics {
            messages: counter(
                &r,
                "tally_source_messages_total",
                "Kafka messages read",
                &["topic", "partition"],
            ),
            bytes: counter(
                &r,
                "tally_source_bytes_total",
                "Bytes of Kafka keys and values read",
                &["topic"],
            ),
            decode_errors: counter(
                &r,
                "tally_source_decode_errors_total",
                "Messages that could not be decoded",
                &["topic", "reason"],
            ),
            ignored: counter(
                &r,
                "tally_source_ignored_total",
                "Messages that are not data (schema changes, heartbeats, ...)",
                &["topic", "reason"],
            ),
            dead_lettered: counter(
                &r,
                "tally_source_dead_letter_total",
                "Messages written to the dead-letter file",
                &["topic"],
            ),
            dead_letter_skipped: counter(
                &r,
                "tally_source_dead_letter_skipped_total",
                "Undecodable messages not written again: an earlier run dead-lettered them",
                &["topic"],
            ),
            dead_letter_errors: counter(
                &r,
                "tally_source_dead_letter_errors_total",
                "Dead-letter writes that failed (the message's bytes are not kept)",
                &["topic"],
            ),
            http_accept_errors: {
                let c = prometheus::IntCounter::new(
                    "tally_http_accept_errors_total",
                    "HTTP accepts that failed (out of descriptors, ...)",
                )
                .expect("static metric definition is valid");
                r.register(Box::new(c.clone())).expect("metric names are unique");
                c
            },
            kafka_errors: counter(
                &r,
                "tally_source_kafka_errors_total",
                "Errors reported by the Kafka client",
                &["topic"],
            ),
            lag: gauge(
                &r,
                "tally_source_lag_messages",
                "High watermark minus next offset to read",
                &["topic", "partition"],
            ),
            in_flight: gauge(
                &r,
                "tally_source_in_flight_records",
                "Records read whose timestamp the dataflow has not finished (bounded by --max-in-flight)",
                &["topic", "worker"],
            ),
            flow_paused: counter(
                &r,
                "tally_source_flow_paused_total",
                "Source steps that read nothing because --max-in-flight records were still in the dataflow",
                &["topic", "worker"],
            ),
            record_age: histogram(
                &r,
                "tally_source_record_age_seconds",
                "Age of each message when read: wall clock minus its Kafka timestamp (producer or broker clock)",
                &["topic"],
            ),
            publish_delay: histogram(
                &r,
                "tally_view_publish_delay_seconds",
                "From a timestamp closing (the wall-clock tick it ends at) to the view showing it",
                &["view"],
            ),
            view_as_of: gauge(
                &r,
                "tally_view_as_of_ms",
                "Closed timestamp the view shows (epoch ms)",
                &["view"],
            ),
            view_rows: gauge(&r, "tally_view_rows", "Rows in the served view", &["view"]),
            view_updates: counter(
                &r,
                "tally_view_updates_total",
                "Updates applied to the served view",
                &["view"],
            ),
            state_records: gauge(
                &r,
                "tally_dataflow_state_records",
                "Records held in operator state",
                &["dataflow", "worker"],
            ),
            sink_batches: counter(
                &r,
                "tally_sink_batches_total",
                "Transactions committed by a sink",
                &["sink"],
            ),
            sink_rows: counter(&r, "tally_sink_rows_total", "Rows written by a sink", &["sink"]),
            sink_errors: counter(
                &r,
                "tally_sink_errors_total",
                "Commits that failed (kept and retried)",
                &["sink"],
            ),
            registry: r,
        }
    }

    /// Registers a pipeline's own gauge on this registry.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        gauge(&self.registry, name, help, labels)
    }

    /// Registers a pipeline's own floating-point gauge (a ratio) on this registry.
    pub fn float_gauge(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::GaugeVec {
        let g = prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("static metric definition is valid");
        self.registry
            .register(Box::new(g.clone()))
            .expect("metric names are unique");
        g
    }

    /// Registers a pipeline's own counter (`tally_<pipeline>_<what>_total`) on this registry.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        counter(&self.registry, name, help, labels)
    }

    /// Messages not yet read, summed over every partition the Kafka clients have reported (librdkafka's
    /// statistics, refreshed each second); `None` until the first report.
    pub fn total_lag(&self) -> Option<i64> {
        let families = prometheus::core::Collector::collect(&self.lag);
        let gauges: Vec<i64> = families
            .iter()
            .flat_map(|f| f.get_metric())
            .map(|m| m.get_gauge().get_value() as i64)
            .collect();
        (!gauges.is_empty()).then(|| gauges.iter().sum())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
