//! Where the shared test servers listen: `.tidemark/test/stack.env`, written by
//! `cargo xtask test`, and `TIDEMARK_TEST_*` variables, which take precedence.

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

pub(crate) const HINT: &str = "the test servers are not running. Run the tests with \
    `cargo xtask test` (it starts Postgres, Redis, ClickHouse and S3 on loopback), or keep \
    them up for repeated runs with `cargo xtask test --keep` and then `cargo nextest run`.";

/// Where the shared test servers listen.
#[derive(Debug, Clone)]
pub struct TestStack {
    vars: HashMap<String, String>,
}

impl TestStack {
    pub(crate) fn var(&self, name: &str) -> &str {
        self.vars
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name} is not set: {HINT}"))
    }

    pub fn postgres_admin_url(&self) -> &str {
        self.var("TIDEMARK_TEST_POSTGRES_URL")
    }

    pub fn postgres_bin_dir(&self) -> PathBuf {
        PathBuf::from(self.var("TIDEMARK_TEST_POSTGRES_BIN"))
    }

    pub fn redis_url(&self) -> &str {
        self.var("TIDEMARK_TEST_REDIS_URL")
    }

    pub fn redis_server_bin(&self) -> &str {
        self.var("TIDEMARK_TEST_REDIS_SERVER")
    }

    pub fn clickhouse_url(&self) -> &str {
        self.var("TIDEMARK_TEST_CLICKHOUSE_URL")
    }

    pub fn clickhouse_server_bin(&self) -> &str {
        self.var("TIDEMARK_TEST_CLICKHOUSE_SERVER")
    }

    /// The folder the shared S3 server (s3s-fs) keeps its buckets in, one
    /// sub-folder each.
    pub fn s3_root(&self) -> PathBuf {
        PathBuf::from(self.var("TIDEMARK_TEST_S3_ROOT"))
    }

    pub fn s3_server_bin(&self) -> &str {
        self.var("TIDEMARK_TEST_S3_SERVER")
    }

    pub fn prometheus_url(&self) -> &str {
        self.var("TIDEMARK_TEST_PROMETHEUS_URL")
    }

    /// The folder of file-based scrape targets the test Prometheus watches.
    pub fn prometheus_targets(&self) -> PathBuf {
        PathBuf::from(self.var("TIDEMARK_TEST_PROMETHEUS_TARGETS"))
    }
}

/// The running test stack; panics with instructions when there is none.
pub fn stack() -> &'static TestStack {
    static STACK: OnceLock<TestStack> = OnceLock::new();
    STACK.get_or_init(|| {
        let mut vars: HashMap<String, String> = HashMap::new();
        let file = tidemark_launch::workspace_root().join(".tidemark/test/stack.env");
        if let Ok(text) = std::fs::read_to_string(&file) {
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('=') {
                    vars.insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
        }
        for (k, v) in std::env::vars() {
            if k.starts_with("TIDEMARK_TEST_") {
                vars.insert(k, v);
            }
        }
        let stack = TestStack { vars };
        // Fail fast, never hang, when the servers are down.
        let pg = stack.postgres_admin_url().to_owned();
        let addr = pg
            .rsplit('@')
            .next()
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_owned();
        let reachable = addr
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
        assert!(reachable, "Postgres at {addr} is unreachable: {HINT}");
        stack
    })
}
