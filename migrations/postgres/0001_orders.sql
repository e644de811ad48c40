-- The orders log, API keys and log-consumer cursors.

-- Postgres `orders` is the source of truth and the log. Log order is (txid, seq):
-- txid is the writing transaction's id (xid8), so a consumer reading
--   WHERE (txid, seq) > $cursor AND txid < pg_snapshot_xmin(pg_current_snapshot())
-- never skips a row whose transaction commits late (see ARCHITECTURE.md, "The log").
CREATE TABLE orders (
    order_id         uuid        PRIMARY KEY,
    seq              bigint      NOT NULL GENERATED ALWAYS AS IDENTITY,
    txid             xid8        NOT NULL DEFAULT pg_current_xact_id(),
    user_id          text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 64),
    city             text        NOT NULL CHECK (char_length(city) BETWEEN 1 AND 64),
    product_id       text        NOT NULL CHECK (char_length(product_id) BETWEEN 1 AND 64),
    category         text        NOT NULL CHECK (char_length(category) BETWEEN 1 AND 64),
    quantity         integer     NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price_minor bigint      NOT NULL CHECK (unit_price_minor BETWEEN 0 AND 100000000),
    currency         char(3)     NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    created_at       timestamptz NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now()
);

-- The tail query's index: range scans in log order.
CREATE UNIQUE INDEX orders_log_position ON orders (txid, seq);
-- Order history by user, newest first, with a stable tiebreak for cursors.
CREATE INDEX orders_user_history ON orders (user_id, created_at DESC, order_id DESC);

CREATE TABLE api_keys (
    key_id          uuid        PRIMARY KEY,
    name            text        NOT NULL,
    -- First characters of the token, for people to recognise a key.
    prefix          text        NOT NULL,
    -- SHA-256 of the token; the token itself is never stored.
    key_hash        bytea       NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    scopes          text[]      NOT NULL CHECK (scopes <@ ARRAY['ingest', 'read', 'admin']),
    rate_per_second integer     CHECK (rate_per_second > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);

-- Durable progress of log consumers that keep their cursor in Postgres (the lake
-- relay). `pending_*` is a batch planned but not yet confirmed: after a crash it
-- is redone with exactly the same bounds, so retried writes land on the same keys.
CREATE TABLE consumer_cursors (
    consumer        text        PRIMARY KEY,
    txid            xid8        NOT NULL DEFAULT '0',
    seq             bigint      NOT NULL DEFAULT 0,
    -- Every row with txid below this horizon has been consumed.
    horizon         xid8        NOT NULL DEFAULT '0',
    pending_txid    xid8,
    pending_seq     bigint,
    pending_horizon xid8,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((pending_txid IS NULL) = (pending_seq IS NULL))
);
