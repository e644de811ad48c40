//! The service's operational endpoints, started on port 0 against real servers.

#[tokio::test(flavor = "multi_thread")]
async fn healthz_readyz_and_metrics_answer() {
    let db = tidemark_testkit::postgres().await;
    let config = tidemark_speed::Config {
        postgres: db.config.clone(),
        redis: tidemark_testkit::redis(),
        ..Default::default()
    };
    let svc = tidemark_testkit::start(|l, s| tidemark_speed::serve(config, l, s)).await;
    tidemark_testkit::assert_operational(&svc).await;
    svc.stop().await.expect("clean shutdown");
}
