-- A line's order is checked once per statement instead of once per line.
--
-- The foreign key from order_lines to orders checked each line as its own query
-- that also locked the order's row (FOR KEY SHARE: a lock written to the row and
-- the WAL), though ingest writes an order and its lines in one statement, joined
-- on the orders it just inserted (store::insert). At 20,000 orders/s those
-- checks were 6 % of the machine's time (`bench speed`'s profile), and with them
-- freshness p99 was 69-144 ms over four runs; checked per statement, 57 and 75 ms.
--
-- The check: after each statement that inserts lines, no line of it may lack its
-- order (SQLSTATE 23503, as the foreign key). It reads the orders by their
-- primary key whatever the planner's estimates: in a fresh database without
-- statistics it chose a scan of the whole table and kept that plan while orders
-- grew (freshness p99 1.2-2.2 s in the first seconds of a run).
--
-- What the key also refused — removing an order that has lines, moving a line
-- to an order that does not exist — becomes two rules: orders are the log, never
-- deleted, truncated or renumbered; a line never moves to another order.
ALTER TABLE order_lines DROP CONSTRAINT order_lines_order_id_fkey;

CREATE FUNCTION order_lines_have_their_orders() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    IF EXISTS (
        SELECT FROM new_lines l
        WHERE NOT EXISTS (SELECT FROM orders o WHERE o.order_id = l.order_id)
    ) THEN
        RAISE EXCEPTION 'a line of an order that does not exist'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER order_lines_have_their_orders
    AFTER INSERT ON order_lines
    REFERENCING NEW TABLE AS new_lines
    FOR EACH STATEMENT EXECUTE FUNCTION order_lines_have_their_orders();

-- Refuses a statement, for the reason given as the trigger's argument.
CREATE FUNCTION refuse_statement() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0] USING ERRCODE = 'restrict_violation';
END
$$;

CREATE TRIGGER orders_are_kept
    BEFORE DELETE OR TRUNCATE OR UPDATE OF order_id ON orders
    FOR EACH STATEMENT
    EXECUTE FUNCTION refuse_statement('orders are the log: never deleted, truncated or renumbered');

CREATE TRIGGER order_lines_stay_with_their_orders
    BEFORE UPDATE OF order_id ON order_lines
    FOR EACH STATEMENT
    EXECUTE FUNCTION refuse_statement('a line never moves to another order');
