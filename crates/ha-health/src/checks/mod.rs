//! Built-in checks: Redis, PostgreSQL, TCP, HTTP, a command, disk, memory, CPU and a closure.
//!
//! Every check here keeps the [`HealthCheck`](crate::HealthCheck) rules: it builds its client
//! once (a fred client, a small `PgPool`, a `reqwest::Client`) and reuses it on every run, sends
//! only read-only probes (`PING`, `ROLE`, `SELECT`, `GET`, `statvfs`), can be dropped at any
//! `.await` (a dropped [`CommandCheck`] kills its child), and reports every failure as an
//! `Unhealthy` result carrying the error's text.
//!
//! ```
//! use ha_health::checks::{CpuCheck, DiskCheck, FnCheck, MemoryCheck, TcpCheck, UsageThresholds};
//! use ha_health::{CheckResult, HealthCheck};
//!
//! let checks: Vec<Box<dyn HealthCheck>> = vec![
//!     Box::new(DiskCheck::new("root-disk", "/").thresholds(UsageThresholds::new(80.0, 95.0))?),
//!     Box::new(MemoryCheck::new("memory")),
//!     Box::new(CpuCheck::new("cpu")),
//!     Box::new(TcpCheck::new("dns", "127.0.0.1:53")?),
//!     Box::new(FnCheck::new("always", || async { CheckResult::healthy("ok") })),
//! ];
//! assert_eq!(checks[0].name(), "root-disk");
//! # Ok::<(), ha_health::Error>(())
//! ```
//!
//! Usage checks ([`DiskCheck`], [`MemoryCheck`], [`CpuCheck`]) share [`UsageThresholds`]:
//! at or above `degraded_at_percent` the result is `Degraded`, at or above
//! `unhealthy_at_percent` it is `Unhealthy`. Their defaults differ, each for a reason given on
//! the check.

mod closure;
mod command;
#[cfg(feature = "system")]
mod cpu;
mod disk;
#[cfg(feature = "http")]
mod http;
#[cfg(feature = "system")]
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod tcp;
mod usage;

pub use closure::FnCheck;
pub use command::CommandCheck;
#[cfg(feature = "system")]
pub use cpu::CpuCheck;
pub use disk::DiskCheck;
#[cfg(feature = "http")]
pub use http::HttpCheck;
#[cfg(feature = "system")]
pub use memory::MemoryCheck;
#[cfg(feature = "postgres")]
pub use postgres::PostgresCheck;
#[cfg(feature = "redis")]
pub use redis::{RedisCheck, RedisRole};
pub use tcp::TcpCheck;
pub use usage::UsageThresholds;
