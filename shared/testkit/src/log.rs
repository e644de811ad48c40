//! The in-process services' logs in a test's captured output, shown by nextest when
//! the test fails or is cut off: where a hung test waited is otherwise unknowable.

use std::sync::Once;

/// Installs a `tracing` subscriber writing to the test's output, once per process.
/// The filter is `TIDEMARK_TEST_LOG` (an `EnvFilter`), by default warnings plus the
/// batch run's steps.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = std::env::var("TIDEMARK_TEST_LOG").unwrap_or_else(|_| {
            "warn,tidemark_compactor=info,tidemark_compactor::run::audit=debug".to_owned()
        });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}
