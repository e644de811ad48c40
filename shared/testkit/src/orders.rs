//! Orders for tests: one generator of random valid orders, and the raw insert
//! that writes a row to the log by SQL, bypassing ingest (for tests of the log
//! consumers that control transactions themselves).

use chrono::{SubsecRound, TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use tidemark_domain::{Order, OrderLine};
use uuid::Uuid;

/// A random valid order. Event times: four in five within the last hour, the
/// rest up to three days late (so runs and epochs span several days). Baskets of
/// one to four lines, each of a different product, often two of one category
/// (an order counts once per value it contains). Values a store's encoding must
/// survive come up often: a city with non-ASCII letters, a product id with colons
/// (the speed view's field separator), a currency without minor units (JPY) and
/// one with three decimals (KWD).
pub fn random_order(rng: &mut StdRng) -> Order {
    let age = if rng.random_bool(0.8) {
        rng.random_range(0..3_600)
    } else {
        rng.random_range(3_600..259_200)
    };
    let lines = [1, 1, 2, 3, 4][rng.random_range(0..5)];
    let first = rng.random_range(0..30);
    Order {
        order_id: Uuid::from_u128(rng.random()),
        user_id: format!("u-{}", rng.random_range(0..100)),
        city: ["Berlin", "Paris", "São Paulo", "Zürich", "Oslo"][rng.random_range(0..5)].into(),
        currency: ["EUR", "USD", "JPY", "KWD"][rng.random_range(0..4)]
            .parse()
            .expect("listed currencies are accepted"),
        created_at: (Utc::now() - TimeDelta::seconds(age)).trunc_subsecs(6),
        lines: (0..lines)
            .map(|i| {
                let product = (first + i * 7) % 30;
                OrderLine {
                    product_id: if product % 3 == 0 {
                        format!("p:{product}")
                    } else {
                        format!("p-{product}")
                    },
                    category: ["books", "games", "garden"][rng.random_range(0..3)].into(),
                    quantity: rng.random_range(1..6),
                    unit_price_minor: rng.random_range(1..100_000),
                }
            })
            .collect(),
    }
}

/// Inserts `n` one-line orders, each refunded once, by SQL in one batch: the log's
/// four tables filled for a test of how they are read (plans, scans), not of what
/// the rows hold.
pub async fn insert_refunded(db: impl sqlx::PgExecutor<'_>, n: i32) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO orders (order_id, user_id, city, currency, created_at) \
           SELECT gen_random_uuid(), 'u', 'Berlin', 'EUR', now() FROM generate_series(1, {n}); \
         INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
                                  unit_price_minor) \
           SELECT order_id, 1, 'p-1', 'books', 2, 100 FROM orders; \
         INSERT INTO adjustments (adjustment_id, order_id, kind, created_at) \
           SELECT gen_random_uuid(), order_id, 'refund', now() FROM orders; \
         INSERT INTO adjustment_lines (adjustment_id, line_no, quantity, amount_minor) \
           SELECT adjustment_id, 1, 1, 100 FROM adjustments"
    )))
    .execute(db)
    .await
    .expect("refunded orders inserted");
}

/// Inserts `order` into the log by SQL, in the caller's transaction if given
/// one: what ingest's store does for one new order, without its checks.
pub async fn insert(db: impl sqlx::PgExecutor<'_>, order: &Order) {
    insert_as(db, order, order.currency.as_str()).await;
}

/// Inserts `order` with `currency` as stored: a code this build may not know
/// (what an older or newer writer, or SQL by hand, could leave in the log). The
/// order and its lines are one statement, so one transaction.
pub async fn insert_as(db: impl sqlx::PgExecutor<'_>, order: &Order, currency: &str) {
    let column = |f: fn(&OrderLine) -> String| order.lines.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "WITH o AS ( \
           INSERT INTO orders (order_id, user_id, city, currency, created_at) \
           VALUES ($1, $2, $3, $4, $5) RETURNING order_id) \
         INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
           unit_price_minor) \
         SELECT o.order_id, l.n, l.product_id, l.category, l.quantity, l.price \
         FROM o, UNNEST($6::text[], $7::text[], $8::int4[], $9::int8[]) \
           WITH ORDINALITY AS l(product_id, category, quantity, price, n)",
    )
    .bind(order.order_id)
    .bind(&order.user_id)
    .bind(&order.city)
    .bind(currency)
    .bind(order.created_at)
    .bind(column(|l| l.product_id.clone()))
    .bind(column(|l| l.category.clone()))
    .bind(order.lines.iter().map(|l| l.quantity).collect::<Vec<_>>())
    .bind(
        order
            .lines
            .iter()
            .map(|l| l.unit_price_minor)
            .collect::<Vec<_>>(),
    )
    .execute(db)
    .await
    .expect("insert into orders and order_lines");
}

/// A log with a row this build cannot decode between two runs of good ones, each
/// group committed in a transaction of its own (so the undecodable row's
/// transaction id separates them): for tests of how consumers stop at such a row.
pub struct Straddle {
    pub before: Vec<Order>,
    /// Stored with the currency `XYZ`, which is no ISO 4217 code.
    pub undecodable: Order,
    pub after: Vec<Order>,
    /// The undecodable row's `(txid, seq)`.
    pub position: (i64, i64),
}

impl Straddle {
    /// Writes `n` orders, the undecodable one, then `n` more.
    pub async fn write(pool: &sqlx::PgPool, seed: u64, n: usize) -> Straddle {
        use rand::SeedableRng;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut orders =
            |n: usize| -> Vec<Order> { (0..n).map(|_| random_order(&mut rng)).collect() };
        let (before, undecodable, after) = (orders(n), orders(1).remove(0), orders(n));
        for (batch, currency) in [
            (&before, None),
            (&vec![undecodable.clone()], Some("XYZ")),
            (&after, None),
        ] {
            let mut tx = pool.begin().await.expect("begin");
            for order in batch {
                insert_as(&mut *tx, order, currency.unwrap_or(order.currency.as_str())).await;
            }
            tx.commit().await.expect("commit");
        }
        let position =
            sqlx::query_as("SELECT txid::text::int8, seq FROM orders WHERE order_id = $1")
                .bind(undecodable.order_id)
                .fetch_one(pool)
                .await
                .expect("the undecodable row's position");
        Straddle {
            before,
            undecodable,
            after,
            position,
        }
    }

    /// Makes the row readable (as a newer build or a corrected row would).
    pub async fn repair(&self, pool: &sqlx::PgPool) {
        sqlx::query("UPDATE orders SET currency = 'EUR' WHERE order_id = $1")
            .bind(self.undecodable.order_id)
            .execute(pool)
            .await
            .expect("repair the row");
    }

    /// `txid_seq`, as the consumers name the row.
    pub fn position_text(&self) -> String {
        format!("{}_{}", self.position.0, self.position.1)
    }
}
