-- Corrections are events: a refund or a cancellation is a new row of the log,
-- never an update of the order. `seq` comes from the same sequence as the orders'
-- (so (txid, seq) orders both tables as one log); `txid` is the writing
-- transaction's id, as for orders. An adjustment's lines say what it gave back of
-- each line of its order: units (`quantity`, 0 for a refund of an amount) and
-- minor units (`amount_minor`).
CREATE TABLE adjustments (
    -- The refund's id (the client's idempotency key), or the cancellation's.
    adjustment_id uuid        PRIMARY KEY,
    order_id      uuid        NOT NULL REFERENCES orders (order_id),
    kind          text        NOT NULL CHECK (kind IN ('refund', 'cancellation')),
    seq           bigint      NOT NULL DEFAULT nextval('orders_seq_seq'),
    txid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    created_at    timestamptz NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now()
);

-- The tail's index, as for orders.
CREATE UNIQUE INDEX adjustments_log_position ON adjustments (txid, seq);
-- An order's adjustments (the checks of a new one, the order history).
CREATE INDEX adjustments_by_order ON adjustments (order_id, created_at);
-- An order is cancelled at most once.
CREATE UNIQUE INDEX adjustments_one_cancellation ON adjustments (order_id)
    WHERE kind = 'cancellation';

CREATE TABLE adjustment_lines (
    adjustment_id uuid     NOT NULL REFERENCES adjustments (adjustment_id),
    -- The order line given back (order_lines.line_no of the adjustment's order).
    line_no       smallint NOT NULL CHECK (line_no BETWEEN 1 AND 100),
    quantity      integer  NOT NULL CHECK (quantity BETWEEN 0 AND 1000),
    amount_minor  bigint   NOT NULL CHECK (amount_minor BETWEEN 0 AND 100000000000),
    PRIMARY KEY (adjustment_id, line_no)
);

-- A refund as its client sent it (items by product, with quantity or amount), to
-- tell a resend (same id, same request: the stored refund is answered) from a
-- conflicting reuse of the id.
ALTER TABLE adjustments ADD COLUMN request jsonb;
