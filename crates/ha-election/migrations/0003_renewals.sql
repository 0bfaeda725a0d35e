-- ha-election PostgreSQL lease store, schema version 3: renewal counts, and CACHE 1 enforced.
--
-- `renewals` counts the renewals of the current term, so a follower can tell a lease that is
-- being renewed from an abandoned one by comparing records, without trusting the database's
-- clock. A sequence created by someone else (or by hand) with a session cache would hand values
-- out of order across sessions; CACHE 1 is set again whatever it was.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS renewals bigint NOT NULL DEFAULT 0;
ALTER SEQUENCE {{sequence}} CACHE 1;
