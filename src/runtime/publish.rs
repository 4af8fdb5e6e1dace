//! Publishing a view: gather its updates on worker 0 and apply them only once their timestamp is closed
//! (every input frontier has passed it), so an HTTP read always sees the state at one timestamp.

use std::collections::BTreeMap;
use std::sync::Arc;

use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Exchange;

use super::clock::epoch_now;
use crate::http::ViewHandle;
use crate::metrics::Metrics;

/// `{` + members joined by `,` + `}`, in one allocation.
pub fn json_object<S: AsRef<str>>(members: impl Iterator<Item = S> + Clone) -> String {
    let len = members.clone().map(|m| m.as_ref().len() + 1).sum::<usize>() + 2;
    let mut out = String::with_capacity(len);
    out.push('{');
    for (i, m) in members.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(m.as_ref());
    }
    out.push('}');
    out
}

/// Hands over, in arrival order, the pending updates whose timestamp the frontier has passed (`bound`: the
/// frontier's least time; `None` once the input is complete) and keeps the rest. Returns how many it applied.
pub fn drain_closed<D, R>(pending: &mut Vec<(D, u64, R)>, bound: Option<u64>, mut apply: impl FnMut(D, R)) -> u64 {
    let mut applied = 0;
    for (d, t, r) in std::mem::take(pending) {
        if bound.is_some_and(|b| t >= b) {
            pending.push((d, t, r));
        } else {
            apply(d, r);
            applied += 1;
        }
    }
    applied
}

/// Gathers a view's updates on worker 0 and publishes the accumulated state at each closed timestamp, as a
/// JSON object with one member per key (`member` renders it). Each key keeps its rendered member, redone
/// only when the key changes: with 50,000 keys, rendering every member took 11.5-11.7 ms per tick (most of
/// worker 0 at 50 ticks per second), a publish with kept members 1.35-1.52 ms when 100 change
/// (`cargo bench --bench view_publish`).
pub fn publish<'s, K, R>(
    collection: VecCollection<'s, u64, K, R>,
    name: &'static str,
    view: ViewHandle,
    metrics: Arc<Metrics>,
    member: fn(&K, &R) -> String,
) where
    K: timely::ExchangeData + Ord + Clone,
    R: timely::ExchangeData + Semigroup + IsZero,
{
    let is_publisher = collection.scope().index() == 0;
    // Per key: its accumulated value and that value's rendered member; an empty member is stale (a rendered
    // one never is) and is redone below, once however many closed timestamps changed the key.
    let mut state: BTreeMap<K, (R, String)> = BTreeMap::new();
    let mut pending: Vec<(K, u64, R)> = Vec::new();
    let mut last_as_of = None;
    collection
        .inner
        .exchange(|_| 0u64)
        .sink(Pipeline, name, move |(input, frontier)| {
            input.for_each(|_cap, data| pending.append(data));
            if !is_publisher {
                return;
            }
            let bound = frontier.frontier().first().copied();
            let changed = drain_closed(&mut pending, bound, |k, r| match state.entry(k) {
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    o.get_mut().0.plus_equals(&r);
                    if o.get().0.is_zero() {
                        o.remove();
                    } else {
                        o.get_mut().1.clear();
                    }
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    if !r.is_zero() {
                        v.insert((r, String::new()));
                    }
                }
            });
            if changed > 0 {
                for (k, (r, rendered)) in state.iter_mut().filter(|(_, (_, rendered))| rendered.is_empty()) {
                    *rendered = member(k, r);
                }
            }
            let as_of = match bound {
                Some(b) => b.saturating_sub(1),
                None => last_as_of.unwrap_or(0),
            };
            if changed > 0 || last_as_of != Some(as_of) {
                view.publish(
                    as_of,
                    (changed > 0).then(|| json_object(state.values().map(|(_, rendered)| rendered))),
                );
                if let Some(closed_at) = bound.filter(|_| changed > 0) {
                    observe_publish_delay(&metrics, name, closed_at);
                }
                last_as_of = Some(as_of);
                metrics.view_as_of.with_label_values(&[name]).set(as_of as i64);
                metrics.view_rows.with_label_values(&[name]).set(state.len() as i64);
                metrics.view_updates.with_label_values(&[name]).inc_by(changed);
            }
        });
}

/// Timestamps are wall-clock epochs: `closed_at` is the tick whose start closed every time before it, so
/// the wall clock minus it is how long the view took to show a closed timestamp.
pub fn observe_publish_delay(metrics: &Metrics, view: &str, closed_at: u64) {
    let delay_ms = epoch_now(1).saturating_sub(closed_at);
    metrics
        .publish_delay
        .with_label_values(&[view])
        .observe(delay_ms as f64 / 1000.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use differential_dataflow::input::Input;

    fn member(k: &String, n: &isize) -> String {
        format!("{}:{n}", serde_json::to_string(k).expect("strings serialize"))
    }

    /// Feeds `batches` (one closed timestamp each) through `publish` and returns the body after each.
    fn bodies(batches: Vec<Vec<(&'static str, isize)>>) -> Vec<String> {
        timely::execute_directly(move |worker| {
            let view = ViewHandle::new("{}");
            let published = view.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, counts) = scope.new_collection::<String, isize>();
                let (probe, counts) = counts.probe();
                publish(counts, "counts", published, Arc::new(Metrics::new()), member);
                (input, probe)
            });
            let mut out = Vec::new();
            for (t, batch) in batches.into_iter().enumerate() {
                for (key, diff) in batch {
                    input.update(key.to_owned(), diff);
                }
                input.advance_to(t as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                worker.step();
                out.push(String::from_utf8(view.read().body.to_vec()).expect("JSON is UTF-8"));
            }
            out
        })
    }

    #[test]
    fn the_published_body_is_the_whole_state_rendered_as_of_each_timestamp() {
        let batches = vec![
            vec![("b", 1), ("a", 2)],
            // Only `a` changes: `b`'s kept member must still be in the body.
            vec![("a", 30)],
            // `b` cancels out to zero and leaves the view; `c` arrives with a name that needs JSON escaping.
            vec![("b", -1), ("c\"q", 1)],
            vec![("a", 1), ("a", 5)],
        ];
        let got = bodies(batches.clone());
        let mut state = BTreeMap::new();
        let expected: Vec<String> = batches
            .into_iter()
            .map(|batch| {
                for (key, diff) in batch {
                    *state.entry(key.to_owned()).or_insert(0isize) += diff;
                }
                state.retain(|_, v| *v != 0);
                json_object(state.iter().map(|(k, v)| member(k, v)))
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!(got[3], r#"{"a":38,"c\"q":1}"#);
    }
}
