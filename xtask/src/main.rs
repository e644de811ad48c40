//! Developer tasks for Tidemark, run as `cargo xtask <task>`.
//!
//! - `up`: install what is missing, start the servers and every service, print URLs.
//! - `test`: the whole check, exactly what CI runs.
//! - `down`, `status`, `logs`: look after a running stack.

mod bench;
mod install;
mod proc;
mod stack;
mod test;
mod up;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tidemark developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, start the servers and all services, wait until
    /// every /readyz answers 200, print the URLs (also in .tidemark/stack.env).
    Up {
        /// Run release builds (a slower first build, services several times
        /// faster: for load and for trying the figures of the benchmarks).
        #[arg(long)]
        release: bool,
    },
    /// Stop everything `up` started (or, with --test, the test stack).
    Down {
        #[arg(long)]
        test: bool,
    },
    /// Show what is running.
    Status {
        #[arg(long)]
        test: bool,
    },
    /// Print a component's log (postgres, redis, clickhouse, s3, prometheus,
    /// ingest, speed, compactor, serving, generator).
    Logs {
        name: String,
        /// Lines from the end.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
        /// Keep printing as the log grows.
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        test: bool,
    },
    /// Format check, clippy, and the whole test suite against real servers started
    /// on their own ports (stopped afterwards, even on failure).
    Test {
        /// Leave the test servers running afterwards (then `cargo nextest run` works).
        #[arg(long)]
        keep: bool,
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Run the heavier fault variants too (longer outages, more kills, more
        /// property-test cases); sets TIDEMARK_TEST_HEAVY=1 for the tests.
        #[arg(long)]
        heavy: bool,
        /// Extra arguments for `cargo nextest run`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install the servers and tools the stacks need, then exit.
    Install,
    /// A benchmark, printed next to an anchor measured in the same run and written
    /// to `target/bench/<name>.json`: ingest, speed, compactor, serving, or all.
    Bench { name: String },
    /// Reconcile the running `up` stack: served totals against Postgres, the raw
    /// lake against Postgres, Parquet against ClickHouse; non-zero exit on drift.
    Verify {
        /// How many recent days to compare.
        #[arg(long, default_value_t = 3)]
        days: i64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Up { release } => up::up(release).await,
        Task::Down { test } => up::down(test).await,
        Task::Status { test } => up::status(test).await,
        Task::Logs {
            name,
            lines,
            follow,
            test,
        } => up::logs(&name, lines, follow, test).await,
        Task::Test {
            keep,
            no_lint,
            heavy,
            args,
        } => test::run(keep, !no_lint, heavy, &args).await,
        Task::Install => install::ensure(),
        Task::Bench { name } => bench::run_bench(&name).await,
        Task::Verify { days } => verify::verify(days),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
