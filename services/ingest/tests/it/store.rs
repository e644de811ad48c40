//! What the schema keeps true of the stored orders whatever writes them
//! (migration `0015_order_lines_checked_per_statement.sql`).

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::random_order;

/// The SQLSTATE of a statement's error.
fn code(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> String {
    let error = result.expect_err("the statement is refused");
    error
        .as_database_error()
        .and_then(sqlx::error::DatabaseError::code)
        .map(std::borrow::Cow::into_owned)
        .unwrap_or_else(|| panic!("not a database error: {error}"))
}

/// A line needs its order, checked once per statement: lines of orders inserted in
/// the same statement (what ingest writes) pass, one line of a missing order fails
/// the whole statement; orders are never removed or renumbered, and a line never
/// moves to another order.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_needs_its_order_and_orders_are_never_removed() {
    let db = tidemark_testkit::postgres().await;
    let mut rng = StdRng::seed_from_u64(15);
    let (kept, other) = (random_order(&mut rng), random_order(&mut rng));
    tidemark_testkit::insert(&db.pool, &kept).await;
    tidemark_testkit::insert(&db.pool, &other).await;
    let lines = |pool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM order_lines")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    let before = lines(&db.pool).await;
    assert_eq!(before, (kept.lines.len() + other.lines.len()) as i64);

    // Three lines in one statement, the middle one of an order that does not exist.
    let orphan = uuid::Uuid::new_v4();
    let mixed = sqlx::query(
        "INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
                                  unit_price_minor) \
         VALUES ($1, 90, 'p-x', 'books', 1, 100), ($2, 1, 'p-x', 'books', 1, 100), \
                ($3, 90, 'p-x', 'books', 1, 100)",
    )
    .bind(kept.order_id)
    .bind(orphan)
    .bind(other.order_id)
    .execute(&db.pool)
    .await;
    assert_eq!(code(mixed), "23503", "a line without its order");
    assert_eq!(
        lines(&db.pool).await,
        before,
        "nothing of the statement stays"
    );

    // Lines of existing orders pass.
    sqlx::query(
        "INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, \
                                  unit_price_minor) \
         VALUES ($1, 90, 'p-x', 'books', 1, 100)",
    )
    .bind(kept.order_id)
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(lines(&db.pool).await, before + 1);

    for refused in [
        "DELETE FROM orders",
        "TRUNCATE orders CASCADE",
        "UPDATE orders SET order_id = gen_random_uuid()",
        "UPDATE order_lines SET order_id = gen_random_uuid()",
    ] {
        let result = sqlx::raw_sql(refused).execute(&db.pool).await;
        assert_eq!(code(result), "23001", "{refused}");
    }
    assert_eq!(lines(&db.pool).await, before + 1);
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(orders, 2);
}
