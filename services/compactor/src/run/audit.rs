//! Step 4: audit the run (raw ↔ Parquet ↔ staging), or fail it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use tidemark_domain::{Currency, Dimension, Granularity};

use super::{Compactor, Kind, Outcome, Result, Run, RunError, Written, manifest};
use crate::aggregate::{self, CurrencyTotals};
use crate::held::Held;
use crate::lake::{self, Store};

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

/// Staging's sums and checks for one granularity × dimension × currency.
#[derive(Debug, Default, clickhouse::Row, serde::Deserialize)]
struct StagedSums {
    granularity: String,
    dimension: String,
    currency: String,
    revenue: i64,
    orders: u64,
    items: u64,
    booked_refunded: i64,
    booked_refunded_items: u64,
    booked_cancelled: u64,
    restated_refunded: i64,
    restated_refunded_items: u64,
    restated_cancelled: u64,
    /// Rows with an empty value outside the `total` dimension.
    empty_values: u64,
    /// Rows holding nothing (no order, no correction).
    empty_rows: u64,
    /// Rows with negative revenue or refunds.
    negative: u64,
    rows: u64,
}

impl Compactor {
    /// Reconciles raw JSON ↔ Parquet ↔ staging and checks keys, amounts and
    /// currencies, reading the run's Parquet files back first.
    pub async fn audit(&self, run: &Run, written: &Written, source: &Held) -> Result<AuditReport> {
        let parquet = read_back_lake(
            self.store.clone(),
            written.parquet_keys.clone(),
            self.settings.read_back_timeout,
            run.run_id,
        )
        .await?;
        self.audit_read_back(run, written, source, parquet).await
    }

    /// [`Compactor::audit`] given the totals of the run's Parquet files as read
    /// back ([`read_back_lake`]).
    pub async fn audit_read_back(
        &self,
        run: &Run,
        written: &Written,
        source: &Held,
        parquet: CurrencyTotals,
    ) -> Result<AuditReport> {
        self.set_step(run, "audit").await?;
        let mut report = AuditReport {
            raw_records: written.raw_records,
            raw: written.raw_totals.clone(),
            ..AuditReport::default()
        };
        let deduped = written.orders.currency_totals();
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
        let t = Instant::now();
        let sums = bounded(
            self.settings.read_back_timeout,
            run.run_id,
            "staging sums",
            || self.staged_sums(run),
        )
        .await?;
        tracing::info!(
            run_id = run.run_id,
            staging_ms = t.elapsed().as_millis() as u64,
            "Audit read staging"
        );
        if parquet != deduped {
            report.problems.push(format!(
                "parquet totals {parquet:?} differ from raw {deduped:?}"
            ));
        }
        report.parquet = parquet;
        report.source = match run.kind {
            Kind::Incremental => deduped,
            Kind::Rebuild => source.currency_totals(),
        };
        check_staging(&mut report, &sums);
        self.check_buyers(run, source, &mut report).await?;
        Ok(report)
    }

    /// Staged buyers hold exactly the users of the run's order lines.
    async fn check_buyers(&self, run: &Run, source: &Held, report: &mut AuditReport) -> Result<()> {
        let expected = source.buyers();
        let staged: u64 = self
            .ch
            .query(&format!(
                "SELECT uniqExact(user_id) FROM {}",
                self.across(&run.staging_buyers())
            ))
            .fetch_one()
            .await?;
        if staged != expected {
            report.problems.push(format!(
                "staging buyers hold {staged} users, the run's order lines {expected}"
            ));
        }
        Ok(())
    }

    /// Staging's sums and checks, per granularity × dimension × currency.
    async fn staged_sums(&self, run: &Run) -> Result<Vec<StagedSums>> {
        Ok(self
            .ch
            .query(&format!(
                "SELECT toString(granularity) AS g, toString(dimension) AS d, currency AS c, \
                        sum(revenue_minor) AS s_revenue, sum(orders) AS s_orders, \
                        sum(items) AS s_items, \
                        sum(booked_refunded_minor) AS s_br, \
                        sum(booked_refunded_items) AS s_bi, \
                        sum(booked_cancelled_orders) AS s_bc, \
                        sum(restated_refunded_minor) AS s_sr, \
                        sum(restated_refunded_items) AS s_si, \
                        sum(restated_cancelled_orders) AS s_sc, \
                        countIf(value = '' AND dimension != 'total') AS s_empty_values, \
                        countIf(orders = 0 AND booked_refunded_minor = 0 \
                            AND booked_refunded_items = 0 AND booked_cancelled_orders = 0 \
                            AND restated_refunded_minor = 0 AND restated_refunded_items = 0 \
                            AND restated_cancelled_orders = 0) AS s_empty_rows, \
                        countIf(revenue_minor < 0 OR booked_refunded_minor < 0 \
                            OR restated_refunded_minor < 0) AS s_negative, \
                        count() AS s_rows \
                 FROM {} GROUP BY granularity, dimension, currency",
                self.across(&run.staging())
            ))
            .fetch_all::<StagedSums>()
            .await?)
    }

    /// Records a failed audit. The run's lake files leave the manifest (the next run
    /// rewrites those orders), its staging table stays for inspection.
    pub async fn fail(&self, run: &Run, report: AuditReport) -> Result<Outcome> {
        metrics::counter!("compactor_audit_failures_total").increment(1);
        // The manifest and the run's status in one write; the files it forgot are
        // deleted after (a crash between leaves unlisted objects, which the next
        // compaction of their partitions removes).
        let mut tx = self.begin().await?;
        let files = manifest::forget_run(&mut *tx, run.run_id).await?;
        sqlx::query(
            "UPDATE batch_runs SET status = 'failed', step = 'audit', audit = $2, error = $3, \
               finished_at = now() WHERE run_id = $1 AND status = 'running'",
        )
        .bind(run.run_id as i64)
        .bind(sqlx::types::Json(&report))
        .bind(report.problems.join("; "))
        .execute(&mut *tx)
        .await?;
        self.commit(tx).await?;
        for key in files {
            self.store.delete(&key).await?;
        }
        tracing::error!(
            run_id = run.run_id,
            problems = ?report.problems,
            staging = run.staging(),
            "Audit failed; nothing published, staging kept for inspection"
        );
        Ok(Outcome::AuditFailed {
            run_id: run.run_id,
            problems: report.problems,
        })
    }
}

/// `read` within `limit`, tried three times. It only reads, so abandoning one
/// and starting again is safe.
async fn bounded<T, F: Future<Output = Result<T>>>(
    limit: Duration,
    run_id: u64,
    what: &str,
    read: impl Fn() -> F,
) -> Result<T> {
    for attempt in 1..=3 {
        match tokio::time::timeout(limit, read()).await {
            Ok(result) => return result,
            Err(_) => {
                metrics::counter!("compactor_read_back_timeouts_total").increment(1);
                tracing::warn!(
                    run_id,
                    attempt,
                    what,
                    timeout_ms = limit.as_millis() as u64,
                    "The audit's read-back did not finish in time; reading again"
                );
            }
        }
    }
    Err(RunError::ReadBack(format!(
        "three read-backs of run {run_id}'s {what} each outlasted {} ms",
        limit.as_millis()
    )))
}

/// The totals of a run's Parquet files (`keys`) as they landed: read back from
/// S3 (only the columns the totals need, fetched by range), each attempt within
/// `limit` (`compactor.read_back_timeout`), three attempts. It depends on nothing
/// after the lake step, so a run reads it back while it stages
/// ([`Compactor::execute`]).
pub async fn read_back_lake(
    store: Store,
    keys: Vec<String>,
    limit: Duration,
    run_id: u64,
) -> Result<CurrencyTotals> {
    let t = Instant::now();
    let totals = bounded(limit, run_id, "Parquet files", || async {
        const COLUMNS: [&str; 10] = [
            "currency",
            "quantity",
            "unit_price_minor",
            "order_first",
            "category_first",
            "adjustment_kind",
            "refunded_minor",
            "refunded_quantity",
            "cancel_first",
            "cancel_category_first",
        ];
        let mut totals = CurrencyTotals::new();
        for key in &keys {
            let groups = lake::read_column_groups(&store, key, &COLUMNS, |group| {
                Ok(aggregate::currency_totals(&group)?)
            })
            .await?;
            for group in groups {
                aggregate::add_totals(&mut totals, group);
            }
        }
        Ok(totals)
    })
    .await?;
    tracing::info!(
        run_id,
        parquet_ms = t.elapsed().as_millis() as u64,
        "Audit read back the lake"
    );
    Ok(totals)
}

/// Staging: keys set, amounts valid, currencies known, and every granularity ×
/// dimension adding up to the run's source rows, per currency: gross figures, and
/// the corrections on each basis (both bases add up to the same).
fn check_staging(report: &mut AuditReport, sums: &[StagedSums]) {
    let mut seen: BTreeMap<(String, String), BTreeMap<String, [i64; 9]>> = BTreeMap::new();
    for s in sums {
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
        if s.empty_rows > 0 || s.negative > 0 {
            report.problems.push(format!(
                "{} by {} has empty rows or negative amounts",
                s.granularity, s.dimension
            ));
        }
        seen.entry((s.granularity.clone(), s.dimension.clone()))
            .or_default()
            .insert(
                s.currency.clone(),
                [
                    s.revenue,
                    s.orders as i64,
                    s.items as i64,
                    s.booked_refunded,
                    s.booked_refunded_items as i64,
                    s.booked_cancelled as i64,
                    s.restated_refunded,
                    s.restated_refunded_items as i64,
                    s.restated_cancelled as i64,
                ],
            );
    }
    for granularity in Granularity::ALL {
        for dimension in Dimension::ALL {
            let key = (
                granularity.as_str().to_owned(),
                dimension.as_str().to_owned(),
            );
            let staged = seen.remove(&key).unwrap_or_default();
            let expected: BTreeMap<String, [i64; 9]> = report
                .source
                .iter()
                .map(|(currency, sums)| {
                    let ([r, o, i], [f, fi, c]) =
                        (sums.of(dimension), sums.corrections_of(dimension));
                    (currency.clone(), [r, o, i, f, fi, c, f, fi, c])
                })
                .collect();
            if staged != expected {
                report.problems.push(format!(
                    "staging {granularity} by {dimension} sums to {staged:?}, the orders to {expected:?}"
                ));
            }
        }
    }
    for (granularity, dimension) in seen.keys() {
        report.problems.push(format!(
            "unexpected staging rows for {granularity} by {dimension}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Staging's sums for a source of one EUR order of 300 (2 items), in every
    /// granularity × dimension.
    fn clean() -> Vec<StagedSums> {
        let mut sums = Vec::new();
        for g in Granularity::ALL {
            for d in Dimension::ALL {
                sums.push(StagedSums {
                    granularity: g.as_str().into(),
                    dimension: d.as_str().into(),
                    currency: "EUR".into(),
                    revenue: 300,
                    orders: 1,
                    items: 2,
                    rows: 1,
                    ..StagedSums::default()
                });
            }
        }
        sums
    }

    fn problems(sums: &[StagedSums]) -> Vec<String> {
        let mut report = AuditReport {
            source: CurrencyTotals::from([(
                "EUR".to_owned(),
                aggregate::Sums {
                    revenue: 300,
                    orders: 1,
                    items: 2,
                    category_orders: 1,
                    lines: 1,
                    ..aggregate::Sums::default()
                },
            )]),
            ..AuditReport::default()
        };
        check_staging(&mut report, sums);
        report.problems
    }

    #[test]
    fn staging_that_adds_up_everywhere_passes() {
        assert_eq!(problems(&clean()), Vec::<String>::new());
    }

    #[test]
    fn every_kind_of_bad_staging_is_named() {
        let mut sums = clean();
        sums[1].revenue += 1; // minute by city no longer adds up
        sums[2].empty_values = 3;
        sums[3].negative = 1;
        sums[4].currency = "XYZ".into();
        sums.retain(|s| !(s.granularity == "day" && s.dimension == "product"));
        sums.push(StagedSums {
            granularity: "week".into(),
            dimension: "city".into(),
            currency: "EUR".into(),
            ..StagedSums::default()
        });
        let found = problems(&sums).join("\n");
        for expected in [
            "staging minute by city sums to",
            "3 rows of minute by category have an empty key",
            "minute by product has empty rows or negative amounts",
            "unknown currency `XYZ` in staging",
            "staging day by product sums to {}",
            "unexpected staging rows for week by city",
        ] {
            assert!(
                found.contains(expected),
                "{expected} missing from:\n{found}"
            );
        }
    }
}
