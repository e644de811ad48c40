//! Step 3: stage the run's aggregates in a table of its own.

use std::time::Instant;

use clickhouse::insert_native::InsertNative;
use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Compactor, Result, Run, RunError};
use crate::aggregate;
use crate::held::Held;

/// Cells or buyers made into one Native block (each row with its values joined
/// from the dictionaries, ~150 bytes): made a third of a run's cells at a time,
/// staged rows held gigabytes in a run of 10M orders; 65,536 at a time, ~10 MB a
/// lane.
const ROWS_AT_ONCE: usize = 16_384;
/// Day (or split hour) cells a grid's parts may hold before they are summed
/// (see [`aggregate::PartialCells`]).
const CELLS_AT_ONCE: usize = 65_536;
/// Ranges written at once, each by an INSERT per shard and table kept open for
/// the whole step: ClickHouse parses and writes each on threads of its own while
/// this process aggregates the next range and encodes the others.
const LANES: usize = 3;

/// One range of hours' staged rows: the cells and the buyers within it (or, last,
/// the days' cells), with its part of the memory budget while it is written.
struct Range {
    aggregates: aggregate::Aggregates,
    buyers: DataFrame,
    _budget: Option<OwnedSemaphorePermit>,
}

/// The budget's unit, in bytes.
const MIB: usize = 1 << 20;

impl Range {
    /// Cells summed from parts (no buyers).
    fn cells(aggregates: aggregate::Aggregates) -> Range {
        Range {
            aggregates,
            buyers: DataFrame::empty(),
            _budget: None,
        }
    }
}

/// Sends the aggregated ranges to the lanes, each with its part of the budget,
/// and counts the figures of the step's log.
struct Sender {
    tx: tokio::sync::mpsc::Sender<Result<Range>>,
    budget: std::sync::Arc<Semaphore>,
    budget_mib: usize,
    range_mb: usize,
    aggregate_ms: u64,
}

impl Sender {
    /// Sends a range made since `made_from`, once the ranges in flight leave room
    /// for it (all of the budget for a range larger than it). False when the
    /// step stops: the range failed or the lanes are gone.
    fn send(&mut self, range: PolarsResult<Range>, made_from: Instant) -> bool {
        self.aggregate_ms += made_from.elapsed().as_millis() as u64;
        let range = range.map_err(RunError::from).map(|mut range| {
            let bytes = range.aggregates.estimated_size() + range.buyers.estimated_size();
            self.range_mb = self.range_mb.max(bytes / 1_000_000);
            let mib = (bytes / MIB).clamp(1, self.budget_mib) as u32;
            let permit = tokio::runtime::Handle::current()
                .block_on(self.budget.clone().acquire_many_owned(mib))
                .expect("the budget is never closed");
            range._budget = Some(permit);
            range
        });
        let failed = range.is_err();
        self.tx.blocking_send(range).is_ok() && !failed
    }

    /// `(ranges, aggregate_ms, range_mb)`
    fn figures(&self, ranges: usize) -> (usize, u64, usize) {
        (ranges, self.aggregate_ms, self.range_mb)
    }
}

/// The INSERTs of a lane, per shard, opened at its first row.
struct Lane {
    cells: Vec<Option<InsertNative>>,
    buyers: Vec<Option<InsertNative>>,
}

impl Compactor {
    /// Writes the run's aggregates to staging tables of its own (rebuilt from
    /// scratch on every attempt), shaped like `revenue_agg` and `buyers` so that
    /// publishing can attach their partitions; sharded, each shard's staging
    /// holds the rows of its days ([`tidemark_batchview::shard_of`]). Returns the
    /// `revenue_agg` rows staged.
    ///
    /// A blocking thread aggregates the run a range at a time
    /// ([`aggregate::hour_ranges`]: whole hours, or quarters or halves of an hour
    /// holding more than `compactor.stage_range_rows`; every minute and quarter-hour cell
    /// lies within a quarter and every hour cell within an hour, so the ranges'
    /// cells are disjoint; a split hour's cells are summed from its parts and
    /// written after them, the days' from every range and written last), ahead
    /// of [`LANES`] tasks that write them. The ranges aggregated and not yet
    /// written hold at most `compactor.stage_memory_bytes` between them (one
    /// range alone may hold more).
    pub async fn stage(&self, run: &Run, source: &Held) -> Result<u64> {
        self.set_step(run, "stage").await?;
        let t = Instant::now();
        let (staging, staging_buyers) = (run.staging(), run.staging_buyers());
        self.create_staging(&staging, "revenue_agg").await?;
        self.create_staging(&staging_buyers, "buyers").await?;
        let orders = source.clone();
        let budget_mib = (self.settings.stage_memory_bytes / MIB).max(1);
        let range_rows = self.settings.stage_range_rows.max(1);
        let budget = std::sync::Arc::new(Semaphore::new(budget_mib));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Range>>(1);
        let aggregating = tokio::task::spawn_blocking(move || {
            let mut out = Sender {
                tx,
                budget,
                budget_mib,
                range_mb: 0,
                aggregate_ms: 0,
            };
            let planned = orders
                .keys()
                .map(|keys| (keys, orders.hour_ranges(range_rows)));
            let (keys, ranges) = match planned {
                Ok((Some(keys), ranges)) => (keys, ranges),
                Ok((None, _)) => return (0, 0, 0),
                Err(e) => {
                    out.send(Err(e), Instant::now());
                    return (0, 0, 0);
                }
            };
            let mut partial = aggregate::PartialCells::new(&keys, CELLS_AT_ONCE);
            for &(from_us, to_us) in &ranges {
                let t = Instant::now();
                if let Some(hour) = partial.left_before(from_us).transpose()
                    && !out.send(hour.map(Range::cells), t)
                {
                    return out.figures(ranges.len());
                }
                let t = Instant::now();
                let range = (|| {
                    let rows = orders.within(from_us, to_us)?;
                    let mut aggregates =
                        aggregate::grids_within(&rows, &keys, Some((from_us, to_us)))?;
                    partial.take(from_us, to_us, &mut aggregates)?;
                    let buyers = aggregate::buyers(&rows)?;
                    Ok(Range {
                        aggregates,
                        buyers,
                        _budget: None,
                    })
                })();
                if !out.send(range, t) {
                    return out.figures(ranges.len());
                }
            }
            // The last split hour's cells, then the days', summed from the ranges'
            // parts.
            let mut t = Instant::now();
            match partial.finish() {
                Ok(summed) => {
                    for aggregates in summed {
                        if !out.send(Ok(Range::cells(aggregates)), t) {
                            break;
                        }
                        t = Instant::now();
                    }
                }
                Err(e) => {
                    out.send(Err(e), t);
                }
            }
            out.figures(ranges.len())
        });
        let queue = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        let (staged, buyers) = futures::stream::iter(0..LANES)
            .map(|_| {
                let queue = queue.clone();
                let (staging, staging_buyers) = (&staging, &staging_buyers);
                async move {
                    let mut lane = Lane {
                        cells: self.shards.iter().map(|_| None).collect(),
                        buyers: self.shards.iter().map(|_| None).collect(),
                    };
                    let (mut staged, mut buyers) = (0, 0);
                    loop {
                        let next = queue.lock().await.recv().await;
                        let Some(range) = next.transpose()? else {
                            break;
                        };
                        staged += range.aggregates.cells() as u64;
                        buyers += range.buyers.height() as u64;
                        self.write_range(&mut lane, &range, run.run_id, staging, staging_buyers)
                            .await?;
                    }
                    for insert in lane.cells.into_iter().flatten() {
                        insert.end().await?;
                    }
                    for insert in lane.buyers.into_iter().flatten() {
                        insert.end().await?;
                    }
                    Ok::<_, RunError>((staged, buyers))
                }
            })
            .buffer_unordered(LANES)
            .try_fold((0, 0), |(s, b), (staged, buyers)| async move {
                Ok((s + staged, b + buyers))
            })
            .await?;
        let (ranges, aggregate_ms, range_mb) =
            aggregating.await.expect("the aggregation does not panic");
        tracing::info!(
            run_id = run.run_id,
            rows = staged,
            buyers,
            ranges,
            range_mb,
            aggregate_ms,
            stage_ms = t.elapsed().as_millis() as u64,
            "Staged"
        );
        Ok(staged)
    }

    /// Writes a range's cells and buyers to the lane's INSERTs, in Native blocks
    /// of at most [`ROWS_AT_ONCE`] rows.
    async fn write_range(
        &self,
        lane: &mut Lane,
        range: &Range,
        run_id: u64,
        staging: &str,
        staging_buyers: &str,
    ) -> Result<()> {
        let shards = self.shards.len();
        let aggregates = &range.aggregates;
        for grid in &aggregates.grids {
            for offset in (0..grid.cells.height()).step_by(ROWS_AT_ONCE) {
                let cells = grid.cells.slice(offset as i64, ROWS_AT_ONCE);
                for (shard, block) in aggregates.staged_blocks(grid, &cells, run_id, shards)? {
                    let insert = lane.cells[shard]
                        .get_or_insert_with(|| self.shards[shard].insert_native(staging));
                    insert.write(&block).await?;
                }
            }
        }
        for offset in (0..range.buyers.height()).step_by(ROWS_AT_ONCE) {
            let part = range.buyers.slice(offset as i64, ROWS_AT_ONCE);
            for (shard, block) in aggregate::buyer_blocks(&part, run_id, shards)? {
                let insert = lane.buyers[shard]
                    .get_or_insert_with(|| self.shards[shard].insert_native(staging_buyers));
                insert.write(&block).await?;
            }
        }
        Ok(())
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
