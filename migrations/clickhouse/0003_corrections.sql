-- Corrections (refunds and cancellations) per cell, on both bases: `booked_*` in
-- the bucket in which they happened, `restated_*` in the bucket (and at the place
-- and products) of the order they correct. Rows written before hold none (0).
-- One statement: ClickHouse adds all the columns or none. 18.16 knows no
-- `ADD COLUMN IF NOT EXISTS`; the runner takes "already exists" as applied.
ALTER TABLE revenue_agg
    ADD COLUMN booked_refunded_minor Int64 DEFAULT 0,
    ADD COLUMN booked_refunded_items UInt64 DEFAULT 0,
    ADD COLUMN booked_cancelled_orders UInt64 DEFAULT 0,
    ADD COLUMN restated_refunded_minor Int64 DEFAULT 0,
    ADD COLUMN restated_refunded_items UInt64 DEFAULT 0,
    ADD COLUMN restated_cancelled_orders UInt64 DEFAULT 0
