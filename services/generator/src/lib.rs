//! Demo data: realistic orders, deterministic from a seed, streamed to the ingest API.

pub mod config;

use axum::Router;
use tidemark_platform::health::Readiness;
use tidemark_platform::http;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Serves the generator's operational endpoints until `shutdown` is cancelled.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let healthz = format!("{}/healthz", config.target.ingest_url.trim_end_matches('/'));
    let readiness = Readiness::new().with("ingest", move || {
        let request = client.get(healthz.clone()).send();
        async move {
            match request.await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("ingest answered {}", r.status().as_u16())),
                Err(_) => Err("unreachable".to_owned()),
            }
        }
    });
    let router = http::finish(Router::new(), readiness, &config.http);
    http::serve(listener, router, shutdown, config.http.shutdown_grace).await?;
    Ok(())
}
