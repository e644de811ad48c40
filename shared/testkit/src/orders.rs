//! Orders for tests: one generator of random valid orders, and the raw insert
//! that writes a row to the log by SQL, bypassing ingest (for tests of the log
//! consumers that control transactions themselves).

use chrono::{SubsecRound, TimeDelta, Utc};
use rand::Rng;
use rand::rngs::StdRng;
use tidemark_domain::Order;
use uuid::Uuid;

/// A random valid order. Event times: four in five within the last hour, the
/// rest up to three days late (so runs and epochs span several days). Values a
/// store's encoding must survive come up often: a city with non-ASCII letters, a
/// product id with colons (the speed view's field separator), a currency without
/// minor units (JPY) and one with three decimals (KWD).
pub fn random_order(rng: &mut StdRng) -> Order {
    let age = if rng.random_bool(0.8) {
        rng.random_range(0..3_600)
    } else {
        rng.random_range(3_600..259_200)
    };
    let product = rng.random_range(0..30);
    Order {
        order_id: Uuid::from_u128(rng.random()),
        user_id: format!("u-{}", rng.random_range(0..100)),
        city: ["Berlin", "Paris", "São Paulo", "Zürich", "Oslo"][rng.random_range(0..5)].into(),
        product_id: if product % 3 == 0 {
            format!("p:{product}")
        } else {
            format!("p-{product}")
        },
        category: ["books", "games", "garden"][rng.random_range(0..3)].into(),
        quantity: rng.random_range(1..6),
        unit_price_minor: rng.random_range(1..100_000),
        currency: ["EUR", "USD", "JPY", "KWD"][rng.random_range(0..4)]
            .parse()
            .expect("listed currencies are accepted"),
        created_at: (Utc::now() - TimeDelta::seconds(age)).trunc_subsecs(6),
    }
}

/// Inserts `order` into the log by SQL, in the caller's transaction if given
/// one: what ingest's store does for one new order, without its checks.
pub async fn insert(db: impl sqlx::PgExecutor<'_>, order: &Order) {
    insert_as(db, order, order.currency.as_str()).await;
}

/// Inserts `order` with `currency` as stored: a code this build may not know
/// (what an older or newer writer, or SQL by hand, could leave in the log).
pub async fn insert_as(db: impl sqlx::PgExecutor<'_>, order: &Order, currency: &str) {
    sqlx::query(
        "INSERT INTO orders (order_id, user_id, city, product_id, category, quantity, \
           unit_price_minor, currency, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
    )
    .bind(order.order_id)
    .bind(&order.user_id)
    .bind(&order.city)
    .bind(&order.product_id)
    .bind(&order.category)
    .bind(order.quantity)
    .bind(order.unit_price_minor)
    .bind(currency)
    .bind(order.created_at)
    .execute(db)
    .await
    .expect("insert into orders");
}
