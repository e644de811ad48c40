//! Exchange rates: `PUT /v1/fx-rates` (admin scope) and the `fx-rates load` CLI
//! store a file in the ECB's CSV format in Postgres `fx_rates` (see
//! `tidemark_domain::fx`). Loading is idempotent: a resent file changes nothing, a
//! later file replaces the rates it gives (a correction), all in one transaction.

use std::collections::BTreeSet;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use chrono::NaiveDate;
use serde::Serialize;
use sqlx::PgPool;
use tidemark_domain::fx::{RateFile, parse_ecb_csv};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind, ProblemSchema};
use utoipa::ToSchema;

use crate::api::{AppState, read_body, refused};

/// Largest rates file accepted (the ECB's full history since 1999 is ~1.5 MB).
pub const MAX_FILE_BYTES: usize = 8 * 1024 * 1024;

/// What loading a rates file did.
#[derive(Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct LoadedRates {
    /// Rates in the file (a `N/A` is not a rate).
    pub rates: usize,
    /// Rates stored or changed by this load (0 for a resent file).
    pub changed: usize,
    pub currencies: Vec<String>,
    pub first_day: Option<NaiveDate>,
    pub last_day: Option<NaiveDate>,
    /// Columns left out: not an accepted ISO 4217 code.
    pub ignored_columns: Vec<String>,
}

/// Stores the rates of `file`, replacing those of the same currency and day.
pub async fn store(pool: &PgPool, file: &RateFile) -> Result<LoadedRates, sqlx::Error> {
    let (mut currencies, mut days, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    for (day, currency, rate) in &file.rates {
        currencies.push(currency.to_string());
        days.push(*day);
        rates.push(rate.to_string());
    }
    let changed: i64 = sqlx::query_scalar(
        "WITH given AS ( \
             SELECT DISTINCT ON (c, d) c, d, r::numeric AS r \
             FROM UNNEST($1::text[], $2::date[], $3::text[]) WITH ORDINALITY AS g(c, d, r, n) \
             ORDER BY c, d, n DESC), \
         stored AS ( \
             INSERT INTO fx_rates (currency, day, per_eur) SELECT c, d, r FROM given \
             ON CONFLICT (currency, day) DO UPDATE \
                 SET per_eur = EXCLUDED.per_eur, loaded_at = now() \
                 WHERE fx_rates.per_eur <> EXCLUDED.per_eur \
             RETURNING 1) \
         SELECT count(*) FROM stored",
    )
    .bind(&currencies)
    .bind(&days)
    .bind(&rates)
    .fetch_one(pool)
    .await?;
    let distinct: BTreeSet<String> = currencies.into_iter().collect();
    Ok(LoadedRates {
        rates: file.rates.len(),
        changed: changed as usize,
        currencies: distinct.into_iter().collect(),
        first_day: days.iter().min().copied(),
        last_day: days.iter().max().copied(),
        ignored_columns: file.ignored_columns.clone(),
    })
}

/// Reads a rates file, or the problem with every line that is wrong.
pub fn parse(text: &str) -> Result<RateFile, Problem> {
    parse_ecb_csv(text).map_err(|errors| {
        Problem::new(ProblemKind::Validation)
            .detail("The rates file has errors; nothing was stored.")
            .errors(
                errors
                    .into_iter()
                    .take(1_000)
                    .map(|e| FieldError {
                        pointer: match e.column {
                            Some(c) => format!("line {}/{c}", e.line),
                            None => format!("line {}", e.line),
                        },
                        code: "invalid".into(),
                        detail: e.message,
                    })
                    .collect(),
            )
    })
}

/// Loads exchange rates from a file in the ECB reference-rate CSV format
/// (`Date,USD,JPY,…` then one row per day; units per euro; `N/A` for none).
/// Idempotent: a resent file changes nothing; a later file corrects the rates it
/// gives. Days without a rate use the last earlier one (up to 7 days back) when
/// converting.
#[utoipa::path(put, path = "/v1/fx-rates",
    request_body(content = String, content_type = "text/csv",
        example = "Date,USD,JPY,GBP,\n2026-11-27,1.0542,158.10,0.83215,\n2026-11-26,1.0533,157.92,0.83301,\n"),
    responses(
        (status = 200, body = LoadedRates),
        (status = 400, description = "Errors per line; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks the admin scope", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
pub async fn put_rates(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let csv = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim() == "text/csv"));
        if !csv {
            return Err(Problem::new(ProblemKind::UnsupportedMediaType)
                .detail("Send the rates as `text/csv` (the ECB reference-rate format)."));
        }
        let body = read_body(&headers, body, MAX_FILE_BYTES).await?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| Problem::malformed("The rates file is not UTF-8."))?;
        let file = parse(text)?;
        store(&state.pool, &file).await.map_err(|e| {
            tracing::warn!(error = %e, "Storing rates failed");
            Problem::unavailable("Postgres is unavailable; nothing was stored. Retry shortly.")
        })
    }
    .await;
    match result {
        Ok(loaded) => Json(loaded).into_response(),
        Err(problem) => refused("/v1/fx-rates", problem),
    }
}
