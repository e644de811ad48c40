-- A Data Vault 2.0 warehouse (issue 20), in a schema of its own, loaded from the
-- log by the vault loader (services/ingest/src/vault.rs) under the safe-tail rule,
-- exactly once: each step's inserts and its cursor move are one transaction.
--
-- Hubs hold business keys, links the relations between them, satellites the
-- descriptive attributes over time. Hash keys are MD5 of the trimmed business key
-- parts joined by '||' (the keys are case-sensitive in the source, so case is
-- kept); `hash_diff` is the MD5 of a satellite row's attributes the same way.
-- `load_date` is when the row reached the log (`ingested_at`, `recorded_at`): the
-- log is the warehouse's staging area, and a rebuild from scratch yields the same
-- rows. Every table is insert-only (a trigger refuses UPDATE and DELETE; a rebuild
-- truncates). See ARCHITECTURE.md, "The warehouse".
CREATE SCHEMA vault;

CREATE FUNCTION vault.hash_key(VARIADIC parts text[]) RETURNS bytea
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
        SELECT decode(md5(string_agg(coalesce(trim(p), ''), '||' ORDER BY i)), 'hex')
        FROM unnest(parts) WITH ORDINALITY AS u (p, i)
    $$;

CREATE FUNCTION vault.insert_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
    BEGIN
        RAISE EXCEPTION 'the vault is insert-only: % on %.% refused',
            TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME;
    END
    $$;

-- Hubs: one row per business key, first seen at `load_date`.
CREATE TABLE vault.hub_customer (
    customer_hk   bytea       PRIMARY KEY,
    user_id       text        NOT NULL UNIQUE,
    load_date     timestamptz NOT NULL,
    record_source text        NOT NULL
);

CREATE TABLE vault.hub_product (
    product_hk    bytea       PRIMARY KEY,
    product_id    text        NOT NULL UNIQUE,
    load_date     timestamptz NOT NULL,
    record_source text        NOT NULL
);

CREATE TABLE vault.hub_order (
    order_hk      bytea       PRIMARY KEY,
    order_id      uuid        NOT NULL UNIQUE,
    load_date     timestamptz NOT NULL,
    record_source text        NOT NULL
);

-- Links: who placed an order; which product each line of an order is (the line
-- number is the link's dependent child key).
CREATE TABLE vault.link_order_customer (
    order_customer_hk bytea       PRIMARY KEY,
    order_hk          bytea       NOT NULL UNIQUE REFERENCES vault.hub_order,
    customer_hk       bytea       NOT NULL REFERENCES vault.hub_customer,
    load_date         timestamptz NOT NULL,
    record_source     text        NOT NULL
);
CREATE INDEX link_order_customer_by_customer ON vault.link_order_customer (customer_hk);

CREATE TABLE vault.link_order_line (
    order_line_hk bytea       PRIMARY KEY,
    order_hk      bytea       NOT NULL REFERENCES vault.hub_order,
    product_hk    bytea       NOT NULL REFERENCES vault.hub_product,
    line_no       smallint    NOT NULL,
    load_date     timestamptz NOT NULL,
    record_source text        NOT NULL,
    UNIQUE (order_hk, line_no)
);

-- Satellites. A customer's attributes: one row per recorded change, with the
-- moment it is effective from; the version in effect at a time is the row with the
-- latest `effective_at` not after it (the latest recorded among equals) — the
-- slowly changing dimension of domain::customer, as an as-of join. `log_seq` tells
-- apart the changes one transaction records (they share `load_date`).
CREATE TABLE vault.sat_customer (
    customer_hk   bytea       NOT NULL REFERENCES vault.hub_customer,
    load_date     timestamptz NOT NULL,
    log_seq       bigint      NOT NULL,
    effective_at  timestamptz NOT NULL,
    hash_diff     bytea       NOT NULL,
    city          text        NOT NULL,
    segment       text        NOT NULL,
    signed_up_at  timestamptz NOT NULL,
    record_source text        NOT NULL,
    PRIMARY KEY (customer_hk, load_date, log_seq)
);
CREATE INDEX sat_customer_as_of
    ON vault.sat_customer (customer_hk, effective_at DESC, log_seq DESC) INCLUDE (city);

-- An order's details (orders never change: one row each).
CREATE TABLE vault.sat_order (
    order_hk      bytea       NOT NULL REFERENCES vault.hub_order,
    load_date     timestamptz NOT NULL,
    hash_diff     bytea       NOT NULL,
    created_at    timestamptz NOT NULL,
    city          text        NOT NULL,
    currency      char(3)     NOT NULL,
    record_source text        NOT NULL,
    PRIMARY KEY (order_hk, load_date)
);
CREATE INDEX sat_order_by_time ON vault.sat_order (created_at);
-- A customer's orders newest first (order history), through the link.
CREATE INDEX sat_order_history ON vault.sat_order (order_hk, created_at DESC);

-- A line's details.
CREATE TABLE vault.sat_order_line (
    order_line_hk    bytea       NOT NULL REFERENCES vault.link_order_line,
    load_date        timestamptz NOT NULL,
    hash_diff        bytea       NOT NULL,
    category         text        NOT NULL,
    quantity         integer     NOT NULL,
    unit_price_minor bigint      NOT NULL,
    record_source    text        NOT NULL,
    PRIMARY KEY (order_line_hk, load_date)
);

-- The refunds and cancellation of an order: a multi-active satellite, one row per
-- adjustment (a cancellation of an order with nothing left gives back no line, and
-- is still the order's cancellation).
CREATE TABLE vault.sat_order_adjustment (
    order_hk      bytea       NOT NULL REFERENCES vault.hub_order,
    adjustment_id uuid        NOT NULL,
    load_date     timestamptz NOT NULL,
    hash_diff     bytea       NOT NULL,
    kind          text        NOT NULL,
    created_at    timestamptz NOT NULL,
    record_source text        NOT NULL,
    PRIMARY KEY (order_hk, adjustment_id)
);

-- What refunds and cancellations gave back of each line: a multi-active
-- satellite, one row per adjustment of the line.
CREATE TABLE vault.sat_line_adjustment (
    order_line_hk bytea       NOT NULL REFERENCES vault.link_order_line,
    adjustment_id uuid        NOT NULL,
    load_date     timestamptz NOT NULL,
    hash_diff     bytea       NOT NULL,
    kind          text        NOT NULL,
    created_at    timestamptz NOT NULL,
    quantity      integer     NOT NULL,
    amount_minor  bigint      NOT NULL,
    record_source text        NOT NULL,
    PRIMARY KEY (order_line_hk, adjustment_id)
);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['hub_customer', 'hub_product', 'hub_order',
        'link_order_customer', 'link_order_line', 'sat_customer', 'sat_order',
        'sat_order_line', 'sat_order_adjustment', 'sat_line_adjustment']
    LOOP
        EXECUTE format('CREATE TRIGGER insert_only BEFORE UPDATE OR DELETE ON vault.%I '
                       'FOR EACH ROW EXECUTE FUNCTION vault.insert_only()', t);
    END LOOP;
END
$$;
