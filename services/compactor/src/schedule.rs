//! `serve`'s loop: a run at least every `interval`, sooner once `min_new_rows`
//! orders have landed past the published watermark.

use std::sync::Arc;
use std::time::Instant;

use tidemark_batchview::PublishedState;
use tokio_util::sync::CancellationToken;

use crate::run::{self, Compactor, Kind};

pub(crate) async fn schedule(compactor: Arc<Compactor>, shutdown: CancellationToken) {
    let settings = compactor.settings.clone();
    let mut last_run: Option<Instant> = None;
    while !shutdown.is_cancelled() {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.check_interval) => {}
        }
        let pool = compactor.pool.clone();
        let state = PublishedState::load(&pool).await.ok().flatten();
        let threshold = state.as_ref().map_or(0, |s| s.threshold);
        if let Some(state) = &state {
            run::set_batch_lag(state);
        }
        let due = last_run.is_none_or(|t| t.elapsed() >= settings.interval)
            || new_rows(pool, threshold, settings.min_new_rows).await >= settings.min_new_rows;
        if !due {
            continue;
        }
        last_run = Some(Instant::now());
        let mut run = {
            let compactor = compactor.clone();
            tokio::spawn(async move { compactor.run_once(Kind::Incremental).await })
        };
        // A run cut short by shutdown is resumed by the next start.
        tokio::select! {
            () = shutdown.cancelled() => {
                run.abort();
                return;
            }
            outcome = &mut run => match outcome {
                Ok(Ok(outcome)) => tracing::info!(?outcome, "Batch run finished"),
                Ok(Err(e)) => {
                    metrics::counter!("compactor_errors_total").increment(1);
                    tracing::warn!(error = %e, "Batch run failed; retrying later");
                }
                Err(e) => tracing::error!(error = %e, "Batch run panicked"),
            }
        }
    }
}

/// Orders past the published watermark, counted up to `cap`.
async fn new_rows(pool: sqlx::PgPool, threshold: u64, cap: i64) -> i64 {
    let threshold = threshold as i64;
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM orders WHERE txid >= $1::int8::text::xid8 LIMIT $2) n",
    )
    .bind(threshold)
    .bind(cap)
    .fetch_one(&pool)
    .await
    .unwrap_or(0)
}
