//! The serving service's settings.

use std::time::Duration;

use serde::Deserialize;
use tidemark_platform::config::{
    ClickHouseConfig, HttpConfig, PostgresConfig, RedisConfig, TelemetryConfig, Validate, millis,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub clickhouse: ClickHouseConfig,
    pub serving: ServingSettings,
}

/// Limits and caches (documented in the OpenAPI spec).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ServingSettings {
    /// Most buckets in one revenue series.
    pub max_points: i64,
    /// Widest query range.
    pub max_range_days: i64,
    /// Most orders per history page.
    pub max_page: usize,
    /// Most entries in a summary's top list (per currency).
    pub max_top: usize,
    /// Most cells (bucket × group × currency) in one revenue answer.
    pub max_cells: usize,
    /// Most values of one filter (`city=a,b,…`).
    pub max_filter_values: usize,
    /// How long the published batch state is reused before it is read again.
    #[serde(with = "millis")]
    pub state_ttl: Duration,
    /// Questions kept per cache (batch cells, speed reads, answers).
    pub cache_entries: usize,
    /// Memory the batch-cells cache, the answers cache, the conversions kept
    /// (see `crate::fx::convert`), the points kept (see `crate::query::revenue`),
    /// REST's validated questions and GraphQL's prechecked query texts may hold,
    /// each: a cache past it starts over
    /// (entries alone do not bound memory — a 30-day hourly question by two
    /// attributes keeps ~150,000 cells and a 4 MB answer).
    pub cache_bytes: usize,
    /// While a question is being computed, requests for it get its last answer at
    /// once if it is at most this old (it states its position like any answer);
    /// 0 makes them wait for the computation.
    #[serde(with = "millis")]
    pub max_stale: Duration,
    /// A question asked again within this long of its last answer gets that
    /// answer at once while the next one is computed in the background (stale
    /// while revalidate: such an answer trails the data by at most one
    /// computation and this); a question asked less often computes for its
    /// request. Not taken by a request that cannot read the data version (a
    /// store down). 0 turns it off.
    #[serde(with = "millis")]
    pub revalidate_within: Duration,
    /// A question asked again within this long of its last answer gets that
    /// answer and no computation starts: a hot question is computed at most once
    /// per this interval (and its computation). Not taken by a request that cannot
    /// read the data version. 0 turns it off.
    #[serde(with = "millis")]
    pub recent_within: Duration,
    /// GraphQL: deepest query accepted.
    pub graphql_max_depth: usize,
    /// GraphQL: highest complexity accepted (a field counts 1; `revenue` 20,
    /// `summary` 40, `userOrders` 10).
    pub graphql_max_complexity: usize,
    /// GraphQL: longest query text accepted, in bytes.
    pub graphql_max_query_bytes: usize,
    /// GraphQL: allow schema introspection.
    pub graphql_introspection: bool,
    /// How often a subscription checks the speed view for new orders.
    #[serde(with = "millis")]
    pub subscription_poll: Duration,
    /// Requests per second per API key without its own rate; unset is unlimited.
    pub default_rate_per_second: Option<u32>,
    #[serde(with = "millis")]
    pub auth_cache_ttl: Duration,
    /// Batch-view statements in flight at once; more wait their turn (and meet the
    /// request deadline: 503 + Retry-After) rather than all run together.
    pub clickhouse_concurrency: usize,
    /// Memory one batch-view statement may use in ClickHouse (`max_memory_usage`);
    /// over it the statement fails and the answer is 503, where a burst of heavy
    /// questions would otherwise exhaust the server (at 50M orders, 50 distinct
    /// dashboard questions a second drove ClickHouse to 22.8 GB and the kernel's
    /// OOM killer).
    pub clickhouse_max_memory_bytes: u64,
    /// Threads computing answers' heavy steps (counting buyers, converting,
    /// writing JSON, compressing); more steps wait their turn.
    pub compute_threads: usize,
    /// How many steps of `nice` below the service those threads run (0–19; 0,
    /// the default: the same priority). Above 0, requests answered from kept
    /// answers take a core from a computation at once, and computations get
    /// what other processes leave (see `serving::compute`).
    pub compute_niceness: u8,
}

impl Default for ServingSettings {
    fn default() -> Self {
        Self {
            max_points: 10_000,
            max_range_days: 400,
            max_page: 500,
            max_top: 100,
            max_cells: 200_000,
            max_filter_values: 100,
            state_ttl: Duration::from_millis(500),
            cache_entries: 2_000,
            cache_bytes: 256 * 1024 * 1024,
            max_stale: Duration::from_secs(1),
            revalidate_within: Duration::from_millis(30),
            recent_within: Duration::from_millis(10),
            graphql_max_depth: 8,
            graphql_max_complexity: 300,
            graphql_max_query_bytes: 16 * 1024,
            graphql_introspection: true,
            subscription_poll: Duration::from_millis(100),
            default_rate_per_second: None,
            auth_cache_ttl: Duration::from_secs(5),
            clickhouse_concurrency: 4,
            clickhouse_max_memory_bytes: 2 * 1024 * 1024 * 1024,
            compute_threads: std::thread::available_parallelism().map_or(2, usize::from),
            compute_niceness: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: HttpConfig::on_port(8082),
            telemetry: TelemetryConfig::default(),
            postgres: PostgresConfig::default(),
            redis: RedisConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            serving: ServingSettings::default(),
        }
    }
}

impl Validate for Config {
    fn validate(&self, problems: &mut Vec<String>) {
        self.http.validate(problems);
        self.telemetry.validate(problems);
        self.postgres.validate(problems);
        self.redis.validate(problems);
        self.clickhouse.validate(problems);
        if self.serving.max_points <= 0 || self.serving.max_page == 0 {
            problems.push("serving.max_points and serving.max_page must be positive".into());
        }
        if self.serving.compute_niceness > 19 || self.serving.compute_threads == 0 {
            problems.push(
                "serving.compute_niceness must be 0–19 and serving.compute_threads positive".into(),
            );
        }
    }
}
