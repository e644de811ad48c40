//! The generator's operational endpoints: ready once the ingest API answers.

#[tokio::test]
async fn healthz_readyz_and_metrics_answer() {
    let db = tidemark_testkit::postgres().await;
    let ingest_config = tidemark_ingest::Config {
        postgres: db.config.clone(),
        s3: tidemark_testkit::s3(),
        ..Default::default()
    };
    let ingest = tidemark_testkit::start(|l, s| tidemark_ingest::serve(ingest_config, l, s)).await;
    let mut config = tidemark_generator::Config::default();
    config.target.ingest_url = ingest.url("");
    let svc = tidemark_testkit::start(|l, s| tidemark_generator::serve(config, l, s)).await;
    tidemark_testkit::assert_operational(&svc).await;
    svc.stop().await.expect("clean shutdown");
    ingest.stop().await.expect("clean shutdown");
}
