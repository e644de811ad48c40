//! Reconciliation of a running deployment's batch layer: the Parquet lake, below
//! the published watermark, aggregated afresh, against what ClickHouse serves for
//! the published runs — every granularity, every dimension, every cell.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;
use tidemark_batchview::{PublishedState, dimension_code, granularity_code};
use tidemark_domain::{Dimension, Granularity};

use crate::Compactor;
use crate::aggregate;

/// Cells compared, and those that differ (with a few examples).
#[derive(Debug, Default, Serialize)]
pub struct Drift {
    pub run_id: u64,
    pub lake_orders: u64,
    pub cells_compared: u64,
    pub cells_differing: u64,
    pub examples: Vec<String>,
}

/// (granularity, dimension, bucket, value, currency) → revenue, orders, items, and
/// the corrections booked and restated (refunded, refunded items, cancelled).
type Cells = BTreeMap<(i8, i8, u32, String, String), [i64; 9]>;

impl Compactor {
    /// Compares the Parquet lake below the published threshold with the published
    /// aggregates in ClickHouse. No published state: nothing to compare.
    pub async fn verify_lake(&self) -> Result<Drift> {
        let Some(state) = PublishedState::load(&self.pool).await? else {
            return Ok(Drift::default());
        };
        let lake = self.read_lake(state.threshold).await?;
        let mut expected = Cells::new();
        for row in aggregate::aggregate(&lake.rows()?, state.run_id)? {
            expected.insert(
                (
                    row.granularity,
                    row.dimension,
                    row.bucket,
                    row.value,
                    row.currency,
                ),
                [
                    row.revenue_minor,
                    row.orders as i64,
                    row.items as i64,
                    row.booked_refunded_minor,
                    row.booked_refunded_items as i64,
                    row.booked_cancelled_orders as i64,
                    row.restated_refunded_minor,
                    row.restated_refunded_items as i64,
                    row.restated_cancelled_orders as i64,
                ],
            );
        }
        let mut published = Cells::new();
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let grid = tidemark_batchview::read(
                    &self.ch,
                    &state,
                    granularity,
                    dimension,
                    0,
                    i64::from(u32::MAX),
                )
                .await?;
                for ((bucket, value, currency), t) in grid {
                    if t.is_zero() {
                        continue;
                    }
                    published.insert(
                        (
                            granularity_code(granularity),
                            dimension_code(dimension),
                            bucket as u32,
                            value,
                            currency.as_str().to_owned(),
                        ),
                        [
                            t.revenue_minor,
                            t.orders,
                            t.items,
                            t.booked.refunded_minor,
                            t.booked.refunded_items,
                            t.booked.cancelled_orders,
                            t.restated.refunded_minor,
                            t.restated.refunded_items,
                            t.restated.cancelled_orders,
                        ],
                    );
                }
            }
        }
        let mut drift = Drift {
            run_id: state.run_id,
            lake_orders: lake
                .currency_totals()
                .values()
                .map(|s| s.orders as u64)
                .sum(),
            ..Drift::default()
        };
        let keys: std::collections::BTreeSet<_> =
            expected.keys().chain(published.keys()).cloned().collect();
        for key in keys {
            drift.cells_compared += 1;
            let (want, got) = (expected.get(&key), published.get(&key));
            if want != got {
                drift.cells_differing += 1;
                if drift.examples.len() < 10 {
                    drift.examples.push(format!(
                        "granularity {} dimension {} bucket {} value {:?} {}: lake {want:?}, ClickHouse {got:?}",
                        key.0, key.1, key.2, key.3, key.4
                    ));
                }
            }
        }
        Ok(drift)
    }
}
