-- The handoff between the speed layer and the batch layer.
--
-- Speed epochs are cut by transaction id: epoch k holds the rows with
-- speed_cuts[k].threshold <= txid < speed_cuts[k+1].threshold (epoch 0 starts at
-- the beginning of the log). A cut's threshold is the id of the transaction that
-- inserts it, so every reader that cannot see the cut yet only reads rows below it
-- (see ARCHITECTURE.md, "Epochs").
CREATE TABLE speed_cuts (
    epoch      bigint      PRIMARY KEY CHECK (epoch > 0),
    threshold  xid8        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per batch run. A run covers the rows with from_threshold <= txid <
-- threshold, where threshold is the cut of `epoch`.
CREATE TABLE batch_runs (
    run_id         bigint      PRIMARY KEY,
    kind           text        NOT NULL CHECK (kind IN ('incremental', 'rebuild', 'backfill')),
    epoch          bigint      NOT NULL REFERENCES speed_cuts (epoch),
    from_threshold xid8        NOT NULL,
    threshold      xid8        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('running', 'published', 'failed')),
    step           text        NOT NULL DEFAULT 'cut',
    rows_in        bigint,
    rows_out       bigint,
    audit          jsonb,
    error          text,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);

-- At most one run is in progress.
CREATE UNIQUE INDEX batch_runs_one_running ON batch_runs ((true)) WHERE status = 'running';

-- The published batch view: ClickHouse rows with run_id between base_run_id and
-- run_id cover every order with txid < threshold; speed epochs >= epoch hold the
-- rest. Changed atomically, in one row, by a publish.
CREATE TABLE batch_state (
    singleton      boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    run_id         bigint      NOT NULL,
    base_run_id    bigint      NOT NULL,
    epoch          bigint      NOT NULL,
    threshold      xid8        NOT NULL,
    watermark_time timestamptz NOT NULL,
    published_at   timestamptz NOT NULL
);
