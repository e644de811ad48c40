//! Local time: buckets of a question's time zone, made of stored UTC buckets.
//!
//! The views store minute, quarter-hour, hour and day buckets aligned to UTC (the
//! speed view minutes, summed into the others as it is read). A local bucket (an
//! hour or a day in `Asia/Kolkata`, a 23-hour day in `Europe/Berlin`) is a run of
//! whole stored buckets as long as those buckets are fine enough: UTC hours make
//! the local hours of a zone whose offset is a whole number of hours, quarter
//! hours those of every zone in use today (offsets are multiples of 15 minutes),
//! minutes those of any (offsets are whole minutes). [`LocalBuckets::pieces`]
//! picks the coarsest stored granularity that tiles a range's local buckets;
//! [`LocalBuckets::start`] names the local bucket a stored one falls in. No view
//! keeps anything per zone, so every zone is answered from the same cells and
//! stays exactly the sum of the orders it holds.
//!
//! A local bucket is named by the UTC instant it starts at, so the repeated hour
//! when clocks go back is two buckets, and a day is from one local midnight to the
//! next (23, 24 or 25 hours). Where a zone skips midnight, its day starts at the
//! first local time that exists.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use tidemark_domain::Granularity;

/// The local buckets of one granularity in one zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalBuckets {
    pub zone: Tz,
    pub granularity: Granularity,
}

impl LocalBuckets {
    pub fn new(zone: Tz, granularity: Granularity) -> Self {
        Self { zone, granularity }
    }

    /// The zone's offset from UTC at `utc` (unix seconds), in seconds.
    pub fn offset(&self, utc: i64) -> i64 {
        let at = DateTime::<Utc>::from_timestamp(utc, 0).unwrap_or_default();
        i64::from(
            self.zone
                .offset_from_utc_datetime(&at.naive_utc())
                .fix()
                .local_minus_utc(),
        )
    }

    /// The UTC start of the local bucket holding the instant `utc`.
    pub fn start(&self, utc: i64) -> i64 {
        match self.granularity {
            Granularity::Minute => utc - (utc + self.offset(utc)).rem_euclid(60),
            Granularity::QuarterHour => utc - (utc + self.offset(utc)).rem_euclid(900),
            Granularity::Hour => utc - (utc + self.offset(utc)).rem_euclid(3_600),
            Granularity::Day => self.midnight(self.local_date(utc)),
        }
    }

    /// The UTC start of the local bucket after the one starting at `start`.
    pub fn next(&self, start: i64) -> i64 {
        match self.granularity {
            Granularity::Minute => start + 60,
            Granularity::QuarterHour | Granularity::Hour => {
                // A bucket is its width, unless the offset changes by a fraction of
                // it inside (Lord Howe's half-hour shift).
                let width = self.granularity.seconds();
                let next = self.start(start + width);
                if next > start {
                    next
                } else {
                    self.start(start + 2 * width)
                }
            }
            Granularity::Day => {
                let date = self.local_date(start);
                self.midnight(date.succ_opt().unwrap_or(date))
            }
        }
    }

    /// The UTC start of the local day `days` after 1970-01-01.
    pub fn day_start(&self, days: i64) -> i64 {
        let date = NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date") + Duration::days(days);
        self.midnight(date)
    }

    fn local_date(&self, utc: i64) -> NaiveDate {
        DateTime::<Utc>::from_timestamp(utc + self.offset(utc), 0)
            .unwrap_or_default()
            .date_naive()
    }

    /// The UTC instant of the first local time of `date` that exists.
    fn midnight(&self, date: NaiveDate) -> i64 {
        let midnight = date.and_hms_opt(0, 0, 0).expect("valid time");
        (0..=16)
            .find_map(|quarter| {
                let local: NaiveDateTime = midnight + Duration::minutes(15 * quarter);
                self.zone
                    .from_local_datetime(&local)
                    .earliest()
                    .map(|t| t.timestamp())
            })
            .unwrap_or_else(|| midnight.and_utc().timestamp())
    }

    /// The coarsest stored granularity whose buckets in `[from, to)` each lie in
    /// one local bucket: the question's own for UTC, else hours while the zone's
    /// offset is whole hours throughout, else quarter hours while it is a multiple
    /// of 15 minutes (every zone today), else minutes.
    pub fn pieces(&self, from: i64, to: i64) -> Granularity {
        let whole = |width: i64| {
            let mut at = from - from.rem_euclid(3_600);
            while at < to {
                let (a, b) = (self.offset(at), self.offset(at + 3_599));
                if a != b || a.rem_euclid(width) != 0 {
                    return false;
                }
                at += 3_600;
            }
            true
        };
        let candidates: &[Granularity] = match self.granularity {
            Granularity::Minute => &[],
            Granularity::QuarterHour => &[Granularity::QuarterHour],
            Granularity::Hour => &[Granularity::Hour, Granularity::QuarterHour],
            Granularity::Day => &[
                Granularity::Day,
                Granularity::Hour,
                Granularity::QuarterHour,
            ],
        };
        candidates
            .iter()
            .copied()
            .find(|g| whole(g.seconds()))
            .unwrap_or(Granularity::Minute)
    }

    /// A ClickHouse expression of `{t}` (a minute, unix seconds) giving its bucket's
    /// key: the local bucket's UTC start for minutes and hours, the local date (days
    /// since 1970-01-01) for days, which [`LocalBuckets::day_start`] turns into its
    /// start. Built from numbers only.
    pub fn key_sql(&self, from: i64, to: i64) -> String {
        let local = self;
        // The zone's offset over the range: constant between transitions.
        let mut segments: Vec<(i64, i64)> = vec![(from, local.offset(from))];
        let mut at = from - from.rem_euclid(3_600);
        while at < to {
            let next = at + 3_600;
            let (before, after) = (local.offset(at), local.offset(next));
            if before != after {
                // The first second with the new offset.
                let (mut lo, mut hi) = (at, next);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if local.offset(mid) == before {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                segments.push((hi, after));
            }
            at = next;
        }
        let offset = if segments.len() == 1 {
            segments[0].1.to_string()
        } else {
            let mut arms: Vec<String> = segments
                .windows(2)
                .map(|w| format!("{{t}} < {}, {}", w[1].0, w[0].1))
                .collect();
            arms.push(segments.last().expect("one").1.to_string());
            format!("multiIf({})", arms.join(", "))
        };
        match local.granularity {
            Granularity::Minute => "{t}".to_owned(),
            Granularity::QuarterHour => format!("{{t}} - modulo({{t}} + {offset}, 900)"),
            Granularity::Hour => format!("{{t}} - modulo({{t}} + {offset}, 3600)"),
            Granularity::Day => format!("intDiv({{t}} + {offset}, 86400)"),
        }
    }

    /// The bucket start `utc` in the zone's local time with its offset (RFC 3339).
    pub fn show(&self, utc: i64) -> String {
        let at = DateTime::<Utc>::from_timestamp(utc, 0).unwrap_or_default();
        at.with_timezone(&self.zone)
            .fixed_offset()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

/// How an answer buckets time: local buckets, or the whole range as one (a
/// summary). A bucket's *key* is what ClickHouse and the speed cells are grouped
/// by; [`Buckets::bucket`] names the answer's bucket of a key, or none for a
/// stored bucket before the range (read only as the prefix of a conversion's
/// UTC date, see `crate::fx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buckets {
    /// The local buckets of a range starting at `from` (a local bucket's start).
    Local { local: LocalBuckets, from: i64 },
    /// The range starting at `from`, as bucket 0.
    Whole { from: i64 },
}

impl Buckets {
    /// The key of a stored bucket starting at `utc`: the local bucket's start (for
    /// days, the local date as days since 1970-01-01); -1 or 0 for the whole range.
    pub fn key(&self, utc: i64) -> i64 {
        match self {
            Buckets::Local { local, .. } if local.granularity == Granularity::Day => {
                (utc + local.offset(utc)).div_euclid(86_400)
            }
            Buckets::Local { local, .. } => local.start(utc),
            Buckets::Whole { from } => {
                if utc < *from {
                    -1
                } else {
                    0
                }
            }
        }
    }

    /// [`Buckets::key`] as a ClickHouse expression of `{t}`, for stored buckets
    /// in `[from, to)`.
    pub fn key_sql(&self, from: i64, to: i64) -> String {
        match self {
            Buckets::Local { local, .. } => local.key_sql(from, to),
            Buckets::Whole { from } => format!("if({{t}} < {from}, -1, 0)"),
        }
    }

    /// The answer's bucket of a key; `None` before the range.
    pub fn bucket(&self, key: i64) -> Option<i64> {
        match self {
            Buckets::Local { local, from } => {
                let start = if local.granularity == Granularity::Day {
                    local.day_start(key)
                } else {
                    key
                };
                (start >= *from).then_some(start)
            }
            Buckets::Whole { .. } => (key >= 0).then_some(0),
        }
    }
}

/// A time of a question: RFC 3339 with an offset (`2026-03-29T00:00:00+01:00`,
/// `…Z`), or a local date and time or date in the question's zone
/// (`2026-03-29T00:00:00`, `2026-03-29`), as unix seconds. A local time the zone
/// skips is read as the first time after it; one it repeats, as the first.
pub fn parse_time(raw: &str, zone: Tz) -> Option<i64> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.timestamp());
    }
    let local = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M"))
        .ok()
        .or_else(|| {
            NaiveDate::parse_from_str(raw, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })?;
    (0..=16).find_map(|quarter| {
        zone.from_local_datetime(&(local + Duration::minutes(15 * quarter)))
            .earliest()
            .map(|t| t.timestamp())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    fn buckets(zone: Tz, g: Granularity, from: &str, to: &str) -> Vec<String> {
        let local = LocalBuckets::new(zone, g);
        let (mut at, to) = (local.start(utc(from)), utc(to));
        let mut out = Vec::new();
        while at < to {
            out.push(local.show(at));
            at = local.next(at);
        }
        out
    }

    #[test]
    fn half_and_three_quarter_hour_zones_bucket_hours_on_their_own_clock() {
        let kolkata = LocalBuckets::new(chrono_tz::Asia::Kolkata, Granularity::Hour);
        // 10:40 UTC is 16:10 in Kolkata: its hour began at 10:30 UTC.
        assert_eq!(
            kolkata.start(utc("2026-11-21T10:40:00Z")),
            utc("2026-11-21T10:30:00Z")
        );
        assert_eq!(
            kolkata.show(utc("2026-11-21T10:30:00Z")),
            "2026-11-21T16:00:00+05:30"
        );
        let kathmandu = LocalBuckets::new(chrono_tz::Asia::Kathmandu, Granularity::Day);
        assert_eq!(
            kathmandu.start(utc("2026-11-21T18:00:00Z")),
            utc("2026-11-21T18:15:00Z") - 86_400
        );
        assert_eq!(
            kathmandu.start(utc("2026-11-21T18:15:00Z")),
            utc("2026-11-21T18:15:00Z")
        );
        // Stored hours cannot tile them; quarter hours can.
        let (from, to) = (utc("2026-11-01T00:00:00Z"), utc("2026-12-01T00:00:00Z"));
        assert_eq!(kolkata.pieces(from, to), Granularity::QuarterHour);
        assert_eq!(kathmandu.pieces(from, to), Granularity::QuarterHour);
        let quarters = LocalBuckets::new(chrono_tz::Asia::Kathmandu, Granularity::QuarterHour);
        assert_eq!(
            quarters.start(utc("2026-11-21T10:29:00Z")),
            utc("2026-11-21T10:15:00Z"),
            "Kathmandu's quarter hours are UTC's"
        );
    }

    #[test]
    fn daylight_saving_days_have_23_and_25_hours() {
        let berlin = chrono_tz::Europe::Berlin;
        let spring = buckets(
            berlin,
            Granularity::Hour,
            "2026-03-28T23:00:00Z",
            "2026-03-29T22:00:00Z",
        );
        assert_eq!(spring.len(), 23);
        assert_eq!(spring[1], "2026-03-29T01:00:00+01:00");
        assert_eq!(spring[2], "2026-03-29T03:00:00+02:00");
        let autumn = buckets(
            berlin,
            Granularity::Hour,
            "2026-10-24T22:00:00Z",
            "2026-10-25T23:00:00Z",
        );
        assert_eq!(autumn.len(), 25);
        // The repeated hour is two buckets.
        assert_eq!(autumn[2], "2026-10-25T02:00:00+02:00");
        assert_eq!(autumn[3], "2026-10-25T02:00:00+01:00");
        let days = LocalBuckets::new(berlin, Granularity::Day);
        let spring_day = utc("2026-03-28T23:00:00Z");
        assert_eq!(days.next(spring_day) - spring_day, 23 * 3_600);
        let autumn_day = utc("2026-10-24T22:00:00Z");
        assert_eq!(days.next(autumn_day) - autumn_day, 25 * 3_600);
        // Whole-hour offsets: local hours are UTC hours, local days sums of them.
        assert_eq!(
            days.pieces(spring_day, days.next(spring_day)),
            Granularity::Hour
        );
        assert_eq!(
            LocalBuckets::new(chrono_tz::UTC, Granularity::Day).pieces(0, 86_400 * 30),
            Granularity::Day
        );
    }

    #[test]
    fn times_may_carry_an_offset_or_be_local() {
        let kolkata = chrono_tz::Asia::Kolkata;
        let expected = utc("2026-11-20T18:30:00Z");
        for raw in [
            "2026-11-21T00:00:00+05:30",
            "2026-11-20T18:30:00Z",
            "2026-11-21T00:00:00",
            "2026-11-21T00:00",
            "2026-11-21",
        ] {
            assert_eq!(parse_time(raw, kolkata), Some(expected), "{raw}");
        }
        assert_eq!(parse_time("21/11/2026", kolkata), None);
        // Berlin skips 02:00–03:00 on 29 March 2026: 02:30 reads as 03:00 CEST.
        assert_eq!(
            parse_time("2026-03-29T02:30:00", chrono_tz::Europe::Berlin),
            Some(utc("2026-03-29T01:00:00Z"))
        );
    }
}
