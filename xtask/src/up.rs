//! `cargo xtask up|down|status|logs`: the local platform.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidemark_platform::auth::{self, Scope};
use tidemark_platform::config::ClickHouseConfig;

use crate::install;
use crate::proc::{self, alive, read_pid, spawn_detached};
use crate::stack::{Kind, S3_ACCESS_KEY, S3_SECRET_KEY, Stack};

/// The services and their ports, in start order.
pub const SERVICES: &[(&str, u16)] = &[
    ("ingest", 8081),
    ("speed", 8083),
    ("compactor", 8084),
    ("serving", 8082),
    ("generator", 8085),
];

/// Stop order: the reverse of start order.
fn stop_order() -> Vec<&'static str> {
    SERVICES.iter().rev().map(|(name, _)| *name).collect()
}

pub async fn up(release: bool) -> Result<()> {
    install::ensure()?;
    let stack = Stack::new(Kind::Up);
    eprintln!("xtask: starting servers under {}", stack.base.display());
    stack.start_servers().await?;

    let pool = sqlx::PgPool::connect(&stack.postgres_url("tidemark")).await?;
    tidemark_platform::postgres::migrate(&pool).await?;
    tidemark_platform::clickhouse::migrate(&clickhouse_config(&stack)).await?;
    let keys = demo_keys(&stack, &pool).await?;
    pool.close().await;

    eprintln!(
        "xtask: building services ({})",
        if release { "release" } else { "debug" }
    );
    let packages: Vec<String> = SERVICES
        .iter()
        .flat_map(|(name, _)| ["-p".to_owned(), format!("tidemark-{name}")])
        .collect();
    let status = crate::proc::cargo()
        .args(["build", "--bins", "--quiet"])
        .args(release.then_some("--release"))
        .args(&packages)
        .current_dir(&stack.root)
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }

    let env = service_env(&stack, &keys);
    for (name, port) in SERVICES {
        start_service(&stack, name, *port, &env, release)?;
    }
    let client = reqwest::Client::new();
    for (name, port) in SERVICES {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let ready =
            tidemark_launch::until(Duration::from_secs(60), Duration::from_millis(100), || {
                let request = client.get(&url).send();
                async move { request.await.is_ok_and(|r| r.status().is_success()) }
            })
            .await;
        if !ready {
            bail!(
                "{name} is not ready at {url}; last log lines:\n{}",
                proc::tail(&stack.log(name), 30)
            );
        }
    }
    load_demo_rates(&stack, &env, release)?;
    let targets: Vec<(String, String)> = SERVICES
        .iter()
        .map(|(name, port)| ((*name).to_owned(), format!("127.0.0.1:{port}")))
        .collect();
    stack.write_prometheus_targets("services", &targets)?;

    let mut vars = vec![];
    for (name, port) in SERVICES {
        vars.push((
            format!("TIDEMARK_{}_URL", name.to_uppercase()),
            format!("http://127.0.0.1:{port}"),
        ));
    }
    vars.extend([
        ("TIDEMARK_PROMETHEUS_URL".to_owned(), stack.prometheus_url()),
        (
            "TIDEMARK_POSTGRES_URL".to_owned(),
            stack.postgres_url("tidemark"),
        ),
        ("TIDEMARK_REDIS_URL".to_owned(), stack.redis_url()),
        ("TIDEMARK_CLICKHOUSE_URL".to_owned(), stack.clickhouse_url()),
        ("TIDEMARK_S3_ENDPOINT".to_owned(), stack.s3_endpoint()),
        ("TIDEMARK_S3_BUCKET".to_owned(), stack.bucket().to_owned()),
    ]);
    vars.extend(keys);
    stack.write_env(&vars)?;

    println!("Tidemark is up.\n");
    for (k, v) in &vars {
        if k.ends_with("_URL") || k.ends_with("_ENDPOINT") {
            println!("  {:<26} {v}", k.trim_start_matches("TIDEMARK_"));
        }
    }
    println!(
        "\nDemo API keys and these URLs: {}\n  set -a; . {0}; set +a   # export them to the programs you start\n\n\
         The generator streams {} orders/s (TIDEMARK_DEMO_RATE); the compactor publishes a \
         batch every minute. Where to look:\n\
         \x20 The page     http://127.0.0.1:8082/ (paste the read key from the file above)\n\
         \x20 API docs     http://127.0.0.1:8081/docs (ingest), http://127.0.0.1:8082/docs (serving)\n\
         \x20 GraphiQL     http://127.0.0.1:8082/graphql\n\
         \x20 Prometheus   {}/graph?g0.expr=sum%20by%20(outcome)%20(rate(ingest_orders_total%5B1m%5D))\n\
         \x20 Alerts       {}/alerts (routed by Alertmanager at http://127.0.0.1:9093)\n\
         \x20 Walkthrough  README.md, \"Five minutes with Tidemark\"\n\
         Stop with `cargo xtask down`; see `cargo xtask status` and `cargo xtask logs <name>`.",
        stack.env_file().display(),
        demo_rate(),
        stack.prometheus_url(),
        stack.prometheus_url(),
    );
    Ok(())
}

/// Demo exchange rates for the shop's currencies (`report_currency`): the
/// generator prints 400 days of them in the ECB format, ingest's CLI loads them
/// (idempotent: a rerun of `up` changes nothing).
fn load_demo_rates(stack: &Stack, env: &[(String, String)], release: bool) -> Result<()> {
    let rates = Command::new(binary(stack, "generator", release))
        .args(["fx-rates", "--days", "400"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&stack.root)
        .output()?;
    if !rates.status.success() {
        bail!(
            "generating demo exchange rates failed: {}",
            String::from_utf8_lossy(&rates.stderr)
        );
    }
    let mut load = Command::new(binary(stack, "ingest", release))
        .args(["fx-rates", "load", "-"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&stack.root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::io::Write::write_all(
        load.stdin.as_mut().context("the loader's stdin")?,
        &rates.stdout,
    )?;
    drop(load.stdin.take());
    if !load.wait()?.success() {
        bail!("loading demo exchange rates failed");
    }
    Ok(())
}

fn clickhouse_config(stack: &Stack) -> ClickHouseConfig {
    ClickHouseConfig {
        url: stack.clickhouse_url(),
        database: "tidemark".into(),
        ..ClickHouseConfig::default()
    }
}

/// The demo keys: reused from stack.env when present, created otherwise.
async fn demo_keys(stack: &Stack, pool: &sqlx::PgPool) -> Result<Vec<(String, String)>> {
    let previous = stack.read_env();
    let mut out = Vec::new();
    for (var, scope) in [
        ("TIDEMARK_INGEST_KEY", Scope::Ingest),
        ("TIDEMARK_READ_KEY", Scope::Read),
        ("TIDEMARK_ADMIN_KEY", Scope::Admin),
    ] {
        let token = previous
            .iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(auth::generate_token);
        auth::store(
            pool,
            &token,
            &format!("demo-{}", scope.as_str()),
            &[scope],
            None,
        )
        .await?;
        out.push((var.to_owned(), token));
    }
    Ok(out)
}

/// Settings every service reads (each ignores what it does not use).
pub(crate) fn service_env(stack: &Stack, keys: &[(String, String)]) -> Vec<(String, String)> {
    let ingest_key = keys
        .iter()
        .find(|(k, _)| k == "TIDEMARK_INGEST_KEY")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let s3 = stack.s3_config();
    vec![
        (
            "TIDEMARK_POSTGRES__URL".into(),
            stack.postgres_url("tidemark"),
        ),
        ("TIDEMARK_REDIS__URL".into(), stack.redis_url()),
        ("TIDEMARK_CLICKHOUSE__URL".into(), stack.clickhouse_url()),
        ("TIDEMARK_CLICKHOUSE__DATABASE".into(), "tidemark".into()),
        ("TIDEMARK_S3__ENDPOINT".into(), s3.endpoint),
        ("TIDEMARK_S3__BUCKET".into(), s3.bucket),
        ("TIDEMARK_S3__ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
        (
            "TIDEMARK_S3__SECRET_ACCESS_KEY".into(),
            S3_SECRET_KEY.into(),
        ),
        (
            "TIDEMARK_TARGET__INGEST_URL".into(),
            "http://127.0.0.1:8081".into(),
        ),
        ("TIDEMARK_TARGET__API_KEY".into(), ingest_key),
        ("TIDEMARK_STREAM__RATE".into(), demo_rate()),
    ]
}

/// Orders per second the generator streams in the demo (`TIDEMARK_DEMO_RATE`,
/// 0 to stop it).
fn demo_rate() -> String {
    std::env::var("TIDEMARK_DEMO_RATE").unwrap_or_else(|_| "20".into())
}

/// A service's binary in the debug or the release build.
pub(crate) fn binary(stack: &Stack, name: &str, release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| stack.root.join("target"), PathBuf::from);
    target
        .join(if release { "release" } else { "debug" })
        .join(format!("tidemark-{name}"))
}

/// Starts a service unless it runs already with the current binary (of the
/// build asked for: `up --release` after `up` restarts every service).
fn start_service(
    stack: &Stack,
    name: &str,
    port: u16,
    env: &[(String, String)],
    release: bool,
) -> Result<()> {
    let pid_file = stack.pid_file(name);
    let bin = binary(stack, name, release);
    let process = format!("tidemark-{name}");
    if let Some(pid) = read_pid(&pid_file).filter(|&pid| alive(pid, &process)) {
        let started = std::fs::metadata(&pid_file)?.modified()?;
        let built = std::fs::metadata(&bin)?.modified()?;
        // The running process's binary, by path: the other build's is another file.
        let same_build = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            exe == bin
                || exe
                    .canonicalize()
                    .is_ok_and(|e| Some(e) == bin.canonicalize().ok())
        });
        if built <= started && same_build {
            return Ok(());
        }
        eprintln!(
            "xtask: restarting {name} ({})",
            if same_build {
                "rebuilt"
            } else {
                "the other build"
            }
        );
        futures_stop(pid, &process)?;
    }
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("TIDEMARK_HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .current_dir(&stack.root);
    let mut cmd = tidemark_launch::at_service_priority(name, cmd);
    spawn_detached(&mut cmd, &stack.log(name), &pid_file)
        .with_context(|| format!("start {name}"))?;
    Ok(())
}

/// Stops a process synchronously from a non-async context.
fn futures_stop(pid: u32, process: &str) -> Result<()> {
    let process = process.to_owned();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(proc::stop(
            pid,
            &process,
            "TERM",
            Duration::from_secs(30),
        ))
    })
}

pub async fn down(test: bool) -> Result<()> {
    let stack = Stack::new(if test { Kind::Test } else { Kind::Up });
    stack.stop(&stop_order()).await?;
    println!("Stopped the {} stack.", if test { "test" } else { "up" });
    Ok(())
}

pub async fn status(test: bool) -> Result<()> {
    let stack = Stack::new(if test { Kind::Test } else { Kind::Up });
    let services: &[(&str, u16)] = if test { &[] } else { SERVICES };
    print!("{}", stack.status_lines(services));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    for (name, port) in services {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let state = match client.get(&url).send().await {
            Ok(r) => format!(
                "{} {}",
                r.status().as_u16(),
                r.text().await.unwrap_or_default()
            ),
            Err(_) => "unreachable".to_owned(),
        };
        println!("{name:<12} /readyz {state}");
    }
    if stack.env_file().exists() {
        println!("URLs and demo keys: {}", stack.env_file().display());
    }
    Ok(())
}

pub async fn logs(name: &str, lines: usize, follow: bool, test: bool) -> Result<()> {
    let stack = Stack::new(if test { Kind::Test } else { Kind::Up });
    let path = stack.log(name);
    if !path.exists() {
        bail!("no log for `{name}` at {}", path.display());
    }
    if follow {
        let status = tokio::process::Command::new("tail")
            .args(["-n", &lines.to_string(), "-F"])
            .arg(&path)
            .status()
            .await?;
        if !status.success() {
            bail!("tail failed");
        }
    } else {
        println!("{}", proc::tail(&path, lines));
    }
    Ok(())
}
