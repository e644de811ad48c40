//! Corrections of an order: refunds and cancellations. Each is an event of its
//! own, appended to the log; an order is never changed. What an adjustment gives
//! back is computed here from the order and the adjustments before it, so that
//! their sum can never pass the order.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::order::{Order, Violation};

/// A refund as a client asks for it: lines of the order by product, each with
/// units or an amount to give back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    /// The client's idempotency key.
    pub refund_id: Uuid,
    /// When the refund happened (event time, UTC); not before the order.
    pub created_at: DateTime<Utc>,
    pub items: Vec<RefundItem>,
}

/// One line of a refund: units of a product (at its unit price) or an amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum RefundItem {
    Units {
        product_id: String,
        quantity: i32,
    },
    Amount {
        product_id: String,
        amount_minor: i64,
    },
}

impl RefundItem {
    pub fn product_id(&self) -> &str {
        match self {
            RefundItem::Units { product_id, .. } | RefundItem::Amount { product_id, .. } => {
                product_id
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdjustmentKind {
    Refund,
    Cancellation,
}

impl AdjustmentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AdjustmentKind::Refund => "refund",
            AdjustmentKind::Cancellation => "cancellation",
        }
    }
}

/// What an adjustment gives back of one line of its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustedLine {
    /// The order line (1-based, as stored).
    pub line_no: i16,
    /// Units given back (0 for a refund of an amount).
    pub quantity: i32,
    pub amount_minor: i64,
}

/// A refund or cancellation as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adjustment {
    pub adjustment_id: Uuid,
    pub order_id: Uuid,
    pub kind: AdjustmentKind,
    pub created_at: DateTime<Utc>,
    pub lines: Vec<AdjustedLine>,
}

/// What is left of one line of an order after its adjustments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remaining {
    pub line_no: i16,
    pub quantity: i32,
    pub amount_minor: i64,
}

/// Why a refund cannot be made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefundError {
    /// The request breaks rules of its own (names each field).
    Invalid(Vec<Violation>),
    /// It asks for more than remains of these lines.
    Exceeds {
        violations: Vec<Violation>,
        remaining: Vec<(String, Remaining)>,
    },
}

/// What remains of each line of `order` after `prior` adjustments.
pub fn remaining(order: &Order, prior: &[Adjustment]) -> Vec<Remaining> {
    order
        .lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let line_no = i as i16 + 1;
            let given: (i32, i64) = prior
                .iter()
                .flat_map(|a| a.lines.iter().filter(|l| l.line_no == line_no))
                .fold((0, 0), |(q, a), l| (q + l.quantity, a + l.amount_minor));
            Remaining {
                line_no,
                quantity: line.quantity - given.0,
                amount_minor: line.revenue_minor() - given.1,
            }
        })
        .collect()
}

/// The lines a refund gives back, checked against what remains of `order` after
/// `prior`: known products, each once, positive units or amounts, never more than
/// remains (units: of units and of amount; an amount: of amount).
pub fn plan_refund(
    order: &Order,
    prior: &[Adjustment],
    request: &RefundRequest,
) -> Result<Vec<AdjustedLine>, RefundError> {
    let mut invalid = Vec::new();
    if request.created_at < order.created_at {
        invalid.push(Violation::new(
            "created_at",
            "before_order",
            format!(
                "must not be before the order's created_at ({})",
                order.created_at.to_rfc3339()
            ),
        ));
    }
    if request.items.is_empty() || request.items.len() > order.lines.len() {
        invalid.push(Violation::new(
            "items",
            "out_of_range",
            format!(
                "must hold 1 to {} lines (one per product of the order)",
                order.lines.len()
            ),
        ));
    }
    let left = remaining(order, prior);
    let mut lines = Vec::with_capacity(request.items.len());
    let mut exceeds = Vec::new();
    let mut short = Vec::new();
    for (i, item) in request.items.iter().enumerate() {
        let at = |field: &str| format!("items/{i}/{field}");
        let Some(index) = order
            .lines
            .iter()
            .position(|l| l.product_id == item.product_id())
        else {
            invalid.push(Violation::new(
                at("product_id"),
                "unknown_product",
                "is not a product of this order",
            ));
            continue;
        };
        if request.items[..i]
            .iter()
            .any(|other| other.product_id() == item.product_id())
        {
            invalid.push(Violation::new(
                at("product_id"),
                "duplicate",
                "each product may appear once in a refund",
            ));
            continue;
        }
        let line = &order.lines[index];
        let rest = left[index];
        let (quantity, amount_minor, field) = match item {
            RefundItem::Units { quantity, .. } => {
                if *quantity < 1 {
                    invalid.push(Violation::new(
                        at("quantity"),
                        "out_of_range",
                        "must be at least 1",
                    ));
                    continue;
                }
                (
                    *quantity,
                    i64::from(*quantity) * line.unit_price_minor,
                    "quantity",
                )
            }
            RefundItem::Amount { amount_minor, .. } => {
                if *amount_minor < 1 {
                    invalid.push(Violation::new(
                        at("amount_minor"),
                        "out_of_range",
                        "must be at least 1",
                    ));
                    continue;
                }
                (0, *amount_minor, "amount_minor")
            }
        };
        if quantity > rest.quantity || amount_minor > rest.amount_minor {
            exceeds.push(Violation::new(
                at(field),
                "exceeds_remaining",
                format!(
                    "asks for {quantity} units, {amount_minor} minor units of {}; remaining: {} units, {} minor units",
                    line.product_id, rest.quantity, rest.amount_minor
                ),
            ));
            short.push((line.product_id.clone(), rest));
            continue;
        }
        lines.push(AdjustedLine {
            line_no: index as i16 + 1,
            quantity,
            amount_minor,
        });
    }
    if !invalid.is_empty() {
        return Err(RefundError::Invalid(invalid));
    }
    if !exceeds.is_empty() {
        return Err(RefundError::Exceeds {
            violations: exceeds,
            remaining: short,
        });
    }
    lines.sort_by_key(|l| l.line_no);
    Ok(lines)
}

/// The lines a cancellation gives back: whatever remains of every line.
pub fn plan_cancellation(order: &Order, prior: &[Adjustment]) -> Vec<AdjustedLine> {
    remaining(order, prior)
        .into_iter()
        .filter(|r| r.quantity > 0 || r.amount_minor > 0)
        .map(|r| AdjustedLine {
            line_no: r.line_no,
            quantity: r.quantity,
            amount_minor: r.amount_minor,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::order::tests::{line, sample};

    fn basket() -> Order {
        let mut order = sample();
        order.lines = vec![line("p-1", "books", 3, 1_000), line("p-2", "games", 1, 500)];
        order
    }

    fn refund(items: Vec<RefundItem>) -> RefundRequest {
        RefundRequest {
            refund_id: Uuid::from_u128(9),
            created_at: basket().created_at,
            items,
        }
    }

    fn units(product: &str, quantity: i32) -> RefundItem {
        RefundItem::Units {
            product_id: product.into(),
            quantity,
        }
    }

    fn amount(product: &str, amount_minor: i64) -> RefundItem {
        RefundItem::Amount {
            product_id: product.into(),
            amount_minor,
        }
    }

    fn applied(order: &Order, lines: Vec<AdjustedLine>) -> Adjustment {
        Adjustment {
            adjustment_id: Uuid::new_v4(),
            order_id: order.order_id,
            kind: AdjustmentKind::Refund,
            created_at: order.created_at,
            lines,
        }
    }

    #[test]
    fn units_and_amounts_are_given_back_up_to_what_remains() {
        let order = basket();
        let first = plan_refund(
            &order,
            &[],
            &refund(vec![units("p-1", 2), amount("p-2", 200)]),
        )
        .unwrap();
        assert_eq!(
            first,
            [
                AdjustedLine {
                    line_no: 1,
                    quantity: 2,
                    amount_minor: 2_000
                },
                AdjustedLine {
                    line_no: 2,
                    quantity: 0,
                    amount_minor: 200
                },
            ]
        );
        let prior = [applied(&order, first)];
        assert_eq!(
            remaining(&order, &prior),
            [
                Remaining {
                    line_no: 1,
                    quantity: 1,
                    amount_minor: 1_000
                },
                Remaining {
                    line_no: 2,
                    quantity: 1,
                    amount_minor: 300
                },
            ]
        );
        // p-2 has 300 left: its last unit (500) no longer fits, 300 does.
        let too_much = plan_refund(&order, &prior, &refund(vec![units("p-2", 1)]));
        let Err(RefundError::Exceeds {
            violations,
            remaining,
        }) = too_much
        else {
            panic!("{too_much:?}");
        };
        assert_eq!(violations[0].field, "items/0/quantity");
        assert_eq!(remaining[0].1.amount_minor, 300);
        assert!(plan_refund(&order, &prior, &refund(vec![amount("p-2", 300)])).is_ok());
        let cancel = plan_cancellation(&order, &prior);
        assert_eq!(
            cancel,
            [
                AdjustedLine {
                    line_no: 1,
                    quantity: 1,
                    amount_minor: 1_000
                },
                AdjustedLine {
                    line_no: 2,
                    quantity: 1,
                    amount_minor: 300
                },
            ]
        );
    }

    #[test]
    fn a_bad_request_names_each_field() {
        let order = basket();
        let mut request = refund(vec![units("p-9", 1), units("p-1", 0), units("p-1", 1)]);
        request.created_at = order.created_at - chrono::TimeDelta::seconds(1);
        let Err(RefundError::Invalid(violations)) = plan_refund(&order, &[], &request) else {
            panic!("invalid");
        };
        let fields: Vec<_> = violations
            .iter()
            .map(|v| (v.field.as_str(), v.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("created_at", "before_order"),
                ("items", "out_of_range"),
                ("items/0/product_id", "unknown_product"),
                ("items/1/quantity", "out_of_range"),
                ("items/2/product_id", "duplicate"),
            ]
        );
        let Err(RefundError::Invalid(violations)) = plan_refund(
            &order,
            &[],
            &refund(vec![units("p-1", 1), amount("p-1", 5)]),
        ) else {
            panic!("duplicate");
        };
        assert_eq!(violations[0].code, "duplicate");
    }

    proptest! {
        /// However refunds arrive, what was given back never passes the order,
        /// line by line, and a cancellation gives back exactly the rest.
        #[test]
        fn refunds_never_pass_the_order(asks in proptest::collection::vec(
            (0_usize..2, 0_i32..4, 0_i64..3_500, any::<bool>()), 0..20
        )) {
            let order = basket();
            let mut prior = Vec::new();
            for (line, quantity, amount_minor, by_units) in asks {
                let product = &order.lines[line].product_id;
                let item = if by_units { units(product, quantity) } else { amount(product, amount_minor) };
                if let Ok(lines) = plan_refund(&order, &prior, &refund(vec![item])) {
                    prior.push(applied(&order, lines));
                }
                for rest in remaining(&order, &prior) {
                    prop_assert!(rest.quantity >= 0 && rest.amount_minor >= 0);
                }
            }
            prior.push(applied(&order, plan_cancellation(&order, &prior)));
            for rest in remaining(&order, &prior) {
                prop_assert_eq!((rest.quantity, rest.amount_minor), (0, 0));
            }
        }
    }
}
