//! Exchange rates and conversion to a reporting currency.
//!
//! Rates are the ECB's reference rates: how many units of a currency one euro
//! buys on a day (`USD 1.0542`), from files in the ECB's CSV format (`Date,USD,
//! JPY,…`, one row per day, `N/A` where a currency has no rate). Any other pair
//! is crossed through the euro: one unit of `from` is `rate(to) / rate(from)`
//! units of `to`.
//!
//! **The conversion rule.** An amount is converted at the rate of the UTC date of
//! the minute it is counted in (a refund booked at its own minute's date, restated
//! at its order's), exactly (integer arithmetic on the decimal rates, [`convert`]),
//! and rounded half to even to the minor units of the reporting currency.
//! Rounding is cumulative within a UTC date: for one answer cell (its grouped
//! values) and original currency, the part of a date inside a bucket,
//! `[s, e)`, is `round(rate · P(e)) − round(rate · P(s))`, where `P(t)` is the
//! exact amount from that date's midnight (UTC) to `t`. The parts telescope, so
//! however a date is cut into buckets (the hours or days of any zone, or one
//! summary) they add up to the rounded conversion of what they cover: a day's
//! converted total is the sum of its hours' in every zone, a total the sum of its
//! days', and a UTC day its exact amount rounded once. (`serving::fx` applies it;
//! `orderlog::question` restates it in SQL.)

use std::str::FromStr;

use chrono::NaiveDate;

use crate::money::Currency;

/// Units of a currency per euro, an exact decimal: `mantissa / 10^scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    mantissa: i128,
    scale: u32,
}

impl Rate {
    /// The euro's own rate.
    pub const ONE: Rate = Rate {
        mantissa: 1,
        scale: 0,
    };
}

impl Rate {
    /// Whether the rate is exactly 1 (`1`, `1.0000`).
    pub fn is_one(&self) -> bool {
        10_i128.checked_pow(self.scale) == Some(self.mantissa)
    }
}

impl FromStr for Rate {
    type Err = String;

    /// A positive decimal with at most 12 digits after the point (`158.10`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "`{}` is not a positive decimal rate",
                s.chars().take(24).collect::<String>()
            )
        };
        let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty()
            || fraction.len() > 12
            || whole.len() > 12
            || !whole
                .bytes()
                .chain(fraction.bytes())
                .all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let mantissa: i128 = format!("{whole}{fraction}").parse().map_err(|_| bad())?;
        if mantissa == 0 {
            return Err(bad());
        }
        Ok(Rate {
            mantissa,
            scale: fraction.len() as u32,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = format!(
            "{:0>width$}",
            self.mantissa,
            width = self.scale as usize + 1
        );
        let (whole, fraction) = digits.split_at(digits.len() - self.scale as usize);
        if fraction.is_empty() {
            f.write_str(whole)
        } else {
            write!(f, "{whole}.{fraction}")
        }
    }
}

/// `amount` minor units of `from` (at `from_rate` per euro) in minor units of `to`
/// (at `to_rate`), rounded half to even; `None` if it would overflow.
pub fn convert(
    amount: i64,
    from: Currency,
    from_rate: Rate,
    to: Currency,
    to_rate: Rate,
) -> Option<i64> {
    if from == to || amount == 0 {
        return Some(amount);
    }
    Conversion::new(from, from_rate, to, to_rate)?.apply(amount)
}

/// [`convert`] of one currency pair at one pair of rates, its factors worked
/// out once for the many amounts of a day converted alike.
#[derive(Clone, Copy, Debug)]
pub struct Conversion {
    /// amount · `num` / `den`: amount · (to_rate / from_rate) · 10^(exp(to) − exp(from)).
    num: i128,
    /// Positive (rates are).
    den: i128,
}

impl Conversion {
    /// `None` if a factor would overflow.
    pub fn new(from: Currency, from_rate: Rate, to: Currency, to_rate: Rate) -> Option<Conversion> {
        let ten = |n: u32| 10_i128.checked_pow(n);
        Some(Conversion {
            num: to_rate
                .mantissa
                .checked_mul(ten(from_rate.scale + u32::from(to.exponent()))?)?,
            den: from_rate
                .mantissa
                .checked_mul(ten(to_rate.scale + u32::from(from.exponent()))?)?,
        })
    }

    /// `amount` converted, rounded half to even; `None` if it would overflow.
    pub fn apply(&self, amount: i64) -> Option<i64> {
        let num = i128::from(amount).checked_mul(self.num)?;
        let q = num.div_euclid(self.den);
        // The remainder, in [0, den), without a second division: exact in wrapping
        // arithmetic, since the true value fits (`q · den` alone may not, near the
        // ends of the range).
        let r = num.wrapping_sub(q.wrapping_mul(self.den));
        // Half to even: up when the remainder is above half, or exactly half and q
        // odd (`r` against `den − r`: `2 · r` may not fit).
        let up = match r.cmp(&(self.den - r)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Equal => q % 2 != 0,
            std::cmp::Ordering::Less => false,
        };
        i64::try_from(q + i128::from(up)).ok()
    }
}

/// The rates of a file in the ECB's CSV format.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RateFile {
    /// `(date, currency, units per euro)`, in file order.
    pub rates: Vec<(NaiveDate, Currency, Rate)>,
    /// Columns whose header is not an accepted ISO 4217 code (the ECB's files
    /// keep currencies that no longer exist): left out, and said so.
    pub ignored_columns: Vec<String>,
}

/// What is wrong with a rates file: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// 1-based line of the file (1 is the header).
    pub line: usize,
    pub column: Option<String>,
    pub message: String,
}

/// Reads a file in the ECB's CSV format: a header `Date,<code>,<code>,…` (an
/// empty trailing column is allowed), then one row per date (`YYYY-MM-DD`) with a
/// rate or `N/A` (or nothing) per currency. `EUR`, if given, must be 1.
pub fn parse_ecb_csv(text: &str) -> Result<RateFile, Vec<FileError>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut errors = Vec::new();
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            return Err(vec![FileError {
                line: 1,
                column: None,
                message: format!("unreadable header: {e}"),
            }]);
        }
    };
    if headers.get(0) != Some("Date") {
        errors.push(FileError {
            line: 1,
            column: headers.get(0).map(str::to_owned),
            message: "the first column must be `Date`".into(),
        });
    }
    let mut out = RateFile::default();
    let columns: Vec<Option<Currency>> = headers
        .iter()
        .skip(1)
        .map(|name| {
            if name.is_empty() {
                return None;
            }
            let currency = name.parse::<Currency>().ok();
            if currency.is_none() {
                out.ignored_columns.push(name.chars().take(16).collect());
            }
            currency
        })
        .collect();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                errors.push(FileError {
                    line,
                    column: None,
                    message: format!("unreadable row: {e}"),
                });
                continue;
            }
        };
        let Ok(date) = NaiveDate::parse_from_str(record.get(0).unwrap_or(""), "%Y-%m-%d") else {
            errors.push(FileError {
                line,
                column: Some("Date".into()),
                message: "must be a date, YYYY-MM-DD".into(),
            });
            continue;
        };
        for (value, column) in record.iter().skip(1).zip(&columns) {
            let Some(currency) = column else { continue };
            if value.is_empty() || value == "N/A" {
                continue;
            }
            match value.parse::<Rate>() {
                Ok(rate) if currency.as_str() == "EUR" && !rate.is_one() => {
                    errors.push(FileError {
                        line,
                        column: Some("EUR".into()),
                        message: "the euro's rate is 1 (rates are per euro)".into(),
                    });
                }
                Ok(rate) => out.rates.push((date, *currency, rate)),
                Err(message) => errors.push(FileError {
                    line,
                    column: Some(currency.to_string()),
                    message,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(code: &str) -> Currency {
        code.parse().unwrap()
    }

    #[test]
    fn conversion_crosses_through_the_euro_and_rounds_half_to_even() {
        let usd: Rate = "1.0542".parse().unwrap();
        let jpy: Rate = "158.10".parse().unwrap();
        // 100.00 EUR → 105.42 USD; 10,000 JPY → 63.25 EUR (63.2511…).
        assert_eq!(
            convert(10_000, c("EUR"), Rate::ONE, c("USD"), usd),
            Some(10_542)
        );
        assert_eq!(
            convert(10_000, c("JPY"), jpy, c("EUR"), Rate::ONE),
            Some(6_325)
        );
        // USD → JPY through the euro: 1.00 USD = 158.10 / 1.0542 JPY = 149.97… → 150.
        assert_eq!(convert(100, c("USD"), usd, c("JPY"), jpy), Some(150));
        // Half to even: 0.5 → 0, 1.5 → 2, 2.5 → 2, and the same below zero.
        let two: Rate = "2".parse().unwrap();
        let eur = c("EUR");
        let half = |minor| convert(minor, eur, two, eur, Rate::ONE);
        assert_eq!(convert(1, c("USD"), two, c("EUR"), Rate::ONE), Some(0));
        assert_eq!(convert(3, c("USD"), two, c("EUR"), Rate::ONE), Some(2));
        assert_eq!(convert(5, c("USD"), two, c("EUR"), Rate::ONE), Some(2));
        assert_eq!(convert(-5, c("USD"), two, c("EUR"), Rate::ONE), Some(-2));
        assert_eq!(convert(-3, c("USD"), two, c("EUR"), Rate::ONE), Some(-2));
        assert_eq!(half(7), Some(7), "the same currency is not converted");
        // Exponents: 1.000 KWD at 0.3300 per euro → 3.03 EUR.
        let kwd: Rate = "0.3300".parse().unwrap();
        assert_eq!(
            convert(1_000, c("KWD"), kwd, c("EUR"), Rate::ONE),
            Some(303)
        );
        assert_eq!(convert(i64::MAX, c("JPY"), jpy, c("KWD"), kwd), None);
    }

    proptest::proptest! {
        /// The factors worked out once give what the whole product divided
        /// directly gives (two divisions, rounded half to even), or overflow alike.
        #[test]
        fn a_conversion_equals_the_direct_division(
            amount in proptest::prelude::any::<i64>(),
            from_mantissa in proptest::prop_oneof![1_i128..10_000_000_000, 1_i128..=10_i128.pow(24)],
            from_scale in 0_u32..=12,
            to_mantissa in proptest::prop_oneof![1_i128..10_000_000_000, 1_i128..=10_i128.pow(24)],
            to_scale in 0_u32..=12,
            pair in proptest::sample::select(vec![("USD", "EUR"), ("JPY", "KWD"), ("KWD", "JPY"), ("EUR", "GBP")]),
        ) {
            let (from, to) = (c(pair.0), c(pair.1));
            let from_rate = Rate { mantissa: from_mantissa, scale: from_scale };
            let to_rate = Rate { mantissa: to_mantissa, scale: to_scale };
            let ten = |n: u32| 10_i128.checked_pow(n);
            let direct = (|| {
                let num = i128::from(amount)
                    .checked_mul(to_rate.mantissa)?
                    .checked_mul(ten(from_rate.scale + u32::from(to.exponent()))?)?;
                let den = from_rate
                    .mantissa
                    .checked_mul(ten(to_rate.scale + u32::from(from.exponent()))?)?;
                let (q, r) = (num.div_euclid(den), num.rem_euclid(den));
                let up = r > den - r || (r == den - r && q % 2 != 0);
                i64::try_from(q + i128::from(up)).ok()
            })();
            proptest::prop_assert_eq!(convert(amount, from, from_rate, to, to_rate), direct);
        }
    }

    #[test]
    fn rates_parse_exactly_and_print_back() {
        for s in ["1.0542", "158.10", "0.86213", "1", "25.315"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
        for bad in ["", "0", "0.000", "-1.2", "1e3", "abc", "1.2.3", "N/A"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_ecb_file_reads_with_gaps_and_old_currencies_set_aside() {
        let file = "Date,USD,JPY,CYP,KWD,\n\
                    2026-11-27,1.0542,158.10,N/A,0.3300,\n\
                    2026-11-26,1.0533,N/A,N/A,0.3296,\n";
        let parsed = parse_ecb_csv(file).unwrap();
        assert_eq!(parsed.ignored_columns, ["CYP"]);
        assert_eq!(parsed.rates.len(), 5);
        let day = NaiveDate::from_ymd_opt(2026, 11, 26).unwrap();
        assert!(
            parsed
                .rates
                .contains(&(day, c("KWD"), "0.3296".parse().unwrap()))
        );
        let errors = parse_ecb_csv("Date,USD\n2026-13-01,1.1\n2026-11-02,-1\n").unwrap_err();
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            [2, 3],
            "{errors:?}"
        );
        assert!(parse_ecb_csv("Day,USD\n").is_err());
    }
}
