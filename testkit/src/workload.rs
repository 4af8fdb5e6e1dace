//! Workloads of `cloud.instances` changes, and a ledger that bills them independently of tally.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally::tools::sim::{debezium_records_at, deploy, LogAt, SimEvent, SimRow, Simulator, ORGS};

use crate::produce::Rec;

/// A benchmark workload: fills a running set of `running` rows, then keeps it constant with a mix of
/// destroy-oldest + deploy pairs and price changes (`update_ratio` of the events). Database time advances
/// one second every `events_per_second` events.
pub struct Workload {
    rng: StdRng,
    next_id: u64,
    live: VecDeque<SimRow>,
    orgs: Vec<String>,
    running: usize,
    update_ratio: f64,
    events_per_second: u64,
    emitted: u64,
    /// The current database second.
    pub ts_s: i64,
}

impl Workload {
    /// `orgs` organizations, `running` rows kept running, `update_ratio` of events price changes, database
    /// time one second per `events_per_second` events; reproducible from `seed`.
    pub fn new(seed: u64, orgs: usize, running: usize, update_ratio: f64, events_per_second: u64) -> Self {
        let orgs = (0..orgs.max(1))
            .map(|i| {
                if i < ORGS.len() {
                    ORGS[i].to_string()
                } else {
                    format!("org-{i:06}")
                }
            })
            .collect();
        Workload {
            rng: StdRng::seed_from_u64(seed),
            next_id: 1,
            live: VecDeque::new(),
            orgs,
            running: running.max(1),
            update_ratio,
            events_per_second: events_per_second.max(1),
            emitted: 0,
            ts_s: 1_700_000_000,
        }
    }

    /// The next event and its database second.
    pub fn next_event(&mut self) -> (SimEvent, i64) {
        self.emitted += 1;
        if self.emitted % self.events_per_second == 0 {
            self.ts_s += 1;
        }
        let ts = self.ts_s;
        let event = if self.live.len() < self.running {
            deploy(&mut self.rng, &self.orgs, &mut self.next_id, &mut self.live, ts)
        } else if self.rng.random_bool(self.update_ratio.clamp(0.0, 1.0)) {
            let i = self.rng.random_range(0..self.live.len());
            let before = self.live[i].clone();
            let after = SimRow {
                price: self.rng.random_range(1..=100),
                ..before.clone()
            };
            self.live[i] = after.clone();
            SimEvent::Reprice { before, after }
        } else {
            SimEvent::Destroy(self.live.pop_front().expect("running set is full here"))
        };
        (event, ts)
    }
}

/// Bills simulator events independently of tally's dataflow: per organization started, running, billing.
#[derive(Default)]
pub struct Ledger {
    per_org: std::collections::BTreeMap<String, (i64, i64, i128)>,
    /// id -> (price, in force since, accrued)
    live: std::collections::HashMap<u64, (i64, i64, i128)>,
}

impl Ledger {
    /// Bills one event at database second `ts`.
    pub fn apply(&mut self, event: &SimEvent, ts: i64) {
        match event {
            SimEvent::Deploy(r) => {
                let e = self.per_org.entry(r.org.clone()).or_default();
                e.0 += 1;
                e.1 += 1;
                self.live.insert(r.id, (r.price, r.started_s, 0));
            }
            SimEvent::Reprice { after, .. } => {
                if let Some((price, since, accrued)) = self.live.get_mut(&after.id) {
                    *accrued += i128::from(*price) * i128::from(ts - *since);
                    *price = after.price;
                    *since = ts;
                }
            }
            SimEvent::Destroy(r) => {
                let (price, since, accrued) = self.live.remove(&r.id).unwrap_or((r.price, r.started_s, 0));
                let e = self.per_org.entry(r.org.clone()).or_default();
                e.1 -= 1;
                e.2 += accrued + i128::from(price) * i128::from(ts - since);
            }
        }
    }

    /// The spec's JSON, as `GET /` renders it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.per_org
                .iter()
                .map(|(org, (s, r, b))| {
                    (
                        org.clone(),
                        serde_json::json!({"started": s, "running": r, "billing": *b as i64}),
                    )
                })
                .collect(),
        )
    }
}

/// `steps` simulator steps with database time advancing 1-3 s per step, as Debezium records over
/// `partitions` partitions (by id), plus what the simulator did billed independently of tally.
pub fn simulated(steps: usize, partitions: i32, seed: u64) -> (Vec<Rec>, serde_json::Value) {
    let (per_step, expected) = simulated_steps(steps, partitions, seed, |i| LogAt::pos(1000 + i as u64 * 10), true);
    (per_step.into_iter().flatten().collect(), expected)
}

/// [`simulated`], the records grouped per step, each step at the place in the server's log `log(step)`
/// says, with or without tombstones after deletes.
pub fn simulated_steps(
    steps: usize,
    partitions: i32,
    seed: u64,
    mut log: impl FnMut(usize) -> LogAt,
    tombstones: bool,
) -> (Vec<Vec<Rec>>, serde_json::Value) {
    let mut sim = Simulator::new(seed);
    let mut ts = 1_700_000_000i64;
    let mut ledger = Ledger::default();
    let mut out = Vec::new();
    for i in 0..steps {
        ts += 1 + (i as i64 % 3);
        let event = sim.step(ts);
        let id = event.row().id;
        let records = debezium_records_at(&event, ts, &log(i), i % 2 == 0, tombstones)
            .into_iter()
            .map(|(key, value)| Rec {
                partition: (id % partitions as u64) as i32,
                key: Some(key.into_bytes()),
                value: value.map(String::into_bytes),
                headers: vec![],
            })
            .collect();
        out.push(records);
        ledger.apply(&event, ts);
    }
    (out, ledger.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_keeps_the_running_set_and_the_ledger_bills_each_price() {
        let mut w = Workload::new(1, 3, 50, 0.3, 10);
        let mut ledger = Ledger::default();
        for _ in 0..5000 {
            let (e, ts) = w.next_event();
            ledger.apply(&e, ts);
        }
        let running: i64 = ledger.per_org.values().map(|v| v.1).sum();
        assert!(
            (49..=50).contains(&running),
            "running set held at 50 (49 right after a destroy): {running}"
        );
        let mut l = Ledger::default();
        let r = SimRow {
            id: 1,
            org: "o".into(),
            instance: "i".into(),
            price: 10,
            started_s: 0,
        };
        l.apply(&SimEvent::Deploy(r.clone()), 0);
        l.apply(
            &SimEvent::Reprice {
                before: r.clone(),
                after: SimRow { price: 20, ..r.clone() },
            },
            100,
        );
        l.apply(&SimEvent::Destroy(SimRow { price: 20, ..r }), 130);
        assert_eq!(l.to_json()["o"]["billing"], 10 * 100 + 20 * 30);
    }
}
