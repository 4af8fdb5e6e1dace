//! Food counts: how many times each food has been seen.
//!
//! The input is a collection of food names (one `+1` per event); the output is `(food, count)` as a
//! differential `count` reduction, so a later change of a food's count arrives as `-(food, old)` and
//! `+(food, new)` at one timestamp. The arrangement behind it holds one record per distinct food.

use differential_dataflow::lattice::Lattice;
use differential_dataflow::VecCollection;
use timely::progress::Timestamp;

/// Counts per food of the foods seen since the dataflow started.
pub fn food_counts<'s, T>(foods: VecCollection<'s, T, String>) -> VecCollection<'s, T, (String, isize)>
where
    T: Timestamp + Lattice + Ord,
{
    foods.count()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::Capture;

    use super::*;

    /// `((food, count), diff)` updates, per timestamp.
    type Updates = Vec<(u64, Vec<((String, isize), isize)>)>;

    /// Feeds `(food, diff)` batches at successive times; returns the final counts and the updates per time.
    fn run(batches: Vec<Vec<(&'static str, isize)>>) -> (BTreeMap<String, isize>, Updates) {
        let captured = timely::execute_directly(move |worker| {
            let (mut input, out) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, foods) = scope.new_collection::<String, isize>();
                (input, food_counts(foods).inner.capture())
            });
            for (t, batch) in batches.into_iter().enumerate() {
                input.advance_to(t as u64);
                for (food, diff) in batch {
                    input.update(food.to_string(), diff);
                }
            }
            out
        });
        let mut counts = BTreeMap::new();
        let mut per_time = BTreeMap::<u64, Vec<_>>::new();
        for (_, updates) in captured.extract() {
            for ((food, count), t, diff) in updates {
                *counts.entry(food.clone()).or_insert(0) += count * diff;
                per_time.entry(t).or_default().push(((food, count), diff));
            }
        }
        counts.retain(|_, c| *c != 0);
        (counts, per_time.into_iter().collect())
    }

    #[test]
    fn counts_each_occurrence_from_one() {
        let (counts, _) = run(vec![vec![("pie", 1)], vec![("pie", 1), ("mayo", 1)]]);
        assert_eq!(counts, BTreeMap::from([("mayo".into(), 1), ("pie".into(), 2)]));
    }

    #[test]
    fn a_change_is_a_retraction_and_an_insertion_at_one_time() {
        let (_, per_time) = run(vec![vec![("pie", 1)], vec![("pie", 1)]]);
        assert_eq!(per_time[1].1, vec![(("pie".into(), 1), -1), (("pie".into(), 2), 1)]);
    }

    #[test]
    fn duplicates_in_a_batch_and_retractions_accumulate() {
        let (counts, _) = run(vec![
            vec![("bagel", 1), ("bagel", 1), ("bagel", 1)],
            vec![("bagel", -1)],
            vec![("aroma", 1), ("aroma", -1)],
        ]);
        assert_eq!(counts, BTreeMap::from([("bagel".into(), 2)]));
    }

    #[test]
    fn batching_does_not_change_the_result() {
        let events = ["pie", "mayo", "pie", "broth", "pie", "mayo"];
        let one = run(vec![events.iter().map(|f| (*f, 1)).collect()]).0;
        let many = run(events.iter().map(|f| vec![(*f, 1)]).collect()).0;
        assert_eq!(one, many);
        assert_eq!(one["pie"], 3);
    }
}
