//! `PUT /v1/customers/{user_id}` and `POST /v1/customers` (bulk): customers'
//! attributes with history (slowly changing dimension, type 2; see
//! `domain::customer`). A change is recorded only if it alters the history, so a
//! resend changes nothing and says so.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::customer::Attributes;
use tidemark_domain::{CustomerChange, OrderLimits, Violation};
use tidemark_orderlog::customers::{self, CustomerView};
use tidemark_platform::problem::{Problem, ProblemKind, ProblemSchema};
use utoipa::ToSchema;

use crate::adjust_api::{bulk, field_errors, parse, utc};
use crate::api::{AppState, read_body, refused};

/// A customer's attributes from a moment on. Unknown fields are rejected.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CustomerChange, example = json!({
    "city": "Berlin",
    "segment": "retail",
    "signed_up_at": "2026-01-15T10:00:00Z",
    "effective_at": "2026-11-01T00:00:00Z"
}))]
pub struct ChangeSchema {
    /// City of residence.
    #[schema(min_length = 1, max_length = 64)]
    city: String,
    #[schema(min_length = 1, max_length = 64)]
    segment: String,
    /// RFC 3339.
    signed_up_at: DateTime<FixedOffset>,
    /// From when these attributes hold, RFC 3339; may lie before versions already
    /// recorded (the change is placed in history).
    effective_at: DateTime<FixedOffset>,
}

/// One item of a bulk import: a change with its customer.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CustomerImport)]
pub struct BulkItem {
    #[schema(min_length = 1, max_length = 64)]
    user_id: String,
    city: String,
    segment: String,
    signed_up_at: DateTime<FixedOffset>,
    effective_at: DateTime<FixedOffset>,
}

/// What a bulk import did.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomersResponse {
    pub received: usize,
    /// Changes that altered a customer's history.
    pub recorded: usize,
    /// Resends, and restatements of the version in effect at their moment.
    pub unchanged: usize,
}

fn change(user_id: String, wire: ChangeSchema) -> CustomerChange {
    CustomerChange {
        user_id,
        attributes: Attributes {
            city: wire.city,
            segment: wire.segment,
            signed_up_at: utc(wire.signed_up_at),
        },
        effective_at: utc(wire.effective_at),
    }
}

/// Checks every change; `Err` lists each violation with its item's index.
fn validate(state: &AppState, changes: &[CustomerChange]) -> Result<(), Problem> {
    let limits = OrderLimits {
        max_future_skew: TimeDelta::seconds(state.settings.max_future_skew_secs),
        ..OrderLimits::default()
    };
    let now = Utc::now();
    let violations: Vec<(usize, Violation)> = changes
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            c.validate(now, &limits)
                .err()
                .into_iter()
                .flatten()
                .map(move |v| (i, v))
        })
        .collect();
    if violations.is_empty() {
        return Ok(());
    }
    let single = changes.len() == 1;
    Err(Problem::new(ProblemKind::Validation)
        .detail("The request is invalid; nothing was stored.")
        .errors(field_errors(
            |i| {
                if single {
                    String::new()
                } else {
                    format!("/{i}")
                }
            },
            violations,
        )))
}

/// Runs `record` in one transaction on a task of its own (a dropped handler must
/// not cut the transaction short; see `api::ingest`), mapping failures to problems.
async fn transaction<T, F>(state: &AppState, record: F) -> Result<T, Problem>
where
    T: Send + 'static,
    F: for<'c> FnOnce(
            &'c mut sqlx::PgConnection,
        ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>
        + Send
        + 'static,
{
    let pool = state.pool.clone();
    let done = tokio::spawn(async move {
        let mut tx = pool.begin().await?;
        let out = record(&mut tx).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(out)
    })
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "The customers task failed");
        Problem::internal()
    })?;
    done.map_err(|e| {
        if tidemark_platform::postgres::is_unavailable(&e) {
            tracing::warn!(error = %e, "Postgres unavailable; answering 503");
            Problem::unavailable("The log is unavailable; retry shortly.")
        } else {
            tracing::error!(error = %e, "Storing customer changes failed");
            Problem::internal()
        }
    })
}

fn counted(recorded: impl IntoIterator<Item = bool>) {
    for recorded in recorded {
        let outcome = if recorded { "recorded" } else { "unchanged" };
        metrics::counter!("ingest_customer_changes_total", "outcome" => outcome).increment(1);
    }
}

/// Set a customer's attributes from `effective_at` on.
///
/// Each change that alters an attribute adds a version (201); an identical resend,
/// or attributes equal to the version in effect at `effective_at`, changes nothing
/// (200). A change effective before the latest version is placed in history: the
/// version before it ends there, and it holds until the next. The answer is the
/// customer with every version.
#[utoipa::path(
    put,
    path = "/v1/customers/{user_id}",
    params(("user_id" = String, Path, min_length = 1, max_length = 64)),
    request_body(content = ChangeSchema, content_type = "application/json"),
    responses(
        (status = 201, description = "Recorded: a new version", body = CustomerView),
        (status = 200, description = "Nothing changed", body = CustomerView),
        (status = 400, description = "Malformed or invalid; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
pub async fn put_customer(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    const ROUTE: &str = "/v1/customers/{user_id}";
    let result = async {
        let bytes = read_body(&headers, body, state.settings.max_body_bytes).await?;
        let wire: ChangeSchema = parse(&headers, &bytes)?;
        let change = change(user_id, wire);
        validate(&state, std::slice::from_ref(&change))?;
        let done = transaction(&state, move |tx| {
            Box::pin(async move { customers::record(tx, &change).await })
        })
        .await?;
        counted([done.0]);
        Ok(done)
    }
    .await;
    match result {
        Ok((true, view)) => (StatusCode::CREATED, Json(view)).into_response(),
        Ok((false, view)) => (StatusCode::OK, Json(view)).into_response(),
        Err(problem) => refused(ROUTE, problem),
    }
}

/// Customer changes in bulk (imports): a JSON array or NDJSON of `{user_id, city,
/// segment, signed_up_at, effective_at}`, applied in order in one transaction, all
/// or nothing.
#[utoipa::path(
    post,
    path = "/v1/customers",
    request_body(
        description = "An array or NDJSON of customer changes, each naming its customer.",
        content(("application/json"), ("application/x-ndjson")),
    ),
    responses(
        (status = 201, description = "Stored; at least one change was recorded", body = CustomersResponse),
        (status = 200, description = "Nothing changed", body = CustomersResponse),
        (status = 400, description = "Malformed or invalid; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON or NDJSON", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
pub async fn post_customers(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    const ROUTE: &str = "/v1/customers";
    let result = async {
        let bytes = read_body(&headers, body, state.settings.max_body_bytes).await?;
        let items: Vec<BulkItem> = bulk(&headers, &bytes, "customer change")?;
        if items.is_empty() {
            return Err(
                Problem::new(ProblemKind::Validation).detail("The request holds no changes.")
            );
        }
        if items.len() > state.settings.max_batch {
            return Err(Problem::new(ProblemKind::PayloadTooLarge).detail(format!(
                "A request holds at most {} changes.",
                state.settings.max_batch
            )));
        }
        let changes: Vec<CustomerChange> = items
            .into_iter()
            .map(|item| {
                change(
                    item.user_id,
                    ChangeSchema {
                        city: item.city,
                        segment: item.segment,
                        signed_up_at: item.signed_up_at,
                        effective_at: item.effective_at,
                    },
                )
            })
            .collect();
        validate(&state, &changes)?;
        let done = transaction(&state, move |tx| {
            Box::pin(async move { customers::record_many(tx, &changes).await })
        })
        .await?;
        counted(done.iter().copied());
        Ok(done)
    }
    .await;
    match result {
        Ok(done) => {
            let recorded = done.iter().filter(|r| **r).count();
            let response = CustomersResponse {
                received: done.len(),
                recorded,
                unchanged: done.len() - recorded,
            };
            let status = if recorded > 0 {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(response)).into_response()
        }
        Err(problem) => refused(ROUTE, problem),
    }
}
