//! Sources: Kafka inside a timely operator (records and progress as separate outputs), the decoder
//! interface over key, value and metadata, the generic Debezium envelope, and the dead-letter file.
pub mod dead_letter;
pub mod debezium;
pub mod decode;
pub mod kafka;

use differential_dataflow::{AsCollection, VecCollection};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Stream;

/// A source's records as a differential collection: each record inserted (`+1`) at the time it was read.
pub fn inserts<'s, D: Clone + 'static>(records: Stream<'s, u64, Vec<D>>) -> VecCollection<'s, u64, D, isize> {
    records
        .unary::<CapacityContainerBuilder<Vec<(D, u64, isize)>>, _, _, _>(Pipeline, "Inserts", |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, data| {
                    if let Some(cap) = cap.retain_least(0) {
                        let t = *cap.time();
                        output.session(&cap).give_iterator(data.drain(..).map(|d| (d, t, 1)));
                    }
                })
            }
        })
        .as_collection()
}
