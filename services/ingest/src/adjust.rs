//! Refunds and cancellations, stored as events of the log.
//!
//! Each request is one transaction: the orders it names are locked (`FOR UPDATE`,
//! in id order, so requests sharing orders wait for each other instead of
//! deadlocking), what their earlier adjustments gave back read (summed per line:
//! the cost of a refund does not grow with the order's refunds), every adjustment checked against
//! what remains (`tidemark_domain::adjustment`) and inserted. Concurrent refunds of
//! one order are therefore serialised, and their sum can never pass the order.
//! All or nothing: any refused item stores nothing.
//!
//! A refund is idempotent by `refund_id` (the same request again answers the stored
//! refund; the id reused for another request is a conflict); an order is cancelled
//! once (the same cancellation again answers the stored one). A request that only
//! resends stored refunds is answered before any lock is taken, so a client
//! retrying after a timeout does not queue again behind the order's other refunds.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tidemark_domain::adjustment::{
    self, AdjustedLine, Adjustment, AdjustmentKind, RefundError, RefundRequest,
};
use tidemark_domain::{Order, Violation};
use tidemark_orderlog::OrderRow;
use utoipa::ToSchema;
use uuid::Uuid;

/// One adjustment a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Ask {
    Refund {
        order_id: Uuid,
        request: RefundRequest,
    },
    Cancellation {
        order_id: Uuid,
        created_at: DateTime<Utc>,
    },
}

impl Ask {
    fn order_id(&self) -> Uuid {
        match self {
            Ask::Refund { order_id, .. } | Ask::Cancellation { order_id, .. } => *order_id,
        }
    }
}

/// An adjustment as answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct AdjustmentView {
    /// The refund's id, or the cancellation's.
    pub adjustment_id: Uuid,
    pub order_id: Uuid,
    /// `refund` or `cancellation`.
    pub kind: String,
    pub created_at: DateTime<Utc>,
    /// Minor units given back, over the lines.
    pub amount_minor: i64,
    pub lines: Vec<AdjustedLineView>,
}

/// What an adjustment gives back of one line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, ToSchema)]
pub struct AdjustedLineView {
    pub product_id: String,
    /// Units given back (0 for a refund of an amount).
    pub quantity: i32,
    pub amount_minor: i64,
}

impl AdjustmentView {
    fn of(adjustment: &Adjustment, order: &Order) -> Self {
        AdjustmentView {
            adjustment_id: adjustment.adjustment_id,
            order_id: adjustment.order_id,
            kind: adjustment.kind.as_str().to_owned(),
            created_at: adjustment.created_at,
            amount_minor: adjustment.lines.iter().map(|l| l.amount_minor).sum(),
            lines: adjustment
                .lines
                .iter()
                .map(|l| AdjustedLineView {
                    product_id: order.lines[(l.line_no - 1) as usize].product_id.clone(),
                    quantity: l.quantity,
                    amount_minor: l.amount_minor,
                })
                .collect(),
        }
    }
}

/// What became of one ask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Done {
    Created(AdjustmentView),
    /// The same request was made before: its stored result.
    Existing(AdjustmentView),
}

/// Why a request stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum AdjustError {
    #[error("unknown orders")]
    UnknownOrders(Vec<(usize, Uuid)>),
    /// The asks at these indexes break rules of their own.
    #[error("invalid adjustments")]
    Invalid(Vec<(usize, Violation)>),
    /// They ask for more than remains, or reuse an id for another request.
    #[error("conflicting adjustments")]
    Conflict {
        violations: Vec<(usize, Violation)>,
        remaining: Vec<(usize, String, adjustment::Remaining)>,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A stored adjustment and the request it answered (for refunds).
struct Stored {
    adjustment: Adjustment,
    request: Option<serde_json::Value>,
}

/// Applies every ask in one transaction, or none.
pub async fn apply(
    pool: &PgPool,
    asks: &[Ask],
    now: DateTime<Utc>,
    max_future_skew: chrono::TimeDelta,
) -> Result<Vec<Done>, AdjustError> {
    let mut tx = pool.begin().await?;
    by_key(&mut tx).await?;
    if let Some(done) = resent(&mut tx, asks).await? {
        tx.commit().await?;
        return Ok(done);
    }
    let order_ids: Vec<Uuid> = asks
        .iter()
        .map(Ask::order_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Locks first, in id order; then the orders with their lines.
    sqlx::query(
        "SELECT order_id FROM orders WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE",
    )
    .bind(&order_ids)
    .execute(&mut *tx)
    .await?;
    let orders = orders(&mut tx, &order_ids).await?;
    let unknown: Vec<(usize, Uuid)> = asks
        .iter()
        .enumerate()
        .filter(|(_, a)| !orders.contains_key(&a.order_id()))
        .map(|(i, a)| (i, a.order_id()))
        .collect();
    if !unknown.is_empty() {
        return Err(AdjustError::UnknownOrders(unknown));
    }
    let refund_ids: Vec<Uuid> = asks
        .iter()
        .filter_map(|a| match a {
            Ask::Refund { request, .. } => Some(request.refund_id),
            Ask::Cancellation { .. } => None,
        })
        .collect();
    // What was given back before, summed per line (one row per order line however
    // many refunds an order has had), and in full only what an ask can meet again:
    // the orders' cancellations and the refunds with the asked ids.
    let given = given_back(&mut tx, &order_ids).await?;
    let stored = load(&mut tx, &order_ids, &refund_ids).await?;
    let mut created: Vec<Stored> = Vec::new();

    let mut done = Vec::with_capacity(asks.len());
    let (mut invalid, mut conflicts, mut remaining) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ask) in asks.iter().enumerate() {
        let order = &orders[&ask.order_id()];
        let prior: Vec<Adjustment> = given
            .get(&order.order_id)
            .into_iter()
            .chain(
                created
                    .iter()
                    .map(|s| &s.adjustment)
                    .filter(|a| a.order_id == order.order_id),
            )
            .cloned()
            .collect();
        let known = || stored.iter().chain(created.iter());
        let created_at = match ask {
            Ask::Refund { request, .. } => request.created_at,
            Ask::Cancellation { created_at, .. } => *created_at,
        };
        if created_at > now + max_future_skew {
            invalid.push((
                i,
                Violation::new(
                    "created_at",
                    "in_future",
                    format!(
                        "must not be more than {} seconds in the future",
                        max_future_skew.num_seconds()
                    ),
                ),
            ));
            continue;
        }
        let (adjustment, request) = match ask {
            Ask::Refund { request, .. } => {
                let sent = serde_json::to_value(request).expect("a refund serializes");
                if let Some(same) =
                    known().find(|s| s.adjustment.adjustment_id == request.refund_id)
                {
                    if same.adjustment.order_id == order.order_id
                        && same.request.as_ref() == Some(&sent)
                    {
                        done.push(Done::Existing(AdjustmentView::of(&same.adjustment, order)));
                    } else {
                        conflicts.push((
                            i,
                            Violation::new(
                                "refund_id",
                                "conflict",
                                "was used for another refund; a resend must repeat it exactly",
                            ),
                        ));
                    }
                    continue;
                }
                match adjustment::plan_refund(order, &prior, request) {
                    Ok(lines) => (
                        Adjustment {
                            adjustment_id: request.refund_id,
                            order_id: order.order_id,
                            kind: AdjustmentKind::Refund,
                            created_at: request.created_at,
                            lines,
                        },
                        Some(sent),
                    ),
                    Err(RefundError::Invalid(violations)) => {
                        invalid.extend(violations.into_iter().map(|v| (i, v)));
                        continue;
                    }
                    Err(RefundError::Exceeds {
                        violations,
                        remaining: left,
                    }) => {
                        conflicts.extend(violations.into_iter().map(|v| (i, v)));
                        remaining.extend(left.into_iter().map(|(p, r)| (i, p, r)));
                        continue;
                    }
                }
            }
            Ask::Cancellation { created_at, .. } => {
                if let Some(cancelled) = known().map(|s| &s.adjustment).find(|a| {
                    a.order_id == order.order_id && a.kind == AdjustmentKind::Cancellation
                }) {
                    if cancelled.created_at == *created_at {
                        done.push(Done::Existing(AdjustmentView::of(cancelled, order)));
                    } else {
                        conflicts.push((
                            i,
                            Violation::new(
                                "created_at",
                                "conflict",
                                format!(
                                    "the order was cancelled at {} already",
                                    cancelled.created_at.to_rfc3339()
                                ),
                            ),
                        ));
                    }
                    continue;
                }
                if *created_at < order.created_at {
                    invalid.push((
                        i,
                        Violation::new(
                            "created_at",
                            "before_order",
                            format!(
                                "must not be before the order's created_at ({})",
                                order.created_at.to_rfc3339()
                            ),
                        ),
                    ));
                    continue;
                }
                (
                    Adjustment {
                        adjustment_id: Uuid::now_v7(),
                        order_id: order.order_id,
                        kind: AdjustmentKind::Cancellation,
                        created_at: *created_at,
                        lines: adjustment::plan_cancellation(order, &prior),
                    },
                    None,
                )
            }
        };
        done.push(Done::Created(AdjustmentView::of(&adjustment, order)));
        created.push(Stored {
            adjustment,
            request,
        });
    }
    if !invalid.is_empty() {
        return Err(AdjustError::Invalid(invalid));
    }
    if !conflicts.is_empty() {
        return Err(AdjustError::Conflict {
            violations: conflicts,
            remaining,
        });
    }
    for s in &created {
        insert(&mut tx, s).await?;
    }
    tx.commit().await?;
    Ok(done)
}

/// Every statement of a refund or cancellation looks rows up by key (an order, its
/// adjustments, an adjustment's lines); the transaction tells the planner so, and
/// its plans stay on the indexes. Without it, Postgres's plan kept per connection for
/// a statement (the generic plan, chosen after five executions) was made while the
/// adjustments tables held a few rows, and a fresh database has no statistics to
/// replan by until autovacuum's first ANALYZE: the plans scanned both tables whole
/// for every refund as they grew (17 ms a refund at 50,000 adjustments, and
/// Postgres three quarters of the machine in `bench speed`'s 20,000 orders/s run).
///
/// And it keeps the generic plan: left to choose, Postgres planned each of these
/// statements anew at every execution (a custom plan for a one-element `ANY($1)`
/// always looks cheaper than the generic plan's guess of ten), and planning was 9 %
/// of the machine's samples in that run's profile, 0.5 % with the plan kept.
pub const BY_KEY: &str = "SELECT set_config('enable_seqscan', 'off', true), \
     set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), \
     set_config('plan_cache_mode', 'force_generic_plan', true)";

async fn by_key(tx: &mut Transaction<'_, Postgres>) -> Result<(), sqlx::Error> {
    sqlx::query(BY_KEY).execute(&mut **tx).await?;
    Ok(())
}

/// The orders `order_ids` with their lines (those that exist).
async fn orders(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, Order>, sqlx::Error> {
    Ok(sqlx::query_as::<_, OrderRow>(concat!(
        "SELECT ",
        tidemark_orderlog::order_columns!(),
        " FROM ",
        tidemark_orderlog::order_from!(),
        " WHERE o.order_id = ANY($1)"
    ))
    .bind(order_ids)
    .fetch_all(conn)
    .await?
    .into_iter()
    .filter_map(|row| row.decode().ok().map(|order| (order.order_id, order)))
    .collect())
}

/// Resends of refunds already stored, answered from what is stored without the
/// orders' locks; `None` unless every ask is one. A stored adjustment and its
/// order never change, so the answer is the one the locked path would give
/// (`Done::Existing`). Without this a client that retries after a timeout queues
/// again behind every refund of the order: under a thousand clients refunding one
/// order (R18, on a loaded machine) the retries of committed refunds outlived
/// their deadlines in that queue, and for a minute no client saw its 2xx.
async fn resent(conn: &mut PgConnection, asks: &[Ask]) -> Result<Option<Vec<Done>>, sqlx::Error> {
    let mut requests = Vec::with_capacity(asks.len());
    for ask in asks {
        match ask {
            Ask::Refund { request, .. } => requests.push(request),
            Ask::Cancellation { .. } => return Ok(None),
        }
    }
    let ids: Vec<Uuid> = requests.iter().map(|r| r.refund_id).collect();
    // One lookup by primary key; a refund not stored yet goes the locked way.
    let stored = load(conn, &[], &ids).await?;
    if stored.len() < ids.iter().collect::<BTreeSet<_>>().len() {
        return Ok(None);
    }
    let order_ids: Vec<Uuid> = asks.iter().map(Ask::order_id).collect();
    let orders = orders(conn, &order_ids).await?;
    let mut done = Vec::with_capacity(asks.len());
    for (ask, request) in asks.iter().zip(requests) {
        let sent = serde_json::to_value(request).expect("a refund serializes");
        let same = stored
            .iter()
            .find(|s| s.adjustment.adjustment_id == request.refund_id);
        match (same, orders.get(&ask.order_id())) {
            (Some(same), Some(order))
                if same.adjustment.order_id == order.order_id
                    && same.request.as_ref() == Some(&sent) =>
            {
                done.push(Done::Existing(AdjustmentView::of(&same.adjustment, order)));
            }
            // Another request under a stored id (a conflict), or an unknown order:
            // the locked path answers it with the rest.
            _ => return Ok(None),
        }
    }
    Ok(Some(done))
}

type StoredRow = (
    Uuid,
    Uuid,
    String,
    DateTime<Utc>,
    Option<serde_json::Value>,
    Option<Vec<i16>>,
    Option<Vec<i32>>,
    Option<Vec<i64>>,
);

/// What the adjustments of the orders `$1` gave back, per order line.
pub const GIVEN_BACK: &str = "SELECT a.order_id, l.line_no, sum(l.quantity)::int8, sum(l.amount_minor)::int8 \
     FROM adjustments a JOIN adjustment_lines l USING (adjustment_id) \
     WHERE a.order_id = ANY($1) GROUP BY a.order_id, l.line_no";

/// The cancellations of the orders `$1` and the adjustments `$2`, with their lines.
pub const LOAD: &str = "SELECT a.adjustment_id, a.order_id, a.kind, a.created_at, a.request, \
     array_agg(l.line_no ORDER BY l.line_no) FILTER (WHERE l.line_no IS NOT NULL), \
     array_agg(l.quantity ORDER BY l.line_no) FILTER (WHERE l.line_no IS NOT NULL), \
     array_agg(l.amount_minor ORDER BY l.line_no) FILTER (WHERE l.line_no IS NOT NULL) \
     FROM adjustments a LEFT JOIN adjustment_lines l USING (adjustment_id) \
     WHERE (a.order_id = ANY($1) AND a.kind = 'cancellation') OR a.adjustment_id = ANY($2) \
     GROUP BY a.adjustment_id ORDER BY a.txid, a.seq";

/// What the adjustments of `order_ids` gave back so far, per order as one
/// adjustment holding each line's sums: all `remaining` needs, read in one row per
/// line, so a refund of an order refunded a thousand times costs what the first did.
async fn given_back(
    tx: &mut Transaction<'_, Postgres>,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, Adjustment>, sqlx::Error> {
    let rows: Vec<(Uuid, i16, i64, i64)> = sqlx::query_as(GIVEN_BACK)
        .bind(order_ids)
        .fetch_all(&mut **tx)
        .await?;
    let mut given: HashMap<Uuid, Adjustment> = HashMap::new();
    for (order_id, line_no, quantity, amount_minor) in rows {
        given
            .entry(order_id)
            .or_insert_with(|| Adjustment {
                adjustment_id: Uuid::nil(),
                order_id,
                kind: AdjustmentKind::Refund,
                created_at: DateTime::<Utc>::MIN_UTC,
                lines: Vec::new(),
            })
            .lines
            .push(AdjustedLine {
                line_no,
                // At most the line's units and amount: the checks kept them there.
                quantity: i32::try_from(quantity).expect("units given back fit the line's"),
                amount_minor,
            });
    }
    Ok(given)
}

/// The cancellations of `order_ids`, and the adjustments with `adjustment_ids` (a refund id may
/// have been used for another order).
async fn load(
    conn: &mut PgConnection,
    order_ids: &[Uuid],
    adjustment_ids: &[Uuid],
) -> Result<Vec<Stored>, sqlx::Error> {
    let rows: Vec<StoredRow> = sqlx::query_as(LOAD)
        .bind(order_ids)
        .bind(adjustment_ids)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, order_id, kind, created_at, request, nos, quantities, amounts)| {
                let lines = nos
                    .unwrap_or_default()
                    .into_iter()
                    .zip(quantities.unwrap_or_default())
                    .zip(amounts.unwrap_or_default())
                    .map(|((line_no, quantity), amount_minor)| AdjustedLine {
                        line_no,
                        quantity,
                        amount_minor,
                    })
                    .collect();
                Stored {
                    adjustment: Adjustment {
                        adjustment_id: id,
                        order_id,
                        kind: if kind == "cancellation" {
                            AdjustmentKind::Cancellation
                        } else {
                            AdjustmentKind::Refund
                        },
                        created_at,
                        lines,
                    },
                    request,
                }
            },
        )
        .collect())
}

async fn insert(tx: &mut Transaction<'_, Postgres>, s: &Stored) -> Result<(), sqlx::Error> {
    let a = &s.adjustment;
    sqlx::query(
        "WITH a AS ( \
           INSERT INTO adjustments (adjustment_id, order_id, kind, created_at, request) \
           VALUES ($1, $2, $3, $4, $5) RETURNING adjustment_id) \
         INSERT INTO adjustment_lines (adjustment_id, line_no, quantity, amount_minor) \
         SELECT a.adjustment_id, l.* FROM a, UNNEST($6::int2[], $7::int4[], $8::int8[]) \
           AS l(line_no, quantity, amount_minor)",
    )
    .bind(a.adjustment_id)
    .bind(a.order_id)
    .bind(a.kind.as_str())
    .bind(a.created_at)
    .bind(&s.request)
    .bind(a.lines.iter().map(|l| l.line_no).collect::<Vec<_>>())
    .bind(a.lines.iter().map(|l| l.quantity).collect::<Vec<_>>())
    .bind(a.lines.iter().map(|l| l.amount_minor).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
