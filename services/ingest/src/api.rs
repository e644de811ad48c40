//! `POST /v1/orders`, the Avro schemas producers write (`GET /v1/schemas`), the
//! OpenAPI document and Swagger UI.

use std::sync::Arc;
use std::time::Instant;
use tidemark_platform::problem::BearerAuth;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use chrono::{TimeDelta, Utc};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use sqlx::PgPool;
use tidemark_domain::avro::SchemaVersion;
use tidemark_domain::{Order, OrderLimits};
use tidemark_platform::auth::{self, Authenticator, Scope};
use tidemark_platform::problem::{FieldError, Problem, ProblemKind};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use crate::config::IngestSettings;
use crate::decode::{self, BodyError, Format};
use crate::store::{self, StoreError};

/// Most field errors listed in one 400 (the count of invalid orders is exact).
const MAX_LISTED_ERRORS: usize = 1_000;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub settings: IngestSettings,
    /// Where single orders go when group commit is on.
    pub groups: Option<crate::group::GroupCommit>,
}

pub fn router(state: AppState, auth: Arc<Authenticator>) -> Router {
    let swagger =
        utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi());
    Router::new()
        .route("/v1/orders", post(post_orders))
        .route("/v1/schemas", get(list_schemas))
        .route(
            "/v1/orders/{order_id}/refunds",
            post(crate::adjust_api::post_refund),
        )
        .route(
            "/v1/orders/{order_id}/cancellation",
            post(crate::adjust_api::post_cancellation),
        )
        .route("/v1/adjustments", post(crate::adjust_api::post_adjustments))
        .route(
            "/v1/customers/{user_id}",
            axum::routing::put(crate::customers::put_customer),
        )
        .route("/v1/customers", post(crate::customers::post_customers))
        .route("/v1/schemas/{version}", get(get_schema))
        .route_layer(middleware::from_fn_with_state(
            (auth.clone(), Scope::Ingest),
            auth::require,
        ))
        .merge(
            Router::new()
                .route("/v1/fx-rates", axum::routing::put(crate::fx::put_rates))
                .route_layer(middleware::from_fn_with_state(
                    (auth, Scope::Admin),
                    auth::require,
                )),
        )
        .with_state(state)
        .merge(swagger)
}

/// What a committed request did.
#[derive(Debug, Serialize, ToSchema)]
pub struct IngestResponse {
    /// Orders in the request.
    pub received: usize,
    /// Orders stored by this request.
    pub created: usize,
    /// Orders already stored with identical content (or repeated in the request).
    pub duplicates: usize,
    pub duplicate_order_ids: Vec<Uuid>,
}

/// An order of one line, the line's fields at the top level. Unknown fields are
/// rejected.
#[allow(dead_code)] // documentation only: the wire type lives in `decode`
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)] // states `additionalProperties: false`
#[schema(as = Order, example = json!({
    "order_id": "0193a1b2-7c3d-7e4f-8a9b-0c1d2e3f4a5b",
    "user_id": "user-1042", "city": "Berlin", "product_id": "sku-778",
    "category": "books", "quantity": 2, "unit_price_minor": 1299, "currency": "EUR",
    "created_at": "2026-11-21T10:15:00Z"
}))]
struct OrderSchema {
    /// Client-chosen UUID: the idempotency key.
    order_id: Uuid,
    /// 1–64 characters, not blank, no control characters (U+0000–U+001F,
    /// U+007F–U+009F); the same pattern on each text field.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    user_id: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    city: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    product_id: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    category: String,
    #[schema(minimum = 1, maximum = 1000)]
    quantity: i32,
    /// Price of one unit in minor units of `currency`, by its ISO 4217 exponent:
    /// cents for EUR (1299 = 12.99 EUR), yen for JPY (1299 = 1,299 JPY), fils
    /// for KWD (1299 = 1.299 KWD).
    #[schema(minimum = 0, maximum = 100_000_000)]
    unit_price_minor: i64,
    /// ISO 4217: any active currency with minor units (not `XXX`, `XTS`, metals,
    /// funds or superseded codes). The pattern lists every accepted code.
    currency: String,
    /// Event time, RFC 3339 (any offset; stored in UTC, microsecond precision). At
    /// most 5 minutes in the future, not before 2000-01-01.
    created_at: chrono::DateTime<Utc>,
}

/// An order of 1 to 100 lines (`items`), each of a different product. Unknown
/// fields are rejected.
#[allow(dead_code)] // documentation only: the wire type lives in `decode`
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(as = Basket, example = json!({
    "order_id": "0193a1b2-7c3d-7e4f-8a9b-0c1d2e3f4a5c",
    "user_id": "user-1042", "city": "Kuwait City", "currency": "KWD",
    "created_at": "2026-11-21T10:15:00Z",
    "items": [
        {"product_id": "sku-778", "category": "books", "quantity": 2, "unit_price_minor": 3990},
        {"product_id": "sku-12", "category": "games", "quantity": 1, "unit_price_minor": 14500}
    ]
}))]
struct BasketSchema {
    /// Client-chosen UUID: the idempotency key.
    order_id: Uuid,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    user_id: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    city: String,
    /// ISO 4217 (as for a one-line order).
    currency: String,
    /// Event time, RFC 3339 (as for a one-line order).
    created_at: chrono::DateTime<Utc>,
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<LineSchema>,
}

/// One line of a basket.
#[allow(dead_code)] // documentation only: the wire type lives in `decode`
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[schema(as = OrderLine)]
struct LineSchema {
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    product_id: String,
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u001F\u007F-\u009F]*$"
    )]
    category: String,
    #[schema(minimum = 1, maximum = 1000)]
    quantity: i32,
    /// Price of one unit in minor units of the order's currency.
    #[schema(minimum = 0, maximum = 100_000_000)]
    unit_price_minor: i64,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tidemark ingest API",
        description = "Send orders; a 2xx means they are committed to the log.\n\n\
            Limits: 10 MB per body and 10,000 orders per request (configurable: \
            `ingest.max_body_bytes`, `ingest.max_batch`). Errors are RFC 9457 problem+json.",
    ),
    paths(post_orders, list_schemas, get_schema,
        crate::adjust_api::post_refund, crate::adjust_api::post_cancellation,
        crate::adjust_api::post_adjustments, crate::customers::put_customer,
        crate::customers::post_customers, crate::fx::put_rates),
    components(schemas(OrderSchema, BasketSchema, LineSchema, IngestResponse, AvroSchema, AvroSchemas,
        crate::adjust::AdjustmentView, crate::adjust::AdjustedLineView,
        crate::adjust_api::RefundSchema, crate::adjust_api::RefundLineSchema,
        crate::adjust_api::CancellationSchema, crate::adjust_api::AdjustmentsResponse,
        crate::fx::LoadedRates, crate::customers::ChangeSchema, crate::customers::BulkItem,
        crate::customers::CustomersResponse, tidemark_orderlog::customers::CustomerView,
        tidemark_orderlog::customers::VersionView,
        tidemark_platform::problem::ProblemSchema, tidemark_platform::problem::FieldErrorSchema)),
    modifiers(&BearerAuth, &OrdersBody, &CurrencyCodes),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

/// The JSON body: one order, or an array of 1 to 10,000 (the default
/// `ingest.max_batch`). The path macro cannot state both forms with bounds.
struct OrdersBody;

/// States the accepted currency codes as the `Order.currency` pattern, from the
/// same list that decoding checks against.
struct CurrencyCodes;

impl utoipa::Modify for CurrencyCodes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::Schema;
        let codes: Vec<String> = tidemark_domain::Currency::all()
            .map(|c| c.as_str().to_owned())
            .collect();
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for name in ["Order", "Basket"] {
            let currency = components
                .schemas
                .get_mut(name)
                .and_then(|order| match order {
                    RefOr::T(Schema::Object(order)) => order.properties.get_mut("currency"),
                    _ => None,
                });
            if let Some(RefOr::T(Schema::Object(currency))) = currency {
                currency.pattern = Some(format!("^({})$", codes.join("|")));
            }
        }
    }
}

impl utoipa::Modify for OrdersBody {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ArrayBuilder, OneOfBuilder, Schema};
        use utoipa::openapi::{ContentBuilder, Ref, RefOr};
        let order = || {
            OneOfBuilder::new()
                .item(Ref::from_schema_name("Order"))
                .item(Ref::from_schema_name("Basket"))
        };
        let body = order()
            .item(
                ArrayBuilder::new()
                    .items(order())
                    .min_items(Some(1))
                    .max_items(Some(10_000)),
            )
            .build();
        let body: RefOr<Schema> = Schema::OneOf(body).into();
        let request = openapi
            .paths
            .paths
            .get_mut("/v1/orders")
            .and_then(|path| path.post.as_mut())
            .and_then(|post| post.request_body.as_mut());
        if let Some(RefOr::T(request)) = request {
            request.content.insert(
                "application/json".into(),
                RefOr::T(ContentBuilder::new().schema(Some(body)).build()),
            );
        }
    }
}

/// An Avro schema of orders that producers may write.
#[derive(Debug, Serialize, ToSchema)]
pub struct AvroSchema {
    /// 1, 2, …
    pub version: u32,
    /// Whether ingest reads files with this version's schema (files written with
    /// an older one are resolved to it).
    pub current: bool,
    /// The CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form,
    /// 16 hex digits, as in Avro's single-object encoding.
    #[schema(example = "c1d2a0f3e4b5a697")]
    pub fingerprint: String,
    /// The schema itself (Avro JSON), to write Object Container Files with.
    #[schema(value_type = Object)]
    pub schema: serde_json::Value,
}

impl From<SchemaVersion> for AvroSchema {
    fn from(version: SchemaVersion) -> Self {
        AvroSchema {
            version: version.number(),
            current: version == SchemaVersion::CURRENT,
            fingerprint: version.fingerprint(),
            schema: serde_json::from_str(version.text()).expect("the schemas are JSON"),
        }
    }
}

/// Every Avro schema version producers may write, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AvroSchemas {
    pub schemas: Vec<AvroSchema>,
}

/// The Avro schemas of orders: every version producers may write, with its
/// fingerprint. Fetch them instead of copying them.
#[utoipa::path(
    get,
    path = "/v1/schemas",
    responses(
        (status = 200, body = AvroSchemas),
    ),
)]
async fn list_schemas() -> Json<AvroSchemas> {
    Json(AvroSchemas {
        schemas: SchemaVersion::ALL
            .into_iter()
            .map(AvroSchema::from)
            .collect(),
    })
}

/// One Avro schema version of orders.
#[utoipa::path(
    get,
    path = "/v1/schemas/{version}",
    params(("version" = u32, Path, description = "The schema version, 1, 2, …")),
    responses(
        (status = 200, body = AvroSchema),
        (status = 400, description = "Not a version number", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 404, description = "No such version", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
async fn get_schema(Path(version): Path<String>) -> Response {
    let Ok(number) = version.parse::<u32>() else {
        return Problem::new(ProblemKind::Validation)
            .detail("`version` must be a schema version number (1, 2, …).")
            .errors(vec![FieldError {
                pointer: "version".into(),
                code: "invalid".into(),
                detail: "must be a whole number".into(),
            }])
            .into_response();
    };
    match SchemaVersion::of(number) {
        Some(version) => Json(AvroSchema::from(version)).into_response(),
        None => Problem::not_found(format!(
            "There is no Avro schema version {number}; versions 1 to {} exist.",
            SchemaVersion::CURRENT.number()
        ))
        .into_response(),
    }
}

/// Ingest one order, a batch, NDJSON or an Avro container file.
///
/// The response comes after the transaction commits. A batch is atomic: if any order
/// is invalid or conflicts, nothing is stored. A request of one order may share its
/// commit with concurrent ones (group commit); its outcome is its own. Resending an order that is already
/// stored with the same content is reported as a duplicate and stores nothing.
#[utoipa::path(
    post,
    path = "/v1/orders",
    request_body(
        description = "One order (object: one line at the top level, or a basket \
                       with `items`), a batch (array), NDJSON (one order per line) or an \
                       Avro Object Container File (any version of `GET /v1/schemas`).",
        content(
            // One order or a batch of 1 to 10,000: see `OrdersBody`.
            (OrderSchema = "application/json"),
            ("application/x-ndjson"),
            ("application/avro"),
        )
    ),
    responses(
        (status = 201, description = "Committed; at least one order was new", body = IngestResponse),
        (status = 200, description = "Committed; every order was a duplicate", body = IngestResponse),
        (status = 400, description = "Malformed or invalid; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 401, description = "Missing, unknown or revoked API key", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 403, description = "The key lacks the `ingest` scope", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 409, description = "An order id exists with different content; nothing stored", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 413, description = "Body or batch over the limit", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 415, description = "Unsupported content type", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 429, description = "The key is over its rate; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
        (status = 503, description = "Postgres unavailable or the service is shedding load; see Retry-After", body = ProblemSchema, content_type = "application/problem+json"),
    ),
)]
async fn post_orders(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    match ingest(&state, &headers, body).await {
        Ok((status, response)) => (status, Json(response)).into_response(),
        Err(problem) => refused("/v1/orders", problem),
    }
}

/// A refusal, counted by route and kind; after a 413 the connection is closed (the
/// rest of the body was not read).
pub(crate) fn refused(route: &'static str, problem: Problem) -> Response {
    metrics::counter!("ingest_requests_rejected_total", "route" => route, "kind" => problem.kind.slug())
        .increment(1);
    let too_large = problem.kind == ProblemKind::PayloadTooLarge;
    let mut response = problem.into_response();
    if too_large {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

use tidemark_platform::problem::ProblemSchema;

/// Reads a body of at most `max` bytes, whatever it claims (413 beyond).
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max: usize,
) -> Result<bytes::Bytes, Problem> {
    let too_large = || {
        Problem::new(ProblemKind::PayloadTooLarge).detail(format!("The body exceeds {max} bytes."))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(Problem::malformed("The request body could not be read.")),
    }
}

async fn ingest(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, IngestResponse), Problem> {
    let started = Instant::now();
    let settings = &state.settings;
    let format = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_content_type)
        .ok_or_else(|| {
            Problem::new(ProblemKind::UnsupportedMediaType)
                .detail("Send application/json, application/x-ndjson or application/avro.")
        })?;
    let bytes = read_body(headers, body, settings.max_body_bytes).await?;

    let limits = OrderLimits {
        max_future_skew: TimeDelta::seconds(settings.max_future_skew_secs),
        ..OrderLimits::default()
    };
    let decoded = decode::decode(format, &bytes, settings.max_batch, Utc::now(), &limits).map_err(
        |e| match e {
            BodyError::Malformed(detail) => Problem::malformed(detail),
            BodyError::TooMany(max) => Problem::new(ProblemKind::PayloadTooLarge)
                .detail(format!("A request holds at most {max} orders.")),
            BodyError::Empty => {
                Problem::new(ProblemKind::Validation).detail("The request holds no orders.")
            }
        },
    )?;

    let total = decoded.items.len();
    let mut orders: Vec<Order> = Vec::with_capacity(total);
    let mut errors: Vec<FieldError> = Vec::new();
    let mut invalid = 0;
    for (index, item) in decoded.items.into_iter().enumerate() {
        match item {
            Ok(order) => orders.push(order),
            Err(violations) => {
                invalid += 1;
                for v in violations {
                    if errors.len() == MAX_LISTED_ERRORS {
                        break;
                    }
                    let mut pointer = if decoded.batch {
                        format!("/{index}")
                    } else {
                        String::new()
                    };
                    if !v.field.is_empty() {
                        pointer = format!("{pointer}/{}", v.field);
                    }
                    errors.push(FieldError {
                        pointer,
                        code: v.code,
                        detail: v.message,
                    });
                }
            }
        }
    }
    if invalid > 0 {
        metrics::counter!("ingest_orders_total", "outcome" => "rejected").increment(total as u64);
        let detail = if decoded.batch {
            format!("{invalid} of {total} orders are invalid; nothing was stored.")
        } else {
            "The order is invalid; nothing was stored.".to_owned()
        };
        return Err(Problem::new(ProblemKind::Validation)
            .detail(detail)
            .errors(errors));
    }

    let stored = match &state.groups {
        // The group's task commits it whatever becomes of this handler.
        Some(groups) if orders.len() == 1 => groups.store(orders.pop().expect("one order")).await,
        _ => spawn_store(&state.pool, orders).await?,
    };
    let outcome = stored.map_err(|e| match e {
        StoreError::Conflict(ids) => Problem::new(ProblemKind::Conflict)
            .detail(format!(
                "{} order id(s) already exist with different content; nothing was stored.",
                ids.len()
            ))
            .extension("conflicting_order_ids", &ids),
        StoreError::Database(e) if tidemark_platform::postgres::is_unavailable(&e) => {
            tracing::warn!(error = %e, "Postgres unavailable; answering 503");
            Problem::unavailable("The order log is unavailable; retry shortly.")
        }
        StoreError::Database(e) => {
            tracing::error!(error = %e, "Storing orders failed");
            Problem::internal()
        }
    })?;

    let duplicates = outcome.duplicates.len();
    metrics::counter!("ingest_orders_total", "outcome" => "created")
        .increment(outcome.created as u64);
    metrics::counter!("ingest_orders_total", "outcome" => "duplicate").increment(duplicates as u64);
    metrics::histogram!("ingest_commit_seconds", "format" => format.as_str())
        .record(started.elapsed().as_secs_f64());
    let status = if outcome.created > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        IngestResponse {
            received: total,
            created: outcome.created,
            duplicates,
            duplicate_order_ids: outcome.duplicates,
        },
    ))
}

/// Stores the orders on a task of its own, which finishes even if the client
/// disconnects and the handler is dropped: a transaction cut inside its BEGIN would
/// stay open on a pooled connection, holding every consumer's horizon back until
/// Postgres ends it.
async fn spawn_store(
    pool: &PgPool,
    orders: Vec<Order>,
) -> Result<Result<store::Outcome, StoreError>, Problem> {
    let pool = pool.clone();
    tokio::spawn(async move { store::store(&pool, &orders).await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "The store task failed");
            Problem::internal()
        })
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi;

    #[test]
    fn the_specs_currency_pattern_lists_exactly_the_accepted_codes() {
        let spec = serde_json::to_value(super::ApiDoc::openapi()).unwrap();
        let pattern = spec["components"]["schemas"]["Order"]["properties"]["currency"]["pattern"]
            .as_str()
            .unwrap()
            .to_owned();
        let listed: Vec<&str> = pattern
            .trim_start_matches("^(")
            .trim_end_matches(")$")
            .split('|')
            .collect();
        let accepted: Vec<String> = tidemark_domain::Currency::all()
            .map(|c| c.as_str().to_owned())
            .collect();
        assert_eq!(listed, accepted);
        assert_eq!(
            spec["components"]["schemas"]["Basket"]["properties"]["currency"]["pattern"],
            spec["components"]["schemas"]["Order"]["properties"]["currency"]["pattern"],
            "a basket takes the same currencies"
        );
        let items = &spec["components"]["schemas"]["Basket"]["properties"]["items"];
        assert_eq!(
            (items["minItems"].as_u64(), items["maxItems"].as_u64()),
            (Some(1), Some(100))
        );
        for code in ["EUR", "JPY", "RUB", "KWD", "BHD"] {
            assert!(listed.contains(&code), "{code} missing from {pattern}");
        }
        for code in ["XXX", "XTS", "BOV", "EUE"] {
            assert!(!listed.contains(&code), "{code} listed in {pattern}");
        }
    }
}
