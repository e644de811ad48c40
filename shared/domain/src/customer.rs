//! Customers and their history: a slowly changing dimension of type 2.
//!
//! A customer's attributes (`city` of residence, `segment`, `signed_up_at`) change
//! over time. Each change is an event of the log, effective from a moment
//! (`effective_at`, which may lie before changes already recorded: an import, a late
//! correction); nothing is updated in place. The history is a function of the
//! events: at each `effective_at` the latest recorded event wins, and a version
//! equal to the one before it is no version at all (it changes nothing). Each
//! version is valid from its `effective_at` to the next version's.

use chrono::{DateTime, Utc};

use crate::order::{OrderLimits, Violation, check_text};

/// A customer's attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// The city of residence.
    pub city: String,
    pub segment: String,
    pub signed_up_at: DateTime<Utc>,
}

/// A change of a customer's attributes, effective from `effective_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerChange {
    pub user_id: String,
    pub attributes: Attributes,
    pub effective_at: DateTime<Utc>,
}

impl CustomerChange {
    /// Checks the rules that types alone do not: lengths, and times within the
    /// bounds orders have (an attribute effective in the far future or before the
    /// earliest order is a mistake, not a plan).
    pub fn validate(&self, now: DateTime<Utc>, limits: &OrderLimits) -> Result<(), Vec<Violation>> {
        let mut v = Vec::new();
        for (field, value) in [
            ("user_id", &self.user_id),
            ("city", &self.attributes.city),
            ("segment", &self.attributes.segment),
        ] {
            v.extend(check_text(field, value).err());
        }
        for (field, at) in [
            ("effective_at", self.effective_at),
            ("signed_up_at", self.attributes.signed_up_at),
        ] {
            v.extend(check_time(field, at, now, limits).err());
        }
        if v.is_empty() { Ok(()) } else { Err(v) }
    }
}

fn check_time(
    field: &str,
    at: DateTime<Utc>,
    now: DateTime<Utc>,
    limits: &OrderLimits,
) -> Result<(), Violation> {
    if at > now + limits.max_future_skew {
        return Err(Violation::new(
            field,
            "in_future",
            format!(
                "must not be more than {} seconds in the future",
                limits.max_future_skew.num_seconds()
            ),
        ));
    }
    if at < limits.earliest {
        return Err(Violation::new(
            field,
            "too_old",
            format!("must not be before {}", limits.earliest.to_rfc3339()),
        ));
    }
    Ok(())
}

/// A recorded change: an event of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub attributes: Attributes,
    pub effective_at: DateTime<Utc>,
    /// Its place in the log (later wins among changes effective at the same moment).
    pub seq: i64,
    pub recorded_at: DateTime<Utc>,
}

/// A version of a customer: its attributes over `[valid_from, valid_to)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub attributes: Attributes,
    pub valid_from: DateTime<Utc>,
    /// `None`: the current version.
    pub valid_to: Option<DateTime<Utc>>,
    /// When the change that made this version was recorded.
    pub recorded_at: DateTime<Utc>,
}

/// A customer's versions, oldest first, from its recorded changes (any order).
pub fn history(changes: &[Recorded]) -> Vec<Version> {
    let mut sorted: Vec<&Recorded> = changes.iter().collect();
    sorted.sort_by_key(|c| (c.effective_at, c.seq));
    let mut versions: Vec<Version> = Vec::new();
    for (i, change) in sorted.iter().enumerate() {
        // Among changes effective at the same moment the last recorded wins.
        if sorted
            .get(i + 1)
            .is_some_and(|next| next.effective_at == change.effective_at)
        {
            continue;
        }
        if versions
            .last()
            .is_some_and(|last| last.attributes == change.attributes)
        {
            continue;
        }
        if let Some(last) = versions.last_mut() {
            last.valid_to = Some(change.effective_at);
        }
        versions.push(Version {
            attributes: change.attributes.clone(),
            valid_from: change.effective_at,
            valid_to: None,
            recorded_at: change.recorded_at,
        });
    }
    versions
}

/// Whether `change` would alter the history made of `changes`: an identical
/// resend, or a change equal to the version in effect at its moment, does not.
pub fn alters(changes: &[Recorded], change: &CustomerChange) -> bool {
    let mut with = changes.to_vec();
    with.push(Recorded {
        attributes: change.attributes.clone(),
        effective_at: change.effective_at,
        seq: changes.iter().map(|c| c.seq).max().unwrap_or(0) + 1,
        recorded_at: DateTime::<Utc>::MIN_UTC,
    });
    let strip = |versions: Vec<Version>| -> Vec<(Attributes, DateTime<Utc>)> {
        versions
            .into_iter()
            .map(|v| (v.attributes, v.valid_from))
            .collect()
    };
    strip(history(&with)) != strip(history(changes))
}

/// The version in effect at `at`, if any.
pub fn as_of(versions: &[Version], at: DateTime<Utc>) -> Option<&Version> {
    versions
        .iter()
        .rev()
        .find(|v| v.valid_from <= at && v.valid_to.is_none_or(|to| at < to))
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn t(day: u32) -> DateTime<Utc> {
        format!("2026-03-{day:02}T00:00:00Z").parse().unwrap()
    }

    fn attrs(city: &str) -> Attributes {
        Attributes {
            city: city.to_owned(),
            segment: "retail".to_owned(),
            signed_up_at: t(1),
        }
    }

    fn rec(city: &str, day: u32, seq: i64) -> Recorded {
        Recorded {
            attributes: attrs(city),
            effective_at: t(day),
            seq,
            recorded_at: t(20) + TimeDelta::seconds(seq),
        }
    }

    fn shape(versions: &[Version]) -> Vec<(&str, u32, Option<u32>)> {
        use chrono::Datelike;
        versions
            .iter()
            .map(|v| {
                (
                    v.attributes.city.as_str(),
                    v.valid_from.day(),
                    v.valid_to.map(|to| to.day()),
                )
            })
            .collect()
    }

    #[test]
    fn each_change_closes_the_version_before_it() {
        let h = history(&[rec("Berlin", 1, 1), rec("Paris", 10, 2), rec("Rome", 15, 3)]);
        assert_eq!(
            shape(&h),
            [
                ("Berlin", 1, Some(10)),
                ("Paris", 10, Some(15)),
                ("Rome", 15, None)
            ]
        );
        assert_eq!(as_of(&h, t(9)).unwrap().attributes.city, "Berlin");
        assert_eq!(as_of(&h, t(10)).unwrap().attributes.city, "Paris");
        assert_eq!(as_of(&h, t(30)).unwrap().attributes.city, "Rome");
        assert!(as_of(&h, t(1) - TimeDelta::microseconds(1)).is_none());
    }

    #[test]
    fn a_late_change_is_placed_in_history_and_merges_with_its_equal_neighbour() {
        // Recorded last, effective between the two: Berlin → Paris (5th) → Paris (10th)
        // is one Paris version from the 5th.
        let changes = [rec("Berlin", 1, 1), rec("Paris", 10, 2), rec("Paris", 5, 3)];
        assert_eq!(
            shape(&history(&changes)),
            [("Berlin", 1, Some(5)), ("Paris", 5, None)]
        );
        // One effective at the same moment as another corrects it.
        let changes = [rec("Berlin", 1, 1), rec("Paris", 10, 2), rec("Lyon", 10, 3)];
        assert_eq!(
            shape(&history(&changes)),
            [("Berlin", 1, Some(10)), ("Lyon", 10, None)]
        );
    }

    #[test]
    fn only_a_change_that_alters_the_history_counts() {
        let changes = [rec("Berlin", 1, 1), rec("Paris", 10, 2)];
        let change = |city: &str, day: u32| CustomerChange {
            user_id: "u1".into(),
            attributes: attrs(city),
            effective_at: t(day),
        };
        // A resend, and a restatement of the version in effect, change nothing.
        assert!(!alters(&changes, &change("Paris", 10)));
        assert!(!alters(&changes, &change("Paris", 12)));
        assert!(!alters(&changes, &change("Berlin", 3)));
        // A move, a backdated move, a correction of a version do.
        assert!(alters(&changes, &change("Rome", 12)));
        assert!(alters(&changes, &change("Paris", 5)));
        assert!(alters(&changes, &change("Lyon", 10)));
        assert!(alters(&[], &change("Berlin", 1)));
        // A segment change alone is a change.
        let mut vip = change("Paris", 12);
        vip.attributes.segment = "vip".into();
        assert!(alters(&changes, &vip));
    }

    #[test]
    fn validation_names_every_bad_field() {
        let now = t(20);
        let limits = OrderLimits::default();
        let bad = CustomerChange {
            user_id: String::new(),
            attributes: Attributes {
                city: "x".repeat(65),
                segment: "a\u{7}".into(),
                signed_up_at: now + TimeDelta::days(2),
            },
            effective_at: limits.earliest - TimeDelta::days(1),
        };
        let fields: Vec<_> = bad
            .validate(now, &limits)
            .unwrap_err()
            .into_iter()
            .map(|v| (v.field, v.code))
            .collect();
        assert_eq!(
            fields,
            [
                ("user_id".to_owned(), "required".to_owned()),
                ("city".to_owned(), "too_long".to_owned()),
                ("segment".to_owned(), "invalid".to_owned()),
                ("effective_at".to_owned(), "too_old".to_owned()),
                ("signed_up_at".to_owned(), "in_future".to_owned()),
            ]
        );
    }
}
