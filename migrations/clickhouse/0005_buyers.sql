-- Who bought (issue 19): one row per minute, city, category, product, currency and
-- user with an order line there, per batch run; `buyers` is the number of distinct
-- users of the rows a question selects (uniqExact), which no sum of counts can
-- give. Published like revenue_agg: a run's rows are staged, attached by
-- partition, and read only for published runs (run_id between the published base
-- and run). Sorted by city first: questions filter by a few cities.
CREATE TABLE IF NOT EXISTS buyers
(
    bucket   DateTime,
    city     String,
    category String,
    product  String,
    currency String,
    user_id  String,
    run_id   UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (city, bucket, category, product, currency, user_id, run_id)
