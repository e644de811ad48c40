//! A service's `serve(config, listener, shutdown)` run in this test process on a
//! loopback port of its own, and checks of its operational endpoints.

use std::time::Duration;

use crate::wait::eventually;

/// A service running in this test process on a loopback port of its own.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// `http://127.0.0.1:<port><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `/readyz`: its status and JSON body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = reqwest::get(self.url("/readyz"))
            .await
            .expect("readyz answers");
        let status = r.status().as_u16();
        (status, r.json().await.expect("readyz body is JSON"))
    }

    /// `/metrics`: the Prometheus text (see [`metric`]).
    pub async fn metrics(&self) -> String {
        let r = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics answer");
        r.text().await.expect("metrics body")
    }

    /// Cancels the service and returns what its `serve` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

/// Starts a service's `serve(config, listener, shutdown)` on port 0.
pub async fn start<F, Fut>(serve: F) -> Running
where
    F: FnOnce(tokio::net::TcpListener, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(serve(listener, shutdown.clone()));
    Running {
        addr,
        shutdown,
        handle,
    }
}

/// Asserts `/healthz` and `/readyz` answer 200 (every check `ok`) and `/metrics`
/// serves the request counter.
pub async fn assert_operational(svc: &Running) {
    let http = reqwest::Client::new();
    let health = http.get(svc.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = http.get(svc.url("/readyz")).send().await.expect("readyz");
    let status = ready.status();
    let body: serde_json::Value = ready.json().await.expect("readyz body is JSON");
    assert_eq!(status, 200, "not ready: {body}");
    let checks = body["checks"].as_object().expect("checks listed");
    assert!(!checks.is_empty());
    assert!(checks.values().all(|v| v == "ok"), "{body}");
    let metrics = http
        .get(svc.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("http_requests_total"),
        "no request counter in:\n{metrics}"
    );
}

/// Waits until `GET http://127.0.0.1:<port><path>` answers 2xx.
pub async fn http_ready(port: u16, path: &str, timeout: Duration) {
    let url = format!("http://127.0.0.1:{port}{path}");
    eventually(timeout, &format!("{url} answers 2xx"), || {
        let request = reqwest::get(url.clone());
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
}

/// The `leases` block of the `/readyz` of the service on `port`: per role, where
/// that instance stands (`state`, `leader`, `token`).
pub async fn leases_at(port: u16) -> serde_json::Value {
    let report: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .expect("/readyz answers")
        .json()
        .await
        .expect("/readyz is JSON");
    report["leases"].clone()
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `metric(&text, r#"relay_errors_total{store="s3"}"#)`; `None` when absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_the_series_named_exactly() {
        let text = "# TYPE relay_errors_total counter\n\
                    relay_errors_total{store=\"postgres\"} 0\n\
                    relay_errors_total{store=\"s3\"} 12\n\
                    relay_stopped 1\n";
        assert_eq!(
            metric(text, r#"relay_errors_total{store="s3"}"#),
            Some(12.0)
        );
        assert_eq!(metric(text, "relay_stopped"), Some(1.0));
        assert_eq!(metric(text, "relay_stop"), None);
        assert_eq!(metric(text, "speed_stopped"), None);
    }
}
