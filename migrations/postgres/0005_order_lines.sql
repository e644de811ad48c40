-- Orders as baskets: each order has 1 to 100 lines, each of a different product.
-- The order row stays the log entry (txid, seq); its lines are written in the same
-- transaction and never change, so a consumer that reads the order below the
-- horizon reads all its lines. Existing orders become one-line orders.
CREATE TABLE order_lines (
    order_id         uuid     NOT NULL REFERENCES orders (order_id),
    line_no          smallint NOT NULL CHECK (line_no BETWEEN 1 AND 100),
    product_id       text     NOT NULL CHECK (char_length(product_id) BETWEEN 1 AND 64),
    category         text     NOT NULL CHECK (char_length(category) BETWEEN 1 AND 64),
    quantity         integer  NOT NULL CHECK (quantity BETWEEN 1 AND 1000),
    unit_price_minor bigint   NOT NULL CHECK (unit_price_minor BETWEEN 0 AND 100000000),
    PRIMARY KEY (order_id, line_no),
    UNIQUE (order_id, product_id)
);

INSERT INTO order_lines (order_id, line_no, product_id, category, quantity, unit_price_minor)
SELECT order_id, 1, product_id, category, quantity, unit_price_minor FROM orders;

ALTER TABLE orders
    DROP COLUMN product_id,
    DROP COLUMN category,
    DROP COLUMN quantity,
    DROP COLUMN unit_price_minor;
