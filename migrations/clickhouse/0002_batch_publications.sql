-- A mirror of each publish (the authoritative record is Postgres `batch_state`), so
-- SQL clients such as Grafana can restrict revenue_agg to published runs:
--   WHERE run_id BETWEEN base_run_id AND run_id of the latest publication.
CREATE TABLE IF NOT EXISTS batch_publications
(
    run_id          UInt64,
    base_run_id     UInt64,
    watermark_txid  UInt64,
    watermark_time  DateTime,
    published_at    DateTime
)
ENGINE = ReplacingMergeTree
ORDER BY run_id
