//! `cargo xtask test`: what CI runs. Format check, then the test servers on their
//! own ports and folder, clippy, and the whole suite; the servers are stopped
//! afterwards, even when something fails or the run is interrupted.

use std::time::Instant;

use anyhow::{Result, bail};

use tidemark_launch::{cargo_bin, postgres_bin_dir, which};

use crate::install;
use crate::stack::{Kind, S3_ACCESS_KEY, S3_SECRET_KEY, Stack};

pub async fn run(keep: bool, lint: bool, heavy: bool, nextest_args: &[String]) -> Result<()> {
    let started = Instant::now();
    install::ensure()?;
    report_free_disk("at the start");
    if lint {
        cargo(&["fmt", "--all", "--", "--check"], &[]).await?;
    }
    let stack = Stack::new(Kind::Test);
    stack.stop(&[]).await?;
    stack.wipe()?;
    let figures = stack.base.join("figures");
    if figures.exists() {
        std::fs::remove_dir_all(&figures)?;
    }
    let outcome = tokio::select! {
        result = checks(&stack, lint, heavy, nextest_args) => result,
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
    print_figures(&figures, nextest_args.is_empty());
    report_free_disk("at the end");
    let secs = started.elapsed().as_secs();
    match &outcome {
        Ok(()) => eprintln!("xtask: all checks passed in {secs} s"),
        Err(_) => eprintln!("xtask: checks failed after {secs} s"),
    }
    outcome
}

async fn checks(stack: &Stack, lint: bool, heavy: bool, nextest_args: &[String]) -> Result<()> {
    eprintln!(
        "xtask: starting test servers under {}",
        stack.base.display()
    );
    stack.start_servers().await?;
    let mut env = test_env(stack)?;
    stack.write_env(&env)?;
    env.push((
        "TIDEMARK_TEST_FIGURES".into(),
        stack.base.join("figures").display().to_string(),
    ));
    if heavy {
        env.push(("TIDEMARK_TEST_HEAVY".into(), "1".into()));
    }
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
    let has_nextest = install::nextest_installed();
    let mut args: Vec<&str> = if has_nextest {
        vec!["nextest", "run", "--workspace", "--no-fail-fast"]
    } else {
        vec!["test", "--workspace", "--no-fail-fast"]
    };
    args.extend(nextest_args.iter().map(String::as_str));
    cargo(&args, &env).await
}

/// A clean build of the workspace and its tests fills about 6.5 GiB of `target/`
/// (more with incremental caches) and the suite's servers about 2 GiB more; a disk
/// too full for that fails the build or the suite halfway with "No space left on
/// device", so the free space is printed `when` (at the start, and at the end to
/// show what the run left), a shortfall named.
fn report_free_disk(when: &str) {
    const NEEDED_GIB: u64 = 12;
    let dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| ".".into());
    let out = crate::proc::run(std::process::Command::new("df").args(["-Pk", &dir]));
    // `df -P`: a header, then "filesystem blocks used available capacity mount".
    let free_gib = out.ok().and_then(|text| {
        let kib: u64 = text
            .lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()?;
        Some(kib >> 20)
    });
    match free_gib {
        Some(gib) if gib < NEEDED_GIB => eprintln!(
            "xtask: warning: {gib} GiB free {when} on the disk holding {dir}; a clean build \
             and the suite need about {NEEDED_GIB} GiB"
        ),
        Some(gib) => eprintln!("xtask: {gib} GiB free {when} on the disk holding {dir}"),
        None => eprintln!("xtask: could not read the free disk space (df)"),
    }
}

/// Rows of RELIABILITY.md without a test yet, and where they will be proven (the
/// repository's RELIABILITY.md says the same).
const NOT_YET_PROVEN: &[(u32, &str)] = &[
    (16, "a keep-alive connection after an early refusal"),
    (17, "request lines and headers over the limits"),
    (
        20,
        "standby workers and replicas arrive with scale-out, issue 22",
    ),
];

/// The fault rows of RELIABILITY.md, each with the figure its tests recorded
/// (`tidemark_testkit::figure`); on a whole-suite run, a row without one is named.
fn print_figures(dir: &std::path::Path, whole_suite: bool) {
    let mut rows: Vec<(u32, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix('R')?.strip_suffix(".txt")?.parse().ok()?;
            Some((n, std::fs::read_to_string(entry.path()).ok()?))
        })
        .collect();
    rows.sort();
    if rows.is_empty() && !whole_suite {
        return;
    }
    eprintln!("xtask: fault figures (RELIABILITY.md)");
    for n in 1..=20 {
        let pending = NOT_YET_PROVEN.iter().find(|(row, _)| *row == n);
        match (rows.iter().find(|(row, _)| *row == n), pending) {
            (Some((_, text)), _) => {
                let mut lines: Vec<&str> = text.lines().collect();
                lines.sort_unstable();
                for line in lines {
                    eprintln!("  R{n:<3} {line}");
                }
            }
            (None, Some((_, why))) if whole_suite => eprintln!("  R{n:<3} (not yet proven: {why})"),
            (None, None) if whole_suite => eprintln!("  R{n:<3} (no figure recorded)"),
            (None, _) => {}
        }
    }
}

/// What the tests need to find the servers (also written to the stack's env file).
fn test_env(stack: &Stack) -> Result<Vec<(String, String)>> {
    let pg_bin = postgres_bin_dir().ok_or_else(|| anyhow::anyhow!("no postgres"))?;
    let redis = which("redis-server").ok_or_else(|| anyhow::anyhow!("no redis-server"))?;
    let var = |k: &str, v: String| (format!("TIDEMARK_TEST_{k}"), v);
    Ok(vec![
        var("POSTGRES_URL", stack.postgres_url("postgres")),
        var("POSTGRES_BIN", pg_bin.display().to_string()),
        var("REDIS_URL", stack.redis_url()),
        var("REDIS_SERVER", redis.display().to_string()),
        var("CLICKHOUSE_URL", stack.clickhouse_url()),
        var(
            "CLICKHOUSE_SERVER",
            which("clickhouse-server")
                .ok_or_else(|| anyhow::anyhow!("no clickhouse-server"))?
                .display()
                .to_string(),
        ),
        var("S3_ENDPOINT", stack.s3_endpoint()),
        var("S3_BUCKET", stack.bucket().to_owned()),
        var("S3_ROOT", stack.data("s3").display().to_string()),
        var("S3_ACCESS_KEY_ID", S3_ACCESS_KEY.to_owned()),
        var("S3_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_owned()),
        var("S3_SERVER", cargo_bin("s3s-fs").display().to_string()),
        var("PROMETHEUS_URL", stack.prometheus_url()),
        var(
            "SCHEMATHESIS",
            install::schemathesis()?.display().to_string(),
        ),
        var(
            "PROMETHEUS_TARGETS",
            stack.base.join("prometheus/targets").display().to_string(),
        ),
    ])
}

/// Runs cargo with inherited output; killed if this future is dropped (Ctrl-C).
async fn cargo(args: &[&str], env: &[(String, String)]) -> Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = tokio::process::Command::from(crate::proc::cargo())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(tidemark_launch::workspace_root())
        .kill_on_drop(true)
        .status()
        .await?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
