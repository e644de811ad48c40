//! Conversion of an answer to a reporting currency (`report_currency`).
//!
//! The rule: an amount is converted at its UTC date's rate (exactly, by
//! `tidemark_domain::fx::convert`, rounded half to even), and rounding is
//! *cumulative within a UTC date*: for an answer cell (its grouped values, an
//! original currency) the converted amount of a stretch `[s, e)` of one UTC date
//! is `round(rate × P(e)) − round(rate × P(s))`, where `P(t)` is the cell's exact
//! amount from the date's midnight to `t`. A bucket is the sum of its stretches
//! (a bucket crossing UTC midnight has one per date). The differences telescope:
//! however a date is cut into buckets — hours or days of any zone, one bucket for
//! a summary — the parts add up to the rounded total of what they cover, so a
//! day's converted total equals the sum of its hours' in every zone, and a UTC
//! day is its exact amount rounded once. The stored cells are merged (batch and
//! speed) before they are converted, so the handoff cannot change a figure.
//!
//! A date without a rate takes the last rate up to [`LOOKBACK_DAYS`] before it
//! (weekends, holidays); beyond that the answer is refused, naming the dates and
//! currencies missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use chrono::{DateTime, Days, NaiveDate};
use sqlx::PgPool;
use tidemark_batchview::PieceKey;
use tidemark_domain::fx::{Conversion, Rate};
use tidemark_domain::{Currency, Totals};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind};

use crate::local::Buckets;
use crate::query::{Answer, Sums};
use crate::views::{BatchPieces, Merged, Pieces, Views};

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

/// The UTC date of a day number (days since 1970-01-01).
fn date_of(day: i64) -> NaiveDate {
    DateTime::from_timestamp(day * 86_400, 0)
        .unwrap_or_default()
        .date_naive()
}

fn has_amounts(t: &Totals) -> bool {
    t.revenue_minor != 0 || t.booked.refunded_minor != 0 || t.restated.refunded_minor != 0
}

/// A conversion kept with what it was made of: the same batch pieces (the one
/// copy the batch cache holds of a published state's), the same speed pieces
/// and the same rates give the same answer. The batch pieces are held weakly:
/// once the batch cache lets them go, so does this (and their place in memory
/// is not reused while it is held, so no other pieces can pass for them).
pub struct Converted {
    batch: Weak<BatchPieces>,
    speed: Pieces,
    rates: String,
    answer: Arc<Answer>,
}

impl Converted {
    /// About how much memory it holds (as [`crate::views::pieces_bytes`] counts).
    pub fn bytes(&self) -> usize {
        crate::query::answer_bytes(&self.answer) + crate::views::pieces_bytes(self.speed.keys())
    }

    /// Whether it was made of `merged`'s pieces with `rates`.
    fn made_of(&self, merged: &Merged, rates: &str) -> bool {
        self.rates == rates
            && Weak::ptr_eq(&self.batch, &Arc::downgrade(&merged.batch))
            && self.speed == merged.speed
    }
}

/// The answer cells of `merged`'s pieces in `to`, and `merged` given back. The
/// pieces are sums per (bucket key, UTC date, grouped values, currency), from the
/// midnight (UTC) of the range's first date: those before the range (keys
/// `buckets` names no bucket of) count only towards the cumulative amounts.
/// Counts are unchanged; amounts follow the rule of the module docs. The rates
/// are read here; the conversion runs on a computing thread (see
/// [`crate::compute`]).
///
/// A question (`question`: what was read, and `to`) asked again whose pieces
/// and rates have not changed gets the conversion kept of it: with a live
/// stream the speed cursor moves every moment, but a question over days the
/// stream does not reach reads the same pieces each time, and converting them
/// was the dearest step of its computation.
pub async fn convert(
    views: &Views,
    question: String,
    merged: Merged,
    buckets: Buckets,
    to: Currency,
) -> Result<(Arc<Answer>, Merged), Problem> {
    // Read before the rates are: a later rates file changes it, so a conversion
    // is never kept under the version of rates older than its own.
    let version = views.rates_version().await;
    let kept = version.as_deref().and_then(|version| {
        views
            .conversion(&question)
            .filter(|k| k.made_of(&merged, version))
    });
    if let Some(kept) = kept {
        metrics::counter!("serving_conversions_total", "result" => "kept").increment(1);
        return Ok((kept.answer.clone(), merged));
    }
    metrics::counter!("serving_conversions_total", "result" => "made").increment(1);
    let rates = rates_for(views.pool(), merged.pieces(), to).await?;
    let converting = views.computing().run(move || {
        convert_at(&rates, merged.pieces(), &buckets, to).map(|answer| (Arc::new(answer), merged))
    });
    let (answer, merged) = crate::views::timed("fx_convert", converting).await?;
    if let (Some(rates), true) = (version, merged.missing.is_empty()) {
        views.keep_conversion(
            question,
            Arc::new(Converted {
                batch: Arc::downgrade(&merged.batch),
                speed: merged.speed.clone(),
                rates,
                answer: answer.clone(),
            }),
        );
    }
    Ok((answer, merged))
}

/// The rates converting `pieces` to `to` needs; a 422 naming those missing.
async fn rates_for<'a>(
    pool: &PgPool,
    pieces: impl Iterator<Item = (&'a PieceKey, &'a Totals)>,
    to: Currency,
) -> Result<Rates, Problem> {
    let needed = needed_rates(pieces, to);
    let rates = if needed.is_empty() {
        Rates::default()
    } else {
        let currencies: BTreeSet<Currency> = needed.iter().map(|(_, c)| *c).collect();
        let (first, last) = (
            needed.first().map(|(d, _)| *d).unwrap_or_default(),
            needed.last().map(|(d, _)| *d).unwrap_or_default(),
        );
        crate::views::timed("fx_rates", Rates::load(pool, &currencies, first, last))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "Exchange rates unavailable");
                Problem::unavailable(
                    "Exchange rates (Postgres) are unavailable; retry shortly, or ask without \
                     report_currency.",
                )
            })?
    };
    refuse_missing(&rates, &needed)?;
    Ok(rates)
}

/// The (date, currency) rates converting `pieces` to `to` needs: those of every
/// date and original currency with an amount.
fn needed_rates<'a>(
    pieces: impl Iterator<Item = (&'a PieceKey, &'a Totals)>,
    to: Currency,
) -> BTreeSet<(NaiveDate, Currency)> {
    // Thousands of pieces name a few dozen (date, currency) pairs: found by hash,
    // made dates once each.
    let mut days: foldhash::HashSet<(i64, Currency)> = foldhash::HashSet::default();
    for ((_, date, _, currency), t) in pieces {
        if *currency != to && has_amounts(t) {
            days.insert((*date, *currency));
        }
    }
    let mut needed = BTreeSet::new();
    for (date, currency) in days {
        needed.insert((date_of(date), currency));
        needed.insert((date_of(date), to));
    }
    needed
}

/// [`convert`] with the rates at hand: every one the pieces need ([`rates_for`]).
fn convert_at<'a>(
    rates: &Rates,
    pieces: impl Iterator<Item = (&'a PieceKey, &'a Totals)>,
    buckets: &Buckets,
    to: Currency,
) -> Result<Answer, Problem> {
    let mut out = Sums::with_capacity(pieces.size_hint().0);
    // The pieces to convert as (grouped values by number, currency, date, key,
    // totals), sorted: each (values, currency, date) is then a run in time order.
    // Numbered values compare as integers (a map keyed by the values compared
    // their strings a dozen times per piece: profiled, a fifth of the conversion),
    // and are summed by the same number (hashed once per piece).
    // The totals are sorted by reference: moved whole (72 bytes each) the sort
    // carried three times the bytes.
    let mut series: Vec<(u32, Currency, i64, i64, &Totals)> =
        Vec::with_capacity(pieces.size_hint().0);
    for ((key, date, groups, currency), t) in pieces {
        if *currency == to {
            if let Some(bucket) = buckets.bucket(*key) {
                out.add(bucket, groups, to, *t);
            }
        } else {
            series.push((out.number(groups), *currency, *date, *key, t));
        }
    }
    series
        .sort_unstable_by_key(|(number, currency, date, key, _)| (*number, *currency, *date, *key));
    let too_large =
        || Problem::new(ProblemKind::Validation).detail("A converted amount does not fit 64 bits.");
    for run in series.chunk_by(|a, b| (a.0, a.1, a.2) == (b.0, b.1, b.2)) {
        let (id, currency, date) = (run[0].0, run[0].1, run[0].2);
        let day = date_of(date);
        // `None`: no rates (then every amount of the date is zero); `Some(None)`:
        // rates whose factors overflow.
        let conversion = rates
            .on(currency, day)
            .zip(rates.on(to, day))
            .map(|(from_rate, to_rate)| Conversion::new(currency, from_rate, to, to_rate));
        // Exact cumulative amounts and their rounded conversions so far.
        let mut exact = [0i64; 3];
        let mut rounded = [0i64; 3];
        // A key both views hold comes twice: summed first.
        for same in run.chunk_by(|a, b| a.3 == b.3) {
            let key = same[0].3;
            let mut t = Totals::default();
            for piece in same {
                t.add(*piece.4);
            }
            let amounts = [
                t.revenue_minor,
                t.booked.refunded_minor,
                t.restated.refunded_minor,
            ];
            let mut converted = [0i64; 3];
            for i in 0..3 {
                if amounts[i] == 0 {
                    // The cumulative amount, and so its rounding, is unchanged.
                    continue;
                }
                exact[i] = exact[i].checked_add(amounts[i]).ok_or_else(too_large)?;
                let now = match conversion {
                    _ if exact[i] == 0 => 0,
                    Some(Some(conversion)) => conversion.apply(exact[i]).ok_or_else(too_large)?,
                    Some(None) => return Err(too_large()),
                    // Only a date whose amounts are all zero goes without a rate.
                    None => 0,
                };
                converted[i] = now - rounded[i];
                rounded[i] = now;
            }
            let Some(bucket) = buckets.bucket(key) else {
                continue;
            };
            t.revenue_minor = converted[0];
            t.booked.refunded_minor = converted[1];
            t.restated.refunded_minor = converted[2];
            out.add_numbered(bucket, id, to, t);
        }
    }
    Ok(out.answer())
}

/// A 422 naming the (date, currency) pairs of `needed` without a rate.
fn refuse_missing(rates: &Rates, needed: &BTreeSet<(NaiveDate, Currency)>) -> Result<(), Problem> {
    let missing: Vec<&(NaiveDate, Currency)> = needed
        .iter()
        .filter(|(day, currency)| rates.on(*currency, *day).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
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
    Err(Problem::new(ProblemKind::MissingData)
        .detail(format!(
            "Exchange rates are missing for {} date(s) and currencies of this answer; load \
             them with PUT /v1/fx-rates.",
            missing.len()
        ))
        .errors(errors))
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

    /// Minute amounts over two UTC dates, converted in several zones and
    /// granularities: the parts of every cut add up to the rounded total of each
    /// date, so a day is the sum of its hours in every zone.
    #[test]
    fn converted_parts_add_up_however_the_dates_are_cut() {
        use crate::local::LocalBuckets;
        use tidemark_domain::Granularity;
        let (usd, eur, jpy): (Currency, Currency, Currency) = (
            "USD".parse().unwrap(),
            "EUR".parse().unwrap(),
            "JPY".parse().unwrap(),
        );
        let first = 20_400_i64;
        let mut rates = Rates::default();
        for (currency, day0, day1) in [(usd, "1.0837", "1.0911"), (jpy, "161.23", "160.07")] {
            let days = rates.0.entry(currency).or_default();
            days.insert(date_of(first), day0.parse().unwrap());
            days.insert(date_of(first + 1), day1.parse().unwrap());
        }
        // Every seventh minute of the two dates, amounts from a fixed sequence.
        let mut seed = 42_u64;
        let minutes: Vec<(i64, i64)> = (0..2 * 1_440)
            .step_by(7)
            .map(|m| {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (first * 86_400 + m * 60, (seed >> 40) as i64 % 99_999 + 1)
            })
            .collect();
        let pieces_of = |buckets: &Buckets| {
            let mut pieces = std::collections::BTreeMap::new();
            for (at, amount) in &minutes {
                let t: &mut Totals = pieces
                    .entry((buckets.key(*at), at.div_euclid(86_400), Arc::from([]), usd))
                    .or_default();
                t.revenue_minor += amount;
                t.orders += 1;
            }
            pieces
        };
        let total = |answer: &Answer| answer.iter().map(|(_, t)| t.revenue_minor).sum::<i64>();
        for to in [eur, jpy] {
            let whole = Buckets::Whole {
                from: first * 86_400,
            };
            let summary = convert_at(&rates, pieces_of(&whole).iter(), &whole, to).unwrap();
            // Each date's exact total, rounded once.
            let mut expected = 0;
            for date in [first, first + 1] {
                let exact: i64 = minutes
                    .iter()
                    .filter(|(at, _)| at.div_euclid(86_400) == date)
                    .map(|(_, a)| a)
                    .sum();
                let (from_rate, to_rate) = (
                    rates.on(usd, date_of(date)).unwrap(),
                    rates.on(to, date_of(date)).unwrap(),
                );
                expected +=
                    tidemark_domain::fx::convert(exact, usd, from_rate, to, to_rate).unwrap();
            }
            assert_eq!(total(&summary), expected, "to {to}");
            for zone in [
                chrono_tz::UTC,
                chrono_tz::Asia::Kolkata,
                chrono_tz::Asia::Kathmandu,
                chrono_tz::America::New_York,
            ] {
                for granularity in Granularity::ALL {
                    let local = LocalBuckets::new(zone, granularity);
                    let buckets = Buckets::Local {
                        local,
                        from: local.start(first * 86_400),
                    };
                    let answer =
                        convert_at(&rates, pieces_of(&buckets).iter(), &buckets, to).unwrap();
                    assert_eq!(total(&answer), expected, "{zone} {granularity} to {to}");
                    let orders: i64 = answer.iter().map(|(_, t)| t.orders).sum();
                    assert_eq!(orders, minutes.len() as i64);
                }
            }
        }
    }
}
