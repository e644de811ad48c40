//! REST: revenue series and summaries over the merged views, order history, the
//! OpenAPI document and Swagger UI.

use std::collections::HashMap;
use std::sync::Arc;
use tidemark_platform::problem::BearerAuth;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tidemark_orderlog::customers::{CustomerView, VersionView};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind, ProblemSchema};
use utoipa::OpenApi;
use uuid::Uuid;

use crate::AppState;
use crate::history::{self, AdjustedLineView, AdjustmentView, LineView, OrderPage, OrderView};
use crate::query::{self, RevenueSeries, Summary};
use crate::residence::{ResidenceAnswer, ResidenceRow, VaultFreshness};

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/revenue", get(revenue))
        .route("/v1/revenue/summary", get(summary))
        .route("/v1/revenue/by-residence", get(by_residence))
        .route("/v1/orders/{order_id}", get(order))
        .route("/v1/users/{user_id}/orders", get(user_orders))
        .route("/v1/customers/{user_id}", get(customer))
}

pub fn swagger() -> utoipa_swagger_ui::SwaggerUi {
    utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi())
}

fn timed<T: serde::Serialize>(route: &'static str, result: Result<T, Problem>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(problem) => rejected(route, problem),
    }
}

fn rejected(route: &'static str, problem: Problem) -> Response {
    metrics::counter!("serving_requests_rejected_total", "route" => route, "kind" => problem.kind.slug())
        .increment(1);
    problem.into_response()
}

/// An answer REST computes: its JSON, and about its bytes (the first size of
/// the buffer it is written into).
trait JsonAnswer {
    fn json_bytes(&self) -> usize;
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

impl JsonAnswer for crate::fields::RestSeries {
    fn json_bytes(&self) -> usize {
        crate::fields::RestSeries::json_bytes(self)
    }

    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        crate::fields::RestSeries::write_json(self, out)
    }
}

impl JsonAnswer for Summary {
    fn json_bytes(&self) -> usize {
        // An envelope and the top groups: a few kilobytes.
        4096
    }

    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        serde_json::to_writer(out, self)
    }
}

/// A revenue or summary answer, through the answers both doors share (see
/// [`crate::answers`]): kept per data version, computed once for the requests
/// that arrive while it is computed.
async fn answer<T, F, Fut>(
    state: &AppState,
    request: &HeaderMap,
    route: &'static str,
    question: String,
    compute: F,
) -> Response
where
    T: JsonAnswer + Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Problem>> + Send + 'static,
{
    let version = crate::answers::timed_version(&state.views, route).await;
    let computing = state.views.computing().clone();
    let (result, outcome) = state
        .answers
        .get(question, version, move || async move {
            let started = std::time::Instant::now();
            let answer = compute().await?;
            // Off the runtime's workers: a 30-day dashboard answer is 3.3 MB of
            // JSON, 10–25 ms during which a worker would answer no request.
            let serializing = computing.run(move || {
                let mut out = Vec::with_capacity(answer.json_bytes());
                answer
                    .write_json(&mut out)
                    .map(|()| out)
                    .map_err(|e| e.to_string())
            });
            let bytes = crate::views::timed("json", serializing)
                .await
                .map(Bytes::from)
                .map_err(|e| Problem::internal().detail(format!("serializing the answer: {e}")));
            metrics::histogram!("serving_answer_compute_seconds", "route" => route)
                .record(started.elapsed().as_secs_f64());
            bytes
        })
        .await;
    metrics::counter!("serving_answers_total", "route" => route, "result" => outcome.as_str())
        .increment(1);
    match result {
        Ok(body) => crate::answers::respond(&body, request, state.views.computing()).await,
        Err(problem) => rejected(route, problem),
    }
}

/// Query parameters of `GET /v1/revenue` (documentation).
#[allow(dead_code)]
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct RevenueParams {
    /// Start, truncated to its bucket: RFC 3339 with an offset
    /// (`2026-11-21T00:00:00Z`, `2026-11-21T00:00:00+05:30`) or a local date and
    /// time in `tz` (`2026-11-21T00:00:00`, `2026-11-21`).
    #[param(example = "2026-11-01T00:00:00+05:30")]
    from: String,
    /// End (exclusive), rounded up to a bucket; the same forms as `from`.
    #[param(example = "2026-12-01")]
    to: String,
    /// `minute`, `quarter_hour`, `hour` (default) or `day`, in the local time of `tz`. At most
    /// 10,000 buckets per query and 400 days per range (`serving.max_points`,
    /// `serving.max_range_days`).
    #[param(example = "hour")]
    granularity: Option<String>,
    /// One or two of `city`, `category`, `product`, comma-separated; omitted:
    /// totals. An order counts once per combination of values it holds in the
    /// dimensions grouped or filtered by.
    #[param(example = "city,category")]
    group_by: Option<String>,
    /// Only these cities, comma-separated (`\,` for a comma inside a name; at
    /// most 100 values, each at most 64 characters). Any filter combines with any
    /// grouping.
    #[param(example = "Berlin,Paris,Mumbai")]
    city: Option<String>,
    /// Only these categories, comma-separated.
    #[param(example = "books")]
    category: Option<String>,
    /// Only these product ids, comma-separated.
    product: Option<String>,
    /// Only this ISO 4217 currency.
    #[param(example = "EUR")]
    currency: Option<String>,
    /// IANA time zone whose local hours and days the buckets follow (default
    /// `UTC`): half-hour and 45-minute offsets, and 23- and 25-hour days where
    /// clocks change. Each point carries its `local_bucket`.
    #[param(example = "Asia/Kolkata")]
    tz: Option<String>,
    /// Convert every amount to this ISO 4217 currency (one series instead of one
    /// per currency): each stored minute at its UTC date's rate from
    /// `PUT /v1/fx-rates` (the last within 7 days; crossed through the euro),
    /// rounded half to even, then summed, so a day is the sum of its hours in any
    /// zone. 422 naming the dates and currencies without a rate.
    #[param(example = "EUR")]
    report_currency: Option<String>,
    /// `booking_time` (default): refunds and cancellations count when they
    /// happened; `order_time`: at their order's time, city and products.
    basis: Option<String>,
    /// When a store is down, answer 200 with what is available, flagged `partial`,
    /// instead of 503.
    allow_partial: Option<bool>,
    /// Only these fields of each point, comma-separated (default: all of them;
    /// the answer's other parts stay whole). Without `buyers` the answer is
    /// computed without counting them, the dearest part of a computation. The
    /// fields: `bucket`, `local_bucket`, `group`, `dimensions`, `currency`,
    /// `revenue_minor`, `revenue`, `orders`, `items`, `average_order_value_minor`,
    /// `buyers`, `gross_revenue_minor`, `refunded_minor`, `net_revenue_minor`,
    /// `net_revenue`, `refunded_items`, `cancelled_orders`,
    /// `net_average_order_value_minor`.
    #[param(example = "bucket,group,currency,net_revenue_minor")]
    fields: Option<String>,
}

/// Revenue, orders and items per time bucket: the exact merge of the batch view
/// and the speed view. Gross revenue (`revenue_minor`, `gross_revenue_minor`),
/// refunds, net revenue and cancellations on the asked `basis`. Buckets with
/// nothing in them are omitted; amounts are minor units per currency.
#[utoipa::path(get, path = "/v1/revenue", params(RevenueParams),
    responses(
        (status = 200, body = RevenueSeries),
        (status = 400, description = "Invalid parameters, with every field's problem", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 401, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 403, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 422, description = "Exchange rates missing for `report_currency`: each date and currency named", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "A store is down; see Retry-After, or use allow_partial", body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn revenue(State(state): State<Arc<AppState>>, headers: HeaderMap, uri: Uri) -> Response {
    let asked = match validated(&state, &uri) {
        Ok(asked) => asked,
        Err(response) => return *response,
    };
    let computing = state.clone();
    let question = asked.question.clone();
    answer(
        &state,
        &headers,
        "/v1/revenue",
        question,
        move || async move {
            let fields = asked.request.fields;
            let series = query::revenue(&computing.views, &asked.request).await?;
            Ok(crate::fields::RestSeries { series, fields })
        },
    )
    .await
}

/// A revenue question as validated, and its key among the answers kept.
pub(crate) struct Asked {
    request: query::RevenueRequest,
    question: String,
}

/// The revenue question of `uri`'s query, validated once per query string and
/// kept: a dashboard polls the same text again and again, and validating it —
/// a 30-day hourly question walks its 720 local hours to count its points — was
/// about a tenth of serving's CPU (its time-zone arithmetic, in a profile at
/// 2,000 requests/s of that question). Validation is a function of the text and
/// the settings alone; only questions that pass are kept.
fn validated(state: &AppState, uri: &Uri) -> Result<Arc<Asked>, Box<Response>> {
    let text = uri.query().unwrap_or_default();
    if let Some(asked) = state.questions.get(text) {
        return Ok(asked);
    }
    let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri)
        .map_err(|rejection| Box::new(rejection.into_response()))?;
    let request = query::revenue_request(&params, &state.settings)
        .map_err(|problem| Box::new(rejected("/v1/revenue", problem)))?;
    let question = format!("revenue {request:?}");
    let weight = 2 * text.len() + question.len() + size_of::<Asked>();
    let asked = Arc::new(Asked { request, question });
    state.questions.keep(text.to_owned(), asked.clone(), weight);
    Ok(asked)
}

/// Query parameters of `GET /v1/revenue/summary` (documentation).
#[allow(dead_code)]
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct SummaryParams {
    /// Start, truncated to the minute (the forms of `/v1/revenue`'s `from`).
    from: String,
    /// End (exclusive), truncated to the minute.
    to: String,
    /// The zone of `from` and `to` when they are local times (default `UTC`).
    tz: Option<String>,
    /// One or two of `city` (default), `category`, `product`, comma-separated.
    #[param(example = "city,category")]
    top_by: Option<String>,
    /// How many top groups per currency, 1–100 (default 5); the rest are summed
    /// in `other`.
    top: Option<u32>,
    /// Only these cities / categories / products (comma-separated), as in
    /// `/v1/revenue`.
    city: Option<String>,
    category: Option<String>,
    product: Option<String>,
    currency: Option<String>,
    /// Convert every amount to this ISO 4217 currency (the rule of
    /// `/v1/revenue`'s `report_currency`).
    report_currency: Option<String>,
    /// `booking_time` (default): refunds and cancellations count when they
    /// happened; `order_time`: at their order's time, city and products.
    basis: Option<String>,
    allow_partial: Option<bool>,
}

/// Totals, orders and average order value per currency, and the top values of a
/// dimension by revenue, for a range.
#[utoipa::path(get, path = "/v1/revenue/summary", params(SummaryParams),
    responses(
        (status = 200, body = Summary),
        (status = 400, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 401, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn summary(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let request = match query::summary_request(&params, &state.settings) {
        Ok(request) => request,
        Err(problem) => return rejected("/v1/revenue/summary", problem),
    };
    let question = format!("summary {request:?}");
    let computing = state.clone();
    answer(
        &state,
        &headers,
        "/v1/revenue/summary",
        question,
        move || async move { query::summary(&computing.views, &request).await },
    )
    .await
}

/// Query parameters of `GET /v1/revenue/by-residence` (documentation).
#[allow(dead_code)]
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ResidenceParams {
    /// Start (the forms of `/v1/revenue`'s `from`).
    #[param(example = "2026-11-01T00:00:00+01:00")]
    from: String,
    /// End, exclusive; at most `max_range_days` after `from`.
    #[param(example = "2026-12-01T00:00:00+01:00")]
    to: String,
    /// IANA zone in which `from`/`to` without an offset are read (default UTC).
    #[param(example = "Europe/Berlin")]
    tz: Option<String>,
    /// Only orders in this currency (ISO 4217).
    #[param(example = "EUR")]
    currency: Option<String>,
}

/// Orders, net revenue and average check by the customer's city of residence at
/// the time of each order (an as-of join on the customer history in the
/// warehouse; `city: null` where no version was in effect). Net revenue counts
/// every refund and cancellation of the range's orders. Exact as of the
/// warehouse's loaded log position (`freshness.cursor`).
#[utoipa::path(get, path = "/v1/revenue/by-residence", params(ResidenceParams),
    responses(
        (status = 200, body = ResidenceAnswer),
        (status = 400, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 401, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn by_residence(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let request = query::residence_request(&params, &state.settings)?;
        crate::residence::by_residence(&state.pool, &request).await
    }
    .await;
    timed("/v1/revenue/by-residence", result)
}

/// One order, from the source of truth.
#[utoipa::path(get, path = "/v1/orders/{order_id}",
    params(("order_id" = Uuid, Path)),
    responses(
        (status = 200, body = OrderView),
        (status = 400, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn order(State(state): State<Arc<AppState>>, Path(order_id): Path<String>) -> Response {
    let result = async {
        let id = Uuid::parse_str(&order_id)
            .map_err(|_| Problem::malformed("`order_id` must be a UUID."))?;
        history::order(&state.pool, id)
            .await?
            .ok_or_else(|| Problem::not_found("No order has this id."))
    }
    .await;
    timed("/v1/orders/{order_id}", result)
}

/// Query parameters of `GET /v1/users/{user_id}/orders` (documentation).
#[allow(dead_code)]
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageParams {
    /// Orders per page, 1–500 (default 50).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A user's orders, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/users/{user_id}/orders",
    params(("user_id" = String, Path), PageParams),
    responses(
        (status = 200, body = OrderPage),
        (status = 400, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn user_orders(
    State(state): State<Arc<AppState>>,
    Path(user_id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let mut errors = query::Errors::default();
        for name in params.keys() {
            if name != "limit" && name != "cursor" {
                let shown: String = name.chars().take(40).collect();
                errors.add(
                    &shown,
                    "unknown_parameter",
                    "is not a parameter of this endpoint",
                );
            }
        }
        let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
            None => 50,
            Some(Ok(n)) if (1..=state.settings.max_page).contains(&n) => n,
            Some(_) => {
                errors.add(
                    "limit",
                    "out_of_range",
                    format!("must be between 1 and {}", state.settings.max_page),
                );
                50
            }
        };
        errors.finish()?;
        history::user_orders(
            &state.pool,
            &user_id,
            limit,
            params.get("cursor").map(String::as_str),
        )
        .await
    }
    .await;
    timed("/v1/users/{user_id}/orders", result)
}

/// A customer's attributes now and every version (slowly changing dimension,
/// type 2), from the log as of the last commit.
#[utoipa::path(get, path = "/v1/customers/{user_id}",
    params(("user_id" = String, Path, min_length = 1, max_length = 64)),
    responses(
        (status = 200, body = CustomerView),
        (status = 400, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, body = ProblemSchema, content_type = "application/problem+json"),
    ))]
async fn customer(State(state): State<Arc<AppState>>, Path(user_id): Path<String>) -> Response {
    let result = async {
        if let Err(v) = tidemark_domain::order::check_text("user_id", &user_id) {
            return Err(Problem::new(ProblemKind::Validation)
                .detail("`user_id` is not valid.")
                .errors(vec![FieldError {
                    pointer: v.field,
                    code: v.code,
                    detail: v.message,
                }]));
        }
        tidemark_orderlog::customers::read(&state.pool, &user_id)
            .await
            .map_err(|e| history::db_problem(&e))?
            .ok_or_else(|| Problem::not_found("No customer has this id."))
    }
    .await;
    timed("/v1/customers/{user_id}", result)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tidemark serving API",
        description = "Exact, real-time revenue: the published batch view plus the speed view \
            after its watermark. Every answer states its freshness. Errors are RFC 9457 \
            problem+json. GraphQL is at /graphql (GraphiQL in a browser), subscriptions at \
            /graphql/ws.",
    ),
    paths(revenue, summary, by_residence, order, user_orders, customer),
    components(schemas(RevenueSeries, Summary, OrderView, LineView, AdjustmentView, AdjustedLineView, OrderPage, CustomerView, VersionView, ResidenceAnswer, ResidenceRow, VaultFreshness, ProblemSchema)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub struct ApiDoc;
