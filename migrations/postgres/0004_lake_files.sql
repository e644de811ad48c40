-- The Parquet lake manifest: every file readers may use. A run's part files are
-- added when written; compaction replaces a partition's parts with one file in a
-- single transaction. Objects not listed here are garbage from an interrupted
-- compaction and are deleted by the next one.
CREATE TABLE lake_files (
    key        text        PRIMARY KEY,
    dt         date        NOT NULL,
    -- The run that wrote the file (for a compacted file: the newest run in it).
    run_id     bigint      NOT NULL,
    rows       bigint      NOT NULL CHECK (rows > 0),
    bytes      bigint      NOT NULL,
    compacted  boolean     NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX lake_files_dt ON lake_files (dt);
