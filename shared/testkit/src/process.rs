//! A Tidemark service binary run as a process of its own, for tests that kill it,
//! signal it, or measure its memory and CPU.

use std::process::Command;
use std::time::Duration;

use tidemark_platform::config::{ClickHouseConfig, PostgresConfig, RedisConfig, S3Config};

/// The `TIDEMARK_*` environment that points a service binary at these stores.
#[derive(Debug, Clone, Default)]
pub struct ServiceEnv(pub Vec<(String, String)>);

impl ServiceEnv {
    pub fn set(mut self, key: &str, value: &dyn std::fmt::Display) -> ServiceEnv {
        self.0.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn postgres(self, config: &PostgresConfig) -> ServiceEnv {
        use secrecy::ExposeSecret;
        self.set("TIDEMARK_POSTGRES__URL", &config.url.expose_secret())
    }

    pub fn redis(self, config: &RedisConfig) -> ServiceEnv {
        use secrecy::ExposeSecret;
        self.set("TIDEMARK_REDIS__URL", &config.url.expose_secret())
            .set("TIDEMARK_REDIS__KEY_PREFIX", &config.key_prefix)
    }

    pub fn clickhouse(self, config: &ClickHouseConfig) -> ServiceEnv {
        self.set("TIDEMARK_CLICKHOUSE__URL", &config.url)
            .set("TIDEMARK_CLICKHOUSE__DATABASE", &config.database)
            .set("TIDEMARK_CLICKHOUSE__SHARDS", &config.shards)
            .set("TIDEMARK_CLICKHOUSE__CLUSTER", &config.cluster)
            .set("TIDEMARK_CLICKHOUSE__TIMEOUT", &config.timeout.as_millis())
    }

    pub fn s3(self, config: &S3Config) -> ServiceEnv {
        use secrecy::ExposeSecret;
        let mut env = self
            .set("TIDEMARK_S3__ENDPOINT", &config.endpoint)
            .set("TIDEMARK_S3__BUCKET", &config.bucket)
            .set("TIDEMARK_S3__PREFIX", &config.prefix);
        if let Some(id) = &config.access_key_id {
            env = env.set("TIDEMARK_S3__ACCESS_KEY_ID", &id);
        }
        if let Some(secret) = &config.secret_access_key {
            env = env.set("TIDEMARK_S3__SECRET_ACCESS_KEY", &secret.expose_secret());
        }
        env
    }
}

/// A Tidemark service binary run as a process of its own, for tests that kill it,
/// stop it, or measure its memory and CPU. Killed when dropped.
pub struct Process {
    child: std::process::Child,
}

impl Process {
    /// Starts `bin` (e.g. `env!("CARGO_BIN_EXE_tidemark-speed")`) with `args` and the
    /// environment; its logs (warnings and worse) go to the test's stderr.
    pub fn spawn(bin: &str, args: &[&str], env: &ServiceEnv) -> Process {
        Self::start(bin, args, env, std::process::Stdio::inherit())
    }

    /// Like [`Process::spawn`], with its stderr (logs, and the error it exits with)
    /// kept for [`Process::stderr`] instead.
    pub fn spawn_capturing(bin: &str, args: &[&str], env: &ServiceEnv) -> Process {
        Self::start(bin, args, env, std::process::Stdio::piped())
    }

    fn start(bin: &str, args: &[&str], env: &ServiceEnv, stderr: std::process::Stdio) -> Process {
        let child = Command::new(bin)
            .args(args)
            .envs(env.0.iter().map(|(k, v)| (k, v)))
            .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn")
            .env("RUST_BACKTRACE", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin} starts: {e}"));
        Process { child }
    }

    /// Waits for a process started with [`Process::spawn_capturing`] to exit, up to
    /// `timeout`; its status and everything it wrote to stderr.
    pub async fn output(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        let mut pipe = self.child.stderr.take().expect("spawned capturing stderr");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            drop(pipe.read_to_string(&mut text));
            text
        });
        let status = self.exit(timeout).await;
        (status, reader.join().expect("stderr reader"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap it.
    pub fn kill(mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }

    /// Sends `signal` (e.g. `"TERM"`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub async fn exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {} still running after {timeout:?}",
                self.pid()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether it has exited (and its status, reaped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        tidemark_platform::metrics::peak_resident_bytes(Some(self.pid())).expect("VmHWM") / 1024
    }

    /// User plus system CPU time used so far, in milliseconds.
    pub fn cpu_millis(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("/proc/<pid>/stat");
        // Fields after the command name (which may hold spaces) in parentheses.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        let out = Command::new("getconf").arg("CLK_TCK").output();
        let hz: f64 = out
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0);
        ticks as f64 * 1000.0 / hz
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}
