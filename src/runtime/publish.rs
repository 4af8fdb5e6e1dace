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
/// (`cargo bench --bench view_publish`). The view gets the members (shared pointers), not their
/// concatenation: the body is joined by the first request that reads it, off the worker.
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
    // Per key: its accumulated value and that value's rendered member; an empty member is stale (a rendered
    // one never is) and is redone below, once however many closed timestamps changed the key.
    let mut state: BTreeMap<K, (R, Option<Arc<str>>)> = BTreeMap::new();
    let mut last_as_of = None;
    on_publisher(collection, name, move |pending, bound| {
        let changed = drain_closed(pending, bound, |k, r| match state.entry(k) {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                o.get_mut().0.plus_equals(&r);
                if o.get().0.is_zero() {
                    o.remove();
                } else {
                    o.get_mut().1 = None;
                }
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                if !r.is_zero() {
                    v.insert((r, None));
                }
            }
        });
        if changed > 0 {
            for (k, (r, rendered)) in state.iter_mut().filter(|(_, (_, rendered))| rendered.is_none()) {
                *rendered = Some(member(k, r).into());
            }
        }
        let members = || state.values().filter_map(|(_, rendered)| rendered.clone()).collect();
        announce(&view, &metrics, name, bound, changed, &mut last_as_of, members);
    });
}

/// Gathers `collection`'s updates on worker 0 and calls `closed` there after each delivery with what is
/// pending and the frontier's least time (`None` once the input is complete).
fn on_publisher<'s, D, R>(
    collection: VecCollection<'s, u64, D, R>,
    name: &'static str,
    mut closed: impl FnMut(&mut Vec<(D, u64, R)>, Option<u64>) + 'static,
) where
    D: timely::ExchangeData,
    R: timely::ExchangeData + Semigroup,
{
    let is_publisher = collection.scope().index() == 0;
    let mut pending = Vec::new();
    collection
        .inner
        .exchange(|_| 0u64)
        .sink(Pipeline, name, move |(input, frontier)| {
            input.for_each(|_cap, data| pending.append(data));
            if is_publisher {
                closed(&mut pending, frontier.frontier().first().copied());
            }
        });
}

/// Tells the view (and the view metrics) that time moved to just below `bound`, with the new members if
/// `changed` updates were applied.
fn announce(
    view: &ViewHandle,
    metrics: &Metrics,
    name: &'static str,
    bound: Option<u64>,
    changed: u64,
    last_as_of: &mut Option<u64>,
    members: impl FnOnce() -> Vec<Arc<str>>,
) {
    let as_of = match bound {
        Some(b) => b.saturating_sub(1),
        None => last_as_of.unwrap_or(0),
    };
    if changed == 0 && *last_as_of == Some(as_of) {
        return;
    }
    // The members are shared with the view, which joins them when a request reads it.
    let members = (changed > 0).then(members);
    let rows = members.as_ref().map(Vec::len);
    view.publish_members(as_of, members);
    if let Some(closed_at) = bound.filter(|_| changed > 0) {
        observe_publish_delay(metrics, name, closed_at);
    }
    *last_as_of = Some(as_of);
    metrics.view_as_of.with_label_values(&[name]).set(as_of as i64);
    if let Some(rows) = rows {
        metrics.view_rows.with_label_values(&[name]).set(rows as i64);
    }
    metrics.view_updates.with_label_values(&[name]).inc_by(changed);
}

/// Renders a key's member of [`publish_grouped`] from its values and their counts, or leaves it out.
pub type GroupMember<G, V> = fn(&G, &[(V, isize)]) -> Option<String>;

/// One key of [`publish_grouped`]: its values with their counts (none zero, sorted by value) and its
/// rendered member (`None` when stale or left out).
struct Group<V> {
    values: Vec<(V, isize)>,
    rendered: Option<Arc<str>>,
}

/// [`publish`] for a view whose member is made of several values of one key, put out by different
/// operators (a site's windows from a `reduce` and its status from another): per key it keeps the values
/// present and renders the member from them, so the parts need no `join` (and no arrangement of either).
/// `member` gets the values with their counts, sorted by value, and may leave the key out (`None`).
/// `observe` sees every key whose values changed at a closed timestamp, with its values (none once it
/// has left): what else follows the view, such as gauges.
pub fn publish_grouped<'s, G, V>(
    collection: VecCollection<'s, u64, (G, V), isize>,
    name: &'static str,
    view: ViewHandle,
    metrics: Arc<Metrics>,
    member: GroupMember<G, V>,
    mut observe: impl FnMut(&G, &[(V, isize)]) + 'static,
) where
    G: timely::ExchangeData + Ord + Clone,
    V: timely::ExchangeData + Ord,
{
    let mut state: BTreeMap<G, Group<V>> = BTreeMap::new();
    let mut touched: Vec<G> = Vec::new();
    let mut last_as_of = None;
    on_publisher(collection, name, move |pending, bound| {
        let changed = drain_closed(pending, bound, |(g, v), r| {
            let group = match state.get_mut(&g) {
                Some(group) => group,
                None => state.entry(g.clone()).or_insert(Group {
                    values: Vec::new(),
                    rendered: None,
                }),
            };
            match group.values.iter_mut().find(|(have, _)| *have == v) {
                Some((_, n)) => *n += r,
                None => group.values.push((v, r)),
            }
            group.values.retain(|(_, n)| *n != 0);
            group.rendered = None;
            touched.push(g);
        });
        touched.sort_unstable();
        touched.dedup();
        for g in touched.drain(..) {
            let Some(group) = state.get_mut(&g) else { continue };
            group.values.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            observe(&g, &group.values);
            if group.values.is_empty() {
                state.remove(&g);
            } else {
                group.rendered = member(&g, &group.values).map(Arc::from);
            }
        }
        let members = || state.values().filter_map(|g| g.rendered.clone()).collect();
        announce(&view, &metrics, name, bound, changed, &mut last_as_of, members);
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
                out.push(String::from_utf8(view.read().body().to_vec()).expect("JSON is UTF-8"));
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

    #[allow(clippy::ptr_arg)] // the key type is String
    fn parts(k: &String, values: &[(u32, isize)]) -> Option<String> {
        // Shown only with both parts: 1 and 2.
        let has = |v| values.iter().any(|(x, n)| *x == v && *n > 0);
        (has(1) && has(2)).then(|| format!("{}:{:?}", serde_json::to_string(k).expect("strings serialize"), values))
    }

    #[test]
    fn a_grouped_member_is_made_of_its_parts_and_observed_when_they_change() {
        let (bodies, seen) = timely::execute_directly(move |worker| {
            let view = ViewHandle::new("{}");
            let published = view.clone();
            let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
            let observed = seen.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, values) = scope.new_collection::<(String, u32), isize>();
                let (probe, values) = values.probe();
                let observe = move |k: &String, v: &[(u32, isize)]| observed.borrow_mut().push((k.clone(), v.to_vec()));
                publish_grouped(values, "parts", published, Arc::new(Metrics::new()), parts, observe);
                (input, probe)
            });
            let batches: Vec<Vec<((&str, u32), isize)>> = vec![
                vec![(("a", 2), 1), (("b", 1), 1)],
                vec![(("a", 1), 1)],
                vec![(("a", 2), -1), (("a", 3), 1), (("b", 2), 1)],
                vec![(("a", 1), -1), (("a", 3), -1)],
            ];
            let mut out = Vec::new();
            for (t, batch) in batches.into_iter().enumerate() {
                for ((k, v), d) in batch {
                    input.update((k.to_owned(), v), d);
                }
                input.advance_to(t as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
                worker.step();
                out.push(String::from_utf8(view.read().body().to_vec()).expect("JSON is UTF-8"));
            }
            let seen = seen.borrow().clone();
            (out, seen)
        });
        assert_eq!(
            bodies,
            vec![
                "{}".to_owned(),
                r#"{"a":[(1, 1), (2, 1)]}"#.to_owned(),
                r#"{"b":[(1, 1), (2, 1)]}"#.to_owned(),
                r#"{"b":[(1, 1), (2, 1)]}"#.to_owned(),
            ]
        );
        // Every change is observed with the key's values, sorted; a key that has none left, with none.
        let last_a = seen.iter().rev().find(|(k, _)| k == "a").cloned();
        assert_eq!(last_a, Some(("a".to_owned(), vec![])));
        assert_eq!(seen.iter().filter(|(k, _)| k == "a").count(), 4);
        assert_eq!(seen[seen.len() - 2..].iter().filter(|(k, _)| k == "b").count(), 1);
    }
}
