-- Who may write for each single-writer role (the lake relay, the speed consumer,
-- the vault loader, the compactor). Instances of a role race for its row; the
-- holder renews it well before `expires_at`, and another instance takes it over
-- only once it has expired — by Postgres's clock alone, so the instances' clocks
-- never matter. `token` grows by one with every change of holder: it is the fencing
-- token, and each role's writes check it (in the write's own transaction, or in
-- its Redis script), so a holder that was paused past its lease and wakes up still
-- believing it leads cannot write any more.
CREATE TABLE leases (
    role        text PRIMARY KEY,
    holder      text        NOT NULL,
    token       bigint      NOT NULL CHECK (token > 0),
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
