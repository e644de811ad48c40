-- The batch view: revenue per time bucket and dimension value, one row per
-- (bucket, value, currency) per batch run that touched it. A run's rows hold the
-- sums of the orders that run added; a reader sums the rows of the published runs
-- (run_id BETWEEN base_run_id AND published run_id). Replacing on the full key
-- (run_id included) makes a re-copied run idempotent under FINAL.
-- Runs on ClickHouse 18.16 and current releases.
CREATE TABLE IF NOT EXISTS revenue_agg
(
    granularity   Enum8('minute' = 1, 'hour' = 2, 'day' = 3),
    dimension     Enum8('total' = 1, 'city' = 2, 'category' = 3, 'product' = 4),
    bucket        DateTime,
    value         String,
    currency      String,
    run_id        UInt64,
    revenue_minor Int64,
    orders        UInt64,
    items         UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (granularity, dimension, bucket, value, currency, run_id)
