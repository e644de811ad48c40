//! Conversion of an answer to a reporting currency (`report_currency`), by the
//! rule of `tidemark_domain::fx`: each stored minute cell at its UTC date's rate,
//! rounded half to even, then summed. A date without a rate takes the last rate
//! up to [`LOOKBACK_DAYS`] before it (weekends, holidays); beyond that the answer
//! is refused, naming the dates and currencies missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Days, NaiveDate};
use sqlx::PgPool;
use tidemark_domain::fx::{Rate, convert};
use tidemark_domain::{Currency, Grid, Totals};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind};

/// How far back a missing day's rate may be taken from.
pub const LOOKBACK_DAYS: u64 = 7;

/// Most missing (date, currency) pairs listed in a refusal.
const LISTED: usize = 50;

/// Rates per currency and day.
#[derive(Debug, Default)]
pub struct Rates(HashMap<Currency, BTreeMap<NaiveDate, Rate>>);

impl Rates {
    /// The rates of `currencies` from `LOOKBACK_DAYS` before `first` to `last`.
    pub async fn load(
        pool: &PgPool,
        currencies: &BTreeSet<Currency>,
        first: NaiveDate,
        last: NaiveDate,
    ) -> Result<Rates, sqlx::Error> {
        let codes: Vec<String> = currencies.iter().map(ToString::to_string).collect();
        let rows: Vec<(String, NaiveDate, String)> = sqlx::query_as(
            "SELECT currency, day, per_eur::text FROM fx_rates \
             WHERE currency = ANY($1) AND day BETWEEN $2 AND $3",
        )
        .bind(&codes)
        .bind(first - Days::new(LOOKBACK_DAYS))
        .bind(last)
        .fetch_all(pool)
        .await?;
        let mut rates = Rates::default();
        for (code, day, rate) in rows {
            // Rows the checks of the table and of loading let through parse; any
            // other would be a rate this build cannot read: leave it out, and the
            // day is reported missing rather than converted wrongly.
            if let (Ok(currency), Ok(rate)) = (code.parse::<Currency>(), rate.parse::<Rate>()) {
                rates.0.entry(currency).or_default().insert(day, rate);
            }
        }
        Ok(rates)
    }

    /// Units of `currency` per euro on `day`: the euro's is 1; otherwise the rate
    /// of `day` or of the last day before it with one, up to `LOOKBACK_DAYS`.
    pub fn on(&self, currency: Currency, day: NaiveDate) -> Option<Rate> {
        if currency.as_str() == "EUR" {
            return Some(Rate::ONE);
        }
        let (found, rate) = self.0.get(&currency)?.range(..=day).next_back()?;
        ((day - *found).num_days() <= LOOKBACK_DAYS as i64).then_some(*rate)
    }
}

/// The UTC date of a bucket start.
fn date_of(bucket: i64) -> NaiveDate {
    DateTime::from_timestamp(bucket, 0)
        .unwrap_or_default()
        .date_naive()
}

/// `grid` (minute cells, any currencies) in `to`: every amount converted per cell
/// at its date's rate, counts unchanged; cells of `to` kept as they are.
pub async fn convert_grid(pool: &PgPool, grid: &Grid, to: Currency) -> Result<Grid, Problem> {
    let amounts = |t: &Totals| {
        t.revenue_minor != 0 || t.booked.refunded_minor != 0 || t.restated.refunded_minor != 0
    };
    let mut needed: BTreeSet<(NaiveDate, Currency)> = BTreeSet::new();
    for ((bucket, _, currency), t) in grid {
        if *currency != to && amounts(t) {
            needed.insert((date_of(*bucket), *currency));
            needed.insert((date_of(*bucket), to));
        }
    }
    let mut out = Grid::new();
    if needed.is_empty() {
        for ((bucket, value, _), t) in grid {
            out.entry((*bucket, value.clone(), to)).or_default().add(*t);
        }
        return Ok(out);
    }
    let currencies: BTreeSet<Currency> = needed.iter().map(|(_, c)| *c).collect();
    let (first, last) = (
        needed.first().map(|(d, _)| *d).unwrap_or_default(),
        needed.last().map(|(d, _)| *d).unwrap_or_default(),
    );
    let rates = Rates::load(pool, &currencies, first, last)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "Exchange rates unavailable");
            Problem::unavailable(
                "Exchange rates (Postgres) are unavailable; retry shortly, or ask without \
                 report_currency.",
            )
        })?;
    let missing: Vec<&(NaiveDate, Currency)> = needed
        .iter()
        .filter(|(day, currency)| rates.on(*currency, *day).is_none())
        .collect();
    if !missing.is_empty() {
        let mut errors: Vec<FieldError> = missing
            .iter()
            .take(LISTED)
            .map(|(day, currency)| FieldError {
                pointer: "report_currency".into(),
                code: "missing_rate".into(),
                detail: format!("no {currency} rate on {day} or the {LOOKBACK_DAYS} days before"),
            })
            .collect();
        if missing.len() > LISTED {
            errors.push(FieldError {
                pointer: "report_currency".into(),
                code: "missing_rate".into(),
                detail: format!("and {} more", missing.len() - LISTED),
            });
        }
        return Err(Problem::new(ProblemKind::MissingData)
            .detail(format!(
                "Exchange rates are missing for {} date(s) and currencies of this answer; load \
                 them with PUT /v1/fx-rates.",
                missing.len()
            ))
            .errors(errors));
    }
    for ((bucket, value, currency), t) in grid {
        let converted = if *currency == to || !amounts(t) {
            *t
        } else {
            let day = date_of(*bucket);
            let (from_rate, to_rate) = (
                rates.on(*currency, day).expect("checked"),
                rates.on(to, day).expect("checked"),
            );
            let c = |amount: i64| {
                convert(amount, *currency, from_rate, to, to_rate).ok_or_else(|| {
                    Problem::new(ProblemKind::Validation)
                        .detail("A converted amount does not fit 64 bits.")
                })
            };
            let mut t = *t;
            t.revenue_minor = c(t.revenue_minor)?;
            t.booked.refunded_minor = c(t.booked.refunded_minor)?;
            t.restated.refunded_minor = c(t.restated.refunded_minor)?;
            t
        };
        out.entry((*bucket, value.clone(), to))
            .or_default()
            .add(converted);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_without_a_rate_takes_the_last_within_seven_days() {
        let usd: Currency = "USD".parse().unwrap();
        let day = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        let mut rates = Rates::default();
        rates
            .0
            .entry(usd)
            .or_default()
            .insert(day(6), "1.05".parse().unwrap());
        assert_eq!(rates.on(usd, day(6)), Some("1.05".parse().unwrap()));
        assert_eq!(rates.on(usd, day(13)), Some("1.05".parse().unwrap()));
        assert_eq!(rates.on(usd, day(14)), None, "eight days back is too far");
        assert_eq!(rates.on(usd, day(5)), None, "never a later rate");
        assert_eq!(rates.on("EUR".parse().unwrap(), day(1)), Some(Rate::ONE));
        assert_eq!(rates.on("JPY".parse().unwrap(), day(6)), None);
    }
}
