//! Whether a statement keeps to the indexes whatever the planner's estimates:
//! pools whose planner favours reading tables whole, and a count of the
//! sequential scans that reveals it.

use sqlx::PgPool;

use crate::TestDb;

/// A pool of one connection to `db` whose planner favours reading tables whole:
/// every statement gets a generic plan (`plan_cache_mode`) and index scans look
/// dear (`cpu_index_tuple_cost`) — what a log read's generic plan met once
/// `ANALYZE` had run on a fresh log. One connection, so [`seq_scans`] after a
/// read counts all it did; a test wanting two plans of one statement takes two
/// pools, as a plan a connection keeps is not planned again for another
/// transaction's settings.
pub fn skewed_pool(db: &TestDb) -> PgPool {
    tidemark_platform::postgres::pool_with(
        &db.config,
        "skewed",
        1,
        &[
            ("plan_cache_mode", "force_generic_plan"),
            ("cpu_index_tuple_cost", "100"),
        ],
    )
    .expect("skewed pool")
}

/// Sequential scans of `tables` so far in the database, once `pool`'s own backend
/// has flushed its counts (it does when the first statement here ends). The
/// counts are the database's: other connections' must have ended first
/// ([`TestDb::close_and_settle`]).
pub async fn seq_scans(pool: &PgPool, tables: &[&str]) -> i64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(pool)
        .await
        .expect("statistics flushed");
    sqlx::query_scalar(
        "SELECT coalesce(sum(seq_scan), 0)::int8 FROM pg_stat_user_tables \
         WHERE relname = ANY($1)",
    )
    .bind(tables)
    .fetch_one(pool)
    .await
    .expect("sequential scans read")
}

/// Gathers the log's tables' statistics, as autovacuum's `ANALYZE` does.
pub async fn analyze_log(pool: &PgPool) {
    sqlx::query("ANALYZE orders, order_lines, adjustments, adjustment_lines, customer_changes")
        .execute(pool)
        .await
        .expect("log analyzed");
}
