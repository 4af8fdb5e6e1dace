//! Availability views: per site its state, uptime over 1 h / 24 h / 7 d and latency percentiles, kept
//! incrementally from check results, with memory that follows sites × window buckets, not history.
//!
//! [`admit`] is the window. It is exchanged by site and, per site, anchored to the latest `scheduled_at`
//! it has seen (the data's time, never the wall clock). A result adds its [`Stats`] to its minute bucket
//! and its hour's counts; when the anchor moves, a minute bucket that leaves the last 60 minutes is
//! retracted as a whole (the operator keeps each bucket's results, compactly, for that) and an hour that leaves the last
//! 168 is dropped from the site's ring of hours. A repeat of a result (same site and `scheduled_at`) is
//! recognised for as long as its hour is in the window and counted once. Because a bucket's content is a
//! set of results and the anchor is a maximum, the windows are the same whatever order results arrive
//! in, so a replay gives the same views. The site's status (state and since when, the last result, the
//! strip of the last 50 checks, the 24 h and 7 d counts) and its incidents follow results in
//! `scheduled_at` order; a result older than the site's newest counts in the windows but not in the
//! status ([`AdmitCounters::out_of_order`]).
//!
//! The 1 h window leaves [`admit`] as a collection keyed by site whose difference type is [`Stats`]:
//! counts and a log-bucket histogram per phase ([`Hist`]). A result is added at its time and a bucket
//! retracted when it leaves, so a site's accumulated difference is its window, exact counts and
//! percentiles within 1/16 of an octave; [`site_windows`] reads it out in a `reduce` over one value per
//! key. A site's changes go out once per batch; [`split`] hands each kind to its one consumer.
//!
//! Per site the operator holds a fixed amount: 168 hours of 40 bytes (counts and a bitmap of the slots
//! counted), 60 minute buckets at most, and a status whose strip has room for 50 cells of 16 bytes from
//! its first result.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::rc::Rc;

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Map, Partition};
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

    /// One result of this outcome as `[up, down, missed]` counts.
    pub fn counts(self) -> [i64; 3] {
        match self {
            Outcome::Up => [1, 0, 0],
            Outcome::Down => [0, 1, 0],
            Outcome::Missed => [0, 0, 1],
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
    /// Per phase of [`PHASES`], the `up` results' timings (empty without one).
    pub phases: Vec<Hist>,
}

impl Stats {
    /// One result's counts and, if it is up, its timings.
    pub fn of(check: &Check) -> Stats {
        let [up, down, missed] = check.outcome.counts();
        let phases = match check.outcome {
            Outcome::Up => check.phases_us.iter().map(|us| Hist::of(*us)).collect(),
            _ => Vec::new(),
        };
        Stats {
            up,
            down,
            missed,
            phases,
        }
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

/// The error classes a checker reports (`tally checker`'s fixed list), so a strip cell holds one byte.
pub const ERROR_CLASSES: [&str; 17] = [
    "dns_nxdomain",
    "dns_no_answer",
    "dns_timeout",
    "dns_error",
    "connect_refused",
    "connect_timeout",
    "connect_error",
    "tls_untrusted",
    "tls_expired",
    "tls_hostname",
    "tls_error",
    "timeout",
    "http_status",
    "http_protocol",
    "body_mismatch",
    "too_many_redirects",
    "bad_url",
];

/// One cell of a site's strip: a check's slot, outcome and error class, in 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cell50 {
    /// The slot, epoch ms.
    pub scheduled_at_ms: i64,
    /// What it found.
    pub outcome: Outcome,
    /// Its error class: 0 none, `1 + i` for [`ERROR_CLASSES`]`[i]`, 255 one not on the list.
    pub class: u8,
}

impl Cell50 {
    /// The cell of a result with this error class.
    pub fn new(scheduled_at_ms: i64, outcome: Outcome, error_class: Option<&str>) -> Cell50 {
        let class = match error_class {
            None => 0,
            Some(c) => ERROR_CLASSES
                .iter()
                .position(|known| *known == c)
                .map_or(255, |i| i as u8 + 1),
        };
        Cell50 {
            scheduled_at_ms,
            outcome,
            class,
        }
    }

    /// The error class's name (`other` for one not on the list).
    pub fn error_class(&self) -> Option<&'static str> {
        match self.class {
            0 => None,
            c => Some(ERROR_CLASSES.get(usize::from(c) - 1).copied().unwrap_or("other")),
        }
    }
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
    pub strip: VecDeque<Cell50>,
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
    /// A site's 1 h window's change: results added, and minute buckets that left it retracted.
    Window(String, Stats),
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

/// One hour of a site's 7 d window, in a ring of [`HOURS`] allocated at the site's first result (so a
/// site's memory is the same after an hour as after a week): the hour's counts and which of its slots
/// were counted (a bitmap over the site's slot grid, inline for up to 128 slots an hour, that is
/// intervals from 28.2 s; finer grids and slots off the grid spill to the heap).
#[derive(Clone, Default)]
struct Hour {
    /// Hours since the epoch; `i32::MIN` while the slot is empty.
    hour: i32,
    /// up, down, missed.
    counts: [u32; 3],
    seen: u128,
    more: Option<Box<MoreSeen>>,
}

#[derive(Clone, Default)]
struct MoreSeen {
    /// Grid slots from 128 on, 64 per word.
    bits: Vec<u64>,
    /// Slots off the grid, sorted.
    off_grid: Vec<i64>,
}

impl Hour {
    fn empty() -> Hour {
        Hour {
            hour: i32::MIN,
            ..Hour::default()
        }
    }

    /// Adds `[up, down, missed]` counts.
    fn add(&mut self, counts: [i64; 3]) {
        for (c, n) in self.counts.iter_mut().zip(counts) {
            *c = c.saturating_add_signed(n.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32);
        }
    }

    /// Marks the result at `at` (with the site's `grid`: interval and phase); false if it was marked.
    fn mark(&mut self, grid: Option<(i64, i64)>, at: i64, interval: Option<i64>) -> bool {
        let hour_start = i64::from(self.hour) * HOUR_MS;
        if let (Some((i, phase)), Some(mine)) = (grid, interval) {
            if mine == i && at.rem_euclid(i) == phase {
                let slot = ((at - hour_start) / i) as usize;
                if slot < 128 {
                    let was = self.seen & (1 << slot) != 0;
                    self.seen |= 1 << slot;
                    return !was;
                }
                let more = self.more.get_or_insert_with(Box::default);
                let (word, bit) = ((slot - 128) / 64, (slot - 128) % 64);
                if more.bits.len() <= word {
                    more.bits.resize(word + 1, 0);
                }
                let was = more.bits[word] & (1 << bit) != 0;
                more.bits[word] |= 1 << bit;
                return !was;
            }
        }
        let more = self.more.get_or_insert_with(Box::default);
        match more.off_grid.binary_search(&at) {
            Ok(_) => false,
            Err(i) => {
                more.off_grid.insert(i, at);
                true
            }
        }
    }
}

/// A minute bucket as the window keeps it: its counts and, per up result, the histogram bucket of each
/// phase (12 bytes; as a [`Stats`] a result is six vectors, about 300 bytes: at 60 s checks a site's 60
/// buckets were most of its memory).
#[derive(Default)]
struct Minute {
    counts: [i64; 3],
    timed: Vec<[u16; 6]>,
}

impl Minute {
    fn add(&mut self, check: &Check) {
        for (c, n) in self.counts.iter_mut().zip(check.outcome.counts()) {
            *c += n;
        }
        if check.outcome == Outcome::Up {
            self.timed.push(check.phases_us.map(Hist::bucket));
        }
    }

    /// The bucket's sum: what its results' [`Stats::of`] add up to.
    fn stats(&self) -> Stats {
        let [up, down, missed] = self.counts;
        let phases = match self.timed.is_empty() {
            true => Vec::new(),
            false => (0..PHASES.len())
                .map(|p| {
                    let mut buckets: Vec<u16> = self.timed.iter().map(|t| t[p]).collect();
                    buckets.sort_unstable();
                    let mut hist: Vec<(u16, i64)> = Vec::new();
                    for b in buckets {
                        match hist.last_mut() {
                            Some((last, n)) if *last == b => *n += 1,
                            _ => hist.push((b, 1)),
                        }
                    }
                    Hist(hist)
                })
                .collect(),
        };
        Stats {
            up,
            down,
            missed,
            phases,
        }
    }
}

#[derive(Default)]
struct Site {
    /// The status as last put out, and whether this batch changed anything it shows.
    emitted: Option<Status>,
    dirty: bool,
    newest: Option<i64>,
    /// The 1 h window's minute buckets, kept to retract each whole when it leaves.
    minutes: BTreeMap<i64, Minute>,
    /// The 1 h window's change in this batch, put out with the status.
    delta: Stats,
    /// The 7 d window's hours, slot `hour % HOURS` (empty until the first result).
    hours: Vec<Hour>,
    /// The slot grid of the site's results: its interval and phase, from the first result that had one.
    grid: Option<(i64, i64)>,
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
                    let url = match &item {
                        Input::Check(c) => &c.url,
                        Input::Rollup(url, ..) | Input::Since(url, ..) => url,
                    };
                    if !sites.contains_key(url) {
                        if matches!(item, Input::Since(..)) {
                            continue;
                        }
                        sites.insert(url.clone(), Site::default());
                    }
                    let Some(site) = sites.get_mut(url) else { continue };
                    // A site goes on the list when the batch first changes it, so it is there once.
                    if !site.dirty {
                        touched.push(url.clone());
                    }
                    match item {
                        Input::Check(check) => site.check(check, rule, &counters, &mut out),
                        Input::Rollup(_, hour, up, down, missed) => site.add_hour(hour, up, down, missed),
                        Input::Since(url, state, since) => site.since(&url, state, since, &mut out),
                    }
                }
                // Once per site and batch, only for the sites this batch touched: its status, and its
                // minute buckets' changes summed.
                for url in touched.drain(..) {
                    if let Some(site) = sites.get_mut(&url).filter(|s| s.dirty) {
                        site.emit(&url, &mut out);
                    }
                }
                counters.sites.set(sites.len());
                output.session(&cap).give_iterator(out.into_iter().map(|a| (a, t, 1)));
            });
        }
    })
}

impl Site {
    /// The ring slot of `hour`, emptied if it held an older hour; `None` if it holds a newer one (then
    /// `hour` is out of the 7 d window).
    fn hour_slot(&mut self, hour: i64) -> Option<&mut Hour> {
        if self.hours.is_empty() {
            self.hours = vec![Hour::empty(); HOURS as usize];
        }
        let hour = i32::try_from(hour).ok()?;
        let slot = &mut self.hours[i64::from(hour).rem_euclid(HOURS) as usize];
        if slot.hour > hour {
            return None;
        }
        if slot.hour < hour {
            *slot = Hour {
                hour,
                ..Hour::default()
            };
        }
        Some(slot)
    }

    fn add_hour(&mut self, hour: i64, up: i64, down: i64, missed: i64) {
        let newest_hour = self.newest.map(|n| n.div_euclid(HOUR_MS));
        if newest_hour.is_some_and(|h| hour <= h - HOURS) {
            return;
        }
        if let Some(slot) = self.hour_slot(hour) {
            slot.add([up, down, missed]);
            self.dirty = true;
        }
    }

    /// Puts out the minute buckets' changes and the status if the batch changed it, with the 24 h and 7 d
    /// counts from the hour buckets.
    fn emit(&mut self, url: &str, out: &mut Vec<Admitted>) {
        self.dirty = false;
        let delta = std::mem::take(&mut self.delta);
        if !delta.is_zero() {
            out.push(Admitted::Window(url.to_owned(), delta));
        }
        let Some(status) = self.status.as_mut() else { return };
        let newest_hour = self.newest.map_or(0, |n| n.div_euclid(HOUR_MS));
        let (mut day, mut week) = ([0; 3], [0; 3]);
        for h in self.hours.iter().filter(|h| i64::from(h.hour) > newest_hour - HOURS) {
            for i in 0..3 {
                let c = i64::from(h.counts[i]);
                week[i] += c;
                if i64::from(h.hour) > newest_hour - 24 {
                    day[i] += c;
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
        let interval = check.interval_ms.filter(|i| *i > 0);
        if self.grid.is_none() {
            self.grid = interval.map(|i| (i, at.rem_euclid(i)));
        }
        let grid = self.grid;
        let Some(slot) = self.hour_slot(hour) else {
            counters.expired.set(counters.expired.get() + 1);
            return;
        };
        if !slot.mark(grid, at, interval) {
            counters.duplicates.set(counters.duplicates.get() + 1);
            return;
        }
        slot.add(check.outcome.counts());
        self.dirty = true;
        let newest_minute = self.newest.map(|n| n.div_euclid(MINUTE_MS));
        if newest_minute.is_none_or(|m| minute > m - MINUTES) {
            self.minutes.entry(minute).or_default().add(&check);
            self.delta.plus_equals(&Stats::of(&check));
        }
        if self.newest.is_some_and(|n| at < n) {
            counters.out_of_order.set(counters.out_of_order.get() + 1);
            return;
        }
        self.newest = Some(at);
        // Buckets the anchor left behind leave the windows as a whole.
        let first_minute = minute - MINUTES + 1;
        while let Some(entry) = self.minutes.first_entry().filter(|e| *e.key() < first_minute) {
            let mut sum = entry.remove().stats();
            sum.negate();
            self.delta.plus_equals(&sum);
        }
        self.follow(check, rule, out);
    }

    /// The status and incidents after a result newer than every other.
    fn follow(&mut self, check: Check, rule: IncidentRule, out: &mut Vec<Admitted>) {
        let at = check.scheduled_at_ms;
        let (outcome, error_class) = (check.outcome, check.error_class.clone());
        // The status is changed in place: the strip shifts by one cell, nothing else is copied.
        let cell = Cell50::new(at, outcome, error_class.as_deref());
        let status = match self.status.as_mut() {
            Some(status) => {
                if status.strip.len() >= STRIP {
                    status.strip.pop_front();
                }
                status.strip.push_back(cell);
                if let Some(c) = check.cert_not_after_ms {
                    status.cert = Some((c, at));
                }
                status.last = check;
                status
            }
            None => self.status.insert(Status {
                state: Outcome::Missed,
                since_ms: at,
                cert: check.cert_not_after_ms.map(|c| (c, at)),
                last: check,
                // The ring's full size from the start: a site's status does not grow as it fills.
                strip: {
                    let mut strip = VecDeque::with_capacity(STRIP);
                    strip.push_back(cell);
                    strip
                },
                day: [0; 3],
                week: [0; 3],
            }),
        };
        if outcome != Outcome::Missed && outcome != status.state {
            (status.state, status.since_ms) = (outcome, at);
            self.run = 0;
        }
        let url = status.last.url.clone();

        // Incidents, over up and down results in slot order.
        if outcome == Outcome::Missed {
            return;
        }
        self.run += 1;
        let before = self.open.clone();
        match (outcome, self.open.as_mut()) {
            (Outcome::Down, Some(open)) => open.failures += 1,
            (Outcome::Down, None) if self.run >= rule.open_after.max(1) => {
                // Opened at the N-th failure, started at the first of the run.
                let first = self.status.as_ref().map_or(at, |s| s.since_ms);
                let first_class = self
                    .status
                    .as_ref()
                    .and_then(|s| s.strip.iter().find(|c| c.scheduled_at_ms == first))
                    .and_then(|c| c.error_class().map(str::to_owned))
                    .or(error_class);
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

/// [`admit`]'s output by kind, each a collection of its own.
pub struct Split<'s> {
    /// The 1 h windows' changes, with [`Stats`] differences: a site's accumulated difference is its window.
    pub windows: VecCollection<'s, u64, (String, ()), Stats>,
    /// The statuses.
    pub statuses: VecCollection<'s, u64, (String, Status), isize>,
    /// The incidents, one by one.
    pub incidents: VecCollection<'s, u64, (String, Incident), isize>,
}

/// Splits [`admit`]'s output by kind. A partition moves each update to its one consumer: three `flat_map`s
/// on the one stream would each get a copy of every status.
pub fn split<'s>(admitted: Stream<'s, u64, Vec<(Admitted, u64, isize)>>) -> Split<'s> {
    let mut parts = admitted.partition(3, |(a, t, d)| {
        let part = match a {
            Admitted::Window(..) => 0,
            Admitted::Status(..) => 1,
            Admitted::Incident(..) => 2,
        };
        (part, (a, t, d))
    });
    let incidents = parts.pop().expect("three parts");
    let statuses = parts.pop().expect("three parts");
    let windows = parts.pop().expect("three parts");
    Split {
        windows: windows
            .flat_map(|(a, t, _)| match a {
                Admitted::Window(url, s) => Some(((url, ()), t, s)),
                _ => None,
            })
            .as_collection(),
        statuses: statuses
            .flat_map(|(a, t, _)| match a {
                Admitted::Status(url, s, d) => Some(((url, s), t, d)),
                _ => None,
            })
            .as_collection(),
        incidents: incidents
            .flat_map(|(a, t, _)| match a {
                Admitted::Incident(url, i, d) => Some(((url, i), t, d)),
                _ => None,
            })
            .as_collection(),
    }
}

/// The incidents gathered per site (newest first).
pub fn incidents<'s>(
    incidents: VecCollection<'s, u64, (String, Incident), isize>,
) -> VecCollection<'s, u64, (String, Vec<Incident>), isize> {
    incidents.reduce(|_url, input, output| {
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
/// [`Status`], and so is where the hour starts: [`Status::hour_from_ms`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Windows {
    /// up, down, missed in the last 60 minute buckets.
    pub hour: [i64; 3],
    /// Per phase of [`PHASES`], p50, p95, p99 in µs of the `up` results in them.
    pub percentiles: Vec<[i64; 3]>,
}

impl Status {
    /// The first minute of the site's 1 h window (epoch ms): the window is anchored at its newest result.
    pub fn hour_from_ms(&self) -> i64 {
        (self.last.scheduled_at_ms.div_euclid(MINUTE_MS) - MINUTES + 1) * MINUTE_MS
    }
}

/// Each site's [`Windows`], from its 1 h window: the accumulated [`Stats`] difference of the site's key
/// (a `reduce` over one value per key, whose difference is the window's sum).
pub fn site_windows<'s>(
    windows: VecCollection<'s, u64, (String, ()), Stats>,
) -> VecCollection<'s, u64, (String, Windows), isize> {
    windows.reduce(|_url, input, output| {
        let mut w = Stats::default();
        for (_, stats) in input {
            w.plus_equals(stats);
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
                let admitted = split(admit(stream, rule, AdmitCounters::default()));
                let w = site_windows(admitted.windows).map(|(u, w)| (format!("w {u}"), format!("{w:?}")));
                let s = admitted.statuses.map(|(u, s)| (format!("s {u}"), format!("{s:?}")));
                let i = incidents(admitted.incidents).map(|(u, i)| (format!("i {u}"), format!("{i:?}")));
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
    fn a_kept_minute_sums_to_its_results_stats() {
        let checks = [
            check("a", 0, Outcome::Up, 900),
            check("a", 1, Outcome::Down, 0),
            check("a", 2, Outcome::Up, 901),
            check("a", 3, Outcome::Up, 70_000),
            check("a", 4, Outcome::Missed, 0),
        ];
        let mut minute = Minute::default();
        let mut sum = Stats::default();
        for c in &checks {
            minute.add(c);
            sum.plus_equals(&Stats::of(c));
        }
        assert_eq!(minute.stats(), sum);
        assert_eq!((sum.up, sum.down, sum.missed, sum.phases[5].count()), (3, 1, 1, 3));
        let mut gone = minute.stats();
        gone.negate();
        sum.plus_equals(&gone);
        assert!(sum.is_zero());
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
