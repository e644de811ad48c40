//! Time buckets and dimensions: how orders are grouped for revenue.
//!
//! Buckets are aligned to UTC and driven by the order's event time (`created_at`),
//! never by the time it was ingested.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// The width of a time bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    /// Fifteen minutes: every UTC offset in use is a multiple of it, so quarter
    /// hours tile the local hours of every zone (Kolkata's, Kathmandu's).
    QuarterHour,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 4] = [
        Granularity::Minute,
        Granularity::QuarterHour,
        Granularity::Hour,
        Granularity::Day,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::QuarterHour => "quarter_hour",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn width(self) -> TimeDelta {
        match self {
            Granularity::Minute => TimeDelta::minutes(1),
            Granularity::QuarterHour => TimeDelta::minutes(15),
            Granularity::Hour => TimeDelta::hours(1),
            Granularity::Day => TimeDelta::days(1),
        }
    }

    pub fn seconds(self) -> i64 {
        self.width().num_seconds()
    }

    /// The start of the bucket that holds `t`.
    pub fn bucket_start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.width())
            .expect("bucket widths divide the epoch evenly")
    }

    /// The start of the bucket that holds the unix time `secs`, as unix seconds.
    pub fn bucket_of_secs(self, secs: i64) -> i64 {
        secs - secs.rem_euclid(self.seconds())
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`; expected one of {expected}")]
pub struct ParseError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

impl FromStr for Granularity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "minute" => Ok(Granularity::Minute),
            "quarter_hour" => Ok(Granularity::QuarterHour),
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            _ => Err(ParseError {
                kind: "granularity",
                value: s.chars().take(32).collect(),
                expected: "minute, quarter_hour, hour, day",
            }),
        }
    }
}

/// What a question groups and filters by: an attribute of an order (city) or of
/// its lines (category, product).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    City,
    Category,
    Product,
}

impl Attribute {
    pub const ALL: [Attribute; 3] = [Attribute::City, Attribute::Category, Attribute::Product];

    pub fn as_str(self) -> &'static str {
        match self {
            Attribute::City => "city",
            Attribute::Category => "category",
            Attribute::Product => "product",
        }
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Attribute {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "city" => Ok(Attribute::City),
            "category" => Ok(Attribute::Category),
            "product" => Ok(Attribute::Product),
            _ => Err(ParseError {
                kind: "dimension",
                value: s.chars().take(32).collect(),
                expected: "city, category, product",
            }),
        }
    }
}

/// Separates the attribute values of a cell of a shape with several attributes
/// (`Berlin\u{1f}books`). Text fields hold no control characters, so it cannot
/// occur in a value, and it sorts below every character that can: cells sorted by
/// their joined value are sorted by their tuple of values.
pub const VALUE_SEPARATOR: char = '\u{1f}';

/// A shape of stored cells: the attributes a cell is keyed by (besides bucket and
/// currency). `Total` has a single, empty value; a shape of several attributes
/// joins their values with [`VALUE_SEPARATOR`].
///
/// An order counts once per combination of values it holds in the shape's
/// attributes, so a shape's order counts are not sums of a finer shape's — except
/// over cities (an order has one city) and, where the product is kept, over
/// categories (an order holds a product once, in one line). The stored shapes are
/// chosen so that every set of attributes a question names is one of them, or one
/// of them with only such attributes added ([`Dimension::covering`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Total,
    City,
    Category,
    Product,
    CityCategory,
    CityCategoryProduct,
}

impl Dimension {
    pub const ALL: [Dimension; 6] = [
        Dimension::Total,
        Dimension::City,
        Dimension::Category,
        Dimension::Product,
        Dimension::CityCategory,
        Dimension::CityCategoryProduct,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Total => "total",
            Dimension::City => "city",
            Dimension::Category => "category",
            Dimension::Product => "product",
            Dimension::CityCategory => "city_category",
            Dimension::CityCategoryProduct => "city_category_product",
        }
    }

    /// The attributes a cell of this shape is keyed by, in value order.
    pub fn attributes(self) -> &'static [Attribute] {
        match self {
            Dimension::Total => &[],
            Dimension::City => &[Attribute::City],
            Dimension::Category => &[Attribute::Category],
            Dimension::Product => &[Attribute::Product],
            Dimension::CityCategory => &[Attribute::City, Attribute::Category],
            Dimension::CityCategoryProduct => {
                &[Attribute::City, Attribute::Category, Attribute::Product]
            }
        }
    }

    /// The shape of one attribute.
    pub fn of(attribute: Attribute) -> Dimension {
        match attribute {
            Attribute::City => Dimension::City,
            Attribute::Category => Dimension::Category,
            Attribute::Product => Dimension::Product,
        }
    }

    /// The smallest stored shape whose cells sum exactly to the cells of
    /// `attributes`: it holds them all, and adds only the city (single-valued per
    /// order) or, with the product, the category (one per product of an order).
    pub fn covering(attributes: &[Attribute]) -> Dimension {
        let has = |a| attributes.contains(&a);
        match (
            has(Attribute::City),
            has(Attribute::Category),
            has(Attribute::Product),
        ) {
            (false, false, false) => Dimension::Total,
            (true, false, false) => Dimension::City,
            (false, true, false) => Dimension::Category,
            (false, false, true) => Dimension::Product,
            (true, true, false) => Dimension::CityCategory,
            _ => Dimension::CityCategoryProduct,
        }
    }

    /// A cell's value in this shape from its attribute values (in
    /// [`Dimension::attributes`] order).
    pub fn join<'a>(
        self,
        mut value_of: impl FnMut(Attribute) -> &'a str,
    ) -> std::borrow::Cow<'a, str> {
        match self.attributes() {
            [] => std::borrow::Cow::Borrowed(""),
            [one] => std::borrow::Cow::Borrowed(value_of(*one)),
            many => {
                // Sized first: a cell's value is made for every staged cell.
                let len = many.iter().map(|a| value_of(*a).len()).sum::<usize>()
                    + (many.len() - 1) * VALUE_SEPARATOR.len_utf8();
                let mut joined = String::with_capacity(len);
                for (i, a) in many.iter().enumerate() {
                    if i > 0 {
                        joined.push(VALUE_SEPARATOR);
                    }
                    joined.push_str(value_of(*a));
                }
                std::borrow::Cow::Owned(joined)
            }
        }
    }

    /// The attribute values of a cell's value, in [`Dimension::attributes`] order;
    /// `None` if it does not have as many as the shape has attributes.
    pub fn split(self, value: &str) -> Option<Vec<&str>> {
        let want = self.attributes().len();
        let parts: Vec<&str> = if want == 0 {
            Vec::new()
        } else {
            value.split(VALUE_SEPARATOR).collect()
        };
        (parts.len() == want && (want > 0 || value.is_empty())).then_some(parts)
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Dimension {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dimension::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| ParseError {
                kind: "dimension",
                value: s.chars().take(32).collect(),
                expected: "total, city, category, product, city_category, city_category_product",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn truncates_to_utc_boundaries() {
        let t = Utc.with_ymd_and_hms(2026, 11, 21, 13, 47, 59).unwrap();
        assert_eq!(
            Granularity::Minute.bucket_start(t),
            Utc.with_ymd_and_hms(2026, 11, 21, 13, 47, 0).unwrap()
        );
        assert_eq!(
            Granularity::Hour.bucket_start(t),
            Utc.with_ymd_and_hms(2026, 11, 21, 13, 0, 0).unwrap()
        );
        assert_eq!(
            Granularity::Day.bucket_start(t),
            Utc.with_ymd_and_hms(2026, 11, 21, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn parses_names_and_rejects_others() {
        for g in Granularity::ALL {
            assert_eq!(g.as_str().parse::<Granularity>().unwrap(), g);
        }
        for d in Dimension::ALL {
            assert_eq!(d.as_str().parse::<Dimension>().unwrap(), d);
        }
        assert!("week".parse::<Granularity>().is_err());
        for a in Attribute::ALL {
            assert_eq!(a.as_str().parse::<Attribute>().unwrap(), a);
        }
        assert!("Hour".parse::<Granularity>().is_err());
    }

    #[test]
    fn every_set_of_attributes_has_a_covering_shape_that_adds_only_what_sums_exactly() {
        use Attribute::*;
        let subsets: Vec<Vec<Attribute>> = (0..8)
            .map(|bits| {
                Attribute::ALL
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, a)| a)
                    .collect()
            })
            .collect();
        for wanted in subsets {
            let shape = Dimension::covering(&wanted);
            for a in &wanted {
                assert!(shape.attributes().contains(a), "{wanted:?} → {shape}");
            }
            for extra in shape.attributes().iter().filter(|a| !wanted.contains(a)) {
                let exact = *extra == City || (*extra == Category && wanted.contains(&Product));
                assert!(exact, "{wanted:?} → {shape} adds {extra}");
            }
        }
    }

    #[test]
    fn composite_values_join_and_split() {
        let shape = Dimension::CityCategoryProduct;
        let value = shape.join(|a| match a {
            Attribute::City => "São Paulo",
            Attribute::Category => "a:b",
            Attribute::Product => "p-1",
        });
        assert_eq!(value, "São Paulo\u{1f}a:b\u{1f}p-1");
        assert_eq!(shape.split(&value).unwrap(), ["São Paulo", "a:b", "p-1"]);
        assert_eq!(Dimension::Total.split(""), Some(vec![]));
        assert_eq!(Dimension::City.split("Berlin"), Some(vec!["Berlin"]));
        assert_eq!(Dimension::CityCategory.split("Berlin"), None);
        // Joined values sort as their tuples do.
        let a = Dimension::CityCategory.join(|x| if x == Attribute::City { "a" } else { "z" });
        let b = Dimension::CityCategory.join(|x| if x == Attribute::City { "a b" } else { "a" });
        assert!(a < b);
    }

    proptest! {
        #[test]
        fn seconds_and_datetime_bucketing_agree(secs in -2_000_000_000_i64..4_000_000_000) {
            let t = DateTime::from_timestamp(secs, 0).unwrap();
            for g in Granularity::ALL {
                let b = g.bucket_of_secs(secs);
                prop_assert_eq!(g.bucket_start(t).timestamp(), b);
                prop_assert!(b <= secs && secs < b + g.seconds());
            }
        }
    }
}
