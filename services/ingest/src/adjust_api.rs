//! `POST /v1/orders/{order_id}/refunds`, `POST /v1/orders/{order_id}/cancellation`
//! and `POST /v1/adjustments` (bulk): the wire forms of [`crate::adjust`].

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, SubsecRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use tidemark_domain::Violation;
use tidemark_domain::adjustment::{RefundItem, RefundRequest};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind, ProblemSchema};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::adjust::{self, AdjustError, AdjustmentView, Ask, Done};
use crate::api::{AppState, read_body, refused};

/// A refund: lines of the order by product, each with `quantity` (units, at the
/// line's unit price) or `amount_minor` (an amount). Unknown fields are rejected.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Refund, example = json!({
    "refund_id": "0193a1b2-7c3d-7e4f-8a9b-0c1d2e3f4a60",
    "created_at": "2026-11-28T09:00:00Z",
    "items": [{"product_id": "sku-778", "quantity": 1}, {"product_id": "sku-12", "amount_minor": 500}]
}))]
pub struct RefundSchema {
    /// Client-chosen UUID: the idempotency key.
    refund_id: Uuid,
    /// When the refund happened, RFC 3339; not before the order.
    created_at: DateTime<FixedOffset>,
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<RefundLineSchema>,
}

/// One line of a refund: exactly one of `quantity` and `amount_minor`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RefundLine)]
pub struct RefundLineSchema {
    #[schema(min_length = 1, max_length = 64)]
    product_id: String,
    #[schema(minimum = 1, maximum = 1000)]
    quantity: Option<i32>,
    #[schema(minimum = 1, maximum = 100_000_000_000_i64)]
    amount_minor: Option<i64>,
}

/// A cancellation: everything that remains of the order is given back.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Cancellation, example = json!({"created_at": "2026-11-28T09:00:00Z"}))]
pub struct CancellationSchema {
    /// When the order was cancelled, RFC 3339; not before the order.
    created_at: DateTime<FixedOffset>,
}

/// One item of a bulk request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkItem {
    kind: String,
    order_id: Uuid,
    refund_id: Option<Uuid>,
    created_at: DateTime<FixedOffset>,
    items: Option<Vec<RefundLineSchema>>,
}

/// What a bulk request did.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdjustmentsResponse {
    pub received: usize,
    pub created: usize,
    /// Resends of adjustments already stored.
    pub duplicates: usize,
    /// The ids of those resends (their stored adjustments are in `adjustments`).
    pub duplicate_adjustment_ids: Vec<Uuid>,
    pub adjustments: Vec<AdjustmentView>,
}

pub(crate) fn utc(t: DateTime<FixedOffset>) -> DateTime<Utc> {
    t.with_timezone(&Utc).trunc_subsecs(6)
}

/// A refund's lines from the wire, or what is wrong with them.
fn refund_items(items: Vec<RefundLineSchema>) -> Result<Vec<RefundItem>, Vec<Violation>> {
    let mut out = Vec::with_capacity(items.len());
    let mut bad = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match (item.quantity, item.amount_minor) {
            (Some(quantity), None) => out.push(RefundItem::Units {
                product_id: item.product_id,
                quantity,
            }),
            (None, Some(amount_minor)) => out.push(RefundItem::Amount {
                product_id: item.product_id,
                amount_minor,
            }),
            _ => bad.push(Violation::new(
                format!("items/{i}"),
                "one_of",
                "give exactly one of `quantity` and `amount_minor`",
            )),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(bad) }
}

/// A JSON body as `T`, or a 400 naming what is wrong (serde names the field).
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<T, Problem> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    if !json {
        return Err(
            Problem::new(ProblemKind::UnsupportedMediaType).detail("Send application/json.")
        );
    }
    serde_json::from_slice(bytes).map_err(|e| Problem::malformed(format!("not a valid body: {e}")))
}

/// The items of a bulk body: a JSON array (`application/json`) or one JSON object
/// per line (`application/x-ndjson`), each a `T`; `what` names an item in errors.
pub(crate) fn bulk<T: for<'de> Deserialize<'de>>(
    headers: &HeaderMap,
    bytes: &[u8],
    what: &str,
) -> Result<Vec<T>, Problem> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match essence.as_str() {
        "application/json" => serde_json::from_slice(bytes)
            .map_err(|e| Problem::malformed(format!("not an array of {what}s: {e}"))),
        "application/x-ndjson" => bytes
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_slice(l).map_err(|e| {
                    Problem::malformed(format!("line {} is not {}: {e}", i + 1, article(what)))
                })
            })
            .collect(),
        _ => Err(Problem::new(ProblemKind::UnsupportedMediaType)
            .detail("Send application/json (an array) or application/x-ndjson.")),
    }
}

fn article(what: &str) -> String {
    match what.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {what}"),
        _ => format!("a {what}"),
    }
}

pub(crate) fn pointer(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (_, true) => prefix.to_owned(),
        (true, false) => format!("/{field}"),
        (false, false) => format!("{prefix}/{field}"),
    }
}

pub(crate) fn field_errors(
    prefix: impl Fn(usize) -> String,
    violations: Vec<(usize, Violation)>,
) -> Vec<FieldError> {
    violations
        .into_iter()
        .map(|(i, v)| FieldError {
            pointer: pointer(&prefix(i), &v.field),
            code: v.code,
            detail: v.message,
        })
        .collect()
}

/// Applies the asks; `prefix(i)` is the pointer prefix of ask `i` (empty for a
/// single one).
async fn run(
    state: &AppState,
    asks: Vec<Ask>,
    prefix: impl Fn(usize) -> String,
) -> Result<Vec<Done>, Problem> {
    let skew = TimeDelta::seconds(state.settings.max_future_skew_secs);
    // On a task of its own (see `api::ingest`): a dropped handler must not cut the
    // transaction short.
    let pool = state.pool.clone();
    let result = tokio::spawn(async move { adjust::apply(&pool, &asks, Utc::now(), skew).await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "The adjustment task failed");
            Problem::internal()
        })?;
    result.map_err(|e| match e {
        AdjustError::UnknownOrders(unknown) => Problem::not_found(format!(
            "{} adjustment(s) name an order that does not exist; nothing was stored.",
            unknown.len()
        ))
        .errors(
            unknown
                .iter()
                .map(|(i, id)| FieldError {
                    pointer: pointer(&prefix(*i), "order_id"),
                    code: "unknown_order".into(),
                    detail: format!("no order {id}"),
                })
                .collect(),
        ),
        AdjustError::Invalid(violations) => Problem::new(ProblemKind::Validation)
            .detail("The request is invalid; nothing was stored.")
            .errors(field_errors(&prefix, violations)),
        AdjustError::Conflict {
            violations,
            remaining,
        } => Problem::new(ProblemKind::Conflict)
            .detail("The request asks for more than remains, or repeats an id for another request; nothing was stored.")
            .errors(field_errors(&prefix, violations))
            .extension(
                "remaining",
                remaining
                    .iter()
                    .map(|(i, product_id, r)| {
                        serde_json::json!({
                            "pointer": pointer(&prefix(*i), ""),
                            "product_id": product_id,
                            "quantity": r.quantity,
                            "amount_minor": r.amount_minor,
                        })
                    })
                    .collect::<Vec<_>>(),
            ),
        AdjustError::Database(e) if tidemark_platform::postgres::is_unavailable(&e) => {
            tracing::warn!(error = %e, "Postgres unavailable; answering 503");
            Problem::unavailable("The order log is unavailable; retry shortly.")
        }
        AdjustError::Database(e)
            if e.as_database_error().and_then(|d| d.constraint()) == Some("adjustments_pkey") =>
        {
            Problem::new(ProblemKind::Conflict)
                .detail("A refund id was used for another order at the same time; nothing was stored.")
        }
        AdjustError::Database(e) => {
            tracing::error!(error = %e, "Storing adjustments failed");
            Problem::internal()
        }
    })
}

fn counted(done: &[Done]) {
    for d in done {
        let (view, outcome) = match d {
            Done::Created(v) => (v, "created"),
            Done::Existing(v) => (v, "duplicate"),
        };
        metrics::counter!("ingest_adjustments_total", "kind" => view.kind.clone(), "outcome" => outcome)
            .increment(1);
    }
}

fn one(done: Vec<Done>) -> Response {
    counted(&done);
    match done.into_iter().next() {
        Some(Done::Created(view)) => (StatusCode::CREATED, Json(view)).into_response(),
        Some(Done::Existing(view)) => (StatusCode::OK, Json(view)).into_response(),
        None => Problem::internal().into_response(),
    }
}

fn order_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| {
        Problem::new(ProblemKind::Validation)
            .detail("`order_id` is not a UUID.")
            .errors(vec![FieldError {
                pointer: "order_id".into(),
                code: "invalid".into(),
                detail: "must be a UUID".into(),
            }])
    })
}

/// Refund lines of an order, by units or amounts.
///
/// Idempotent by `refund_id`: the same request again answers the stored refund
/// (200); the id reused for another request is a conflict. A refund never gives
/// back more than remains of a line (409, stating what remains).
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/refunds",
    params(("order_id" = Uuid, Path)),
    request_body(content = RefundSchema, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored", body = AdjustmentView),
        (status = 200, description = "The same refund was stored before", body = AdjustmentView),
        (status = 400, description = "Malformed or invalid (unknown product, before the order, …); nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 409, description = "More than remains, or the refund id used for another request", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
pub async fn post_refund(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    const ROUTE: &str = "/v1/orders/{order_id}/refunds";
    let result = async {
        let order_id = order_id(&raw_id)?;
        let bytes = read_body(&headers, body, state.settings.max_body_bytes).await?;
        let wire: RefundSchema = parse(&headers, &bytes)?;
        let items = refund_items(wire.items).map_err(|violations| {
            Problem::new(ProblemKind::Validation)
                .detail("The refund is invalid; nothing was stored.")
                .errors(field_errors(
                    |_| String::new(),
                    violations.into_iter().map(|v| (0, v)).collect(),
                ))
        })?;
        let ask = Ask::Refund {
            order_id,
            request: RefundRequest {
                refund_id: wire.refund_id,
                created_at: utc(wire.created_at),
                items,
            },
        };
        run(&state, vec![ask], |_| String::new()).await
    }
    .await;
    match result {
        Ok(done) => one(done),
        Err(problem) => refused(ROUTE, problem),
    }
}

/// Cancel an order: whatever remains of every line is given back, and the order
/// counts as cancelled. The same cancellation again answers the stored one (200).
#[utoipa::path(
    post,
    path = "/v1/orders/{order_id}/cancellation",
    params(("order_id" = Uuid, Path)),
    request_body(content = CancellationSchema, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored", body = AdjustmentView),
        (status = 200, description = "The order was cancelled so before", body = AdjustmentView),
        (status = 400, description = "Malformed or invalid; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 409, description = "The order was cancelled at another time", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
pub async fn post_cancellation(
    State(state): State<AppState>,
    Path(raw_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    const ROUTE: &str = "/v1/orders/{order_id}/cancellation";
    let result = async {
        let order_id = order_id(&raw_id)?;
        let bytes = read_body(&headers, body, state.settings.max_body_bytes).await?;
        let wire: CancellationSchema = parse(&headers, &bytes)?;
        let ask = Ask::Cancellation {
            order_id,
            created_at: utc(wire.created_at),
        };
        run(&state, vec![ask], |_| String::new()).await
    }
    .await;
    match result {
        Ok(done) => one(done),
        Err(problem) => refused(ROUTE, problem),
    }
}

/// Refunds and cancellations in bulk (imports, backfills): a JSON array or NDJSON
/// of `{kind: "refund", order_id, refund_id, created_at, items}` and `{kind:
/// "cancellation", order_id, created_at}`, applied in order, all or nothing.
#[utoipa::path(
    post,
    path = "/v1/adjustments",
    request_body(
        description = "An array or NDJSON of adjustments, each naming its order.",
        content(("application/json"), ("application/x-ndjson")),
    ),
    responses(
        (status = 201, description = "Stored; at least one was new", body = AdjustmentsResponse),
        (status = 200, description = "Every adjustment was stored before", body = AdjustmentsResponse),
        (status = 400, description = "Malformed or invalid; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, description = "An order does not exist; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 409, description = "More than remains, or a conflicting replay; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON or NDJSON", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
pub async fn post_adjustments(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    const ROUTE: &str = "/v1/adjustments";
    let result = async {
        let bytes = read_body(&headers, body, state.settings.max_body_bytes).await?;
        let items: Vec<BulkItem> = bulk(&headers, &bytes, "adjustment")?;
        if items.is_empty() {
            return Err(
                Problem::new(ProblemKind::Validation).detail("The request holds no adjustments.")
            );
        }
        if items.len() > state.settings.max_batch {
            return Err(Problem::new(ProblemKind::PayloadTooLarge).detail(format!(
                "A request holds at most {} adjustments.",
                state.settings.max_batch
            )));
        }
        let received = items.len();
        let mut asks = Vec::with_capacity(received);
        let mut bad = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            match (item.kind.as_str(), item.refund_id, item.items) {
                ("refund", Some(refund_id), Some(lines)) => match refund_items(lines) {
                    Ok(items) => asks.push(Ask::Refund {
                        order_id: item.order_id,
                        request: RefundRequest {
                            refund_id,
                            created_at: utc(item.created_at),
                            items,
                        },
                    }),
                    Err(violations) => bad.extend(violations.into_iter().map(|v| (i, v))),
                },
                ("refund", _, _) => bad.push((
                    i,
                    Violation::new("", "required", "a refund needs `refund_id` and `items`"),
                )),
                ("cancellation", None, None) => asks.push(Ask::Cancellation {
                    order_id: item.order_id,
                    created_at: utc(item.created_at),
                }),
                ("cancellation", _, _) => bad.push((
                    i,
                    Violation::new(
                        "",
                        "invalid",
                        "a cancellation has no `refund_id` or `items`",
                    ),
                )),
                _ => bad.push((
                    i,
                    Violation::new("kind", "invalid", "must be `refund` or `cancellation`"),
                )),
            }
        }
        if !bad.is_empty() {
            return Err(Problem::new(ProblemKind::Validation)
                .detail("Some adjustments are invalid; nothing was stored.")
                .errors(field_errors(|i| format!("/{i}"), bad)));
        }
        let done = run(&state, asks, |i| format!("/{i}")).await?;
        Ok((received, done))
    }
    .await;
    match result {
        Ok((received, done)) => {
            counted(&done);
            let created = done
                .iter()
                .filter(|d| matches!(d, Done::Created(_)))
                .count();
            let duplicate_adjustment_ids = done
                .iter()
                .filter_map(|d| match d {
                    Done::Existing(v) => Some(v.adjustment_id),
                    Done::Created(_) => None,
                })
                .collect();
            let adjustments: Vec<AdjustmentView> = done
                .into_iter()
                .map(|d| match d {
                    Done::Created(v) | Done::Existing(v) => v,
                })
                .collect();
            let status = if created > 0 {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                Json(AdjustmentsResponse {
                    received,
                    created,
                    duplicates: received - created,
                    duplicate_adjustment_ids,
                    adjustments,
                }),
            )
                .into_response()
        }
        Err(problem) => refused(ROUTE, problem),
    }
}
