//! R14: schemathesis against ingest's OpenAPI spec, every check, bounded in time.

use crate::Harness;

#[tokio::test(flavor = "multi_thread")]
async fn r14_schemathesis_finds_nothing_against_the_ingest_spec() {
    let h = Harness::start().await;
    let (spec, key) = (h.svc.url("/openapi.json"), h.key.clone());
    let (examples, secs) = if tidemark_testkit::heavy() {
        (500, 300)
    } else {
        (60, 60)
    };
    let fuzzed = tokio::task::spawn_blocking(move || {
        tidemark_testkit::schemathesis(&spec, &key, examples, secs)
    })
    .await
    .unwrap();
    tidemark_testkit::figure("R14", format!("ingest: {}", fuzzed.summary));
    assert!(fuzzed.passed, "{}", fuzzed.output);
}
