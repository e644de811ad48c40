//! API keys: `Authorization: Bearer tdm_…` tokens with scopes.
//!
//! Only the SHA-256 of a token is stored. Lookups are cached briefly (hits and
//! misses alike) so a flood of bad keys does not reach Postgres; a revoked key stops
//! working within [`AuthConfig::cache_ttl`]. Unknown, revoked and missing keys get
//! byte-identical 401 bodies so a caller cannot probe which keys exist.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::problem::{Problem, ProblemKind};

/// What a key may do. `admin` implies the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Ingest,
    Read,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A stored key, without its secret.
#[derive(Clone, Debug, Serialize)]
pub struct ApiKey {
    pub key_id: Uuid,
    pub name: String,
    /// The first characters of the token, to recognise it in lists and logs.
    pub prefix: String,
    pub scopes: Vec<Scope>,
    /// Requests per second allowed; `None` uses the service default.
    pub rate_per_second: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// Token prefix: lets secret scanners recognise leaked Tidemark keys.
pub const TOKEN_PREFIX: &str = "tdm_";
const TOKEN_RANDOM_CHARS: usize = 40;
const DISPLAY_PREFIX_CHARS: usize = 12;

/// A new random token (`tdm_` + 40 alphanumerics, ~238 bits).
pub fn generate_token() -> String {
    let random: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(TOKEN_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("{TOKEN_PREFIX}{random}")
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

type KeyRow = (
    Uuid,
    String,
    String,
    Vec<String>,
    Option<i32>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

fn from_row(row: KeyRow) -> ApiKey {
    let (key_id, name, prefix, scopes, rate_per_second, created_at, revoked_at) = row;
    ApiKey {
        key_id,
        name,
        prefix,
        scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        rate_per_second,
        created_at,
        revoked_at,
    }
}

const KEY_COLUMNS: &str = "key_id, name, prefix, scopes, rate_per_second, created_at, revoked_at";

/// Stores a key for `token` (idempotent: the same token is stored once) and returns it.
pub async fn store(
    pool: &PgPool,
    token: &str,
    name: &str,
    scopes: &[Scope],
    rate_per_second: Option<i32>,
) -> Result<ApiKey, sqlx::Error> {
    let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let prefix: String = token.chars().take(DISPLAY_PREFIX_CHARS).collect();
    let sql = format!(
        "INSERT INTO api_keys (key_id, name, prefix, key_hash, scopes, rate_per_second) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (key_hash) DO UPDATE SET key_hash = EXCLUDED.key_hash \
         RETURNING {KEY_COLUMNS}"
    );
    let row: KeyRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(name)
        .bind(prefix)
        .bind(&hash(token)[..])
        .bind(&scopes)
        .bind(rate_per_second)
        .fetch_one(pool)
        .await?;
    Ok(from_row(row))
}

/// Creates a key with a fresh token; the token is returned once and never stored.
pub async fn create(
    pool: &PgPool,
    name: &str,
    scopes: &[Scope],
    rate_per_second: Option<i32>,
) -> Result<(ApiKey, String), sqlx::Error> {
    let token = generate_token();
    let key = store(pool, &token, name, scopes, rate_per_second).await?;
    Ok((key, token))
}

pub async fn list(pool: &PgPool) -> Result<Vec<ApiKey>, sqlx::Error> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at");
    let rows: Vec<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Revokes the key with this id or display prefix; returns how many were revoked.
pub async fn revoke(pool: &PgPool, id_or_prefix: &str) -> Result<u64, sqlx::Error> {
    let id = Uuid::parse_str(id_or_prefix).ok();
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() \
         WHERE revoked_at IS NULL AND (key_id = $1 OR prefix = $2)",
    )
    .bind(id)
    .bind(id_or_prefix)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// The active key for a token, if any.
pub async fn lookup(pool: &PgPool, token: &str) -> Result<Option<ApiKey>, sqlx::Error> {
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL");
    let row: Option<KeyRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&hash(token)[..])
        .fetch_optional(pool)
        .await?;
    Ok(row.map(from_row))
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// How long a lookup (hit or miss) is trusted.
    pub cache_ttl: Duration,
    /// Requests per second for keys without their own rate; `None` is unlimited.
    pub default_rate_per_second: Option<u32>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(5),
            default_rate_per_second: None,
        }
    }
}

/// Checks bearer tokens against Postgres, with a short cache and per-key rate limits.
pub struct Authenticator {
    pool: PgPool,
    config: AuthConfig,
    cache: Mutex<HashMap<[u8; 32], CachedLookup>>,
    limiters: Mutex<HashMap<Uuid, Arc<DefaultDirectRateLimiter>>>,
}

/// A lookup result and when it was made.
type CachedLookup = (Option<ApiKey>, Instant);

/// Entries kept before the cache is cleared wholesale (bounds memory under a flood
/// of random tokens).
const CACHE_CAPACITY: usize = 100_000;

impl Authenticator {
    pub fn new(pool: PgPool, config: AuthConfig) -> Arc<Self> {
        Arc::new(Self {
            pool,
            config,
            cache: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
        })
    }

    /// The active key for `token`, from the cache or Postgres.
    pub async fn authenticate(&self, token: &str) -> Result<Option<ApiKey>, sqlx::Error> {
        let digest = hash(token);
        if let Some((key, at)) = self.cache.lock().expect("not poisoned").get(&digest)
            && at.elapsed() < self.config.cache_ttl
        {
            return Ok(key.clone());
        }
        let key = lookup(&self.pool, token).await?;
        let mut cache = self.cache.lock().expect("not poisoned");
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(digest, (key.clone(), Instant::now()));
        Ok(key)
    }

    /// `Err(seconds to wait)` when the key is over its rate.
    pub fn check_rate(&self, key: &ApiKey) -> Result<(), u64> {
        let rate = key
            .rate_per_second
            .and_then(|r| u32::try_from(r).ok())
            .or(self.config.default_rate_per_second)
            .and_then(NonZeroU32::new);
        let Some(rate) = rate else { return Ok(()) };
        let limiter = {
            let mut limiters = self.limiters.lock().expect("not poisoned");
            limiters
                .entry(key.key_id)
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_second(rate))))
                .clone()
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + 1
        })
    }
}

/// The 401 for missing, unknown and revoked keys alike.
/// Middleware: requires a key with `scope`, applies its rate limit, and puts the
/// [`ApiKey`] in the request's extensions.
pub async fn require(
    State((auth, scope)): State<(Arc<Authenticator>, Scope)>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .map(str::to_owned);
    match admit(&auth, token.as_deref(), scope).await {
        Ok(key) => {
            request.extensions_mut().insert(key);
            next.run(request).await
        }
        Err(problem) => problem.into_response(),
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme is
/// case-insensitive, RFC 9110 §11.1).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The key of `token` if it exists, has `scope` and is within its rate; the
/// problem to answer otherwise (401, 403, 429, or 503 when keys cannot be read).
/// Used by [`require`] and by the GraphQL subscription's `connection_init`.
pub async fn admit(
    auth: &Authenticator,
    token: Option<&str>,
    scope: Scope,
) -> Result<ApiKey, Problem> {
    let unauthorized = || {
        Problem::new(ProblemKind::Unauthorized)
            .detail("Send a valid API key as `Authorization: Bearer <key>`.")
    };
    let Some(token) = token.filter(|t| t.starts_with(TOKEN_PREFIX) && t.len() <= 128) else {
        return Err(unauthorized());
    };
    let key = match auth.authenticate(token).await {
        Ok(Some(key)) => key,
        Ok(None) => return Err(unauthorized()),
        Err(e) => {
            tracing::warn!(error = %e, "API key lookup failed");
            return Err(Problem::unavailable(
                "API keys cannot be checked right now.",
            ));
        }
    };
    if !key.allows(scope) {
        return Err(Problem::new(ProblemKind::Forbidden).detail(format!(
            "This API key lacks the `{}` scope.",
            scope.as_str()
        )));
    }
    if let Err(wait) = auth.check_rate(&key) {
        metrics::counter!("api_key_rate_limited_total").increment(1);
        return Err(Problem::new(ProblemKind::RateLimited)
            .detail("This API key is over its request rate.")
            .retry_after(wait));
    }
    Ok(key)
}

/// `keys create|list|revoke`: the command-line for key management.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its token (shown once).
    Create {
        #[arg(long)]
        name: String,
        /// Comma-separated: ingest, read, admin.
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<Scope>,
        /// Requests per second (default: the service's default).
        #[arg(long)]
        rate: Option<i32>,
    },
    /// Store a given token (idempotent), e.g. a demo key known to a compose file.
    Import {
        #[arg(long, env = "TIDEMARK_IMPORT_TOKEN")]
        token: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_delimiter = ',', required = true)]
        scopes: Vec<Scope>,
    },
    /// List keys (never their tokens).
    List,
    /// Revoke a key by id or display prefix.
    Revoke { id_or_prefix: String },
}

impl KeysCommand {
    pub async fn run(self, pool: &PgPool) -> anyhow::Result<()> {
        match self {
            KeysCommand::Create { name, scopes, rate } => {
                let (key, token) = create(pool, &name, &scopes, rate).await?;
                println!("{}", serde_json::json!({ "key": key, "token": token }));
            }
            KeysCommand::Import {
                token,
                name,
                scopes,
            } => {
                anyhow::ensure!(
                    token.starts_with(TOKEN_PREFIX) && (20..=128).contains(&token.len()),
                    "a token starts with {TOKEN_PREFIX} and has 20 to 128 characters"
                );
                let key = store(pool, &token, &name, &scopes, None).await?;
                println!("{}", serde_json::to_string(&key)?);
            }
            KeysCommand::List => {
                for key in list(pool).await? {
                    println!("{}", serde_json::to_string(&key)?);
                }
            }
            KeysCommand::Revoke { id_or_prefix } => {
                let n = revoke(pool, &id_or_prefix).await?;
                anyhow::ensure!(n > 0, "no active key matches {id_or_prefix}");
                println!("revoked {n} key(s)");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::bearer;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer tdm_a"), Some("tdm_a"));
        assert_eq!(bearer("bearer tdm_a"), Some("tdm_a"));
        assert_eq!(bearer("BEARER  tdm_a "), Some("tdm_a"));
        assert_eq!(bearer("Basic dXNlcg=="), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearertdm_a"), None);
    }
}
