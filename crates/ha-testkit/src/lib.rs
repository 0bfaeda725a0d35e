//! Real servers and real faults for tests.
//!
//! `ha-testkit` starts real `redis-server`, `redis-sentinel`, PostgreSQL (primary and
//! streaming replica) and etcd (a 3-member cluster) processes from the machine's packages, each on a free loopback port in
//! its own temporary directory, and stops and removes them on drop — also when a test panics.
//! Faults are real: SIGKILL, SIGSTOP/SIGCONT, restarts, and a fault proxy that drops,
//! blackholes, delays or cuts TCP traffic in front of any server. [`HaNodeCluster`] runs
//! this workspace's own `ha-node` binary the same way, one config file per node.
//!
//! A missing binary is an error naming the binary and the package to install, never a skipped
//! test. Start-up waits on readiness probes, never on fixed sleeps.
//!
//! The optional `containers` feature adds `containers::ContainerServer`: the same servers
//! from official Docker images, for machines with a Docker engine and without the packages.
//!
//! This is a dev-dependency: nothing here is meant for production.

pub mod binaries;
#[cfg(feature = "containers")]
pub mod containers;
pub mod error;
pub mod etcd;
pub mod ha_node;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod sentinel;

pub use error::{Result, TestkitError};
pub use etcd::{EtcdCluster, EtcdMember};
pub use ha_node::{HaNodeCluster, HaNodeOptions, HaNodeProcess};
pub use postgres::{Lsn, ParseLsnError, PostgresServer, PostgresServerBuilder};
pub use process::{ServerProcess, free_port, free_ports};
pub use proxy::{FaultProxy, ProxyMode};
pub use redis::{RedisServer, RedisServerBuilder, RespConnection, RespValue};
pub use sentinel::{RedisReplicaSet, SentinelOptions, SentinelSet};
