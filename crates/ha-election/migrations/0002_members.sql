-- ha-election PostgreSQL lease store, schema version 2: cluster membership.
--
-- One row per (group, node): the node's last heartbeat. `{{members}}` is replaced by the
-- store's quoted (optionally schema-qualified) name. Meta is two parallel arrays (keys,
-- values) so no JSON type is needed on either side. Expired rows are removed by later
-- heartbeats of the same group.
CREATE TABLE IF NOT EXISTS {{members}} (
    grp         text        NOT NULL,
    node        text        NOT NULL,
    meta_keys   text[]      NOT NULL,
    meta_values text[]      NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (grp, node)
);
