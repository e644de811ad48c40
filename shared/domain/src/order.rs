//! The order: one purchase of one product, the unit every revenue figure is built from.

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bucket::Dimension;
use crate::money::Currency;

/// Longest accepted text field, in characters.
pub const MAX_TEXT_CHARS: usize = 64;
/// Largest accepted quantity of one order.
pub const MAX_QUANTITY: i32 = 1_000;
/// Largest accepted unit price, in minor units (1,000,000.00 in a two-decimal currency).
///
/// With [`MAX_QUANTITY`] this bounds one order's revenue to 10^11 minor units, so an
/// `i64` sum overflows only after ~9·10^7 maximal orders in one bucket.
pub const MAX_UNIT_PRICE_MINOR: i64 = 100_000_000;

/// A valid order, as stored in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Client-supplied idempotency key.
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    /// Price of one unit, in minor units of `currency`.
    pub unit_price_minor: i64,
    pub currency: Currency,
    /// Event time, UTC. Drives the time buckets.
    pub created_at: DateTime<Utc>,
}

impl Order {
    /// Revenue of the order in minor units: quantity × unit price.
    pub fn revenue_minor(&self) -> i64 {
        i64::from(self.quantity) * self.unit_price_minor
    }

    /// The order's value for a dimension (`""` for [`Dimension::Total`]).
    pub fn dimension_value(&self, dim: Dimension) -> &str {
        match dim {
            Dimension::Total => "",
            Dimension::City => &self.city,
            Dimension::Category => &self.category,
            Dimension::Product => &self.product_id,
        }
    }

    /// Checks the rules that types alone do not: lengths, ranges, event time.
    pub fn validate(&self, now: DateTime<Utc>, limits: &OrderLimits) -> Result<(), Vec<Violation>> {
        let mut v = Vec::new();
        if self.order_id.is_nil() {
            v.push(Violation::new(
                "order_id",
                "invalid",
                "must not be the nil UUID",
            ));
        }
        for (field, value) in [
            ("user_id", &self.user_id),
            ("city", &self.city),
            ("product_id", &self.product_id),
            ("category", &self.category),
        ] {
            if let Err(violation) = check_text(field, value) {
                v.push(violation);
            }
        }
        v.extend(check_quantity(self.quantity).err());
        v.extend(check_unit_price(self.unit_price_minor).err());
        if self.created_at > now + limits.max_future_skew {
            v.push(Violation::new(
                "created_at",
                "in_future",
                format!(
                    "must not be more than {} seconds in the future",
                    limits.max_future_skew.num_seconds()
                ),
            ));
        }
        if self.created_at < limits.earliest {
            v.push(Violation::new(
                "created_at",
                "too_old",
                format!("must not be before {}", limits.earliest.to_rfc3339()),
            ));
        }
        if v.is_empty() { Ok(()) } else { Err(v) }
    }
}

/// The quantity rule: 1 to [`MAX_QUANTITY`].
pub fn check_quantity(quantity: i32) -> Result<(), Violation> {
    if (1..=MAX_QUANTITY).contains(&quantity) {
        Ok(())
    } else {
        Err(Violation::new(
            "quantity",
            "out_of_range",
            format!("must be between 1 and {MAX_QUANTITY}"),
        ))
    }
}

/// The unit price rule: 0 to [`MAX_UNIT_PRICE_MINOR`] minor units.
pub fn check_unit_price(minor: i64) -> Result<(), Violation> {
    if (0..=MAX_UNIT_PRICE_MINOR).contains(&minor) {
        Ok(())
    } else {
        Err(Violation::new(
            "unit_price_minor",
            "out_of_range",
            format!("must be between 0 and {MAX_UNIT_PRICE_MINOR} minor units"),
        ))
    }
}

/// The rule for the text fields: not blank, at most [`MAX_TEXT_CHARS`], no control
/// characters.
pub fn check_text(field: &str, value: &str) -> Result<(), Violation> {
    let chars = value.chars().count();
    if value.trim().is_empty() {
        return Err(Violation::new(field, "required", "must not be empty"));
    }
    if chars > MAX_TEXT_CHARS {
        return Err(Violation::new(
            field,
            "too_long",
            format!("must be at most {MAX_TEXT_CHARS} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Violation::new(
            field,
            "invalid",
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Limits on event time, set by configuration.
#[derive(Clone, Debug)]
pub struct OrderLimits {
    /// How far `created_at` may lie in the future (clock skew of producers).
    pub max_future_skew: TimeDelta,
    /// The earliest accepted `created_at`.
    pub earliest: DateTime<Utc>,
}

impl Default for OrderLimits {
    fn default() -> Self {
        Self {
            max_future_skew: TimeDelta::minutes(5),
            earliest: Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap(),
        }
    }
}

/// One broken rule: which field, a stable machine-readable code, and a sentence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub field: String,
    pub code: String,
    pub message: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, code: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample() -> Order {
        Order {
            order_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
            user_id: "u-1".into(),
            city: "Berlin".into(),
            product_id: "p-7".into(),
            category: "books".into(),
            quantity: 3,
            unit_price_minor: 1_299,
            currency: "EUR".parse().unwrap(),
            created_at: Utc.with_ymd_and_hms(2026, 11, 21, 10, 0, 0).unwrap(),
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
    }

    #[test]
    fn revenue_is_quantity_times_unit_price() {
        assert_eq!(sample().revenue_minor(), 3_897);
    }

    #[test]
    fn accepts_a_valid_order() {
        assert_eq!(sample().validate(now(), &OrderLimits::default()), Ok(()));
    }

    #[test]
    fn reports_every_broken_rule() {
        let mut o = sample();
        o.order_id = Uuid::nil();
        o.city = " ".into();
        o.category = "x".repeat(MAX_TEXT_CHARS + 1);
        o.product_id = "p\u{0}".into();
        o.quantity = 0;
        o.unit_price_minor = -1;
        o.created_at = now() + TimeDelta::hours(1);
        let errs = o.validate(now(), &OrderLimits::default()).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "order_id",
                "city",
                "product_id",
                "category",
                "quantity",
                "unit_price_minor",
                "created_at"
            ]
        );
    }

    #[test]
    fn bounds_are_inclusive() {
        let mut o = sample();
        o.quantity = MAX_QUANTITY;
        o.unit_price_minor = MAX_UNIT_PRICE_MINOR;
        o.category = "é".repeat(MAX_TEXT_CHARS);
        o.created_at = now() + TimeDelta::minutes(5);
        assert_eq!(o.validate(now(), &OrderLimits::default()), Ok(()));
    }
}
