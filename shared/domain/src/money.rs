//! Money is an integer count of minor units plus an ISO 4217 currency; never a float.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 currency that a shop may sell in: every active code with a
/// minor-unit exponent, from the maintained list of the `iso_currency` crate.
///
/// Refused: anything not in ISO 4217 (a typo such as `EUE` must be rejected at
/// ingest, not become its own revenue series), codes without minor units (`XXX`
/// "no currency", `XAU` gold, `XDR`), special codes (`XTS` for testing), funds
/// (`BOV`, `CLF`, `USN`, …) and codes superseded by another (`HRK`).
///
/// The code and its exponent (a function of the code, so ordering and equality
/// are the code's): the exponent is looked up once, where the code is parsed,
/// not at every amount shown.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3], u8);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an accepted ISO 4217 currency code")]
pub struct CurrencyError(pub String);

impl Currency {
    /// Every accepted code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = Currency> {
        use iso_currency::IntoEnumIterator;
        let mut codes: Vec<Currency> = iso_currency::Currency::iter()
            .filter_map(Currency::accepted)
            .collect();
        codes.sort_unstable();
        codes.into_iter()
    }

    /// `c`, with its exponent, if a shop may take payments in it.
    fn accepted(c: iso_currency::Currency) -> Option<Currency> {
        let active = !c.is_fund() && !c.is_special() && c.is_superseded().is_none();
        let exponent = u8::try_from(c.exponent()?).ok().filter(|_| active)?;
        let code = c
            .code()
            .as_bytes()
            .try_into()
            .expect("ISO 4217 codes are three letters");
        Some(Currency(code, exponent))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// Digits after the decimal point (2 for EUR, 0 for JPY, 3 for KWD).
    pub fn exponent(&self) -> u8 {
        self.1
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        iso_currency::Currency::from_code(s)
            .and_then(Currency::accepted)
            .ok_or_else(|| CurrencyError(s.chars().take(16).collect()))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Minor units as an exact decimal amount in major units, by the currency's
/// exponent (`12345` EUR → `123.45`, JPY → `12345`, KWD → `12.345`). A string,
/// because money is never a float.
pub fn decimal(minor: i64, currency: Currency) -> String {
    let exp = usize::from(currency.exponent());
    // The digits of |minor| from the right, with zeros before them up to one
    // more than the exponent (a whole unit's digit): written by hand, as every
    // point of an answer shows two amounts and `format!` was a share of serving's
    // time making them.
    let mut digits = [b'0'; 24];
    let (mut rest, mut at) = (minor.unsigned_abs(), digits.len());
    while rest > 0 {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let shown = &digits[at.min(digits.len() - exp - 1)..];
    let (units, fraction) = shown.split_at(shown.len() - exp);
    let mut out = String::with_capacity(shown.len() + 2);
    if minor < 0 {
        out.push('-');
    }
    out.extend(units.iter().map(|d| char::from(*d)));
    if exp > 0 {
        out.push('.');
        out.extend(fraction.iter().map(|d| char::from(*d)));
    }
    out
}

/// Formats minor units as a decimal amount for people (`12345`, EUR → `123.45 EUR`).
pub fn format_minor(minor: i64, currency: Currency) -> String {
    format!("{} {currency}", decimal(minor, currency))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_active_code_and_refuses_the_rest() {
        for (code, exponent) in [
            ("EUR", 2),
            ("JPY", 0),
            ("RUB", 2),
            ("KZT", 2),
            ("TRY", 2),
            ("AED", 2),
            ("ZAR", 2),
            ("KWD", 3),
            ("BHD", 3),
            ("OMR", 3),
            ("JOD", 3),
            ("TND", 3),
            ("CLP", 0),
        ] {
            let currency: Currency = code.parse().unwrap();
            assert_eq!(currency.as_str(), code);
            assert_eq!(currency.exponent(), exponent, "{code}");
        }
        for refused in [
            "eur", "EUE", "", "EURO", "XXX", "XTS", "XAU", "XDR", "BOV", "CLF", "USN", "HRK",
        ] {
            assert!(
                refused.parse::<Currency>().is_err(),
                "{refused} must be refused"
            );
        }
    }

    #[test]
    fn the_list_is_sorted_unique_and_round_trips() {
        let all: Vec<Currency> = Currency::all().collect();
        assert!(
            all.len() > 140,
            "every active code, not a hand-kept few: {}",
            all.len()
        );
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        for c in all {
            assert_eq!(c.as_str().parse::<Currency>(), Ok(c));
            assert!(c.exponent() <= 4);
        }
    }

    #[test]
    fn formats_minor_units() {
        let eur: Currency = "EUR".parse().unwrap();
        let jpy: Currency = "JPY".parse().unwrap();
        assert_eq!(format_minor(12345, eur), "123.45 EUR");
        assert_eq!(format_minor(5, eur), "0.05 EUR");
        assert_eq!(format_minor(-5, eur), "-0.05 EUR");
        assert_eq!(format_minor(500, jpy), "500 JPY");
        let kwd: Currency = "KWD".parse().unwrap();
        assert_eq!(format_minor(12_345, kwd), "12.345 KWD");
        assert_eq!(format_minor(-7, kwd), "-0.007 KWD");
        assert_eq!(decimal(1_299, kwd), "1.299");
        assert_eq!(decimal(1_299, jpy), "1299");
        assert_eq!(decimal(i64::MIN, eur), "-92233720368547758.08");
    }

    #[test]
    fn decimals_are_the_integer_division_by_the_exponent() {
        let by_division = |minor: i64, exp: u32| {
            let (abs, scale) = (minor.unsigned_abs(), 10_u64.pow(exp));
            let sign = if minor < 0 { "-" } else { "" };
            match exp {
                0 => format!("{sign}{abs}"),
                _ => format!(
                    "{sign}{}.{:0w$}",
                    abs / scale,
                    abs % scale,
                    w = exp as usize
                ),
            }
        };
        // One currency of each exponent.
        let mut exponents: Vec<Currency> = Currency::all().collect();
        exponents.sort_by_key(Currency::exponent);
        exponents.dedup_by_key(|c| c.exponent());
        assert!(exponents.len() >= 3, "{exponents:?}");
        let mut amounts = vec![
            0,
            1,
            -1,
            9,
            10,
            99,
            100,
            101,
            1_000,
            12_345,
            i64::MAX,
            i64::MIN,
        ];
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            amounts.push(x >> (x & 63).clamp(0, 60));
        }
        for c in exponents {
            for &minor in &amounts {
                let exp = u32::from(c.exponent());
                assert_eq!(decimal(minor, c), by_division(minor, exp), "{minor} {c}");
            }
        }
    }
}
