//! Committing orders: one transaction per request (single orders of concurrent
//! requests share one: see `group`), idempotent on `order_id`.
//!
//! A resent identical order is a duplicate (no second row); the same id with other
//! content is a conflict, and then nothing of the request is stored. Concurrent
//! inserts of one id serialise on the primary key: the later one waits for the
//! earlier to commit, then sees its row. Rows are inserted in id order, so two
//! batches sharing ids cannot deadlock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sqlx::PgPool;
use tidemark_domain::Order;
use tidemark_orderlog::OrderRow;
use uuid::Uuid;

/// What a committed request did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub created: usize,
    /// Ids already stored with identical content (or repeated within the request).
    pub duplicates: Vec<Uuid>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// These ids exist (or repeat in the request) with different content.
    #[error("conflicting orders")]
    Conflict(Vec<Uuid>),
    /// Shared by every order of a group that failed together.
    #[error(transparent)]
    Database(Arc<sqlx::Error>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(Arc::new(e))
    }
}

/// Stores the orders in one transaction.
pub async fn store(pool: &PgPool, orders: &[Order]) -> Result<Outcome, StoreError> {
    // Repeats inside the request: identical ones are duplicates, others conflicts.
    let mut first: HashMap<Uuid, &Order> = HashMap::with_capacity(orders.len());
    let mut duplicates = Vec::new();
    let mut conflicts = Vec::new();
    let mut unique: Vec<&Order> = Vec::with_capacity(orders.len());
    for order in orders {
        match first.get(&order.order_id) {
            None => {
                first.insert(order.order_id, order);
                unique.push(order);
            }
            Some(seen) if *seen == order => duplicates.push(order.order_id),
            Some(_) => conflicts.push(order.order_id),
        }
    }
    if !conflicts.is_empty() {
        return Err(StoreError::Conflict(conflicts));
    }
    // Every transaction takes its unique-index locks in the same (id) order, so
    // concurrent batches sharing ids wait for each other instead of deadlocking.
    unique.sort_unstable_by_key(|o| o.order_id);

    // One order needs no explicit transaction: the statement is atomic, and a
    // duplicate or conflict inserts nothing, so there is nothing to roll back.
    // That is one round trip instead of three on the hottest path.
    if let [order] = unique.as_slice() {
        return store_one(pool, order, duplicates).await;
    }

    // A batch of new orders (the common case) is copied: `COPY` skips the
    // statement's per-row conflict handling and its join of lines to the orders
    // inserted (`bench ingest`: 12–13 % more orders/s). Should one of them be
    // stored already (a resent batch), it stores nothing and the batch takes the
    // statement below, which tells new orders from duplicates.
    if unique.len() >= COPY_FROM {
        if copy_new(pool, &unique).await? {
            return Ok(Outcome {
                created: unique.len(),
                duplicates,
            });
        }
        metrics::counter!("ingest_batch_copy_fallbacks_total").increment(1);
    }

    let mut tx = pool.begin().await?;
    let inserted: Vec<Uuid> = insert(&unique).fetch_all(&mut *tx).await?;

    let created = inserted.len();
    if created < unique.len() {
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
        let others: Vec<Uuid> = unique
            .iter()
            .map(|o| o.order_id)
            .filter(|id| !inserted.contains(id))
            .collect();
        for row in existing(&others).fetch_all(&mut *tx).await? {
            let id = row.order_id;
            if row.holds(first[&id]) {
                duplicates.push(id);
            } else {
                conflicts.push(id);
            }
        }
    }
    if !conflicts.is_empty() {
        tx.rollback().await?;
        return Err(StoreError::Conflict(conflicts));
    }
    tx.commit().await?;
    Ok(Outcome {
        created,
        duplicates,
    })
}

async fn store_one(
    pool: &PgPool,
    order: &Order,
    mut duplicates: Vec<Uuid>,
) -> Result<Outcome, StoreError> {
    if !insert(&[order]).fetch_all(pool).await?.is_empty() {
        return Ok(Outcome {
            created: 1,
            duplicates,
        });
    }
    match existing(&[order.order_id]).fetch_optional(pool).await? {
        Some(row) if row.holds(order) => {
            duplicates.push(order.order_id);
            Ok(Outcome {
                created: 0,
                duplicates,
            })
        }
        Some(_) => Err(StoreError::Conflict(vec![order.order_id])),
        // Inserted by a transaction that then rolled back: try again.
        None => Box::pin(store_one(pool, order, duplicates)).await,
    }
}

/// Batches of at least this many orders are first tried with `COPY`.
const COPY_FROM: usize = 16;

/// Copies `orders` and their lines in one transaction if none of them is
/// stored yet; `false` (nothing stored) if one is. The rows go in the order
/// given (by id), so concurrent batches sharing ids wait for each other in one
/// order, as the statement's do; one that waited for a batch holding its id
/// finds it stored once that batch commits.
pub async fn copy_new(pool: &PgPool, orders: &[&Order]) -> Result<bool, sqlx::Error> {
    let (order_rows, line_rows) = copy_rows(orders)?;
    let mut tx = pool.begin().await?;
    let copied = async {
        let mut copy = tx
            .copy_in_raw(
                "COPY orders (order_id, user_id, city, currency, created_at) \
                 FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        copy.send(order_rows).await?;
        copy.finish().await?;
        let mut copy = tx
            .copy_in_raw(
                "COPY order_lines (order_id, line_no, product_id, category, quantity, \
                                   unit_price_minor) \
                 FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        copy.send(line_rows).await?;
        copy.finish().await
    }
    .await;
    match copied {
        Ok(_) => {
            tx.commit().await?;
            Ok(true)
        }
        Err(e)
            if e.as_database_error()
                .is_some_and(sqlx::error::DatabaseError::is_unique_violation) =>
        {
            tx.rollback().await?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The orders' rows and their lines' rows as `COPY … (FORMAT csv)` takes them.
/// Every text is quoted, so an empty one stays a value (unquoted, it would be
/// `NULL`); times are written to the microsecond, what Postgres keeps (the
/// statement's binding truncates the same way).
fn copy_rows(orders: &[&Order]) -> Result<(Vec<u8>, Vec<u8>), sqlx::Error> {
    fn writer() -> csv::Writer<Vec<u8>> {
        csv::WriterBuilder::new()
            .quote_style(csv::QuoteStyle::NonNumeric)
            .from_writer(Vec::new())
    }
    fn done(w: csv::Writer<Vec<u8>>) -> Result<Vec<u8>, sqlx::Error> {
        w.into_inner()
            .map_err(|e| sqlx::Error::Encode(Box::new(e.into_error())))
    }
    let encode = |e: csv::Error| sqlx::Error::Encode(Box::new(e));
    let (mut order_rows, mut line_rows) = (writer(), writer());
    for order in orders {
        let id = order.order_id.to_string();
        order_rows
            .write_record([
                id.as_str(),
                &order.user_id,
                &order.city,
                order.currency.as_str(),
                &order
                    .created_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ])
            .map_err(encode)?;
        for (no, line) in (1..).zip(&order.lines) {
            line_rows
                .serialize((
                    id.as_str(),
                    no,
                    &line.product_id,
                    &line.category,
                    line.quantity,
                    line.unit_price_minor,
                ))
                .map_err(encode)?;
        }
    }
    Ok((done(order_rows)?, done(line_rows)?))
}

type Insert<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, Uuid, sqlx::postgres::PgArguments>;

/// Inserts the orders not stored yet and their lines, in one statement; returns
/// the ids it inserted (the lines of an order that was already there are not
/// written again).
pub(crate) fn insert<'q>(orders: &[&Order]) -> Insert<'q> {
    let lines = || {
        orders
            .iter()
            .flat_map(|o| o.lines.iter().map(move |l| (o, l)))
    };
    sqlx::query_scalar(
        "WITH new AS ( \
           INSERT INTO orders (order_id, user_id, city, currency, created_at) \
           SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
                                $5::timestamptz[]) \
           ON CONFLICT (order_id) DO NOTHING \
           RETURNING order_id \
         ), lines AS ( \
           INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
                                    unit_price_minor) \
           SELECT l.* FROM UNNEST($6::uuid[], $7::int2[], $8::text[], $9::text[], \
                                  $10::int4[], $11::int8[]) \
             AS l(order_id, line_no, product_id, category, quantity, unit_price_minor) \
           JOIN new USING (order_id) \
         ) \
         SELECT order_id FROM new",
    )
    .bind(orders.iter().map(|o| o.order_id).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.user_id.clone()).collect::<Vec<_>>())
    .bind(orders.iter().map(|o| o.city.clone()).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .map(|o| o.currency.as_str().to_owned())
            .collect::<Vec<_>>(),
    )
    .bind(orders.iter().map(|o| o.created_at).collect::<Vec<_>>())
    .bind(lines().map(|(o, _)| o.order_id).collect::<Vec<_>>())
    .bind(
        orders
            .iter()
            .flat_map(|o| (1..=o.lines.len()).map(|n| n as i16))
            .collect::<Vec<_>>(),
    )
    .bind(
        lines()
            .map(|(_, l)| l.product_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(lines().map(|(_, l)| l.category.clone()).collect::<Vec<_>>())
    .bind(lines().map(|(_, l)| l.quantity).collect::<Vec<_>>())
    .bind(lines().map(|(_, l)| l.unit_price_minor).collect::<Vec<_>>())
}

type Select<'q> = sqlx::query::QueryAs<'q, sqlx::Postgres, OrderRow, sqlx::postgres::PgArguments>;

pub(crate) fn existing<'q>(ids: &[Uuid]) -> Select<'q> {
    sqlx::query_as(concat!(
        "SELECT ",
        tidemark_orderlog::order_columns!(),
        " FROM ",
        tidemark_orderlog::order_from!(),
        " WHERE o.order_id = ANY($1)"
    ))
    .bind(ids.to_vec())
}
