-- The log's horizon: the transaction id below which every transaction has
-- finished or never writes the log (orders, adjustments, customer_changes), so no
-- row below it can still appear. Consumers read the log only below it
-- (orderlog::tail, the warehouse loader).
--
-- It is pg_snapshot_xmin(pg_current_snapshot()) — the oldest transaction still
-- running — except for transactions registered in log_horizon_exempt: the
-- warehouse loader registers its transaction id there (committed on a connection
-- of its own) before its load, which writes only the warehouse and ran for tens
-- of milliseconds while holding back every consumer of the log behind it (the
-- speed layer's freshness p99 at 5,000 orders/s: 109 ms with the loader running,
-- 16 ms without). Registering a transaction that writes the log would let
-- consumers pass rows it has yet to commit: only a holder that never writes the
-- log may register. A registered id is never reused (xid8), and one of a finished
-- transaction is simply not among those running.
CREATE TABLE log_horizon_exempt (
    holder text PRIMARY KEY,
    xid xid8 NOT NULL
);

CREATE FUNCTION log_horizon() RETURNS xid8
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT min(x) FROM pg_snapshot_xip(s) AS x
          WHERE x NOT IN (SELECT xid FROM log_horizon_exempt)),
        pg_snapshot_xmax(s))
    FROM pg_current_snapshot() AS s
$$;
