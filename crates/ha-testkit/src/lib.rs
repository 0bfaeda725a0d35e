//! Real servers and real faults for tests.
//!
//! `ha-testkit` starts real `redis-server`, `redis-sentinel` and PostgreSQL (primary and
//! streaming replica) processes from the machine's packages, each on a free loopback port in
//! its own temporary directory, and stops and removes them on drop — also when a test panics.
//! Faults are real: SIGKILL, SIGSTOP/SIGCONT, restarts, and a fault proxy that drops,
//! blackholes, delays or cuts TCP traffic in front of any server.
//!
//! A missing binary is an error naming the binary and the package to install, never a skipped
//! test. Start-up waits on readiness probes, never on fixed sleeps.
//!
//! This is a dev-dependency: nothing here is meant for production.

pub mod binaries;
pub mod error;
pub mod process;
pub mod redis;
pub mod sentinel;

pub use error::{Result, TestkitError};
pub use process::{ServerProcess, free_port};
pub use redis::{RedisServer, RedisServerBuilder, RespConnection, RespValue};
pub use sentinel::{RedisReplicaSet, SentinelOptions, SentinelSet};
