//! What queries read: the dataflow's prices per pair and day and its region expansion, gathered on worker
//! 0 and published as one immutable [`Index`] per closed timestamp. A request takes the current `Arc` and
//! answers from it alone, so it sees every batch up to that timestamp and none after: never part of one.
//!
//! Publishing copies only what changed: the per-pair day maps are shared `Arc`s, and a closed timestamp
//! copies the maps of the pairs it touched (`Arc::make_mut`), not the whole index.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use dataflows::rates::{Day, Port, PriceSum, Region};
use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

use crate::http::ViewHandle;
use crate::metrics::Metrics;
use crate::runtime::publish::{drain_closed, observe_publish_delay};

/// A pair's prices: per day, their sum and count.
pub type Days = BTreeMap<Day, PriceSum>;

/// The state queries read, as of one closed timestamp.
#[derive(Clone, Default)]
pub struct Index {
    /// Every update at or before this timestamp is in, none after.
    pub as_of: u64,
    /// Per origin, per destination: the days.
    pub pairs: HashMap<Port, HashMap<Port, Arc<Days>>>,
    /// Per region: the ports under it at any depth.
    pub under: HashMap<Region, Arc<BTreeSet<Port>>>,
    /// Every port code.
    pub ports: Arc<HashSet<Port>>,
    /// Every region slug.
    pub regions: Arc<HashSet<Region>>,
    /// Distinct (pair, day) entries.
    pub entries: usize,
    /// Prices in all.
    pub prices: i64,
}

/// The index HTTP reads, swapped whole at each closed timestamp.
#[derive(Clone, Default)]
pub struct SharedIndex(Arc<RwLock<Arc<Index>>>);

impl SharedIndex {
    /// An empty index over these ports and regions (until the first closed timestamp).
    pub fn new(ports: Arc<HashSet<Port>>, regions: Arc<HashSet<Region>>) -> Self {
        SharedIndex(Arc::new(RwLock::new(Arc::new(Index {
            ports,
            regions,
            ..Index::default()
        }))))
    }

    /// The index now.
    pub fn read(&self) -> Arc<Index> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn swap(&self, index: Arc<Index>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = index;
    }
}

/// Applies a change to a day map, removing days that sum to zero.
fn apply(days: &mut Days, day: Day, diff: &PriceSum) -> isize {
    match days.entry(day) {
        std::collections::btree_map::Entry::Occupied(mut o) => {
            o.get_mut().plus_equals(diff);
            if o.get().is_zero() {
                o.remove();
                return -1;
            }
            0
        }
        std::collections::btree_map::Entry::Vacant(v) => {
            if diff.is_zero() {
                return 0;
            }
            v.insert(*diff);
            1
        }
    }
}

/// Gathers `prices` and `under` on worker 0 and publishes an [`Index`] into `shared` at each closed
/// timestamp, and a summary (`/rates/summary`) into `summary`, so `/health` sees the as-of.
pub fn publish_index<'s>(
    prices: VecCollection<'s, u64, ((Port, Port), Day), PriceSum>,
    under: VecCollection<'s, u64, (Region, Port)>,
    shared: SharedIndex,
    summary: ViewHandle,
    metrics: Arc<Metrics>,
    mut on_publish: impl FnMut(u64) + 'static,
) {
    let scope = prices.scope();
    let is_publisher = scope.index() == 0;
    let mut builder = OperatorBuilder::new("RatesIndex".to_owned(), scope);
    let mut prices_in = builder.new_input(prices.inner, Exchange::new(|_| 0u64));
    let mut under_in = builder.new_input(under.inner, Exchange::new(|_| 0u64));
    builder.build(move |_caps| {
        let mut pending_prices = Vec::new();
        let mut pending_under = Vec::new();
        let mut last_as_of = None;
        move |frontiers| {
            prices_in.for_each(|_cap, data| pending_prices.append(data));
            under_in.for_each(|_cap, data| pending_under.append(data));
            if !is_publisher {
                return;
            }
            let bound = frontiers.iter().filter_map(|f| f.frontier().first().copied()).min();
            let current = shared.read();
            let mut next: Option<Index> = None;
            let mut changed = 0u64;
            drain_closed(&mut pending_prices, bound, |((orig, dest), day), diff: PriceSum| {
                let index = next.get_or_insert_with(|| (*current).clone());
                let days = index.pairs.entry(orig).or_default().entry(dest).or_default();
                index.entries = (index.entries as isize + apply(Arc::make_mut(days), day, &diff)) as usize;
                index.prices += diff.count;
                changed += 1;
            });
            drain_closed(&mut pending_under, bound, |(region, port), diff: isize| {
                let index = next.get_or_insert_with(|| (*current).clone());
                let ports = Arc::make_mut(index.under.entry(region).or_default());
                if diff > 0 {
                    ports.insert(port);
                } else if diff < 0 {
                    ports.remove(&port);
                }
                changed += 1;
            });
            let as_of = match bound {
                Some(b) => b.saturating_sub(1),
                None => last_as_of.unwrap_or(0),
            };
            if changed == 0 && last_as_of == Some(as_of) {
                return;
            }
            let mut index = next.unwrap_or_else(|| (*current).clone());
            if changed > 0 {
                index.pairs.retain(|_, dests| {
                    dests.retain(|_, days| !days.is_empty());
                    !dests.is_empty()
                });
            }
            index.as_of = as_of;
            let body = (changed > 0).then(|| {
                serde_json::json!({
                    "as_of": as_of,
                    "ports": index.ports.len(),
                    "regions": index.regions.len(),
                    "pairs": index.pairs.values().map(HashMap::len).sum::<usize>(),
                    "pair_days": index.entries,
                    "prices": index.prices,
                })
                .to_string()
            });
            shared.swap(Arc::new(index));
            summary.publish(as_of, body);
            on_publish(as_of);
            if let Some(closed_at) = bound.filter(|_| changed > 0) {
                observe_publish_delay(&metrics, "rates", closed_at);
            }
            metrics.view_as_of.with_label_values(&["rates"]).set(as_of as i64);
            metrics.view_updates.with_label_values(&["rates"]).inc_by(changed);
            last_as_of = Some(as_of);
        }
    });
}
