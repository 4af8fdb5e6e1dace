//! The benchmark workload as tally decodes it, event by event, with no Kafka: shared by the engine benches.

use dataflows::usage::Change;
use tally::pipelines::usage::UsageDecoder;
use tally::sources::decode::{Decoded, Decoder, Metadata};
use tally::tools::sim::debezium_records;
use testkit::Workload;

/// `testkit`'s workload (100 organizations, 20,000 running rows, 20% price updates) as schemaless
/// Debezium records, decoded by tally's decoder: partition = row id % 4, offsets counted across partitions.
pub(crate) struct DecodedWorkload {
    workload: Workload,
    decoder: UsageDecoder,
    events: u64,
    offset: i64,
}

impl Default for DecodedWorkload {
    fn default() -> Self {
        DecodedWorkload {
            workload: Workload::new(42, 100, 20_000, 0.2, 50),
            decoder: UsageDecoder::new(None),
            events: 0,
            offset: 0,
        }
    }
}

impl DecodedWorkload {
    /// Generates the next event and hands each of its decoded changes to `each`.
    pub(crate) fn next_event(&mut self, mut each: impl FnMut(Change)) {
        self.events += 1;
        let (event, ts) = self.workload.next_event();
        for (k, v) in debezium_records(&event, ts, self.events * 300, false) {
            self.offset += 1;
            let meta = Metadata::at("topic.cloud.instances", (event.row().id % 4) as i32, self.offset);
            if let Ok(Decoded::Record(c)) =
                self.decoder
                    .decode(Some(k.as_bytes()), v.as_ref().map(|v| v.as_bytes()), &meta)
            {
                each(c);
            }
        }
    }
}
