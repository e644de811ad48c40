//! Aggregates: what every view (speed, batch, served) holds per cell.
//!
//! A cell holds the gross figures of the orders placed in its bucket and the
//! corrections (refunds and cancellations) on both bases: `booked` counts a
//! correction in the bucket in which it happened, `restated` in the bucket of the
//! order it corrects. Both are kept everywhere, so a question on either basis is a
//! sum of stored cells, exact across the batch/speed handoff.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::money::Currency;

/// What refunds and cancellations took back in one cell, on one basis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Corrections {
    pub refunded_minor: i64,
    /// Units given back (a refund of an amount gives back none).
    pub refunded_items: i64,
    /// Orders cancelled, counted like orders: once per dimension value the order
    /// contains.
    pub cancelled_orders: i64,
}

impl Corrections {
    pub fn add(&mut self, other: Corrections) {
        self.refunded_minor += other.refunded_minor;
        self.refunded_items += other.refunded_items;
        self.cancelled_orders += other.cancelled_orders;
    }
}

/// Which time a correction counts at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// When it happened, as shop reports count it (the default).
    #[default]
    BookingTime,
    /// At its order's time, place and products: cohort revenue, restated.
    OrderTime,
}

impl Basis {
    pub const ALL: [Basis; 2] = [Basis::BookingTime, Basis::OrderTime];

    pub fn as_str(self) -> &'static str {
        match self {
            Basis::BookingTime => "booking_time",
            Basis::OrderTime => "order_time",
        }
    }
}

impl std::str::FromStr for Basis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "booking_time" => Ok(Basis::BookingTime),
            "order_time" => Ok(Basis::OrderTime),
            other => Err(format!(
                "unknown basis `{other}` (use booking_time or order_time)"
            )),
        }
    }
}

/// Gross revenue, orders and items of one dimension value in one bucket and
/// currency, and the corrections counted there on each basis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Gross revenue: the orders' lines, before corrections.
    pub revenue_minor: i64,
    pub orders: i64,
    pub items: i64,
    /// Corrections that happened in this bucket (booking-time basis).
    pub booked: Corrections,
    /// Corrections of the orders placed in this bucket (order-time basis).
    pub restated: Corrections,
}

impl Totals {
    pub fn add(&mut self, other: Totals) {
        self.revenue_minor += other.revenue_minor;
        self.orders += other.orders;
        self.items += other.items;
        self.booked.add(other.booked);
        self.restated.add(other.restated);
    }

    pub fn is_zero(&self) -> bool {
        *self == Totals::default()
    }

    /// The corrections counted on `basis`.
    pub fn corrections(&self, basis: Basis) -> Corrections {
        match basis {
            Basis::BookingTime => self.booked,
            Basis::OrderTime => self.restated,
        }
    }

    /// Gross less the refunds counted on `basis`.
    pub fn net_revenue_minor(&self, basis: Basis) -> i64 {
        self.revenue_minor - self.corrections(basis).refunded_minor
    }
}

/// A cell of a revenue grid: bucket start (unix seconds), dimension value, currency.
pub type CellKey = (i64, String, Currency);

/// A revenue grid.
pub type Grid = BTreeMap<CellKey, Totals>;

/// Adds `other` into `into`, cell by cell.
pub fn merge(into: &mut Grid, other: &Grid) {
    for (key, totals) in other {
        into.entry(key.clone()).or_default().add(*totals);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_revenue_follows_the_basis() {
        let totals = Totals {
            revenue_minor: 1_000,
            orders: 2,
            items: 3,
            booked: Corrections {
                refunded_minor: 100,
                refunded_items: 1,
                cancelled_orders: 0,
            },
            restated: Corrections {
                refunded_minor: 250,
                refunded_items: 0,
                cancelled_orders: 1,
            },
        };
        assert_eq!(totals.net_revenue_minor(Basis::BookingTime), 900);
        assert_eq!(totals.net_revenue_minor(Basis::OrderTime), 750);
        let mut twice = totals;
        twice.add(totals);
        assert_eq!(twice.restated.cancelled_orders, 2);
        assert_eq!("order_time".parse::<Basis>(), Ok(Basis::OrderTime));
        assert!("order".parse::<Basis>().is_err());
    }
}
