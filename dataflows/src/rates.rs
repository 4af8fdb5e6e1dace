//! Rates: prices per port pair and day, with `(sum, count)` as the difference, and the region tree
//! expanded to the ports under each region at any depth.
//!
//! A price is a record `(orig, dest, day)` whose difference is [`PriceSum`]: inserting a price adds
//! `(price, 1)`, so the accumulated difference of a pair's day is its exact integer sum and count, and a
//! mean is computed only when a query asks for one. Duplicate prices on a day are normal in this data
//! (the `prices` table has no key) and simply add up.
//!
//! The region tree is a fixed point: a port is under its parent region and under every region above it.
//! [`ports_under`] computes it with `iterate`, so a tree of any depth is expanded (a two-level expansion
//! finds 69 of the 128 ports under `northern_europe` in the rates dump) and a cycle terminates, because the
//! iteration only ever adds distinct `(region, port)` pairs of which there are finitely many.

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use differential_dataflow::lattice::Lattice;
use differential_dataflow::operators::Iterate;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::progress::Timestamp;

/// A day as days since 1970-01-01 (UTC civil calendar).
pub type Day = i32;

/// A port code (`CNSGH`).
pub type Port = String;

/// A region slug (`northern_europe`).
pub type Region = String;

/// One price of one day between two ports.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Origin port code.
    pub orig: Port,
    /// Destination port code.
    pub dest: Port,
    /// The day it applies to.
    pub day: Day,
    /// The price, a positive integer.
    pub price: i64,
}

/// The sum and count of a set of prices: the difference type of [`prices_by_day`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PriceSum {
    /// Sum of the prices.
    pub sum: i64,
    /// How many prices.
    pub count: i64,
}

impl IsZero for PriceSum {
    fn is_zero(&self) -> bool {
        self.sum == 0 && self.count == 0
    }
}

impl Semigroup for PriceSum {
    fn plus_equals(&mut self, rhs: &Self) {
        self.sum += rhs.sum;
        self.count += rhs.count;
    }
}

impl Monoid for PriceSum {
    fn zero() -> Self {
        PriceSum::default()
    }
}

impl Abelian for PriceSum {
    fn negate(&mut self) {
        self.sum = -self.sum;
        self.count = -self.count;
    }
}

impl Multiply<isize> for PriceSum {
    type Output = PriceSum;
    fn multiply(self, rhs: &isize) -> PriceSum {
        let n = *rhs as i64;
        PriceSum {
            sum: self.sum * n,
            count: self.count * n,
        }
    }
}

/// Per `((orig, dest), day)`: the sum and count of its prices, consolidated (arranged) by pair and day.
pub fn prices_by_day<'s, T>(prices: VecCollection<'s, T, Price>) -> VecCollection<'s, T, ((Port, Port), Day), PriceSum>
where
    T: Timestamp + Lattice + Ord,
{
    prices
        .explode(|p| Some((((p.orig, p.dest), p.day), PriceSum { sum: p.price, count: 1 })))
        .consolidate()
}

/// Every `(region, port)` with the port somewhere under the region, from each port's parent region
/// (`ports`: `(code, parent_slug)`) and each region's parent (`regions`: `(slug, parent_slug)`).
pub fn ports_under<'s, T>(
    ports: VecCollection<'s, T, (Port, Region)>,
    regions: VecCollection<'s, T, (Region, Option<Region>)>,
) -> VecCollection<'s, T, (Region, Port)>
where
    T: Timestamp + Lattice + Ord,
{
    let parents = regions.flat_map(|(slug, parent)| parent.map(|p| (slug, p)));
    let direct = ports.map(|(code, parent)| (parent, code)).distinct();
    direct.clone().iterate(|scope, under| {
        let parents = parents.enter(scope);
        let direct = direct.enter(scope);
        under
            .join_map(parents, |_child, port, parent| (parent.clone(), port.clone()))
            .concat(direct)
            .distinct()
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i32, month: u32, day: u32) -> Day {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = month as i32;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i32 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The `(year, month, day)` of a day number ([`days_from_civil`]'s inverse).
pub fn civil_from_days(z: Day) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses strict ASCII `YYYY-MM-DD` (a real date, years 0001-9999); `None` otherwise.
pub fn parse_day(text: &str) -> Option<Day> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter()
            .try_fold(0u32, |n, c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    (year >= 1 && (1..=days_in_month).contains(&day)).then(|| days_from_civil(year as i32, month, day))
}

/// `YYYY-MM-DD` of a day number.
pub fn format_day(day: Day) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::Capture;

    use super::*;

    fn expand(ports: &[(&str, &str)], regions: &[(&str, Option<&str>)]) -> BTreeSet<(String, String)> {
        let ports: Vec<(String, String)> = ports.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let regions: Vec<(String, Option<String>)> = regions
            .iter()
            .map(|(a, b)| (a.to_string(), b.map(str::to_owned)))
            .collect();
        let captured = timely::execute_directly(move |worker| {
            let (mut p, mut r, out) = worker.dataflow::<u64, _, _>(|scope| {
                let (p, ports) = scope.new_collection::<(String, String), isize>();
                let (r, regions) = scope.new_collection::<(String, Option<String>), isize>();
                (p, r, ports_under(ports, regions).inner.capture())
            });
            for x in ports {
                p.insert(x);
            }
            for x in regions {
                r.insert(x);
            }
            out
        });
        let mut acc: std::collections::BTreeMap<(String, String), isize> = Default::default();
        for (_, updates) in captured.extract() {
            for (d, _, r) in updates {
                *acc.entry(d).or_default() += r;
            }
        }
        assert!(acc.values().all(|r| *r == 0 || *r == 1), "{acc:?}");
        acc.into_iter().filter(|(_, r)| *r == 1).map(|(d, _)| d).collect()
    }

    fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
        list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn a_port_is_under_every_region_above_it_at_any_depth() {
        let got = expand(
            &[("P1", "d"), ("P2", "b"), ("P3", "x")],
            &[
                ("a", None),
                ("b", Some("a")),
                ("c", Some("b")),
                ("d", Some("c")),
                ("x", None),
            ],
        );
        let expected = pairs(&[
            ("d", "P1"),
            ("c", "P1"),
            ("b", "P1"),
            ("a", "P1"),
            ("b", "P2"),
            ("a", "P2"),
            ("x", "P3"),
        ]);
        assert_eq!(got, expected);
    }

    #[test]
    fn a_cycle_in_the_region_tree_terminates() {
        let got = expand(&[("P", "a")], &[("a", Some("b")), ("b", Some("c")), ("c", Some("a"))]);
        assert_eq!(got, pairs(&[("a", "P"), ("b", "P"), ("c", "P")]));
    }

    #[test]
    fn days_round_trip_and_only_real_dates_parse() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2021-01-31"), Some(18_658));
        for day in days_from_civil(1, 1, 1)..=days_from_civil(9999, 12, 31) {
            assert_eq!(parse_day(&format_day(day)), Some(day), "{day}");
        }
        for bad in [
            "2021-02-29",
            "2020-02-30",
            "2021-13-01",
            "2021-00-10",
            "2021-1-01",
            "２０２１-01-01",
            "2021-01-01 ",
            "0000-01-01",
            "2021/01/01",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad:?}");
        }
        assert_eq!(parse_day("2020-02-29"), Some(days_from_civil(2020, 2, 29)));
    }

    #[test]
    fn prices_add_up_by_pair_and_day() {
        let captured = timely::execute_directly(|worker| {
            let (mut input, out) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, prices) = scope.new_collection::<Price, isize>();
                (input, prices_by_day(prices).inner.capture())
            });
            let price = |d: Day, p: i64| Price {
                orig: "A".into(),
                dest: "B".into(),
                day: d,
                price: p,
            };
            input.insert(price(1, 10));
            input.insert(price(1, 10));
            input.insert(price(1, 7));
            input.insert(price(2, 5));
            input.advance_to(1);
            input.remove(price(2, 5));
            out
        });
        let mut acc: std::collections::BTreeMap<Day, PriceSum> = Default::default();
        for (_, updates) in captured.extract() {
            for ((_, day), _, r) in updates {
                acc.entry(day).or_default().plus_equals(&r);
            }
        }
        acc.retain(|_, r| !r.is_zero());
        assert_eq!(
            acc.into_iter().collect::<Vec<_>>(),
            vec![(1, PriceSum { sum: 27, count: 3 })]
        );
    }
}
