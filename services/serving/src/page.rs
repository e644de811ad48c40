//! `GET /`: a page to watch Tidemark (the role Streamlit plays beside Grafana in
//! the platform Tidemark grew from): live net revenue per minute from the GraphQL
//! subscription, today's totals and average check per currency, average check by
//! city of residence, the top products, and the freshness of both layers and the
//! warehouse. Plain HTML, CSS and JavaScript in one file (`page/index.html`), no
//! build step; it asks for a read key and calls the same APIs as any client.
//! Tested in Chromium: `serving …page::*`.

use std::sync::Arc;

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use crate::AppState;

const PAGE: &str = include_str!("page/index.html");

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/", get(|| async { Html(PAGE) }))
}
