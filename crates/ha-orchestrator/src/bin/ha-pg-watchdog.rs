//! `ha-pg-watchdog`: the PostgreSQL agent's watchdog process, started by the agent beside
//! `ha-node` (its own process group, messages on stdin). It stops PostgreSQL when the agent
//! dies or passes its leadership deadline while the database may be a writable primary; see
//! `ha_replication::pg::watchdog`.

use std::process::ExitCode;

fn main() -> ExitCode {
    ha_replication::pg::watchdog::main(std::env::args().skip(1))
}
