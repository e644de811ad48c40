//! Events of the log and what each adds to the aggregates.
//!
//! The log holds two kinds of event: orders, and adjustments (refunds and
//! cancellations) of earlier orders. An adjustment is read together with the order
//! it corrects, so that a consumer can place it on both bases without looking the
//! order up: at its own time (booked) and at the order's time, city and products
//! (restated). [`Event::contributions`] is the one definition of what an event adds
//! to which cell; every view and every ground truth sums it.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::adjustment::{Adjustment, AdjustmentKind};
use crate::aggregate::{Corrections, Totals};
use crate::bucket::Dimension;
use crate::order::Order;

/// An adjustment with the order it corrects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentEvent {
    pub adjustment: Adjustment,
    pub order: Order,
}

/// An event of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Event {
    Order(Order),
    Adjustment(AdjustmentEvent),
}

/// What an event adds to one cell of a dimension: the time whose bucket the cell
/// is, the dimension value (`""` for [`Dimension::Total`]) and the totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contribution<'a> {
    pub at: DateTime<Utc>,
    pub value: Cow<'a, str>,
    pub totals: Totals,
}

impl Event {
    /// The order the event is, or corrects.
    pub fn order(&self) -> &Order {
        match self {
            Event::Order(order) => order,
            Event::Adjustment(event) => &event.order,
        }
    }

    /// When the event happened (its own event time).
    pub fn created_at(&self) -> DateTime<Utc> {
        match self {
            Event::Order(order) => order.created_at,
            Event::Adjustment(event) => event.adjustment.created_at,
        }
    }

    /// What the event adds to each cell of `dim`.
    ///
    /// An order adds its gross revenue, items and one order to each value it
    /// contains, at its time. An adjustment adds, per value, what it gave back of
    /// the lines with that value (and, for a cancellation, one cancelled order per
    /// value the order contains): once as `booked` at its own time, once as
    /// `restated` at the order's time.
    pub fn contributions(&self, dim: Dimension) -> Vec<Contribution<'_>> {
        match self {
            Event::Order(order) => order
                .cells(dim)
                .into_iter()
                .map(|cell| Contribution {
                    at: order.created_at,
                    value: cell.value,
                    totals: Totals {
                        revenue_minor: cell.revenue_minor,
                        orders: 1,
                        items: cell.items,
                        ..Totals::default()
                    },
                })
                .collect(),
            Event::Adjustment(event) => {
                let cells = event.corrections(dim);
                let booked = cells.iter().map(|(value, c)| Contribution {
                    at: event.adjustment.created_at,
                    value: value.clone(),
                    totals: Totals {
                        booked: *c,
                        ..Totals::default()
                    },
                });
                let restated = cells.iter().map(|(value, c)| Contribution {
                    at: event.order.created_at,
                    value: value.clone(),
                    totals: Totals {
                        restated: *c,
                        ..Totals::default()
                    },
                });
                booked.chain(restated).collect()
            }
        }
    }
}

impl AdjustmentEvent {
    /// The corrections per value of `dim`, in the order values first appear among
    /// the order's lines.
    pub fn corrections(&self, dim: Dimension) -> Vec<(Cow<'_, str>, Corrections)> {
        let order = &self.order;
        let cancels = self.adjustment.kind == AdjustmentKind::Cancellation;
        let mut cells: Vec<(Cow<'_, str>, Corrections)> = Vec::new();
        for (i, line) in order.lines.iter().enumerate() {
            let value = dim.join(|a| order.attribute(line, a));
            let given = self
                .adjustment
                .lines
                .iter()
                .find(|l| usize::try_from(l.line_no).ok() == Some(i + 1));
            if given.is_none() && !cancels {
                continue;
            }
            let index = match cells.iter().position(|(v, _)| *v == value) {
                Some(index) => index,
                None => {
                    let first = Corrections {
                        cancelled_orders: i64::from(cancels),
                        ..Corrections::default()
                    };
                    cells.push((value, first));
                    cells.len() - 1
                }
            };
            if let Some(given) = given {
                cells[index].1.refunded_minor += given.amount_minor;
                cells[index].1.refunded_items += i64::from(given.quantity);
            }
        }
        cells
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use uuid::Uuid;

    use super::*;
    use crate::adjustment::AdjustedLine;
    use crate::order::tests::{line, sample};

    fn basket() -> Order {
        let mut order = sample();
        order.lines = vec![
            line("p-1", "books", 3, 1_000),
            line("p-2", "games", 1, 500),
            line("p-3", "books", 2, 100),
        ];
        order
    }

    fn adjusted(kind: AdjustmentKind, lines: &[(i16, i32, i64)]) -> Event {
        let order = basket();
        Event::Adjustment(AdjustmentEvent {
            adjustment: Adjustment {
                adjustment_id: Uuid::from_u128(7),
                order_id: order.order_id,
                kind,
                created_at: order.created_at + TimeDelta::days(3),
                lines: lines
                    .iter()
                    .map(|&(line_no, quantity, amount_minor)| AdjustedLine {
                        line_no,
                        quantity,
                        amount_minor,
                    })
                    .collect(),
            },
            order,
        })
    }

    fn cells(event: &Event, dim: Dimension) -> Vec<(i64, String, Totals)> {
        event
            .contributions(dim)
            .into_iter()
            .map(|c| (c.at.timestamp(), c.value.into_owned(), c.totals))
            .collect()
    }

    #[test]
    fn an_order_adds_gross_figures_at_its_time() {
        let order = basket();
        let event = Event::Order(order.clone());
        let by_category = cells(&event, Dimension::Category);
        assert_eq!(by_category.len(), 2);
        assert_eq!(by_category[0].1, "books");
        assert_eq!(
            (
                by_category[0].2.revenue_minor,
                by_category[0].2.orders,
                by_category[0].2.items
            ),
            (3_200, 1, 5)
        );
        assert_eq!(by_category[0].0, order.created_at.timestamp());
        assert_eq!(by_category[0].2.booked, Corrections::default());
    }

    #[test]
    fn a_refund_is_booked_at_its_time_and_restated_at_the_order() {
        let event = adjusted(AdjustmentKind::Refund, &[(1, 1, 1_000), (3, 0, 50)]);
        let order_at = event.order().created_at.timestamp();
        let refund_at = event.created_at().timestamp();
        let by_category = cells(&event, Dimension::Category);
        // books only (lines 1 and 3), once per basis.
        assert_eq!(by_category.len(), 2);
        let (booked, restated) = (&by_category[0], &by_category[1]);
        assert_eq!((booked.0, booked.1.as_str()), (refund_at, "books"));
        assert_eq!((restated.0, restated.1.as_str()), (order_at, "books"));
        let expected = Corrections {
            refunded_minor: 1_050,
            refunded_items: 1,
            cancelled_orders: 0,
        };
        assert_eq!(booked.2.booked, expected);
        assert_eq!(booked.2.restated, Corrections::default());
        assert_eq!(restated.2.restated, expected);
        assert_eq!(booked.2.revenue_minor + booked.2.orders, 0);
        assert_eq!(cells(&event, Dimension::Product).len(), 4);
    }

    #[test]
    fn a_cancellation_counts_once_per_value_even_where_nothing_remained() {
        // Line 2 was refunded in full before: the cancellation gives back 1 and 3.
        let event = adjusted(AdjustmentKind::Cancellation, &[(1, 3, 3_000), (3, 2, 200)]);
        let booked: Vec<_> = cells(&event, Dimension::Category)
            .into_iter()
            .filter(|c| c.0 == event.created_at().timestamp())
            .map(|c| (c.1, c.2.booked))
            .collect();
        assert_eq!(
            booked,
            [
                (
                    "books".to_owned(),
                    Corrections {
                        refunded_minor: 3_200,
                        refunded_items: 5,
                        cancelled_orders: 1
                    }
                ),
                (
                    "games".to_owned(),
                    Corrections {
                        refunded_minor: 0,
                        refunded_items: 0,
                        cancelled_orders: 1
                    }
                ),
            ]
        );
        let total = cells(&event, Dimension::Total);
        assert_eq!(total[0].2.booked.cancelled_orders, 1);
        assert_eq!(total[1].2.restated.refunded_minor, 3_200);
    }
}
