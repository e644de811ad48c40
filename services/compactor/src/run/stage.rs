//! Step 3: stage the run's aggregates in a table of its own.

use std::time::Instant;

use clickhouse::insert::Insert;
use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;

use super::{Compactor, Result, Run, RunError};

/// Cells or buyers made into staged rows at once: made a whole insert batch at a
/// time (a third of a run's cells, with their joined values), they held
/// gigabytes in a run of 10M orders.
const ROWS_AT_ONCE: usize = 65_536;
use crate::aggregate;

impl Compactor {
    /// Writes the run's aggregates to a staging table of its own (rebuilt from
    /// scratch on every attempt), shaped like `revenue_agg` so that publishing can
    /// attach its partitions; sharded, each shard's staging holds the rows of its
    /// days ([`tidemark_batchview::shard_of`]). Returns the rows staged.
    pub async fn stage(&self, run: &Run, source: &DataFrame) -> Result<u64> {
        /// Inserts running at once: ClickHouse parses and writes each on threads of
        /// its own while this process serialises the next.
        const INSERTS: usize = 3;
        self.set_step(run, "stage").await?;
        let t = Instant::now();
        let orders = source.clone();
        let aggregates = tokio::task::spawn_blocking(move || aggregate::grids(&orders))
            .await
            .expect("the aggregation task does not panic")?;
        let aggregate_ms = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        let staging = run.staging();
        self.create_staging(&staging, "revenue_agg").await?;
        let staged: usize = aggregates.grids.iter().map(|g| g.cells.height()).sum();
        // The grids in batches of about a third of the rows each (ClickHouse writes
        // each INSERT as a few parts, so few large ones), as zero-copy slices. The
        // grids come in revenue_agg's order and each is sorted by its key, so every
        // batch is sorted as the table is and ClickHouse does not sort it again.
        let batch_rows = staged.div_ceil(INSERTS).max(50_000);
        let mut batches: Vec<Vec<(usize, DataFrame)>> = vec![Vec::new()];
        let mut filled = 0;
        for (index, grid) in aggregates.grids.iter().enumerate() {
            let mut offset = 0;
            while offset < grid.cells.height() {
                let take = (batch_rows - filled).min(grid.cells.height() - offset);
                let slice = grid.cells.slice(offset as i64, take);
                batches
                    .last_mut()
                    .expect("never empty")
                    .push((index, slice));
                (offset, filled) = (offset + take, filled + take);
                if filled == batch_rows {
                    batches.push(Vec::new());
                    filled = 0;
                }
            }
        }
        let (shards, run_id) = (self.shards.clone(), run.run_id);
        let (table, aggregates) = (staging.clone(), std::sync::Arc::new(aggregates));
        futures::stream::iter(batches.into_iter().filter(|b| !b.is_empty()))
            .map(move |batch| {
                let (shards, staging, aggregates) =
                    (shards.clone(), table.clone(), aggregates.clone());
                async move {
                    // An INSERT per shard that the batch has rows for.
                    let mut inserts: Vec<Option<Insert<aggregate::StagedRow<'_>>>> =
                        shards.iter().map(|_| None).collect();
                    for (index, cells) in &batch {
                        let grid = &aggregates.grids[*index];
                        // Rows made a slice at a time (see ROWS_AT_ONCE).
                        for offset in (0..cells.height()).step_by(ROWS_AT_ONCE) {
                            let cells = cells.slice(offset as i64, ROWS_AT_ONCE);
                            for row in &aggregates.staged_rows(grid, &cells, run_id)? {
                                let shard = tidemark_batchview::shard_of(row.bucket, shards.len());
                                let insert = match &mut inserts[shard] {
                                    Some(insert) => insert,
                                    empty => empty.insert(shards[shard].insert(&staging).await?),
                                };
                                insert.write(row).await?;
                            }
                        }
                    }
                    for insert in inserts.into_iter().flatten() {
                        insert.end().await?;
                    }
                    Ok::<_, RunError>(())
                }
            })
            .buffer_unordered(INSERTS)
            .try_collect::<Vec<()>>()
            .await?;
        let buyers = self.stage_buyers(run, source).await?;
        tracing::info!(
            run_id = run.run_id,
            rows = staged,
            buyers,
            aggregate_ms,
            insert_ms = t.elapsed().as_millis() as u64,
            "Staged"
        );
        Ok(staged as u64)
    }

    /// Writes the run's rows of `buyers` (who bought where and when) to a staging
    /// table of their own. Returns the rows staged.
    pub async fn stage_buyers(&self, run: &Run, source: &DataFrame) -> Result<u64> {
        let orders = source.clone();
        let frame = tokio::task::spawn_blocking(move || aggregate::buyers(&orders))
            .await
            .expect("the buyers task does not panic")?;
        let staging = run.staging_buyers();
        self.create_staging(&staging, "buyers").await?;
        // An INSERT per shard with rows, the rows made a slice at a time (a run's
        // buyers, one per order line, are millions).
        let mut inserts: Vec<Option<Insert<aggregate::BuyerRow<'_>>>> =
            self.shards.iter().map(|_| None).collect();
        for offset in (0..frame.height()).step_by(ROWS_AT_ONCE) {
            let part = frame.slice(offset as i64, ROWS_AT_ONCE);
            for row in &aggregate::buyer_rows(&part, run.run_id)? {
                let shard = tidemark_batchview::shard_of(row.bucket, self.shards.len());
                let insert = match &mut inserts[shard] {
                    Some(insert) => insert,
                    empty => empty.insert(self.shards[shard].insert(&staging).await?),
                };
                insert.write(row).await?;
            }
        }
        for insert in inserts.into_iter().flatten() {
            insert.end().await?;
        }
        Ok(frame.height() as u64)
    }

    /// Creates `staging`, shaped like `table`, empty, on every shard's writer.
    /// Its engine is `table`'s unreplicated (a replicated table's own engine
    /// would make staging another replica of it): the partitions of a plain
    /// MergeTree attach to a replicated one, and the attach replicates. Staging
    /// is written once and attached whole: merging its parts would only spend
    /// CPU during the run (the published table merges them later).
    async fn create_staging(&self, staging: &str, table: &str) -> Result<()> {
        let engine = tidemark_platform::clickhouse::engine_of(table)
            .unwrap_or_else(|| panic!("the migrations create {table}"));
        for ch in &self.shards {
            ch.query(&format!("DROP TABLE IF EXISTS {staging}"))
                .execute()
                .await?;
            ch.query(&format!("CREATE TABLE {staging} AS {table} {engine}"))
                .execute()
                .await?;
            ch.query(&format!("SYSTEM STOP MERGES {staging}"))
                .execute()
                .await?;
        }
        Ok(())
    }
}
