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
        /// Lines per order.
        #[arg(long, default_value_t = 1)]
        basket: usize,
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
        /// Share of the orders refunded right after their ingest (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        adjust_share: f64,
    },
    /// A fixed request rate against one URL (GET, or POST with --body), or
    /// `@FILE`: the URLs of a file (one per line) asked in turn.
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
        /// Send this `Accept-Encoding` (as a browser sends `gzip, deflate, br`);
        /// a compressed answer is received as sent, not inflated.
        #[arg(long)]
        accept_encoding: Option<String>,
    },
    /// A named scenario (ingest-heavy, rest-reads, graphql-reads, mixed) at a target
    /// request rate: prints a summary table and writes a JSON report.
    Run {
        #[arg(value_enum)]
        scenario: tidemark_loadtest::scenario::Name,
        #[arg(
            long,
            env = "TIDEMARK_INGEST_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        ingest_url: String,
        #[arg(
            long,
            env = "TIDEMARK_SERVING_URL",
            default_value = "http://127.0.0.1:8082"
        )]
        serving_url: String,
        #[arg(long, env = "TIDEMARK_INGEST_KEY", hide_env_values = true)]
        ingest_key: String,
        #[arg(long, env = "TIDEMARK_READ_KEY", hide_env_values = true)]
        read_key: String,
        /// Requests per second, all kinds together.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Orders per ingest request.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Seed of orders and request mix; from the clock when absent.
        #[arg(long)]
        seed: Option<u64>,
        /// A few seconds at a low rate, failing on any error.
        #[arg(long)]
        smoke: bool,
        /// Where to write the JSON report.
        #[arg(long, default_value = "loadtest-report.json")]
        report: std::path::PathBuf,
    },
    /// Subscribe to live revenue over GraphQL and print each update as it arrives.
    Watch {
        #[arg(
            long,
            env = "TIDEMARK_SERVING_URL",
            default_value = "http://127.0.0.1:8082"
        )]
        serving_url: String,
        #[arg(long, env = "TIDEMARK_READ_KEY", hide_env_values = true)]
        key: String,
        /// The subscription document.
        #[arg(
            long,
            default_value = "subscription { revenue(granularity: MINUTE, groupBy: CITY) \
                             { points { bucket group currency revenueMinor orders } \
                               freshness { speed { lagSeconds } asOf } } }"
        )]
        query: String,
        /// Stop after this many updates.
        #[arg(long)]
        updates: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Write `count` deterministic orders as CSV (for a COPY anchor): the
    /// `orders` rows, or with `--lines` the `order_lines` rows.
    Csv {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        count: usize,
        #[arg(long)]
        lines: bool,
        /// Lines per order (as `ingest-batch --basket`).
        #[arg(long, default_value_t = 1)]
        basket: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let report = match Cli::parse().scenario {
        Scenario::IngestBatch {
            url,
            key,
            seed,
            count,
            batch,
            concurrency,
            basket,
        } => {
            let orders = tidemark_loadtest::baskets(seed, count, basket);
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
            let (rec, elapsed) =
                tidemark_loadtest::send_all(&url, &key, "application/json", bodies, concurrency)
                    .await?;
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
            let (rec, elapsed) =
                tidemark_loadtest::send_all(&url, &key, "application/json", bodies, concurrency)
                    .await?;
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
            adjust_share,
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
                    adjust_share,
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
            accept_encoding,
        } => {
            let urls = match url.strip_prefix('@') {
                Some(file) => std::fs::read_to_string(file)?
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect(),
                None => vec![url],
            };
            anyhow::ensure!(!urls.is_empty(), "no URLs");
            tidemark_loadtest::rate::run(
                &name,
                tidemark_loadtest::rate::Settings {
                    urls,
                    key,
                    body,
                    rate,
                    seconds,
                    max_in_flight: 256,
                    accept_encoding,
                },
            )
            .await?
        }
        Scenario::Run {
            scenario,
            ingest_url,
            serving_url,
            ingest_key,
            read_key,
            rate,
            seconds,
            batch,
            seed,
            smoke,
            report,
        } => {
            let mut settings = tidemark_loadtest::scenario::Settings {
                ingest_url,
                serving_url,
                ingest_key,
                read_key,
                rate,
                duration: std::time::Duration::from_secs(seconds),
                batch,
                seed: seed.unwrap_or_else(tidemark_generator::clock_seed),
                max_in_flight: 512,
            };
            if smoke {
                settings = settings.smoke();
            }
            let reports = tidemark_loadtest::scenario::run(scenario, &settings).await?;
            print!("{}", tidemark_loadtest::scenario::table(&reports));
            std::fs::write(&report, serde_json::to_vec_pretty(&reports)?)?;
            println!("report: {}", report.display());
            let errors = reports.last().map_or(0, |r| r.errors);
            anyhow::ensure!(!smoke || errors == 0, "{errors} requests failed");
            return Ok(());
        }
        Scenario::Watch {
            serving_url,
            key,
            query,
            updates,
            seconds,
        } => {
            let settings = tidemark_loadtest::watch::Settings {
                serving_url,
                key,
                query,
                updates,
                duration: seconds.map(std::time::Duration::from_secs),
            };
            let n = tidemark_loadtest::watch::run(&settings).await?;
            eprintln!("{n} updates");
            return Ok(());
        }
        Scenario::Csv {
            seed,
            count,
            lines,
            basket,
        } => {
            let mut out = String::with_capacity(count * 150);
            for o in tidemark_loadtest::baskets(seed, count, basket) {
                if lines {
                    for (n, l) in o.lines.iter().enumerate() {
                        out.push_str(&format!(
                            "{},{},{},{},{},{}\n",
                            o.order_id,
                            n + 1,
                            l.product_id,
                            l.category,
                            l.quantity,
                            l.unit_price_minor
                        ));
                    }
                } else {
                    out.push_str(&format!(
                        "{},{},{},{},{}\n",
                        o.order_id,
                        o.user_id,
                        o.city,
                        o.currency,
                        o.created_at.to_rfc3339()
                    ));
                }
            }
            print!("{out}");
            return Ok(());
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
