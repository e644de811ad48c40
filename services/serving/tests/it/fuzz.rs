//! R14: schemathesis against serving's OpenAPI spec, every check, bounded in time.

use crate::Env;

#[tokio::test(flavor = "multi_thread")]
async fn r14_schemathesis_finds_nothing_against_the_serving_spec() {
    let env = Env::new().await;
    let (spec, key) = (env.serving.url("/openapi.json"), env.key.clone());
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
    tidemark_testkit::figure("R14", format!("serving: {}", fuzzed.summary));
    assert!(fuzzed.passed, "{}", fuzzed.output);
}
