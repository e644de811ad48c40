//! Step 5: publish — attach staging to `revenue_agg`, then flip the published state.

use tidemark_batchview::PublishedState;

use super::{AuditReport, Compactor, Kind, Result, Run, RunError};

impl Compactor {
    /// Copies staging into `revenue_agg`, then switches the published state in one
    /// Postgres transaction: the moment readers see the run.
    pub async fn publish(&self, run: &Run, report: &AuditReport) -> Result<()> {
        let staged = self.copy(run).await?;
        self.flip(run, report, staged).await
    }

    /// Attaches the run's staging partitions to `revenue_agg` (invisible to readers
    /// until the flip: they read published runs only). ClickHouse attaches all parts
    /// of a partition at once, sharing their files; a partition already holding the
    /// run's rows (an attempt that died between partitions) is skipped, so a rerun
    /// adds no row twice. Returns the rows staged.
    ///
    /// Sharded, every shard attaches its staging before the flip, so readers see
    /// the run on all shards or on none; an attempt that died between shards is
    /// completed by the next (the shards done skip their partitions).
    pub async fn copy(&self, run: &Run) -> Result<u64> {
        self.set_step(run, "publish").await?;
        let mut staged = 0;
        for shard in 0..self.shards.len() {
            staged += self.copy_to_shard(run, shard).await?;
        }
        Ok(staged)
    }

    /// Attaches the run's staging on one shard's writer (of
    /// [`Compactor::shards`]), then waits until each of the shard's other
    /// replicas has fetched what was attached (`SYSTEM SYNC REPLICA`, bounded by
    /// `clickhouse.timeout`): readers may ask any replica, so none may miss a
    /// published run. A replica that is down fails the run, which is retried;
    /// meanwhile the speed layer covers everything after the last published
    /// watermark. Returns the rows staged there.
    pub async fn copy_to_shard(&self, run: &Run, shard: usize) -> Result<u64> {
        let ch = &self.shards[shard];
        attach(ch, run, "buyers", &run.staging_buyers()).await?;
        let staged = attach(ch, run, "revenue_agg", &run.staging()).await?;
        for replica in self.replicas.get(shard).into_iter().flatten() {
            for table in ["buyers", "revenue_agg"] {
                replica
                    .query(&format!("SYSTEM SYNC REPLICA {table}"))
                    .execute()
                    .await?;
            }
        }
        Ok(staged)
    }

    /// Makes the run the published state, with its watermark and epoch.
    pub async fn flip(&self, run: &Run, report: &AuditReport, staged: u64) -> Result<()> {
        let mut tx = self.begin().await?;
        let base = match run.kind {
            Kind::Rebuild => run.run_id as i64,
            Kind::Incremental => PublishedState::load(&mut *tx)
                .await?
                .map_or(run.run_id, |p| p.base_run_id) as i64,
        };
        let claimed = sqlx::query(
            "UPDATE batch_runs SET status = 'published', step = 'published', rows_in = $2, \
               rows_out = $3, audit = $4, finished_at = now() \
             WHERE run_id = $1 AND status = 'running'",
        )
        .bind(run.run_id as i64)
        .bind(report.source.values().map(|t| t.orders).sum::<i64>())
        .bind(staged as i64)
        .bind(sqlx::types::Json(report))
        .execute(&mut *tx)
        .await?;
        if claimed.rows_affected() == 1 {
            sqlx::query(
                "INSERT INTO batch_state (run_id, base_run_id, epoch, threshold, watermark_time, published_at) \
                 VALUES ($1, $2, $3, $4::int8::text::xid8, $5, now()) \
                 ON CONFLICT (singleton) DO UPDATE SET run_id = EXCLUDED.run_id, \
                   base_run_id = EXCLUDED.base_run_id, epoch = EXCLUDED.epoch, \
                   threshold = EXCLUDED.threshold, watermark_time = EXCLUDED.watermark_time, \
                   published_at = EXCLUDED.published_at",
            )
            .bind(run.run_id as i64)
            .bind(base)
            .bind(run.epoch as i64)
            .bind(run.threshold as i64)
            .bind(run.cut_at)
            .execute(&mut *tx)
            .await?;
        }
        self.commit(tx).await?;
        tracing::info!(run_id = run.run_id, rows = staged, "Published a batch run");
        self.repair().await
    }

    /// Brings ClickHouse in line with the published state after a crash between
    /// the publish and its follow-ups: mirrors the publication, drops staging
    /// tables of published runs (on every shard).
    pub async fn repair(&self) -> Result<()> {
        let Some(state) = PublishedState::load(&self.pool).await? else {
            return Ok(());
        };
        // Every shard mirrors the publication (each tells which of its runs count).
        for ch in &self.shards {
            ch.query(
                "INSERT INTO batch_publications (run_id, base_run_id, watermark_txid, \
                   watermark_time, published_at) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(state.run_id)
            .bind(state.base_run_id)
            .bind(state.threshold)
            .bind(state.watermark_time.timestamp().max(0) as u32)
            .bind(state.published_at.timestamp().max(0) as u32)
            .execute()
            .await?;
            let tables: Vec<String> = ch
                .query(
                    "SELECT name FROM system.tables WHERE database = currentDatabase() \
                     AND (name LIKE 'staging_run_%' OR name LIKE 'staging_buyers_run_%')",
                )
                .fetch_all()
                .await?;
            for table in tables {
                let Some(run_id) = super::staging_run_id(&table) else {
                    continue;
                };
                let status: Option<String> =
                    sqlx::query_scalar("SELECT status FROM batch_runs WHERE run_id = $1")
                        .bind(run_id)
                        .fetch_optional(&self.pool)
                        .await?;
                if status.as_deref() == Some("published") {
                    ch.query(&format!("DROP TABLE IF EXISTS {table}"))
                        .execute()
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Attaches the partitions of `staging` that `table` does not hold rows of the run
/// in yet, on the server of `ch`. Returns the rows staged.
///
/// Only when `staging` is laid out as `table` is (engine, partitioning, order
/// and settings; see [`layout`]): ClickHouse 18.16 attaches the parts of a
/// table with another `index_granularity` without a word and then reads them
/// wrong (tried: 81,920 rows counted of 635,191), so a staging table made from a
/// definition other than the live table's fails the run instead.
async fn attach(ch: &clickhouse::Client, run: &Run, table: &str, staging: &str) -> Result<u64> {
    let engines: Vec<(String, String)> = ch
        .query(
            "SELECT name, engine_full FROM system.tables \
             WHERE database = currentDatabase() AND name IN (?, ?)",
        )
        .bind(table)
        .bind(staging)
        .fetch_all()
        .await?;
    let layout_of = |name: &str| {
        engines
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, engine)| layout(engine))
    };
    match (layout_of(table), layout_of(staging)) {
        (Some(live), Some(staged)) if live == staged => {}
        (live, staged) => {
            return Err(RunError::Publish(format!(
                "{staging} is not laid out as {table} is ({staged:?} against {live:?}); \
                 its partitions are not attached"
            )));
        }
    }
    let partitions: Vec<String> = ch
        .query(
            "SELECT DISTINCT partition_id FROM system.parts \
             WHERE database = currentDatabase() AND table = ? AND active",
        )
        .bind(staging)
        .fetch_all()
        .await?;
    // Both tables are partitioned by toYYYYMM(bucket) (migrations/clickhouse): a
    // partition's id is that number.
    let attached: Vec<String> = ch
        .query(&format!(
            "SELECT DISTINCT toString(toYYYYMM(bucket)) FROM {table} WHERE run_id = ?"
        ))
        .bind(run.run_id)
        .fetch_all()
        .await?;
    for partition in partitions.iter().filter(|p| !attached.contains(p)) {
        if !partition
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(RunError::Publish(format!(
                "unexpected partition id `{partition}` in {staging}"
            )));
        }
        ch.query(&format!(
            "ALTER TABLE {table} ATTACH PARTITION ID '{partition}' FROM {staging}"
        ))
        .execute()
        .await?;
    }
    Ok(ch
        .query(&format!("SELECT count() FROM {staging}"))
        .fetch_one()
        .await?)
}

/// What must agree for a partition to move between two MergeTree tables, from an
/// `engine_full` of `system.tables`: the engine's kind without `Replicated` and
/// its arguments (a replica's ZooKeeper path), and everything from `PARTITION BY`
/// on — partitioning, sorting key and settings such as `index_granularity`.
fn layout(engine_full: &str) -> Option<(&str, &str)> {
    let kind_end = engine_full.find(['(', ' ']).unwrap_or(engine_full.len());
    let kind = &engine_full[..kind_end];
    let kind = kind.strip_prefix("Replicated").unwrap_or(kind);
    let rest = &engine_full[engine_full.find(" PARTITION BY ")?..];
    Some((kind, rest.trim()))
}

#[cfg(test)]
mod tests {
    use super::layout;

    #[test]
    fn a_replica_and_its_staging_share_a_layout_which_another_granule_breaks() {
        let plain = "ReplacingMergeTree PARTITION BY toYYYYMM(bucket) ORDER BY (bucket, run_id) \
                     SETTINGS index_granularity = 8192";
        let replicated = "ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/t/revenue_agg', \
                          '{replica}') PARTITION BY toYYYYMM(bucket) ORDER BY (bucket, run_id) \
                          SETTINGS index_granularity = 8192";
        assert_eq!(layout(plain), layout(replicated));
        assert!(layout(plain).is_some());
        let finer = plain.replace("8192", "1024");
        assert_ne!(layout(plain), layout(&finer));
        let other_kind = plain.replace("ReplacingMergeTree", "MergeTree");
        assert_ne!(layout(plain), layout(&other_kind));
        let by_day = plain.replace("toYYYYMM(", "toYYYYMMDD(");
        assert_ne!(layout(plain), layout(&by_day));
        assert_eq!(layout("Memory"), None);
    }
}
