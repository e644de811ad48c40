-- Daily exchange rates (issue 19): units of `currency` one euro buys on `day`,
-- from files in the ECB reference-rate CSV format. A later file corrects an
-- earlier one (the row is replaced); `loaded_at` says when a rate last changed.
-- Serving converts to a reporting currency with them (see domain::fx).
CREATE TABLE fx_rates (
    currency  text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    day       date        NOT NULL,
    per_eur   numeric     NOT NULL CHECK (per_eur > 0),
    loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (currency, day)
);
