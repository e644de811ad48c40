-- The raw-lake manifest: every JSON Lines object the relay has landed in S3.
-- Written in the same transaction that advances the relay's cursor, so it lists
-- exactly the confirmed objects; the compactor finds the files holding a log range
-- here instead of listing the bucket.
CREATE TABLE lake_raw_files (
    key              text        PRIMARY KEY,
    dt               date        NOT NULL,
    hour             smallint    NOT NULL CHECK (hour BETWEEN 0 AND 23),
    -- The relay batch: rows with (txid, seq) in (after, until].
    after_txid       xid8        NOT NULL,
    after_seq        bigint      NOT NULL,
    until_txid       xid8        NOT NULL,
    until_seq        bigint      NOT NULL,
    -- The transaction ids of the rows in this object.
    min_txid         xid8        NOT NULL,
    max_txid         xid8        NOT NULL,
    rows             integer     NOT NULL CHECK (rows > 0),
    bytes            bigint      NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX lake_raw_files_txids ON lake_raw_files (max_txid, min_txid);
