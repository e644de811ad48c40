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
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn width(self) -> TimeDelta {
        match self {
            Granularity::Minute => TimeDelta::minutes(1),
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
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            _ => Err(ParseError {
                kind: "granularity",
                value: s.chars().take(32).collect(),
                expected: "minute, hour, day",
            }),
        }
    }
}

/// What revenue is grouped by. `Total` has a single, empty value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    Total,
    City,
    Category,
    Product,
}

impl Dimension {
    pub const ALL: [Dimension; 4] = [
        Dimension::Total,
        Dimension::City,
        Dimension::Category,
        Dimension::Product,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Total => "total",
            Dimension::City => "city",
            Dimension::Category => "category",
            Dimension::Product => "product",
        }
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
        match s {
            "total" => Ok(Dimension::Total),
            "city" => Ok(Dimension::City),
            "category" => Ok(Dimension::Category),
            "product" => Ok(Dimension::Product),
            _ => Err(ParseError {
                kind: "dimension",
                value: s.chars().take(32).collect(),
                expected: "total, city, category, product",
            }),
        }
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
        assert!("Hour".parse::<Granularity>().is_err());
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
