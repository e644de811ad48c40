//! Money is an integer count of minor units plus an ISO 4217 currency; never a float.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The currencies Tidemark accepts, with their minor-unit exponent (ISO 4217).
///
/// A fixed list rather than "any three letters": a typo such as `EUE` must be
/// rejected at ingest, not become its own revenue series.
const CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("USD", 2),
];

/// An ISO 4217 currency code from the accepted list.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an accepted ISO 4217 currency code")]
pub struct CurrencyError(pub String);

impl Currency {
    /// Every accepted code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES
            .iter()
            .map(|(code, _)| Currency(code.as_bytes().try_into().expect("three letters")))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// Digits after the decimal point (2 for EUR, 0 for JPY).
    pub fn exponent(&self) -> u8 {
        CURRENCIES
            .iter()
            .find(|(code, _)| code.as_bytes() == self.0)
            .map_or(2, |(_, exp)| *exp)
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CURRENCIES
            .iter()
            .find(|(code, _)| *code == s)
            .map(|(code, _)| Currency(code.as_bytes().try_into().expect("three letters")))
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

/// Formats minor units as a decimal amount for people (`12345`, EUR → `123.45`).
pub fn format_minor(minor: i64, currency: Currency) -> String {
    let exp = u32::from(currency.exponent());
    if exp == 0 {
        return format!("{minor} {currency}");
    }
    let scale = 10_i64.pow(exp);
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let scale = scale.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {currency}",
        abs / scale,
        abs % scale,
        width = exp as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_accepted_codes() {
        assert_eq!("EUR".parse::<Currency>().unwrap().as_str(), "EUR");
        assert!("eur".parse::<Currency>().is_err());
        assert!("EUE".parse::<Currency>().is_err());
        assert!("".parse::<Currency>().is_err());
        assert_eq!(Currency::all().count(), CURRENCIES.len());
    }

    #[test]
    fn formats_minor_units() {
        let eur: Currency = "EUR".parse().unwrap();
        let jpy: Currency = "JPY".parse().unwrap();
        assert_eq!(format_minor(12345, eur), "123.45 EUR");
        assert_eq!(format_minor(5, eur), "0.05 EUR");
        assert_eq!(format_minor(-5, eur), "-0.05 EUR");
        assert_eq!(format_minor(500, jpy), "500 JPY");
    }
}
