//! GraphQL: the REST questions as queries, plus a subscription that pushes live
//! revenue whenever the speed view moves. Depth and complexity are limited and
//! introspection can be switched off (`serving.graphql_*`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::http::GraphiQLSource;
use async_graphql::parser::types::{OperationType, Selection};
use async_graphql::{Context, EmptyMutation, Enum, ErrorExtensions, Object, Schema, Subscription};
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLWebSocket};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::WebSocketUpgrade;
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use futures::Stream;
use tidemark_platform::auth::{Authenticator, Scope};
use tidemark_platform::problem::Problem;
use uuid::Uuid;

use crate::AppState;
use crate::config::ServingSettings;
use crate::fields::PointFields;
use crate::history::{self, OrderPage, OrderView};
use crate::query::{self, RevenueRequest, RevenueSeries, Summary};
use crate::residence::ResidenceAnswer;

pub type TidemarkSchema = Schema<QueryRoot, EmptyMutation, SubscriptionRoot>;

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
pub enum Granularity {
    Minute,
    QuarterHour,
    Hour,
    Day,
}

/// Which time refunds and cancellations count at.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Default)]
pub enum Basis {
    /// When they happened (the default).
    #[default]
    BookingTime,
    /// At their order's time, place and products.
    OrderTime,
}

impl Basis {
    fn as_str(self) -> &'static str {
        match self {
            Basis::BookingTime => "booking_time",
            Basis::OrderTime => "order_time",
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
pub enum GroupBy {
    City,
    Category,
    Product,
}

impl Granularity {
    fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::QuarterHour => "quarter_hour",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }
}

impl GroupBy {
    fn as_str(self) -> &'static str {
        match self {
            GroupBy::City => "city",
            GroupBy::Category => "category",
            GroupBy::Product => "product",
        }
    }
}

/// A problem as a GraphQL error: message, and `code`, `status`, field `errors` in
/// the extensions.
fn error(problem: &Problem) -> async_graphql::Error {
    let message = problem
        .detail
        .clone()
        .unwrap_or_else(|| problem.kind.title().to_owned());
    let errors = serde_json::to_value(&problem.errors).unwrap_or_default();
    async_graphql::Error::new(message).extend_with(|_, e| {
        e.set("code", problem.kind.slug());
        e.set("status", problem.kind.status().as_u16());
        if !problem.errors.is_empty()
            && let Ok(v) = async_graphql::Value::from_json(errors.clone())
        {
            e.set("errors", v);
        }
    })
}

fn record(field: &'static str, started: Instant) {
    metrics::histogram!("serving_graphql_field_duration_seconds", "field" => field)
        .record(started.elapsed().as_secs_f64());
}

/// What a question slices by, as GraphQL arguments: they become the same query
/// parameters REST takes, validated by the same code.
#[derive(Clone, Default)]
struct Slice {
    group_by: Option<Vec<GroupBy>>,
    city: Option<Vec<String>>,
    category: Option<Vec<String>>,
    product: Option<Vec<String>>,
    currency: Option<String>,
    tz: Option<String>,
    report_currency: Option<String>,
}

impl Slice {
    fn into_params(self, params: &mut HashMap<String, String>, group_param: &str) {
        if let Some(g) = self.group_by {
            let names: Vec<&str> = g.iter().map(|g| g.as_str()).collect();
            params.insert(group_param.to_owned(), query::join_list(&names));
        }
        for (k, v) in [
            ("city", self.city),
            ("category", self.category),
            ("product", self.product),
        ] {
            if let Some(v) = v {
                params.insert(k.to_owned(), query::join_list(&v));
            }
        }
        for (k, v) in [
            ("currency", self.currency),
            ("tz", self.tz),
            ("report_currency", self.report_currency),
        ] {
            if let Some(v) = v {
                params.insert(k.to_owned(), v);
            }
        }
    }
}

fn revenue_params(
    from: &str,
    to: &str,
    granularity: Granularity,
    slice: Slice,
    basis: Basis,
    allow_partial: bool,
) -> HashMap<String, String> {
    let mut params = HashMap::from([
        ("from".to_owned(), from.to_owned()),
        ("to".to_owned(), to.to_owned()),
        ("granularity".to_owned(), granularity.as_str().to_owned()),
        ("basis".to_owned(), basis.as_str().to_owned()),
        ("allow_partial".to_owned(), allow_partial.to_string()),
    ]);
    slice.into_params(&mut params, "group_by");
    params
}

/// The fields of each point a `revenue` selection asks for: buyers are counted
/// only when `points { buyers }` is selected (through fragments too; aliases
/// do not matter), as REST's `fields` (see [`crate::fields`]).
fn point_fields(ctx: &Context<'_>) -> PointFields {
    if ctx.look_ahead().field("points").field("buyers").exists() {
        PointFields::ALL
    } else {
        PointFields::ALL.without_buyers()
    }
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Revenue per time bucket: the exact merge of the batch and speed views.
    /// Costs 20 toward the complexity limit (it reads three stores).
    #[allow(clippy::too_many_arguments)]
    #[graphql(complexity = "20 + child_complexity")]
    async fn revenue(
        &self,
        ctx: &Context<'_>,
        #[graphql(
            desc = "Start: RFC 3339 (`2026-11-21T00:00:00+05:30`) or local time in \
                          `tz` (`2026-11-21T00:00:00`, `2026-11-21`); truncated to its bucket."
        )]
        from: String,
        #[graphql(desc = "End, exclusive, in the same forms; rounded up to a bucket.")] to: String,
        #[graphql(default_with = "Granularity::Hour")] granularity: Granularity,
        #[graphql(desc = "One or two dimensions, e.g. `[CITY, CATEGORY]`.")] group_by: Option<
            Vec<GroupBy>,
        >,
        #[graphql(desc = "Only these cities, e.g. `[\"Berlin\", \"Paris\"]`.")] city: Option<
            Vec<String>,
        >,
        #[graphql(desc = "Only these categories.")] category: Option<Vec<String>>,
        #[graphql(desc = "Only these product ids.")] product: Option<Vec<String>>,
        #[graphql(desc = "Only this ISO 4217 currency.")] currency: Option<String>,
        #[graphql(desc = "IANA zone whose local hours and days the buckets follow \
                          (default UTC), e.g. `Asia/Kolkata`.")]
        tz: Option<String>,
        #[graphql(
            desc = "Convert every amount to this ISO 4217 currency at daily rates \
                          (PUT /v1/fx-rates), e.g. `EUR`."
        )]
        report_currency: Option<String>,
        #[graphql(default)] basis: Basis,
        #[graphql(default)] allow_partial: bool,
    ) -> async_graphql::Result<RevenueSeries> {
        let started = Instant::now();
        let state = ctx.data::<Arc<AppState>>()?;
        let slice = Slice {
            group_by,
            city,
            category,
            product,
            currency,
            tz,
            report_currency,
        };
        let params = revenue_params(&from, &to, granularity, slice, basis, allow_partial);
        let fields = point_fields(ctx);
        let result = async {
            let request = RevenueRequest {
                fields,
                ..query::revenue_request(&params, &state.settings)?
            };
            query::revenue(&state.views, &request).await
        }
        .await
        .map_err(|p| error(&p));
        record("revenue", started);
        result
    }

    /// Totals per currency and the top values of a dimension, for a range.
    /// Costs 40 toward the complexity limit.
    #[allow(clippy::too_many_arguments)] // a resolver's arguments are the field's
    #[graphql(complexity = "40 + child_complexity")]
    async fn summary(
        &self,
        ctx: &Context<'_>,
        from: String,
        to: String,
        #[graphql(default_with = "vec![GroupBy::City]", desc = "One or two dimensions.")]
        top_by: Vec<GroupBy>,
        #[graphql(default = 5)] top: u32,
        city: Option<Vec<String>>,
        category: Option<Vec<String>>,
        product: Option<Vec<String>>,
        currency: Option<String>,
        #[graphql(desc = "IANA zone of `from` and `to` when they are local times.")] tz: Option<
            String,
        >,
        #[graphql(desc = "Convert every amount to this ISO 4217 currency, e.g. `EUR`.")]
        report_currency: Option<String>,
        #[graphql(default)] basis: Basis,
    ) -> async_graphql::Result<Summary> {
        let started = Instant::now();
        let state = ctx.data::<Arc<AppState>>()?;
        let mut params = HashMap::from([
            ("from".to_owned(), from),
            ("to".to_owned(), to),
            ("basis".to_owned(), basis.as_str().to_owned()),
            ("top".to_owned(), top.to_string()),
        ]);
        let slice = Slice {
            group_by: Some(top_by),
            city,
            category,
            product,
            currency,
            tz,
            report_currency,
        };
        slice.into_params(&mut params, "top_by");
        // Buyers are counted when the selection shows them.
        let look = ctx.look_ahead();
        let buyers = look.field("totals").field("buyers").exists()
            || look.field("top").field("buyers").exists();
        let result = async {
            let request = query::SummaryRequest {
                buyers,
                ..query::summary_request(&params, &state.settings)?
            };
            query::summary(&state.views, &request).await
        }
        .await
        .map_err(|p| error(&p));
        record("summary", started);
        result
    }

    /// Orders, net revenue and average check by the customer's city of residence
    /// at the time of each order, from the warehouse (see REST
    /// `/v1/revenue/by-residence`). Costs 20 toward the complexity limit.
    #[graphql(complexity = "20 + child_complexity")]
    async fn revenue_by_residence(
        &self,
        ctx: &Context<'_>,
        from: String,
        to: String,
        #[graphql(desc = "IANA zone of `from` and `to` when they are local times.")] tz: Option<
            String,
        >,
        currency: Option<String>,
    ) -> async_graphql::Result<ResidenceAnswer> {
        let started = Instant::now();
        let state = ctx.data::<Arc<AppState>>()?;
        let mut params = HashMap::from([("from".to_owned(), from), ("to".to_owned(), to)]);
        params.extend(tz.map(|tz| ("tz".to_owned(), tz)));
        params.extend(currency.map(|c| ("currency".to_owned(), c)));
        let result = async {
            let request = query::residence_request(&params, &state.settings)?;
            crate::residence::by_residence(&state.pool, &request).await
        }
        .await
        .map_err(|p| error(&p));
        record("revenueByResidence", started);
        result
    }

    /// One order.
    async fn order(
        &self,
        ctx: &Context<'_>,
        order_id: Uuid,
    ) -> async_graphql::Result<Option<OrderView>> {
        let started = Instant::now();
        let state = ctx.data::<Arc<AppState>>()?;
        let result = history::order(&state.pool, order_id)
            .await
            .map_err(|p| error(&p));
        record("order", started);
        result
    }

    /// A user's orders, newest first. Costs 10 toward the complexity limit.
    #[graphql(complexity = "10 + child_complexity")]
    async fn user_orders(
        &self,
        ctx: &Context<'_>,
        user_id: String,
        #[graphql(default = 50)] limit: u32,
        cursor: Option<String>,
    ) -> async_graphql::Result<OrderPage> {
        let started = Instant::now();
        let state = ctx.data::<Arc<AppState>>()?;
        let limit = limit as usize;
        if !(1..=state.settings.max_page).contains(&limit) {
            return Err(async_graphql::Error::new(format!(
                "limit must be between 1 and {}",
                state.settings.max_page
            )));
        }
        let result = history::user_orders(&state.pool, &user_id, limit, cursor.as_deref())
            .await
            .map_err(|p| error(&p));
        record("userOrders", started);
        result
    }
}

pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Live revenue: the series is pushed at once and again whenever new orders
    /// reach the speed view. Without `to`, the window rolls: it ends with the
    /// current bucket and starts at `from` (default: one hour before now).
    #[allow(clippy::unused_async)] // the macro requires an async resolver
    #[allow(clippy::too_many_arguments)] // a resolver's arguments are the field's
    async fn revenue(
        &self,
        ctx: &Context<'_>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        #[graphql(default_with = "Granularity::Minute")] granularity: Granularity,
        group_by: Option<Vec<GroupBy>>,
        city: Option<Vec<String>>,
        category: Option<Vec<String>>,
        product: Option<Vec<String>>,
        currency: Option<String>,
        tz: Option<String>,
        report_currency: Option<String>,
        #[graphql(default)] basis: Basis,
    ) -> async_graphql::Result<impl Stream<Item = async_graphql::Result<RevenueSeries>>> {
        let state = ctx.data::<Arc<AppState>>()?.clone();
        let slice = Slice {
            group_by,
            city,
            category,
            product,
            currency,
            tz,
            report_currency,
        };
        let window = move || {
            let now = Utc::now();
            let from = from.unwrap_or(now - chrono::TimeDelta::hours(1));
            let to = to.unwrap_or(now + chrono::TimeDelta::seconds(60));
            revenue_params(
                &from.to_rfc3339(),
                &to.to_rfc3339(),
                granularity,
                slice.clone(),
                basis,
                false,
            )
        };
        // Reject bad arguments before the first push.
        query::revenue_request(&window(), &state.settings).map_err(|p| error(&p))?;
        let fields = point_fields(ctx);
        let poll = state.settings.subscription_poll;
        Ok(futures::stream::unfold(None::<String>, move |last| {
            let state = state.clone();
            let window = window.clone();
            async move {
                loop {
                    let cursor = state.views.speed_cursor().await;
                    if last.is_none() || cursor != last {
                        let result = async {
                            let request = RevenueRequest {
                                fields,
                                ..query::revenue_request(&window(), &state.settings)?
                            };
                            query::revenue(&state.views, &request).await
                        }
                        .await
                        .map_err(|p| error(&p));
                        return Some((result, cursor.or_else(|| Some(String::new()))));
                    }
                    tokio::time::sleep(poll).await;
                }
            }
        }))
    }
}

pub fn schema(state: Arc<AppState>, settings: &ServingSettings) -> TidemarkSchema {
    let builder = Schema::build(QueryRoot, EmptyMutation, SubscriptionRoot)
        .data(state)
        .limit_depth(settings.graphql_max_depth)
        .limit_complexity(settings.graphql_max_complexity);
    if settings.graphql_introspection {
        builder.finish()
    } else {
        builder.disable_introspection().finish()
    }
}

/// `POST /graphql` (authenticated by the router's key check; see
/// [`subscriptions`] for `/graphql/ws`).
pub fn router(
    executor: TidemarkSchema,
    settings: &ServingSettings,
    computing: Arc<crate::compute::Computing>,
) -> Router<Arc<AppState>> {
    let cache = Arc::new(
        ResponseCache::new(
            settings.cache_entries,
            settings.cache_bytes,
            settings.max_stale,
            settings.revalidate_within,
            settings.recent_within,
        )
        .compressing(computing),
    );
    let prechecks = Arc::new(Prechecks::new(settings.cache_entries, settings.cache_bytes));
    Router::new().route(
        "/graphql",
        post(
            move |State(app): State<Arc<AppState>>, headers: HeaderMap, request: GraphQLRequest| {
                let (schema, cache, prechecks) =
                    (executor.clone(), cache.clone(), prechecks.clone());
                async move {
                    let request = request.into_inner();
                    execute(&app, &schema, (&cache, &prechecks), &headers, request).await
                }
            },
        ),
    )
}

/// `/graphql/ws`: the live subscription (graphql-ws and the older
/// subscriptions-transport-ws). A browser cannot put a header on a WebSocket
/// upgrade, so the read key comes either as the upgrade's `Authorization` header
/// or in the `connection_init` payload — `{"Authorization": "Bearer <key>"}` (as
/// GraphiQL sends its headers), `{"authorization": …}` or `{"apiKey": "<key>"}`.
/// Without a valid key the connection is closed (1002, with the reason) before any
/// subscription starts; a key over its rate is refused the same way.
pub fn subscriptions(schema: TidemarkSchema, auth: Arc<Authenticator>) -> Router<Arc<AppState>> {
    Router::new().route(
        "/graphql/ws",
        get(
            move |protocol: GraphQLProtocol, headers: HeaderMap, upgrade: WebSocketUpgrade| {
                let (schema, auth) = (schema.clone(), auth.clone());
                async move {
                    let header = headers
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(tidemark_platform::auth::bearer)
                        .map(str::to_owned);
                    upgrade.protocols(ALL_WEBSOCKET_PROTOCOLS).on_upgrade(
                        move |stream| async move {
                            let _open = OpenWebSocket::new();
                            GraphQLWebSocket::new(stream, schema, protocol)
                                .on_connection_init(move |payload| async move {
                                    let token = header.or_else(|| init_token(&payload));
                                    tidemark_platform::auth::admit(
                                        &auth,
                                        token.as_deref(),
                                        Scope::Read,
                                    )
                                    .await
                                    .map(|key| {
                                        let mut data = async_graphql::Data::default();
                                        data.insert(key);
                                        data
                                    })
                                    .map_err(|problem| {
                                        metrics::counter!("serving_subscriptions_refused_total")
                                            .increment(1);
                                        async_graphql::Error::new(
                                            problem
                                                .detail
                                                .unwrap_or_else(|| problem.kind.title().to_owned()),
                                        )
                                    })
                                })
                                .serve()
                                .await;
                        },
                    )
                }
            },
        ),
    )
}

/// One open subscription connection, counted in `serving_websockets_open` while it
/// lives (a replica's share of the live clients; after a replica dies its clients
/// reconnect to the others).
struct OpenWebSocket;

impl OpenWebSocket {
    fn new() -> Self {
        metrics::gauge!("serving_websockets_open").increment(1.0);
        OpenWebSocket
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        metrics::gauge!("serving_websockets_open").decrement(1.0);
    }
}

/// The key in a `connection_init` payload (see [`subscriptions`]).
fn init_token(payload: &serde_json::Value) -> Option<String> {
    let field = |name: &str| payload.get(name).and_then(serde_json::Value::as_str);
    field("Authorization")
        .or_else(|| field("authorization"))
        .and_then(tidemark_platform::auth::bearer)
        .or_else(|| field("apiKey"))
        .map(str::to_owned)
}

/// Answers of revenue and summary queries, through the same coalescing store as
/// REST's (see [`crate::answers`]): kept per data version (`as_of` then says when
/// they were computed); a response with errors is shared only with the requests
/// that waited for it, never kept. Order history is never cached.
type ResponseCache = crate::answers::Answers<Bytes>;

/// Prechecks by query text: a dashboard sends the same few texts thousands of
/// times a second, and parsing one (pest, recursive) was a twentieth of serving's
/// CPU in a profile at 2,000 requests/s. Bounded like the other per-question
/// caches, by `cache_entries` and `cache_bytes` (each text weighs its length):
/// by entries alone, the default 2,000 texts of up to `graphql_max_query_bytes`
/// (16 KiB) each could hold 32 MB outside `cache_bytes`.
struct Prechecks {
    seen: crate::bounded::Bounded<String, Precheck>,
}

impl Prechecks {
    fn new(entries: usize, bytes: usize) -> Self {
        Prechecks {
            seen: crate::bounded::Bounded::new(entries.max(1), bytes),
        }
    }

    fn of(&self, query: &str, settings: &ServingSettings) -> Precheck {
        if let Some(found) = self.seen.get(query) {
            return *found;
        }
        let found = precheck(query, settings);
        // A text too large is refused by its length alone: not kept.
        if query.len() <= settings.graphql_max_query_bytes {
            self.seen
                .keep(query.to_owned(), Arc::new(found), Self::weight(query));
        }
        found
    }

    /// A kept text's bytes: the text and its entry.
    fn weight(query: &str) -> usize {
        query.len() + std::mem::size_of::<(String, Precheck)>()
    }
}

/// Top-level fields whose answers depend only on the data version.
const CACHEABLE_FIELDS: [&str; 3] = ["revenue", "summary", "__typename"];

/// What a cheap look at a query's text finds, before async-graphql validates it.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Precheck {
    /// Not parseable: async-graphql reports why.
    Unparsed,
    /// Certainly over a limit: refused with this message, unvalidated.
    Refused(&'static str),
    /// Within the limits; whether only revenue/summary questions are asked.
    Admitted { cacheable: bool },
}

/// Refuses a query over the limits from its text alone. async-graphql checks depth
/// and complexity only after its validation rules, one of which
/// (overlapping fields) is quadratic in the number of fields: a 20 kB query of
/// repeated fields would cost tens of milliseconds of CPU before being refused.
/// Every field counts at least 1 toward complexity and fragment spreads are
/// expanded, so a query with more fields than the complexity limit, or fields
/// nested deeper than the depth limit, would be refused anyway.
fn precheck(query: &str, settings: &ServingSettings) -> Precheck {
    if query.len() > settings.graphql_max_query_bytes {
        return Precheck::Refused("Query is too large.");
    }
    let Ok(document) = async_graphql::parser::parse_query(query) else {
        return Precheck::Unparsed;
    };
    let mut walk = Walk {
        document: &document,
        fields: 0,
        depth: 0,
        max_fields: settings.graphql_max_complexity,
        max_depth: settings.graphql_max_depth,
        spreads: Vec::new(),
    };
    let mut cacheable = true;
    for (_, operation) in document.operations.iter() {
        let selections = &operation.node.selection_set.node;
        cacheable &= operation.node.ty == OperationType::Query
            && selections.items.iter().all(|item| {
                matches!(&item.node, Selection::Field(field)
                    if CACHEABLE_FIELDS.contains(&field.node.name.node.as_str()))
            });
        walk.selections(selections, 0);
    }
    if walk.fields > walk.max_fields {
        Precheck::Refused("Query is too complex.")
    } else if walk.depth > walk.max_depth {
        Precheck::Refused("Query is nested too deep.")
    } else {
        Precheck::Admitted { cacheable }
    }
}

/// Counts fields and their nesting, expanding fragment spreads, and stops as soon
/// as a limit is passed (so a cyclic or exponential fragment costs nothing more).
struct Walk<'a> {
    document: &'a async_graphql::parser::types::ExecutableDocument,
    fields: usize,
    depth: usize,
    max_fields: usize,
    max_depth: usize,
    spreads: Vec<&'a str>,
}

impl<'a> Walk<'a> {
    fn selections(&mut self, set: &'a async_graphql::parser::types::SelectionSet, depth: usize) {
        for item in &set.items {
            if self.fields > self.max_fields || self.depth > self.max_depth {
                return;
            }
            match &item.node {
                Selection::Field(field) => {
                    self.fields += 1;
                    self.depth = self.depth.max(depth + 1);
                    self.selections(&field.node.selection_set.node, depth + 1);
                }
                Selection::InlineFragment(fragment) => {
                    self.selections(&fragment.node.selection_set.node, depth);
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    // A cycle is a validation error async-graphql reports.
                    if self.spreads.contains(&name) {
                        continue;
                    }
                    if let Some(fragment) = self.document.fragments.get(name) {
                        self.spreads.push(name);
                        self.selections(&fragment.node.selection_set.node, depth);
                        self.spreads.pop();
                    }
                }
            }
        }
    }
}

async fn execute(
    app: &AppState,
    schema: &TidemarkSchema,
    (cache, prechecks): (&Arc<ResponseCache>, &Prechecks),
    headers: &HeaderMap,
    request: async_graphql::Request,
) -> Response {
    let cacheable = match prechecks.of(&request.query, &app.settings) {
        Precheck::Refused(message) => {
            metrics::counter!("serving_graphql_refused_total").increment(1);
            let refused =
                async_graphql::Response::from_errors(vec![async_graphql::ServerError::new(
                    message, None,
                )]);
            return json(serde_json::to_vec(&refused).unwrap_or_default().into());
        }
        Precheck::Admitted { cacheable } => cacheable,
        Precheck::Unparsed => false,
    };
    let key = cacheable
        .then(|| {
            serde_json::to_string(&(&request.query, &request.operation_name, &request.variables))
                .ok()
        })
        .flatten();
    let Some(key) = key else {
        let response = schema.execute(request).await;
        return json(serde_json::to_vec(&response).unwrap_or_default().into());
    };
    let version = crate::answers::timed_version(&app.views, "graphql").await;
    let schema = schema.clone();
    let computing = app.views.computing().clone();
    let (result, outcome) = cache
        .get(key, version, move || async move {
            let started = std::time::Instant::now();
            let response = schema.execute(request).await;
            let ok = response.errors.is_empty();
            let serializing = computing.run(move || serde_json::to_vec(&response));
            let body = Bytes::from(
                crate::views::timed("json", serializing)
                    .await
                    .unwrap_or_default(),
            );
            metrics::histogram!("serving_answer_compute_seconds", "route" => "graphql")
                .record(started.elapsed().as_secs_f64());
            if ok { Ok(body) } else { Err(body) }
        })
        .await;
    metrics::counter!("serving_graphql_cache_total", "result" => outcome.as_str()).increment(1);
    match result {
        Ok(body) => crate::answers::respond(&body, headers, app.views.computing()).await,
        Err(errors) => json(errors),
    }
}

fn json(body: Bytes) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `GET /graphql`: GraphiQL, for people (send the API key as a header from it).
pub fn graphiql() -> Router<Arc<AppState>> {
    Router::new().route(
        "/graphql",
        get(|| async {
            Html(
                GraphiQLSource::build()
                    .endpoint("/graphql")
                    .subscription_endpoint("/graphql/ws")
                    .finish(),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::{Precheck, Prechecks, precheck};
    use crate::config::ServingSettings;

    fn settings() -> ServingSettings {
        ServingSettings {
            graphql_max_depth: 4,
            graphql_max_complexity: 10,
            ..ServingSettings::default()
        }
    }

    #[test]
    fn queries_within_the_limits_are_admitted() {
        let s = settings();
        assert_eq!(
            precheck("{ revenue(from: 1, to: 2) { points { bucket } } }", &s),
            Precheck::Admitted { cacheable: true }
        );
        assert_eq!(
            precheck("{ userOrders(userId: \"u\") { orders { orderId } } }", &s),
            Precheck::Admitted { cacheable: false }
        );
        assert_eq!(precheck("{ not graphql", &s), Precheck::Unparsed);
    }

    #[test]
    fn too_many_fields_or_too_deep_are_refused_from_the_text() {
        let s = settings();
        let aliases: String = (0..11).map(|i| format!("a{i}: __typename ")).collect();
        assert_eq!(
            precheck(&format!("{{ {aliases} }}"), &s),
            Precheck::Refused("Query is too complex.")
        );
        assert_eq!(
            precheck("{ a { b { c { d { e } } } } }", &s),
            Precheck::Refused("Query is nested too deep.")
        );
        // Inline fragments add no depth; fields inside them count.
        assert_eq!(
            precheck("{ a { ... on A { b { c { d } } } } }", &s),
            Precheck::Admitted { cacheable: false }
        );
        assert_eq!(
            precheck(&"{ a }".replace('a', &"x ".repeat(10_000)), &s),
            Precheck::Refused("Query is too large.")
        );
    }

    #[test]
    fn fragment_spreads_are_expanded_and_cycles_cost_nothing() {
        let s = settings();
        // Each spread of F brings its four fields: 3 × 4 > 10.
        let spread = "{ a { ...F } b { ...F } c { ...F } } fragment F on T { w x y z }";
        assert_eq!(
            precheck(spread, &s),
            Precheck::Refused("Query is too complex.")
        );
        // Doubling fragments: expanded naively, 2^30 fields; refused at the limit.
        let mut doubling = String::from("{ ...F0 } ");
        for i in 0..30 {
            doubling += &format!("fragment F{i} on Q {{ ...F{} ...F{} }} ", i + 1, i + 1);
        }
        doubling += "fragment F30 on Q { __typename }";
        assert_eq!(
            precheck(&doubling, &s),
            Precheck::Refused("Query is too complex.")
        );
        // A cycle is left for async-graphql's validation to report.
        let cycle = "{ ...A } fragment A on Q { x ...B } fragment B on Q { y ...A }";
        assert_eq!(precheck(cycle, &s), Precheck::Admitted { cacheable: false });
    }

    #[test]
    fn a_query_texts_precheck_is_kept_and_given_again_within_bounds() {
        let s = settings();
        let texts = [
            "{ revenue(from: 1, to: 2) { points { bucket } } }",
            "{ userOrders(userId: \"u\") { orders { orderId } } }",
            "{ a { b { c { d { e } } } } }",
        ];
        let prechecks = Prechecks::new(2, 1 << 20);
        for text in &texts[..2] {
            assert_eq!(prechecks.of(text, &s), precheck(text, &s));
            assert_eq!(prechecks.of(text, &s), precheck(text, &s), "kept: {text}");
        }
        assert!(texts[..2].iter().all(|t| prechecks.seen.get(*t).is_some()));
        // A third text past the entries starts over from it.
        assert_eq!(
            prechecks.of(texts[2], &s),
            Precheck::Refused("Query is nested too deep.")
        );
        assert!(prechecks.seen.get(texts[2]).is_some());
        assert!(texts[..2].iter().all(|t| prechecks.seen.get(*t).is_none()));
        let huge = "{ a }".replace('a', &"x ".repeat(10_000));
        assert_eq!(prechecks.of(&huge, &s), precheck(&huge, &s));
        assert!(prechecks.seen.get(&huge).is_none(), "too large: not kept");
        // Bounded by bytes too: a text past the bytes starts over from it.
        let bytes = Prechecks::weight(texts[0]) + Prechecks::weight(texts[1]);
        let prechecks = Prechecks::new(100, bytes);
        for text in &texts {
            assert_eq!(prechecks.of(text, &s), precheck(text, &s));
            assert!(prechecks.seen.get(*text).is_some(), "kept: {text}");
        }
        assert!(texts[..2].iter().all(|t| prechecks.seen.get(*t).is_none()));
    }
}
