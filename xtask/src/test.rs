//! `cargo xtask test`: what CI runs. Format check, then the test servers on their
//! own ports and folder, clippy, and the whole suite; the servers are stopped
//! afterwards, even when something fails or the run is interrupted.

use std::time::Instant;

use anyhow::{Result, bail};

use crate::install::{self, which};
use crate::stack::{Kind, S3_ACCESS_KEY, S3_SECRET_KEY, Stack};

pub async fn run(keep: bool, lint: bool, nextest_args: &[String]) -> Result<()> {
    let started = Instant::now();
    install::ensure()?;
    if lint {
        cargo(&["fmt", "--all", "--", "--check"], &[]).await?;
    }
    let stack = Stack::new(Kind::Test);
    stack.stop(&[]).await?;
    stack.wipe()?;
    let outcome = tokio::select! {
        result = checks(&stack, lint, nextest_args) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if keep {
        eprintln!(
            "xtask: test servers left running (stop with `cargo xtask down --test`); \
             their addresses are in {}",
            stack.env_file().display()
        );
    } else {
        stack.stop(&[]).await?;
    }
    let secs = started.elapsed().as_secs();
    match &outcome {
        Ok(()) => eprintln!("xtask: all checks passed in {secs} s"),
        Err(_) => eprintln!("xtask: checks failed after {secs} s"),
    }
    outcome
}

async fn checks(stack: &Stack, lint: bool, nextest_args: &[String]) -> Result<()> {
    eprintln!(
        "xtask: starting test servers under {}",
        stack.base.display()
    );
    stack.start_servers().await?;
    let env = test_env(stack)?;
    stack.write_env(&env)?;
    if lint {
        cargo(
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
        .await?;
    }
    let has_nextest = tokio::process::Command::new(env!("CARGO"))
        .args(["nextest", "--version"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    let mut args: Vec<&str> = if has_nextest {
        vec!["nextest", "run", "--workspace", "--no-fail-fast"]
    } else {
        vec!["test", "--workspace", "--no-fail-fast"]
    };
    args.extend(nextest_args.iter().map(String::as_str));
    cargo(&args, &env).await
}

/// What the tests need to find the servers (also written to the stack's env file).
fn test_env(stack: &Stack) -> Result<Vec<(String, String)>> {
    let pg_bin = install::postgres_bin_dir().ok_or_else(|| anyhow::anyhow!("no postgres"))?;
    let redis = which("redis-server").ok_or_else(|| anyhow::anyhow!("no redis-server"))?;
    let var = |k: &str, v: String| (format!("TIDEMARK_TEST_{k}"), v);
    Ok(vec![
        var("POSTGRES_URL", stack.postgres_url("postgres")),
        var("POSTGRES_BIN", pg_bin.display().to_string()),
        var("REDIS_URL", stack.redis_url()),
        var("REDIS_SERVER", redis.display().to_string()),
        var("CLICKHOUSE_URL", stack.clickhouse_url()),
        var("S3_ENDPOINT", stack.s3_endpoint()),
        var("S3_BUCKET", stack.bucket().to_owned()),
        var("S3_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
        var("S3_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
        var(
            "S3_SERVER",
            install::cargo_bin("s3s-fs").display().to_string(),
        ),
        var("PROMETHEUS_URL", stack.prometheus_url()),
        var(
            "PROMETHEUS_TARGETS",
            stack.base.join("prometheus/targets").display().to_string(),
        ),
    ])
}

/// Runs cargo with inherited output; killed if this future is dropped (Ctrl-C).
async fn cargo(args: &[&str], env: &[(String, String)]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = tokio::process::Command::new(env!("CARGO"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(crate::stack::workspace_root())
        .kill_on_drop(true)
        .status()
        .await?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
