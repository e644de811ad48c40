//! Aggregates: what every view (speed, batch, served) holds per cell.

use std::collections::BTreeMap;

use crate::money::Currency;

/// Revenue, orders and items of one dimension value in one bucket and currency.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub revenue_minor: i64,
    pub orders: i64,
    pub items: i64,
}

impl Totals {
    pub fn add(&mut self, other: Totals) {
        self.revenue_minor += other.revenue_minor;
        self.orders += other.orders;
        self.items += other.items;
    }

    pub fn is_zero(&self) -> bool {
        *self == Totals::default()
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
