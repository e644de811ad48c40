-- One random-key index fewer for the vault loader to maintain per order (issue 20):
-- `sat_order_history (order_hk, created_at DESC)` served nothing the primary key
-- `(order_hk, load_date)` does not — order history finds a customer's orders through
-- the link and each order's satellite by `order_hk`, then sorts them by time.
DROP INDEX vault.sat_order_history;
