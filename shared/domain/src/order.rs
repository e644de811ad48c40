//! The order: one purchase of a basket of lines, the unit every revenue figure is
//! built from.

use std::borrow::Cow;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bucket::{Attribute, Dimension};
use crate::money::Currency;

/// Longest accepted text field, in characters.
pub const MAX_TEXT_CHARS: usize = 64;
/// Largest accepted quantity of one order.
pub const MAX_QUANTITY: i32 = 1_000;
/// Largest accepted unit price, in minor units (1,000,000.00 in a two-decimal currency).
///
/// With [`MAX_QUANTITY`] and [`MAX_LINES`] this bounds one order's revenue to 10^13
/// minor units, so an `i64` sum overflows only after ~9·10^5 maximal orders in one
/// bucket.
pub const MAX_UNIT_PRICE_MINOR: i64 = 100_000_000;
/// Most lines of one order.
pub const MAX_LINES: usize = 100;

/// One line of an order: a product, its quantity and unit price.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: String,
    pub category: String,
    pub quantity: i32,
    /// Price of one unit, in minor units of the order's currency.
    pub unit_price_minor: i64,
}

impl OrderLine {
    /// quantity × unit price, in minor units.
    pub fn revenue_minor(&self) -> i64 {
        i64::from(self.quantity) * self.unit_price_minor
    }
}

/// What one order adds to one cell of a dimension: its revenue and items there, and
/// one order (an order counts once per value it contains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderCell<'a> {
    pub value: Cow<'a, str>,
    pub revenue_minor: i64,
    pub items: i64,
}

/// A valid order, as stored in the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Client-supplied idempotency key.
    pub order_id: Uuid,
    pub user_id: String,
    pub city: String,
    pub currency: Currency,
    /// Event time, UTC. Drives the time buckets.
    pub created_at: DateTime<Utc>,
    /// 1 to [`MAX_LINES`] lines, each of a different product (`items` in JSON,
    /// as the ingest API names them).
    #[serde(rename = "items")]
    pub lines: Vec<OrderLine>,
}

impl Order {
    /// Revenue of the order in minor units: the sum of its lines.
    pub fn revenue_minor(&self) -> i64 {
        self.lines.iter().map(OrderLine::revenue_minor).sum()
    }

    /// Units across the lines.
    pub fn items(&self) -> i64 {
        self.lines.iter().map(|l| i64::from(l.quantity)).sum()
    }

    /// The value of `attribute` for `line` of this order.
    pub fn attribute<'a>(&'a self, line: &'a OrderLine, attribute: Attribute) -> &'a str {
        match attribute {
            Attribute::City => &self.city,
            Attribute::Category => &line.category,
            Attribute::Product => &line.product_id,
        }
    }

    /// What the order adds to each value of `dim` it contains (`""` for
    /// [`Dimension::Total`]), in the order the values first appear: revenue and
    /// items summed over the lines with that value.
    pub fn cells(&self, dim: Dimension) -> Vec<OrderCell<'_>> {
        let mut cells: Vec<OrderCell<'_>> = Vec::with_capacity(1);
        for line in &self.lines {
            let value = dim.join(|a| self.attribute(line, a));
            match cells.iter_mut().find(|c| c.value == value) {
                Some(cell) => {
                    cell.revenue_minor += line.revenue_minor();
                    cell.items += i64::from(line.quantity);
                }
                None => cells.push(OrderCell {
                    value,
                    revenue_minor: line.revenue_minor(),
                    items: i64::from(line.quantity),
                }),
            }
        }
        cells
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
        for (field, value) in [("user_id", &self.user_id), ("city", &self.city)] {
            if let Err(violation) = check_text(field, value) {
                v.push(violation);
            }
        }
        if self.lines.is_empty() || self.lines.len() > MAX_LINES {
            v.push(Violation::new(
                "items",
                "out_of_range",
                format!("must hold 1 to {MAX_LINES} lines"),
            ));
        }
        for (i, line) in self.lines.iter().enumerate() {
            let at = |violation: Violation| Violation {
                field: format!("items/{i}/{}", violation.field),
                ..violation
            };
            for (field, value) in [
                ("product_id", &line.product_id),
                ("category", &line.category),
            ] {
                v.extend(check_text(field, value).err().map(at));
            }
            v.extend(check_quantity(line.quantity).err().map(at));
            v.extend(check_unit_price(line.unit_price_minor).err().map(at));
            if self.lines[..i]
                .iter()
                .any(|l| l.product_id == line.product_id)
            {
                v.push(at(Violation::new(
                    "product_id",
                    "duplicate",
                    "each line of an order must be of a different product",
                )));
            }
        }
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

    pub fn line(product_id: &str, category: &str, quantity: i32, price: i64) -> OrderLine {
        OrderLine {
            product_id: product_id.into(),
            category: category.into(),
            quantity,
            unit_price_minor: price,
        }
    }

    pub fn sample() -> Order {
        Order {
            order_id: Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0001),
            user_id: "u-1".into(),
            city: "Berlin".into(),
            currency: "EUR".parse().unwrap(),
            created_at: Utc.with_ymd_and_hms(2026, 11, 21, 10, 0, 0).unwrap(),
            lines: vec![line("p-7", "books", 3, 1_299)],
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
    fn a_basket_sums_its_lines_and_counts_once_per_value() {
        let mut o = sample();
        o.lines = vec![
            line("p-1", "books", 2, 100),
            line("p-2", "games", 1, 1_000),
            line("p-3", "books", 3, 10),
        ];
        assert_eq!((o.revenue_minor(), o.items()), (1_230, 6));
        let cells = |d| {
            o.cells(d)
                .into_iter()
                .map(|c| (c.value.into_owned(), c.revenue_minor, c.items))
                .collect::<Vec<_>>()
        };
        assert_eq!(cells(Dimension::Total), [("".to_owned(), 1_230, 6)]);
        assert_eq!(cells(Dimension::City), [("Berlin".to_owned(), 1_230, 6)]);
        assert_eq!(
            cells(Dimension::Category),
            [("books".to_owned(), 230, 5), ("games".to_owned(), 1_000, 1)]
        );
        assert_eq!(cells(Dimension::Product).len(), 3);
        assert_eq!(
            cells(Dimension::CityCategory),
            [
                ("Berlin\u{1f}books".to_owned(), 230, 5),
                ("Berlin\u{1f}games".to_owned(), 1_000, 1)
            ]
        );
        assert_eq!(
            cells(Dimension::CityCategoryProduct)[2],
            ("Berlin\u{1f}books\u{1f}p-3".to_owned(), 30, 3)
        );
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
        o.lines[0].category = "x".repeat(MAX_TEXT_CHARS + 1);
        o.lines[0].product_id = "p\u{0}".into();
        o.lines[0].quantity = 0;
        o.lines[0].unit_price_minor = -1;
        o.lines.push(o.lines[0].clone());
        o.created_at = now() + TimeDelta::hours(1);
        let errs = o.validate(now(), &OrderLimits::default()).unwrap_err();
        let fields: Vec<_> = errs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "order_id",
                "city",
                "items/0/product_id",
                "items/0/category",
                "items/0/quantity",
                "items/0/unit_price_minor",
                "items/1/product_id",
                "items/1/category",
                "items/1/quantity",
                "items/1/unit_price_minor",
                "items/1/product_id",
                "created_at"
            ]
        );
        assert_eq!(errs[10].code, "duplicate");
        o.lines.clear();
        let errs = o.validate(now(), &OrderLimits::default()).unwrap_err();
        assert!(errs.iter().any(|v| v.field == "items"));
    }

    #[test]
    fn bounds_are_inclusive() {
        let mut o = sample();
        o.lines[0].quantity = MAX_QUANTITY;
        o.lines[0].unit_price_minor = MAX_UNIT_PRICE_MINOR;
        o.lines[0].category = "é".repeat(MAX_TEXT_CHARS);
        o.lines = (0..MAX_LINES)
            .map(|i| OrderLine {
                product_id: format!("p-{i}"),
                ..o.lines[0].clone()
            })
            .collect();
        o.created_at = now() + TimeDelta::minutes(5);
        assert_eq!(o.validate(now(), &OrderLimits::default()), Ok(()));
    }
}
