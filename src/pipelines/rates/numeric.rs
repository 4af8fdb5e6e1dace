//! The original API's averages, to the byte: PostgreSQL's `AVG(integer)` is a `numeric` division whose
//! number of decimals `select_div_scale` (numeric.c) picks, psycopg2 hands that text to Python as a
//! `Decimal`, the app makes it a `float`, and Flask prints the float's shortest round-trip form.
//!
//! Here the same steps run on integers: the exact decimal at PostgreSQL's scale, rounded half away from
//! zero as `div_var` rounds, then parsed to the nearest f64 (as `float(Decimal)` does) and printed
//! shortest round-trip. A plain f64 `sum / count` differs from that in about 1.5 of a million cases.

/// PostgreSQL's base-10000 weight (digits minus one) and leading digit of a non-negative integer.
fn weight_and_first(mut x: u128) -> (i32, u128) {
    if x == 0 {
        return (0, 0);
    }
    let mut weight = 0;
    while x >= 10_000 {
        x /= 10_000;
        weight += 1;
    }
    (weight, x)
}

/// The decimals PostgreSQL gives `sum / count` (`select_div_scale` for two integers, whose display
/// scales are 0): `16 - 4 q`, clamped to 0..=1000, where `q` estimates the quotient's base-10000 weight.
pub fn div_scale(sum: u128, count: u128) -> u32 {
    let (w1, f1) = weight_and_first(sum);
    let (w2, f2) = weight_and_first(count);
    let mut q = w1 - w2;
    if f1 <= f2 {
        q -= 1;
    }
    (16 - 4 * q).clamp(0, 1000) as u32
}

/// `AVG` of integers summing to `sum` over `count > 0` rows, as PostgreSQL prints the numeric.
pub fn pg_avg_text(sum: i64, count: i64) -> String {
    assert!(count > 0, "an average of no rows is NULL, not a number");
    let negative = sum < 0;
    let (s, c) = (u128::from(sum.unsigned_abs()), u128::from(count.unsigned_abs()));
    let scale = div_scale(s, c);
    // Prices are below 2^31 and counts below 2^63, so sum * 10^scale fits: scale is at most 20 here
    // (sum >= count makes q >= -1).
    let pow = 10u128.pow(scale);
    let q = (2 * s * pow + c) / (2 * c);
    let (int, frac) = (q / pow, q % pow);
    let sign = if negative && q != 0 { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac:0width$}", width = scale as usize)
    }
}

/// Python's `repr(float)` for the magnitudes an average of prices takes (1 to 2^31): the shortest
/// digits that round-trip, with `.0` on a whole number. (Python switches to exponent form at 1e16,
/// which no average of 32-bit prices reaches.)
pub fn python_float(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// The average as the original app prints it.
pub fn flask_average(sum: i64, count: i64) -> String {
    let text = pg_avg_text(sum, count);
    let x: f64 = text.parse().expect("a decimal PostgreSQL prints parses as f64");
    python_float(x)
}

/// The ratestask form's average: the mean rounded half away from zero to an integer.
pub fn rounded_mean(sum: i64, count: i64) -> i64 {
    assert!(count > 0);
    let (s, c) = (i128::from(sum), i128::from(count));
    let q = (2 * s.abs() + c) / (2 * c);
    (if s < 0 { -q } else { q }) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_scales_and_rounds_averages_as_numeric_c_does() {
        // Values PostgreSQL 15 printed for SELECT AVG(x) over these rows (psql, this machine).
        assert_eq!(pg_avg_text(3463, 3), "1154.3333333333333333");
        assert_eq!(pg_avg_text(1625866, 1805), "900.7567867036011080");
        assert_eq!(pg_avg_text(10, 4), "2.5000000000000000");
        assert_eq!(pg_avg_text(3, 3), "1.00000000000000000000");
        assert_eq!(pg_avg_text(20000, 2), "10000.0000000000000000");
        assert_eq!(pg_avg_text(0, 3), "0.00000000000000000000");
        assert_eq!(pg_avg_text(2, 3), "0.66666666666666666667");
    }

    #[test]
    fn the_float_text_is_pythons() {
        assert_eq!(flask_average(3463, 3), "1154.3333333333333");
        assert_eq!(flask_average(1625866, 1805), "900.756786703601");
        assert_eq!(flask_average(3, 3), "1.0");
        assert_eq!(flask_average(10, 4), "2.5");
        assert_eq!(rounded_mean(3336, 3), 1112);
        assert_eq!(rounded_mean(5, 2), 3);
        assert_eq!(rounded_mean(7, 2), 4);
    }
}
