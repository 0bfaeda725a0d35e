-- ha-election PostgreSQL lease store, schema version 1: the token sequence and the lease table.
--
-- Run by `PostgresLeaseStore::migrate` inside one transaction, under an advisory lock, and
-- recorded in the schema-version table. `{{sequence}}` and `{{table}}` are replaced by the
-- store's quoted (optionally schema-qualified) names before this runs.

-- Fencing tokens. CACHE 1: a per-session cache would hand values out of order across sessions.
-- Sequences are WAL-logged, so tokens survive restarts; after a crash the sequence may jump
-- ahead (it logs values in advance), which keeps it monotonic.
CREATE SEQUENCE IF NOT EXISTS {{sequence}} AS bigint MINVALUE 1 START WITH 1 CACHE 1 NO CYCLE;

-- One row per lease key, kept after release (with expires_at = '-infinity') so that the row's
-- token is a floor for the next grant of that key.
CREATE TABLE IF NOT EXISTS {{table}} (
    key         text        PRIMARY KEY,
    holder      text        NOT NULL,
    token       bigint      NOT NULL CHECK (token > 0),
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL
);
