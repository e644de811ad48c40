//! `tidemark-loadtest`: load scenarios against a running stack; prints a JSON report.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tidemark-loadtest",
    about = "Load-test scenarios against a running Tidemark stack"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Batched JSON ingest of `count` deterministic orders.
    IngestBatch {
        #[arg(long, env = "TIDEMARK_INGEST_URL")]
        url: String,
        #[arg(long, env = "TIDEMARK_INGEST_KEY")]
        key: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// One order per request from `concurrency` connections.
    IngestSingle {
        #[arg(long, env = "TIDEMARK_INGEST_URL")]
        url: String,
        #[arg(long, env = "TIDEMARK_INGEST_KEY")]
        key: String,
        #[arg(long, default_value_t = 2)]
        seed: u64,
        #[arg(long, default_value_t = 50_000)]
        count: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Freshness: ingest at a fixed rate and measure 2xx → visible in the speed view.
    Freshness {
        #[arg(long, env = "TIDEMARK_INGEST_URL")]
        url: String,
        #[arg(long, env = "TIDEMARK_INGEST_KEY")]
        key: String,
        #[arg(long)]
        redis_url: String,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        postgres_url: String,
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        #[arg(long, default_value_t = 50)]
        batch: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        seed: u64,
    },
    /// A fixed request rate against one URL (GET, or POST with --body).
    Rate {
        #[arg(long)]
        name: String,
        #[arg(long)]
        url: String,
        #[arg(long, env = "TIDEMARK_READ_KEY")]
        key: Option<String>,
        #[arg(long)]
        body: Option<String>,
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
    /// Write `count` deterministic orders as CSV (for a COPY anchor).
    Csv {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let report = match Cli::parse().scenario {
        Scenario::IngestBatch {
            url,
            key,
            seed,
            count,
            batch,
            concurrency,
        } => {
            let orders = tidemark_loadtest::orders(seed, count);
            let bodies = orders
                .chunks(batch)
                .map(|c| {
                    let items: Vec<_> = c.iter().map(tidemark_loadtest::order_json).collect();
                    (
                        serde_json::to_vec(&items).expect("serializes"),
                        c.len() as u64,
                    )
                })
                .collect();
            let url = format!("{}/v1/orders", url.trim_end_matches('/'));
            let (rec, elapsed) = tidemark_loadtest::send_all(
                &client,
                &url,
                &key,
                "application/json",
                bodies,
                concurrency,
            )
            .await;
            rec.report("ingest-batch", elapsed)
        }
        Scenario::IngestSingle {
            url,
            key,
            seed,
            count,
            concurrency,
        } => {
            let bodies = tidemark_loadtest::orders(seed, count)
                .iter()
                .map(|o| {
                    let body = serde_json::to_vec(&tidemark_loadtest::order_json(o));
                    (body.expect("serializes"), 1)
                })
                .collect();
            let url = format!("{}/v1/orders", url.trim_end_matches('/'));
            let (rec, elapsed) = tidemark_loadtest::send_all(
                &client,
                &url,
                &key,
                "application/json",
                bodies,
                concurrency,
            )
            .await;
            rec.report("ingest-single", elapsed)
        }
        Scenario::Freshness {
            url,
            key,
            redis_url,
            prefix,
            postgres_url,
            rate,
            batch,
            seconds,
            seed,
        } => {
            let report =
                tidemark_loadtest::freshness::run(tidemark_loadtest::freshness::Settings {
                    ingest_url: url,
                    key,
                    redis_url,
                    prefix,
                    postgres_url,
                    rate,
                    batch,
                    seconds,
                    seed,
                })
                .await?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        Scenario::Rate {
            name,
            url,
            key,
            body,
            rate,
            seconds,
        } => {
            tidemark_loadtest::rate::run(
                &name,
                tidemark_loadtest::rate::Settings {
                    url,
                    key,
                    body,
                    rate,
                    seconds,
                    max_in_flight: 256,
                },
            )
            .await?
        }
        Scenario::Csv { seed, count } => {
            let mut out = String::with_capacity(count * 150);
            for o in tidemark_loadtest::orders(seed, count) {
                out.push_str(&format!(
                    "{},{},{},{},{},{},{},{},{}\n",
                    o.order_id,
                    o.user_id,
                    o.city,
                    o.product_id,
                    o.category,
                    o.quantity,
                    o.unit_price_minor,
                    o.currency,
                    o.created_at.to_rfc3339()
                ));
            }
            print!("{out}");
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
