//! Step 4: audit the run (raw ↔ Parquet ↔ staging), or fail it.

use std::collections::BTreeMap;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;
use serde::Serialize;
use tidemark_domain::{Currency, Dimension, Granularity};

use super::{Compactor, Kind, Outcome, Result, Run, RunError, Written, manifest};
use crate::aggregate::{self, CurrencyTotals};
use crate::lake;

/// The audit's findings (stored with the run).
#[derive(Debug, Default, Serialize)]
pub struct AuditReport {
    pub raw_records: u64,
    pub raw: CurrencyTotals,
    pub parquet: CurrencyTotals,
    pub source: CurrencyTotals,
    pub staging_rows: u64,
    pub problems: Vec<String>,
}

impl Compactor {
    /// Reconciles raw JSON ↔ Parquet ↔ staging and checks keys, amounts and
    /// currencies.
    pub async fn audit(
        &self,
        run: &Run,
        written: &Written,
        source: &DataFrame,
    ) -> Result<AuditReport> {
        self.set_step(run, "audit").await?;
        let mut report = AuditReport {
            raw_records: written.raw_records,
            raw: written.raw_totals.clone(),
            ..AuditReport::default()
        };
        let deduped = aggregate::currency_totals(&written.orders)?;
        let duplicates = written.raw_records - written.orders.height() as u64;
        if duplicates > 0 {
            tracing::warn!(
                duplicates,
                run_id = run.run_id,
                "Raw records repeated an order id; kept the first"
            );
        } else if deduped != report.raw {
            report
                .problems
                .push("raw totals changed by de-duplication without duplicates".into());
        }

        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Sums {
            granularity: String,
            dimension: String,
            currency: String,
            revenue: i64,
            orders: u64,
            items: u64,
            empty_values: u64,
            empty_orders: u64,
            negative: u64,
            rows: u64,
        }
        // The Parquet files, read back from S3 (only the columns the totals need,
        // fetched by range), and staging's sums in ClickHouse, both at once.
        let t = Instant::now();
        let parquet = async {
            const COLUMNS: [&str; 3] = ["currency", "quantity", "unit_price_minor"];
            let mut totals = CurrencyTotals::new();
            let mut frames = futures::stream::iter(written.parquet_keys.clone())
                .map(|key| {
                    let store = self.store.clone();
                    async move { lake::read_columns(&store, &key, &COLUMNS).await }
                })
                .buffered(2);
            while let Some(frame) = frames.try_next().await? {
                aggregate::add_totals(&mut totals, aggregate::currency_totals(&frame)?);
            }
            Ok::<_, RunError>((totals, t.elapsed().as_millis() as u64))
        };
        let sums = async {
            Ok::<_, RunError>((
                self.ch
                    .query(&format!(
                        "SELECT toString(granularity) AS g, toString(dimension) AS d, currency AS c, \
                                sum(revenue_minor) AS s_revenue, sum(orders) AS s_orders, \
                                sum(items) AS s_items, \
                                countIf(value = '' AND dimension != 'total') AS s_empty_values, \
                                countIf(orders = 0) AS s_empty_orders, \
                                countIf(revenue_minor < 0) AS s_negative, count() AS s_rows \
                         FROM {} GROUP BY granularity, dimension, currency",
                        run.staging()
                    ))
                    .fetch_all::<Sums>()
                    .await?,
                t.elapsed().as_millis() as u64,
            ))
        };
        let ((parquet_totals, parquet_ms), (sums, staging_ms)) = tokio::try_join!(parquet, sums)?;
        tracing::info!(
            run_id = run.run_id,
            parquet_ms,
            staging_ms,
            "Audit read back"
        );
        if parquet_totals != deduped {
            report.problems.push(format!(
                "parquet totals {parquet_totals:?} differ from raw {deduped:?}"
            ));
        }
        report.parquet = parquet_totals;

        // Staging: every granularity × dimension adds up to the source, per currency.
        report.source = match run.kind {
            Kind::Incremental => deduped.clone(),
            Kind::Rebuild => aggregate::currency_totals(source)?,
        };
        let mut seen: BTreeMap<(String, String), CurrencyTotals> = BTreeMap::new();
        for s in &sums {
            report.staging_rows += s.rows;
            if s.currency.parse::<Currency>().is_err() {
                report
                    .problems
                    .push(format!("unknown currency `{}` in staging", s.currency));
            }
            if s.empty_values > 0 {
                report.problems.push(format!(
                    "{} rows of {} by {} have an empty key",
                    s.empty_values, s.granularity, s.dimension
                ));
            }
            if s.empty_orders > 0 || s.negative > 0 {
                report.problems.push(format!(
                    "{} by {} has rows without orders or with negative revenue",
                    s.granularity, s.dimension
                ));
            }
            seen.entry((s.granularity.clone(), s.dimension.clone()))
                .or_default()
                .insert(
                    s.currency.clone(),
                    [s.revenue, s.orders as i64, s.items as i64],
                );
        }
        for granularity in Granularity::ALL {
            for dimension in Dimension::ALL {
                let key = (
                    granularity.as_str().to_owned(),
                    dimension.as_str().to_owned(),
                );
                let staged = seen.remove(&key).unwrap_or_default();
                if staged != report.source {
                    report.problems.push(format!(
                        "staging {granularity} by {dimension} sums to {staged:?}, the orders to {:?}",
                        report.source
                    ));
                }
            }
        }
        for (granularity, dimension) in seen.keys() {
            report.problems.push(format!(
                "unexpected staging rows for {granularity} by {dimension}"
            ));
        }
        Ok(report)
    }

    /// Records a failed audit. The run's lake files leave the manifest (the next run
    /// rewrites those orders), its staging table stays for inspection.
    pub async fn fail(&self, run: &Run, report: AuditReport) -> Result<Outcome> {
        metrics::counter!("compactor_audit_failures_total").increment(1);
        let files = manifest::forget_run(&self.pool, run.run_id).await?;
        for key in files {
            self.store.delete(&key).await?;
        }
        tracing::error!(
            run_id = run.run_id,
            problems = ?report.problems,
            staging = run.staging(),
            "Audit failed; nothing published, staging kept for inspection"
        );
        sqlx::query(
            "UPDATE batch_runs SET status = 'failed', step = 'audit', audit = $2, error = $3, \
               finished_at = now() WHERE run_id = $1 AND status = 'running'",
        )
        .bind(run.run_id as i64)
        .bind(sqlx::types::Json(&report))
        .bind(report.problems.join("; "))
        .execute(&self.pool)
        .await?;
        Ok(Outcome::AuditFailed {
            run_id: run.run_id,
            problems: report.problems,
        })
    }
}
