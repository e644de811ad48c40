//! Liveness and readiness.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` runs every registered
//! check (each bounded by a timeout) and answers 200 only when all pass; a check
//! does no more than the service itself does with that dependency. Advisories are
//! reported beside the checks without making the service unready: a part that
//! must not take the service out of a load balancer when it fails (ingest's lake
//! relay: order intake goes on while it is stopped).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;

use crate::lease::{Lease, Standing};

type CheckFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// How long one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The named checks that make a service ready.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Vec<(&'static str, Arc<CheckFn>)>>,
    advisories: Arc<Vec<(&'static str, Arc<CheckFn>)>>,
    leases: Arc<Vec<Lease>>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub ready: bool,
    /// Check name → `ok` or a short reason.
    pub checks: BTreeMap<&'static str, String>,
    /// Advisory name → `ok` or a short reason; never affects `ready`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub advisories: BTreeMap<&'static str, String>,
    /// Role → whether this instance leads it, and who does; never affects
    /// `ready` (a standby is a healthy instance).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<&'static str, Standing>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; its error text is reported on `/readyz`, so keep it short.
    pub fn with<F, Fut>(mut self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Arc::make_mut(&mut self.checks).push((name, boxed(check)));
        self
    }

    /// Adds an advisory: reported on `/readyz` like a check, but a failing one
    /// leaves the service ready.
    pub fn advise<F, Fut>(mut self, name: &'static str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        Arc::make_mut(&mut self.advisories).push((name, boxed(check)));
        self
    }

    /// Reports where this instance stands for a single-writer role.
    pub fn lease(mut self, lease: &Lease) -> Self {
        Arc::make_mut(&mut self.leases).push(lease.clone());
        self
    }

    /// Runs every check and advisory concurrently.
    pub async fn report(&self) -> Report {
        let (checks, advisories) =
            futures::future::join(run_all(&self.checks), run_all(&self.advisories)).await;
        Report {
            ready: checks.values().all(|v| v == "ok"),
            checks,
            advisories,
            leases: self
                .leases
                .iter()
                .map(|lease| (lease.role(), lease.standing()))
                .collect(),
        }
    }
}

fn boxed<F, Fut>(check: F) -> Arc<CheckFn>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(check()))
}

async fn run_all(checks: &[(&'static str, Arc<CheckFn>)]) -> BTreeMap<&'static str, String> {
    let runs = checks.iter().map(|(name, check)| async move {
        let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(reason)) => reason,
            Err(_) => "timed out".to_owned(),
        };
        (*name, outcome)
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

pub async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    let report = readiness.report().await;
    if !report.ready {
        tracing::warn!(checks = ?report.checks, "Not ready");
    }
    let status = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report))
}
