//! Availability views: per site its state, uptime over 1 h / 24 h / 7 d and latency percentiles, kept
//! incrementally from check results, with memory that follows sites × window buckets, not history.
//!
//! [`admit`] is the window. It is exchanged by site and, per site, anchored to the latest `scheduled_at`
//! it has seen (the data's time, never the wall clock). A result adds its [`Stats`] to its minute bucket
//! and its hour bucket; when the anchor moves, a minute bucket that leaves the last 60 minutes and an hour
//! bucket that leaves the last 168 hours are retracted as a whole (the operator keeps each bucket's sum
//! for that). A repeat of a result (same site and `scheduled_at`) is recognised for as long as its hour
//! bucket is in the window and counted once. Because a bucket's content is a set of results and the
//! anchor is a maximum, the buckets are the same whatever order results arrive in, so a replay gives the
//! same windows. The site's status (state and since when, the last result, the strip of the last 50
//! checks) and its incidents follow results in `scheduled_at` order; a result older than the site's
//! newest counts in the windows but not in the status ([`AdmitCounters::out_of_order`]).
//!
//! [`site_windows`] sums a site's minute buckets in a `reduce`: the difference type [`Stats`] carries the
//! counts and a log-bucket histogram per phase ([`Hist`]), so the sum is exact counts and percentiles
//! within 1/16 of an octave. The hour buckets (counts only) stay in the operator, which puts their 24 h
//! and 7 d sums into the status; status and minute-bucket changes go out once per site and batch.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::rc::Rc;

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::Stream;

/// The phases timed per check, in the order of [`Check::phases_us`].
pub const PHASES: [&str; 6] = ["dns", "connect", "tls", "ttfb", "transfer", "total"];
/// Minute buckets in the 1 h window.
pub const MINUTES: i64 = 60;
/// Hour buckets in the 7 d window (the 24 h window is the last 24 of them).
pub const HOURS: i64 = 168;
/// Checks in a site's strip.
pub const STRIP: usize = 50;
/// Incidents kept per site (besides the 7 d window).
pub const INCIDENTS: usize = 20;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// Answered as expected.
    Up,
    /// Failed, with an error class.
    Down,
    /// The slot came while the previous check still ran.
    Missed,
}

impl Outcome {
    /// `up`, `down`, `missed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Up => "up",
            Outcome::Down => "down",
            Outcome::Missed => "missed",
        }
    }
}

/// One check result, as the views need it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Check {
    /// The site (its configured URL).
    pub url: String,
    /// The slot, epoch ms.
    pub scheduled_at_ms: i64,
    /// The site's check interval, ms, when the checker said (makes repeat detection a bitmap).
    pub interval_ms: Option<i64>,
    /// up, down or missed.
    pub outcome: Outcome,
    /// Why it is down.
    pub error_class: Option<String>,
    /// In which phase it failed.
    pub error_phase: Option<String>,
    /// The final HTTP status.
    pub http_status: Option<i32>,
    /// dns, connect, tls, ttfb, transfer, total, in microseconds.
    pub phases_us: [i64; 6],
    /// The certificate's notAfter, epoch ms.
    pub cert_not_after_ms: Option<i64>,
}

/// What goes into [`admit`]: check results, and hour counts from a store's rollups (a restart's reload of
/// hours whose results it does not reload).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Input {
    /// One result.
    Check(Check),
    /// An hour's counts for a site: `(url, hour since the epoch, up, down, missed)`.
    Rollup(String, i64, i64, i64, i64),
    /// After a reload: the site's current run of this state began at this slot, before the results
    /// reloaded (`(url, state, since)`); moves the status's and an open incident's start back to it.
    Since(String, Outcome, i64),
}

/// A log-bucket histogram of microseconds: values below 32 are exact, above them each octave has 16
/// buckets (a bucket is at most 1/16 of its lower bound wide). Sparse: `(bucket, count)` sorted by
/// bucket, no zero counts, so it is a difference type and an empty one is zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hist(pub Vec<(u16, i64)>);

impl Hist {
    /// The bucket of `us` (negative counts as 0).
    pub fn bucket(us: i64) -> u16 {
        let v = us.max(0) as u64;
        if v < 32 {
            return v as u16;
        }
        let e = 63 - v.leading_zeros(); // floor(log2 v) >= 5
        let sub = (v >> (e - 4)) & 15;
        (32 + (e - 5) * 16 + sub as u32) as u16
    }

    /// The largest value in bucket `b`: what a percentile falling in it reports.
    pub fn upper(b: u16) -> i64 {
        if b < 32 {
            return i64::from(b);
        }
        let (e, sub) = (u32::from(b - 32) / 16 + 5, u64::from(b - 32) % 16);
        let lower = (16 + sub) << (e - 4);
        (lower + (1 << (e - 4)) - 1) as i64
    }

    /// One value.
    pub fn of(us: i64) -> Hist {
        Hist(vec![(Hist::bucket(us), 1)])
    }

    /// How many values.
    pub fn count(&self) -> i64 {
        self.0.iter().map(|(_, c)| c).sum()
    }

    /// The value at quantile `per_mille`/1000 (nearest rank, the bucket's upper bound), or `None` if empty.
    pub fn quantile(&self, per_mille: i64) -> Option<i64> {
        let n = self.count();
        if n <= 0 {
            return None;
        }
        let rank = (n * per_mille + 999) / 1000; // ceil(n * q), at least 1
        let mut seen = 0;
        for (b, c) in &self.0 {
            seen += c;
            if seen >= rank.max(1) {
                return Some(Hist::upper(*b));
            }
        }
        self.0.last().map(|(b, _)| Hist::upper(*b))
    }
}

impl IsZero for Hist {
    fn is_zero(&self) -> bool {
        self.0.is_empty()
    }
}

impl Semigroup for Hist {
    fn plus_equals(&mut self, rhs: &Self) {
        if rhs.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + rhs.0.len());
        let (x, y) = (&self.0, &rhs.0);
        let (mut i, mut j) = (0, 0);
        while i < x.len() || j < y.len() {
            let next = if j == y.len() || (i < x.len() && x[i].0 < y[j].0) {
                i += 1;
                x[i - 1]
            } else if i == x.len() || y[j].0 < x[i].0 {
                j += 1;
                y[j - 1]
            } else {
                i += 1;
                j += 1;
                (x[i - 1].0, x[i - 1].1 + y[j - 1].1)
            };
            if next.1 != 0 {
                out.push(next);
            }
        }
        self.0 = out;
    }
}

impl Monoid for Hist {
    fn zero() -> Self {
        Hist::default()
    }
}

impl Abelian for Hist {
    fn negate(&mut self) {
        for (_, c) in &mut self.0 {
            *c = -*c;
        }
    }
}

/// Counts of a set of results and, for the `up` ones, a histogram per phase: the difference type of the
/// window buckets.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stats {
    /// Results up.
    pub up: i64,
    /// Results down.
    pub down: i64,
    /// Slots missed.
    pub missed: i64,
    /// Per phase of [`PHASES`], the `up` results' timings (empty in hour buckets).
    pub phases: Vec<Hist>,
}

impl Stats {
    /// One result's counts, with its timings if `timings`.
    pub fn of(check: &Check, timings: bool) -> Stats {
        let mut s = Stats::default();
        match check.outcome {
            Outcome::Up => s.up = 1,
            Outcome::Down => s.down = 1,
            Outcome::Missed => s.missed = 1,
        }
        if timings && check.outcome == Outcome::Up {
            s.phases = check.phases_us.iter().map(|us| Hist::of(*us)).collect();
        }
        s
    }
}

impl IsZero for Stats {
    fn is_zero(&self) -> bool {
        self.up == 0 && self.down == 0 && self.missed == 0 && self.phases.iter().all(IsZero::is_zero)
    }
}

impl Semigroup for Stats {
    fn plus_equals(&mut self, rhs: &Self) {
        self.up += rhs.up;
        self.down += rhs.down;
        self.missed += rhs.missed;
        if self.phases.len() < rhs.phases.len() {
            self.phases.resize(rhs.phases.len(), Hist::default());
        }
        for (h, r) in self.phases.iter_mut().zip(&rhs.phases) {
            h.plus_equals(r);
        }
        if self.phases.iter().all(IsZero::is_zero) {
            self.phases.clear();
        }
    }
}

impl Monoid for Stats {
    fn zero() -> Self {
        Stats::default()
    }
}

impl Abelian for Stats {
    fn negate(&mut self) {
        self.up = -self.up;
        self.down = -self.down;
        self.missed = -self.missed;
        for h in &mut self.phases {
            h.negate();
        }
    }
}

impl Multiply<isize> for Stats {
    type Output = Stats;
    fn multiply(mut self, rhs: &isize) -> Stats {
        let k = *rhs as i64;
        self.up *= k;
        self.down *= k;
        self.missed *= k;
        for h in &mut self.phases {
            for (_, c) in &mut h.0 {
                *c *= k;
            }
        }
        self
    }
}

/// One cell of a site's strip: a check's slot, outcome and error class.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cell50 {
    /// The slot, epoch ms.
    pub scheduled_at_ms: i64,
    /// What it found.
    pub outcome: Outcome,
    /// Why it was down.
    pub error_class: Option<String>,
}

/// A site's status after its newest result.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Status {
    /// `up` or `down`: the newest result that was not a missed slot (`missed` if none was).
    pub state: Outcome,
    /// The slot of the first result of the current run of that state.
    pub since_ms: i64,
    /// The newest result.
    pub last: Check,
    /// The newest certificate expiry seen and the slot it was seen at.
    pub cert: Option<(i64, i64)>,
    /// The last [`STRIP`] checks, oldest first.
    pub strip: Vec<Cell50>,
    /// up, down, missed over the last 24 hour buckets.
    pub day: [i64; 3],
    /// up, down, missed over the last 168 hour buckets.
    pub week: [i64; 3],
}

/// An outage: opened after N consecutive failures, closed after M consecutive successes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Incident {
    /// The slot of the first failure.
    pub started_ms: i64,
    /// The slot of the first success of the closing run, once closed.
    pub ended_ms: Option<i64>,
    /// Failed checks in it.
    pub failures: i64,
    /// The first failure's error class.
    pub error_class: Option<String>,
}

/// When incidents open and close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncidentRule {
    /// Consecutive failures that open one.
    pub open_after: u32,
    /// Consecutive successes that close it.
    pub close_after: u32,
}

/// What [`admit`] puts out: window buckets (difference [`Stats`]) and statuses and incidents (difference
/// `isize`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // short-lived: each lives from the window to the split below
pub enum Admitted {
    /// `(site, minute since the epoch)` with its change: the 1 h window's buckets.
    Bucket(String, i64, Stats),
    /// A site's status, added or retracted.
    Status(String, Status, isize),
    /// A site's incident, added or retracted.
    Incident(String, Incident, isize),
}

/// What [`admit`] did not count, per worker.
#[derive(Clone, Debug, Default)]
pub struct AdmitCounters {
    /// Repeats of a result already counted.
    pub duplicates: Rc<Cell<u64>>,
    /// Results older than their site's newest: in the windows, not in the status.
    pub out_of_order: Rc<Cell<u64>>,
    /// Results older than the 7 d window: in no view.
    pub expired: Rc<Cell<u64>>,
    /// Sites held.
    pub sites: Rc<Cell<usize>>,
}

/// Which slots of an hour bucket were counted: a bitmap over the site's slot grid, plus a sorted list of
/// slots off it.
#[derive(Default)]
struct Seen {
    grid: Option<(i64, i64)>,
    bits: Vec<u64>,
    off_grid: Vec<i64>,
}

impl Seen {
    /// Marks `at`; false if it was already marked.
    fn insert(&mut self, hour_start: i64, at: i64, interval: Option<i64>) -> bool {
        let interval = interval.filter(|i| *i > 0);
        if self.grid.is_none() && self.bits.is_empty() {
            self.grid = interval.map(|i| (i, at.rem_euclid(i)));
        }
        if let (Some((i, phase)), Some(mine)) = (self.grid, interval) {
            if mine == i && at.rem_euclid(i) == phase {
                let slot = ((at - hour_start) / i) as usize;
                let (word, bit) = (slot / 64, slot % 64);
                if self.bits.len() <= word {
                    self.bits.resize(word + 1, 0);
                }
                let was = self.bits[word] & (1 << bit) != 0;
                self.bits[word] |= 1 << bit;
                return !was;
            }
        }
        match self.off_grid.binary_search(&at) {
            Ok(_) => false,
            Err(i) => {
                self.off_grid.insert(i, at);
                true
            }
        }
    }
}

#[derive(Default)]
struct Site {
    /// The status as last put out, and whether this batch changed anything it shows.
    emitted: Option<Status>,
    dirty: bool,
    newest: Option<i64>,
    minutes: BTreeMap<i64, Stats>,
    hours: BTreeMap<i64, (Stats, Seen)>,
    status: Option<Status>,
    run: u32,
    open: Option<Incident>,
    incidents: VecDeque<Incident>,
}

/// The window operator (see the module docs): results in, bucket, status and incident changes out.
pub fn admit<'s>(
    input: Stream<'s, u64, Vec<Input>>,
    rule: IncidentRule,
    counters: AdmitCounters,
) -> Stream<'s, u64, Vec<(Admitted, u64, isize)>> {
    let hasher = foldhash::fast::FixedState::with_seed(0x7a11);
    let route = move |i: &Input| {
        let url = match i {
            Input::Check(c) => &c.url,
            Input::Rollup(url, ..) | Input::Since(url, ..) => url,
        };
        hasher.hash_one(url)
    };
    let mut sites: HashMap<String, Site> = HashMap::new();
    let mut touched: Vec<String> = Vec::new();
    input.unary(Exchange::new(route), "AvailabilityWindow", move |_cap, _info| {
        move |input, output| {
            input.for_each(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let t = *cap.time();
                let mut out = Vec::new();
                for item in data.drain(..) {
                    match item {
                        Input::Check(check) => {
                            touched.push(check.url.clone());
                            let site = sites.entry(check.url.clone()).or_default();
                            site.check(check, rule, &counters, &mut out);
                        }
                        Input::Rollup(url, hour, up, down, missed) => {
                            touched.push(url.clone());
                            let site = sites.entry(url.clone()).or_default();
                            let stats = Stats {
                                up,
                                down,
                                missed,
                                phases: Vec::new(),
                            };
                            site.add_hour(hour, stats);
                        }
                        Input::Since(url, state, since) => {
                            touched.push(url.clone());
                            if let Some(site) = sites.get_mut(&url) {
                                site.since(&url, state, since, &mut out);
                            }
                        }
                    }
                }
                // Once per site and batch: its status, and its minute buckets' changes summed.
                let mut minutes: HashMap<(String, i64), Stats> = HashMap::new();
                let mut rest = Vec::new();
                for a in out {
                    match a {
                        Admitted::Bucket(url, m, stats) => minutes.entry((url, m)).or_default().plus_equals(&stats),
                        other => rest.push(other),
                    }
                }
                // Only the sites this batch touched, not every site held.
                touched.sort_unstable();
                touched.dedup();
                for url in touched.drain(..) {
                    if let Some(site) = sites.get_mut(&url).filter(|s| s.dirty) {
                        site.emit_status(&url, &mut rest);
                    }
                }
                counters.sites.set(sites.len());
                let buckets = minutes
                    .into_iter()
                    .filter(|(_, s)| !s.is_zero())
                    .map(|((url, m), s)| Admitted::Bucket(url, m, s));
                output
                    .session(&cap)
                    .give_iterator(buckets.chain(rest).map(|a| (a, t, 1)));
            });
        }
    })
}

impl Site {
    fn add_hour(&mut self, hour: i64, stats: Stats) {
        let newest_hour = self.newest.map(|n| n.div_euclid(HOUR_MS));
        if newest_hour.is_some_and(|h| hour <= h - HOURS) {
            return;
        }
        let entry = self.hours.entry(hour).or_default();
        entry.0.plus_equals(&stats);
        self.dirty = true;
    }

    /// Puts out the status if the batch changed it, with the 24 h and 7 d counts from the hour buckets.
    fn emit_status(&mut self, url: &str, out: &mut Vec<Admitted>) {
        self.dirty = false;
        let Some(status) = self.status.as_mut() else { return };
        let newest_hour = self.newest.map_or(0, |n| n.div_euclid(HOUR_MS));
        let (mut day, mut week) = ([0; 3], [0; 3]);
        for (h, (s, _)) in self.hours.range(newest_hour - HOURS + 1..) {
            let c = [s.up, s.down, s.missed];
            for i in 0..3 {
                week[i] += c[i];
                if *h > newest_hour - 24 {
                    day[i] += c[i];
                }
            }
        }
        (status.day, status.week) = (day, week);
        if self.emitted.as_ref() == Some(status) {
            return;
        }
        if let Some(old) = self.emitted.take() {
            out.push(Admitted::Status(url.to_owned(), old, -1));
        }
        out.push(Admitted::Status(url.to_owned(), status.clone(), 1));
        self.emitted = Some(status.clone());
    }

    fn since(&mut self, url: &str, state: Outcome, since: i64, out: &mut Vec<Admitted>) {
        let Some(old) = self.status.as_ref().filter(|s| s.state == state && since < s.since_ms) else {
            return;
        };
        let new = Status {
            since_ms: since,
            ..old.clone()
        };
        if let Some(open) = self.open.as_ref().filter(|o| o.started_ms == old.since_ms) {
            let moved = Incident {
                started_ms: since,
                ..open.clone()
            };
            out.push(Admitted::Incident(url.to_owned(), open.clone(), -1));
            out.push(Admitted::Incident(url.to_owned(), moved.clone(), 1));
            self.open = Some(moved);
        }
        self.status = Some(new);
        self.dirty = true;
    }

    fn check(&mut self, check: Check, rule: IncidentRule, counters: &AdmitCounters, out: &mut Vec<Admitted>) {
        let at = check.scheduled_at_ms;
        let (minute, hour) = (at.div_euclid(MINUTE_MS), at.div_euclid(HOUR_MS));
        if self.newest.is_some_and(|n| hour <= n.div_euclid(HOUR_MS) - HOURS) {
            counters.expired.set(counters.expired.get() + 1);
            return;
        }
        let (stats, seen) = self.hours.entry(hour).or_default();
        if !seen.insert(hour * HOUR_MS, at, check.interval_ms) {
            counters.duplicates.set(counters.duplicates.get() + 1);
            return;
        }
        let url = check.url.clone();
        stats.plus_equals(&Stats::of(&check, false));
        self.dirty = true;
        let newest_minute = self.newest.map(|n| n.div_euclid(MINUTE_MS));
        if newest_minute.is_none_or(|m| minute > m - MINUTES) {
            let timed = Stats::of(&check, true);
            self.minutes.entry(minute).or_default().plus_equals(&timed);
            out.push(Admitted::Bucket(url.clone(), minute, timed));
        }
        if self.newest.is_some_and(|n| at < n) {
            counters.out_of_order.set(counters.out_of_order.get() + 1);
            return;
        }
        self.newest = Some(at);
        // Buckets the anchor left behind leave the windows as a whole.
        let keep_minutes = self.minutes.split_off(&(minute - MINUTES + 1));
        for (m, mut sum) in std::mem::replace(&mut self.minutes, keep_minutes) {
            sum.negate();
            out.push(Admitted::Bucket(url.clone(), m, sum));
        }
        self.hours = self.hours.split_off(&(hour - HOURS + 1));
        self.follow(check, rule, out);
    }

    /// The status and incidents after a result newer than every other.
    fn follow(&mut self, check: Check, rule: IncidentRule, out: &mut Vec<Admitted>) {
        let url = check.url.clone();
        let at = check.scheduled_at_ms;
        let old = self.status.take();
        let mut strip = old.as_ref().map(|s| s.strip.clone()).unwrap_or_default();
        strip.push(Cell50 {
            scheduled_at_ms: at,
            outcome: check.outcome,
            error_class: check.error_class.clone(),
        });
        if strip.len() > STRIP {
            strip.drain(..strip.len() - STRIP);
        }
        let (mut state, mut since) = old.as_ref().map_or((Outcome::Missed, at), |s| (s.state, s.since_ms));
        if check.outcome != Outcome::Missed && check.outcome != state {
            (state, since) = (check.outcome, at);
            self.run = 0;
        }
        let cert = check
            .cert_not_after_ms
            .map(|c| (c, at))
            .or(old.as_ref().and_then(|s| s.cert));
        let (day, week) = old.as_ref().map_or(([0; 3], [0; 3]), |s| (s.day, s.week));
        self.status = Some(Status {
            state,
            since_ms: since,
            last: check.clone(),
            cert,
            strip,
            day,
            week,
        });

        // Incidents, over up and down results in slot order.
        if check.outcome == Outcome::Missed {
            return;
        }
        self.run += 1;
        let before = self.open.clone();
        match (check.outcome, self.open.as_mut()) {
            (Outcome::Down, Some(open)) => open.failures += 1,
            (Outcome::Down, None) if self.run >= rule.open_after.max(1) => {
                // Opened at the N-th failure, started at the first of the run.
                let first = self.status.as_ref().map_or(at, |s| s.since_ms);
                let first_class = self
                    .status
                    .as_ref()
                    .and_then(|s| s.strip.iter().find(|c| c.scheduled_at_ms == first))
                    .and_then(|c| c.error_class.clone())
                    .or(check.error_class.clone());
                self.open = Some(Incident {
                    started_ms: first,
                    ended_ms: None,
                    failures: i64::from(self.run),
                    error_class: first_class,
                });
            }
            (Outcome::Up, Some(_)) if self.run >= rule.close_after.max(1) => {
                if let Some(mut done) = self.open.take() {
                    done.ended_ms = self.status.as_ref().map(|s| s.since_ms);
                    self.incidents.push_back(done.clone());
                    if let Some(b) = &before {
                        out.push(Admitted::Incident(url.clone(), b.clone(), -1));
                    }
                    out.push(Admitted::Incident(url.clone(), done, 1));
                }
                self.expire_incidents(&url, at, out);
                return;
            }
            _ => {}
        }
        if before != self.open {
            if let Some(b) = before {
                out.push(Admitted::Incident(url.clone(), b, -1));
            }
            if let Some(o) = &self.open {
                out.push(Admitted::Incident(url.clone(), o.clone(), 1));
            }
        }
        self.expire_incidents(&url, at, out);
    }

    /// Closed incidents beyond the last [`INCIDENTS`] or ended before the 7 d window leave.
    fn expire_incidents(&mut self, url: &str, newest: i64, out: &mut Vec<Admitted>) {
        let horizon = (newest.div_euclid(HOUR_MS) - HOURS + 1) * HOUR_MS;
        while let Some(first) = self.incidents.front() {
            let old = first.ended_ms.is_some_and(|e| e < horizon);
            if self.incidents.len() <= INCIDENTS && !old {
                break;
            }
            if let Some(gone) = self.incidents.pop_front() {
                out.push(Admitted::Incident(url.to_owned(), gone, -1));
            }
        }
    }
}

/// The window buckets of [`admit`]'s output, as a collection with [`Stats`] differences.
pub fn buckets<'s>(
    admitted: &Stream<'s, u64, Vec<(Admitted, u64, isize)>>,
) -> VecCollection<'s, u64, (String, i64), Stats> {
    admitted
        .clone()
        .flat_map(|(a, t, _)| match a {
            Admitted::Bucket(url, b, s) => Some(((url, b), t, s)),
            _ => None,
        })
        .as_collection()
}

/// The statuses of [`admit`]'s output.
pub fn statuses<'s>(
    admitted: &Stream<'s, u64, Vec<(Admitted, u64, isize)>>,
) -> VecCollection<'s, u64, (String, Status), isize> {
    admitted
        .clone()
        .flat_map(|(a, t, _)| match a {
            Admitted::Status(url, s, d) => Some(((url, s), t, d)),
            _ => None,
        })
        .as_collection()
}

/// The incidents of [`admit`]'s output, gathered per site (newest first).
pub fn incidents<'s>(
    admitted: &Stream<'s, u64, Vec<(Admitted, u64, isize)>>,
) -> VecCollection<'s, u64, (String, Vec<Incident>), isize> {
    admitted
        .clone()
        .flat_map(|(a, t, _)| match a {
            Admitted::Incident(url, i, d) => Some(((url, i), t, d)),
            _ => None,
        })
        .as_collection()
        .reduce(|_url, input, output| {
            let mut list: Vec<Incident> = input
                .iter()
                .filter(|(_, d)| *d > 0)
                .map(|(i, _)| (*i).clone())
                .collect();
            list.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then_with(|| a.cmp(b)));
            output.push((list, 1));
        })
}

/// A site's last hour: exact counts and the percentiles per phase (the 24 h and 7 d counts are in its
/// [`Status`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Windows {
    /// up, down, missed in the last 60 minute buckets.
    pub hour: [i64; 3],
    /// Per phase of [`PHASES`], p50, p95, p99 in µs of the `up` results in them.
    pub percentiles: Vec<[i64; 3]>,
    /// The window's first minute (epoch ms).
    pub from_ms: i64,
}

/// Sums each site's minute buckets into its [`Windows`].
pub fn site_windows<'s>(
    buckets: VecCollection<'s, u64, (String, i64), Stats>,
) -> VecCollection<'s, u64, (String, Windows), isize> {
    buckets.reduce(|_url, input, output| {
        let newest = input.iter().map(|(m, _)| **m).max().unwrap_or(0);
        let mut w = Stats::default();
        for (minute, stats) in input {
            if **minute > newest - MINUTES {
                w.plus_equals(stats);
            }
        }
        let percentiles = (0..PHASES.len())
            .map(|p| {
                let h = w.phases.get(p).cloned().unwrap_or_default();
                [500, 950, 990].map(|q| h.quantile(q).unwrap_or(0))
            })
            .collect();
        output.push((
            Windows {
                hour: [w.up, w.down, w.missed],
                percentiles,
                from_ms: (newest - MINUTES + 1) * MINUTE_MS,
            },
            1,
        ));
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::{Capture, Input as _, Probe};

    use super::*;

    fn check(url: &str, at: i64, outcome: Outcome, total: i64) -> Check {
        Check {
            url: url.into(),
            scheduled_at_ms: at,
            interval_ms: Some(30_000),
            outcome,
            error_class: (outcome == Outcome::Down).then(|| "connect_refused".into()),
            error_phase: None,
            http_status: None,
            phases_us: [1, 2, 3, 4, 5, total],
            cert_not_after_ms: None,
        }
    }

    /// The final views as text per `kind url`: `w` windows, `s` status, `i` incidents.
    type Views = BTreeMap<String, String>;

    /// Feeds batches (one timestamp each) through admit and the views on `workers` workers.
    fn run(batches: Vec<Vec<Input>>, workers: usize) -> Views {
        let rule = IncidentRule {
            open_after: 3,
            close_after: 2,
        };
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let batches = batches.clone();
            let (mut input, probe, captured) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Vec<Input>>();
                let admitted = admit(stream, rule, AdmitCounters::default());
                let w = site_windows(buckets(&admitted)).map(|(u, w)| (format!("w {u}"), format!("{w:?}")));
                let s = statuses(&admitted).map(|(u, s)| (format!("s {u}"), format!("{s:?}")));
                let i = incidents(&admitted).map(|(u, i)| (format!("i {u}"), format!("{i:?}")));
                let all = w.concat(s).concat(i).inner;
                let (probe, all) = all.probe();
                (input, probe, all.capture())
            });
            for (t, mut batch) in batches.into_iter().enumerate() {
                if worker.index() == 0 {
                    input.send_batch(&mut batch);
                }
                input.advance_to(t as u64 + 1);
                worker.step_while(|| probe.less_than(input.time()));
            }
            drop(input);
            while worker.step() {}
            captured
        })
        .unwrap();
        let mut acc: BTreeMap<(String, String), isize> = BTreeMap::new();
        for captured in guards.join() {
            for (_, updates) in captured.unwrap().extract() {
                for ((k, v), _, d) in updates {
                    *acc.entry((k, v)).or_default() += d;
                }
            }
        }
        let mut views = BTreeMap::new();
        for ((k, v), d) in acc {
            assert!(d == 0 || d == 1, "{k}: multiplicity {d}");
            if d == 1 {
                assert!(views.insert(k.clone(), v).is_none(), "{k}: two values");
            }
        }
        views
    }

    /// The counts `[1 h, 24 h, 7 d]` of a site, read back from the views' text.
    fn windows_of(views: &Views, url: &str) -> [[i64; 3]; 3] {
        let nums = |text: &str, field: &str| -> [i64; 3] {
            let part = text
                .split(&format!("{field}: ["))
                .nth(1)
                .unwrap()
                .split(']')
                .next()
                .unwrap();
            let v: Vec<i64> = part.split(", ").map(|n| n.parse().unwrap()).collect();
            [v[0], v[1], v[2]]
        };
        let (w, s) = (&views[&format!("w {url}")], &views[&format!("s {url}")]);
        [nums(w, "hour"), nums(s, "day"), nums(s, "week")]
    }

    const T0: i64 = 1_790_000_000_000 / HOUR_MS * HOUR_MS; // an hour boundary

    /// A site checked every 30 s for `slots` slots from `T0`, down where `down(k)`.
    fn series(url: &str, slots: i64, down: impl Fn(i64) -> bool) -> Vec<Input> {
        (0..slots)
            .map(|k| {
                let o = if down(k) { Outcome::Down } else { Outcome::Up };
                Input::Check(check(url, T0 + k * 30_000, o, 1000 + k))
            })
            .collect()
    }

    #[test]
    fn windows_count_exactly_and_slide_with_the_newest_result() {
        // 3 hours of 30 s checks (360), every 10th down.
        let all = series("a", 360, |k| k % 10 == 0);
        let views = run(all.chunks(7).map(<[Input]>::to_vec).collect(), 1);
        let w = windows_of(&views, "a");
        // 1 h: the last 60 minutes = slots 240..360 (120 checks, 12 down).
        assert_eq!(w[0], [108, 12, 0]);
        // 24 h and 7 d: all three hours.
        assert_eq!(w[1], [324, 36, 0]);
        assert_eq!(w[2], [324, 36, 0]);
        // 25 hours later one more check: the 24 h window holds only its hour; the 7 d window all.
        let mut later = all.clone();
        later.push(Input::Check(check("a", T0 + 27 * HOUR_MS, Outcome::Up, 5)));
        let views = run(vec![later], 1);
        let w = windows_of(&views, "a");
        assert_eq!(w[0], [1, 0, 0]);
        assert_eq!(w[1], [1, 0, 0]);
        assert_eq!(w[2], [325, 36, 0]);
    }

    #[test]
    fn a_repeat_counts_once_and_order_and_workers_do_not_matter() {
        let mut all = series("a", 300, |k| (100..110).contains(&k));
        all.extend(series("b", 300, |k| k % 7 == 0));
        let expected = run(vec![all.clone()], 1);
        // Every result twice, in a scrambled order, over many timestamps and 1, 2 and 3 workers: the windows
        // are the same sets of results.
        let mut twice: Vec<Input> = all.iter().chain(all.iter()).cloned().collect();
        let n = twice.len();
        for i in 0..n {
            twice.swap(i, (i * 7919 + 13) % n);
        }
        for workers in [1, 2, 3] {
            let got = run(twice.chunks(37).map(<[Input]>::to_vec).collect(), workers);
            for site in ["a", "b"] {
                let key = format!("w {site}");
                assert_eq!(got[&key], expected[&key], "{workers} workers, {site}");
            }
        }
        // In slot order (any batching, any workers) the status and incidents agree too.
        for workers in [2, 3] {
            let repeated: Vec<Input> = all.iter().flat_map(|i| [i.clone(), i.clone()]).collect();
            let got = run(repeated.chunks(11).map(<[Input]>::to_vec).collect(), workers);
            assert_eq!(got, expected, "{workers} workers");
        }
    }

    #[test]
    fn incidents_open_after_three_failures_and_close_after_two_successes() {
        // Two failures (no incident), up, four failures (one incident from the first), one up, one down
        // (still open), two ups (closed at the first of them).
        let pattern = "ddudddduduu";
        let inputs: Vec<Input> = pattern
            .chars()
            .enumerate()
            .map(|(k, c)| {
                let o = if c == 'd' { Outcome::Down } else { Outcome::Up };
                Input::Check(check("s", T0 + k as i64 * 30_000, o, 1))
            })
            .collect();
        let views = run(vec![inputs.clone()], 1);
        let expected = vec![Incident {
            started_ms: T0 + 3 * 30_000,
            ended_ms: Some(T0 + 9 * 30_000),
            failures: 5,
            error_class: Some("connect_refused".into()),
        }];
        assert_eq!(views["i s"], format!("{expected:?}"));
        // Before the last up it is still open.
        let views = run(vec![inputs[..10].to_vec()], 1);
        assert!(views["i s"].contains("ended_ms: None"), "{}", views["i s"]);
        let since = format!("Status {{ state: Up, since_ms: {}, ", T0 + 9 * 30_000);
        assert!(views["s s"].starts_with(&since), "{}", views["s s"]);
    }

    #[test]
    fn percentiles_come_from_the_last_hour_of_up_results() {
        // 120 ups with total 1000+k µs (k = 0..120) and downs with huge totals that must not count.
        let mut all = series("p", 120, |_| false);
        all.push(Input::Check(check("p", T0 + 120 * 30_000, Outcome::Down, 9_000_000)));
        let views = run(vec![all], 1);
        let text = &views["w p"];
        // total's p50 is the 60th of 1000..1119 = 1059, reported as its bucket's upper bound.
        let p50 = Hist::upper(Hist::bucket(1059));
        let p99 = Hist::upper(Hist::bucket(1118));
        assert!(text.contains(&format!("[{p50}, ")), "{text}");
        assert!(text.contains(&format!(", {p99}]]")), "{text}");
    }

    #[test]
    fn rollups_fill_hours_a_reload_does_not_replay() {
        let all = series("r", 360, |k| k % 10 == 0);
        let direct = run(vec![all.clone()], 1);
        // A reload: the first hour as its rollup counts, the last two hours as results.
        let mut reload = vec![Input::Rollup("r".into(), T0 / HOUR_MS, 108, 12, 0)];
        reload.extend(all[120..].iter().cloned());
        let reloaded = run(vec![reload], 1);
        assert_eq!(reloaded["w r"], direct["w r"]);
    }

    #[test]
    fn histogram_buckets_bound_values_within_a_sixteenth() {
        for v in [
            0i64,
            1,
            31,
            32,
            33,
            47,
            48,
            100,
            999,
            1_000,
            12_345,
            5_000_000,
            60_000_000_000,
        ] {
            let b = Hist::bucket(v);
            let up = Hist::upper(b);
            assert!(up >= v, "{v}: upper {up}");
            assert!((up - v) * 16 <= v.max(1), "{v}: upper {up} too far");
            assert_eq!(Hist::bucket(up), b, "{v}");
            assert_eq!(Hist::bucket(up + 1), b + 1, "{v}");
        }
        let mut h = Hist::default();
        for v in 1..=100 {
            h.plus_equals(&Hist::of(v * 1000));
        }
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(500).unwrap();
        assert!((50_000..=53_125).contains(&p50), "{p50}");
        let p99 = h.quantile(990).unwrap();
        assert!((99_000..=102_400).contains(&p99), "{p99}");
        let mut neg = h.clone();
        neg.negate();
        h.plus_equals(&neg);
        assert!(h.is_zero());
    }
}
