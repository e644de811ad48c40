//! Step 1: plan a run (or resume the one in progress) and wait for the relay.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tidemark_batchview::PublishedState;
use tidemark_orderlog::epochs;

use super::{Compactor, Kind, Result, Run, manifest};

impl Compactor {
    /// The run in progress, if any.
    pub async fn pending(&self) -> Result<Option<Run>> {
        let row: Option<(i64, String, i64, i64, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT r.run_id, r.kind, r.epoch, r.from_threshold::text::int8, \
                    r.threshold::text::int8, c.created_at \
             FROM batch_runs r JOIN speed_cuts c USING (epoch) WHERE r.status = 'running'",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(run_id, kind, epoch, from, threshold, cut_at)| Run {
                run_id: run_id as u64,
                kind: if kind == "rebuild" {
                    Kind::Rebuild
                } else {
                    Kind::Incremental
                },
                epoch: epoch as u64,
                from_threshold: from as u64,
                threshold: threshold as u64,
                cut_at,
                token: self.token(),
            }),
        )
    }

    /// Cuts a new epoch and records the run, in one transaction.
    pub async fn plan(&self, kind: Kind) -> Result<Run> {
        let mut tx = self.begin().await?;
        let published = PublishedState::load(&mut *tx).await?;
        let from_threshold = published.map_or(0, |p| p.threshold);
        let (epoch, threshold) = epochs::cut(&mut *tx).await?;
        let (run_id, cut_at): (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO batch_runs (run_id, kind, epoch, from_threshold, threshold, status) \
             SELECT COALESCE(max(run_id), 0) + 1, $1, $2, $3::int8::text::xid8, \
                    $4::int8::text::xid8, 'running' FROM batch_runs \
             RETURNING run_id, (SELECT created_at FROM speed_cuts WHERE epoch = $2)",
        )
        .bind(kind.as_str())
        .bind(epoch as i64)
        .bind(from_threshold as i64)
        .bind(threshold as i64)
        .fetch_one(&mut *tx)
        .await?;
        self.commit(tx).await?;
        tracing::info!(
            run_id,
            kind = kind.as_str(),
            epoch,
            threshold,
            "Planned a batch run"
        );
        Ok(Run {
            run_id: run_id as u64,
            kind,
            epoch,
            from_threshold,
            threshold,
            cut_at,
            token: self.token(),
        })
    }

    /// True once the relay has landed every row below the run's threshold.
    pub async fn wait_for_relay(&self, run: &Run) -> Result<bool> {
        self.set_step(run, "wait_for_relay").await?;
        let deadline = Instant::now() + self.settings.relay_wait;
        loop {
            let horizon = manifest::relay_horizon(&self.pool).await?;
            if horizon.is_some_and(|h| h >= run.threshold) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
