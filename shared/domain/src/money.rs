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
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an accepted ISO 4217 currency code")]
pub struct CurrencyError(pub String);

/// Whether a shop may take payments in `c`, and its exponent if so.
fn accepted(c: iso_currency::Currency) -> Option<u8> {
    let exponent = c.exponent()?;
    let active = !c.is_fund() && !c.is_special() && c.is_superseded().is_none();
    active.then(|| u8::try_from(exponent).ok()).flatten()
}

impl Currency {
    /// Every accepted code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = Currency> {
        use iso_currency::IntoEnumIterator;
        let mut codes: Vec<Currency> = iso_currency::Currency::iter()
            .filter(|c| accepted(*c).is_some())
            .map(|c| Currency::from_code(c.code()))
            .collect();
        codes.sort_unstable();
        codes.into_iter()
    }

    fn from_code(code: &str) -> Currency {
        Currency(
            code.as_bytes()
                .try_into()
                .expect("ISO 4217 codes are three letters"),
        )
    }

    fn iso(&self) -> iso_currency::Currency {
        iso_currency::Currency::from_code(self.as_str()).expect("constructed from the ISO list")
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// Digits after the decimal point (2 for EUR, 0 for JPY, 3 for KWD).
    pub fn exponent(&self) -> u8 {
        accepted(self.iso()).expect("only accepted codes are constructed")
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        iso_currency::Currency::from_code(s)
            .filter(|c| accepted(*c).is_some())
            .map(|c| Currency::from_code(c.code()))
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
    let exp = u32::from(currency.exponent());
    if exp == 0 {
        return minor.to_string();
    }
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let scale = 10_u64.pow(exp);
    format!(
        "{sign}{}.{:0width$}",
        abs / scale,
        abs % scale,
        width = exp as usize
    )
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
}
