-- Customers with history (issue 20): each change of a customer's attributes is an
-- event of the log, effective from `effective_at` (which may lie before changes
-- already recorded), never an update. The versions (slowly changing dimension,
-- type 2) are a function of these rows: at each `effective_at` the latest `seq`
-- wins, and a version equal to the one before it is merged into it (see
-- domain::customer). Ingest records a change only if it alters that history, so an
-- identical resend records nothing. `seq` and `txid` place the row in the one log
-- with orders and adjustments, for the consumers that tail it.
CREATE TABLE customer_changes (
    user_id      text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 64),
    effective_at timestamptz NOT NULL,
    city         text        NOT NULL CHECK (char_length(city) BETWEEN 1 AND 64),
    segment      text        NOT NULL CHECK (char_length(segment) BETWEEN 1 AND 64),
    signed_up_at timestamptz NOT NULL,
    seq          bigint      NOT NULL DEFAULT nextval('orders_seq_seq'),
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, effective_at, seq)
);

-- The tail's index, as for orders and adjustments.
CREATE UNIQUE INDEX customer_changes_log_position ON customer_changes (txid, seq);
