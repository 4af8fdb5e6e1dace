//! Exact money: a fixed-point decimal with nine fractional digits in an `i128`.
//!
//! Prices arrive as integers, as Kafka Connect `Decimal`s (unscaled integer + scale), as decimal strings
//! or as JSON doubles; all of them become `Money` without rounding (a value needing more than nine
//! fractional digits is refused, never rounded). A bill is `price x whole seconds`, so sums stay exact.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Fractional digits kept by [`Money`].
pub const SCALE: u32 = 9;
const ONE: i128 = 1_000_000_000;

/// A fixed-point amount: `units / 10^9`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Money(pub i128);

/// Why a decimal could not be represented exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoneyError {
    /// The text is not a decimal number.
    Syntax,
    /// More than nine non-zero fractional digits.
    TooPrecise,
    /// Does not fit in an i128 of nano-units.
    Overflow,
}

impl Money {
    /// A whole number of currency units.
    pub fn from_int(v: i64) -> Money {
        Money(i128::from(v) * ONE)
    }

    /// `unscaled / 10^scale`, as a Kafka Connect `Decimal` carries it.
    pub fn from_unscaled(unscaled: i128, scale: u32) -> Result<Money, MoneyError> {
        if scale <= SCALE {
            let factor = 10i128.checked_pow(SCALE - scale).ok_or(MoneyError::Overflow)?;
            unscaled.checked_mul(factor).map(Money).ok_or(MoneyError::Overflow)
        } else {
            let divisor = 10i128.checked_pow(scale - SCALE).ok_or(MoneyError::TooPrecise)?;
            if unscaled % divisor != 0 {
                return Err(MoneyError::TooPrecise);
            }
            Ok(Money(unscaled / divisor))
        }
    }

    /// Parses decimal text exactly: `12`, `-3.25`, `1.5E2`, `2.50e-1` (JSON number syntax, or a plain
    /// decimal string as Debezium's `decimal.handling.mode=string` writes it).
    pub fn parse(text: &str) -> Result<Money, MoneyError> {
        let text = text.trim();
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => {
                let exp: i32 = text[i + 1..].parse().map_err(|_| MoneyError::Syntax)?;
                (&text[..i], exp)
            }
            None => (text, 0),
        };
        let (negative, digits) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(MoneyError::Syntax);
        }
        let mut unscaled: i128 = 0;
        for c in int_part.chars().chain(frac_part.chars()) {
            let d = c.to_digit(10).ok_or(MoneyError::Syntax)?;
            unscaled = unscaled
                .checked_mul(10)
                .and_then(|u| u.checked_add(i128::from(d)))
                .ok_or(MoneyError::Overflow)?;
        }
        if negative {
            unscaled = -unscaled;
        }
        // value = unscaled * 10^(exponent - frac_len)
        let shift = i64::from(exponent) - frac_part.len() as i64;
        if shift >= 0 {
            let factor = u32::try_from(shift)
                .ok()
                .and_then(|s| 10i128.checked_pow(s))
                .ok_or(MoneyError::Overflow)?;
            let whole = unscaled.checked_mul(factor).ok_or(MoneyError::Overflow)?;
            Money::from_unscaled(whole, 0)
        } else {
            let scale = u32::try_from(-shift).map_err(|_| MoneyError::TooPrecise)?;
            Money::from_unscaled(unscaled, scale)
        }
    }

    /// `self x n`, for a price times a number of seconds.
    pub fn times(self, n: i64) -> Money {
        Money(self.0.saturating_mul(i128::from(n)))
    }

    /// Exactly zero.
    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0.saturating_add(rhs.0))
    }
}

impl std::ops::AddAssign for Money {
    fn add_assign(&mut self, rhs: Money) {
        *self = *self + rhs;
    }
}

/// Renders as a JSON-compatible number: `3025` for whole amounts, `30.5` otherwise (no trailing zeros).
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let one = ONE.unsigned_abs();
        let (whole, frac) = (abs / one, abs % one);
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let digits = format!("{frac:09}");
            write!(f, "{sign}{whole}.{}", digits.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(Money::parse("12").unwrap(), Money::from_int(12));
        assert_eq!(Money::parse("-3.25").unwrap().to_string(), "-3.25");
        assert_eq!(Money::parse("1.5E2").unwrap(), Money::from_int(150));
        assert_eq!(Money::parse("2.50e-1").unwrap().to_string(), "0.25");
        assert_eq!(Money::parse("0.1").unwrap().times(3).to_string(), "0.3");
        assert_eq!(Money::parse("1e-10"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse("1.0000000000").unwrap(), Money::from_int(1));
        assert_eq!(Money::parse("abc"), Err(MoneyError::Syntax));
        assert_eq!(Money::parse(""), Err(MoneyError::Syntax));
    }

    #[test]
    fn unscaled_decimals() {
        assert_eq!(Money::from_unscaled(1250, 2).unwrap().to_string(), "12.5");
        assert_eq!(Money::from_unscaled(-1, 0).unwrap().to_string(), "-1");
        assert_eq!(Money::from_unscaled(10, 10).unwrap().to_string(), "0.000000001");
        assert_eq!(Money::from_unscaled(11, 10), Err(MoneyError::TooPrecise));
    }
}
