-- Shapes of several attributes (issue 19): cells keyed by city and category, and
-- by city, category and product, their values joined by U+001F. Adding values to
-- an Enum changes no stored data, which ClickHouse allows even for a key column.
ALTER TABLE revenue_agg
    MODIFY COLUMN dimension Enum8('total' = 1, 'city' = 2, 'category' = 3, 'product' = 4,
                                  'city_category' = 5, 'city_category_product' = 6)
