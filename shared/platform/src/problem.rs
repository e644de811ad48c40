//! RFC 9457 problem details: the one error body every Tidemark API answers with.
//!
//! Each kind of problem has one row in [`ProblemKind`]: its status, its `type` URI
//! slug and its title. Handlers pick a kind and add a detail; they never put an
//! internal error's text in a response.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";
/// Base of every problem `type` URI; the slug names the section documenting it.
pub const TYPE_BASE: &str = "https://tidemark.dev/problems/";

/// The table of problems: kind → status, slug, title.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    Malformed,
    Validation,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    /// Well-formed, but the data to answer it is missing (e.g. exchange rates).
    MissingData,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    Internal,
    Unavailable,
    Timeout,
}

impl ProblemKind {
    pub fn status(self) -> StatusCode {
        self.row().0
    }

    pub fn slug(self) -> &'static str {
        self.row().1
    }

    pub fn title(self) -> &'static str {
        self.row().2
    }

    fn row(self) -> (StatusCode, &'static str, &'static str) {
        use ProblemKind::*;
        match self {
            Malformed => (StatusCode::BAD_REQUEST, "malformed", "Malformed request"),
            Validation => (StatusCode::BAD_REQUEST, "validation", "Invalid request"),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Missing or invalid API key",
            ),
            Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "API key lacks the required scope",
            ),
            NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
            ),
            Conflict => (
                StatusCode::CONFLICT,
                "conflict",
                "Conflicts with stored data",
            ),
            MissingData => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing-data",
                "Data needed for the answer is missing",
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Request body too large",
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported content type",
            ),
            RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service temporarily unavailable",
            ),
            Timeout => (
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "Request took too long",
            ),
        }
    }

    /// The kind whose status is `status`, for bodies produced outside our handlers.
    pub fn for_status(status: StatusCode) -> ProblemKind {
        use ProblemKind::*;
        match status {
            StatusCode::UNAUTHORIZED => Unauthorized,
            StatusCode::FORBIDDEN => Forbidden,
            StatusCode::NOT_FOUND => NotFound,
            StatusCode::METHOD_NOT_ALLOWED => MethodNotAllowed,
            StatusCode::CONFLICT => Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => UnsupportedMediaType,
            StatusCode::TOO_MANY_REQUESTS => RateLimited,
            StatusCode::SERVICE_UNAVAILABLE => Unavailable,
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => Timeout,
            s if s.is_server_error() => Internal,
            _ => Malformed,
        }
    }
}

/// One field-level error: where (a JSON-pointer-like path) and what.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// E.g. `quantity`, or `/3/currency` for item 3 of a batch.
    pub pointer: String,
    pub code: String,
    pub detail: String,
}

/// A problem details response.
#[derive(Clone, Debug)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: Option<String>,
    pub errors: Vec<FieldError>,
    pub retry_after_secs: Option<u64>,
    /// Extra members of the body, e.g. the ids of conflicting orders.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(kind: ProblemKind) -> Self {
        Self {
            kind,
            detail: None,
            errors: Vec::new(),
            retry_after_secs: None,
            extensions: serde_json::Map::new(),
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn extension(mut self, key: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).expect("extensions serialize");
        self.extensions.insert(key.to_owned(), value);
        self
    }

    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Malformed).detail(detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::NotFound).detail(detail)
    }

    /// A dependency is down: 503 with a hint to retry.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(ProblemKind::Unavailable)
            .detail(detail)
            .retry_after(2)
    }

    /// An opaque 500. Log the cause before answering with this.
    pub fn internal() -> Self {
        Self::new(ProblemKind::Internal)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert(
            "type".into(),
            format!("{TYPE_BASE}{}", self.kind.slug()).into(),
        );
        body.insert("title".into(), self.kind.title().into());
        body.insert("status".into(), self.kind.status().as_u16().into());
        if let Some(detail) = &self.detail {
            body.insert("detail".into(), detail.clone().into());
        }
        if !self.errors.is_empty() {
            body.insert(
                "errors".into(),
                serde_json::to_value(&self.errors).expect("field errors serialize"),
            );
        }
        for (k, v) in &self.extensions {
            body.insert(k.clone(), v.clone());
        }
        serde_json::Value::Object(body)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).expect("problem serializes");
        let mut response = (self.kind.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.kind == ProblemKind::Unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tidemark\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_follows_rfc_9457() {
        let p = Problem::new(ProblemKind::Validation)
            .detail("2 orders are invalid")
            .errors(vec![FieldError {
                pointer: "/1/quantity".into(),
                code: "out_of_range".into(),
                detail: "must be between 1 and 1000".into(),
            }]);
        let body = p.body();
        assert_eq!(body["type"], "https://tidemark.dev/problems/validation");
        assert_eq!(body["status"], 400);
        assert_eq!(body["errors"][0]["pointer"], "/1/quantity");
    }

    #[test]
    fn unavailable_carries_retry_after() {
        let r = Problem::unavailable("postgres is unreachable").into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}

/// The problem+json body, for OpenAPI documents.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Problem)]
pub struct ProblemSchema {
    /// A URI naming the kind of problem, e.g. `https://tidemark.dev/problems/validation`.
    #[schema(example = "https://tidemark.dev/problems/validation")]
    pub r#type: String,
    #[schema(example = "Invalid request")]
    pub title: String,
    #[schema(example = 400)]
    pub status: u16,
    /// What went wrong, in a sentence.
    pub detail: Option<String>,
    /// Field-level errors (validation problems).
    pub errors: Option<Vec<FieldErrorSchema>>,
}

/// One field-level error, for OpenAPI documents.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = FieldError)]
pub struct FieldErrorSchema {
    /// JSON pointer to the field; batches are prefixed with the item index.
    #[schema(example = "/3/currency")]
    pub pointer: String,
    #[schema(example = "invalid")]
    pub code: String,
    #[schema(example = "must be an accepted ISO 4217 code (e.g. EUR, USD, JPY)")]
    pub detail: String,
}

/// An OpenAPI modifier for APIs behind a bearer key: declares the `bearer` scheme
/// and documents on every operation the answers the key check can give (401, 403,
/// 429), so each operation's spec lists every status it can return.
pub struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let answers = [
            ("401", "Missing, unknown or revoked API key"),
            ("403", "The key lacks the scope this operation needs"),
            ("429", "The key is over its rate; see Retry-After"),
        ];
        for path in openapi.paths.paths.values_mut() {
            let operations = [
                &mut path.get,
                &mut path.post,
                &mut path.put,
                &mut path.patch,
                &mut path.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(
                                        "application/problem+json",
                                        ContentBuilder::new()
                                            .schema(Some(Ref::from_schema_name("Problem")))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}
