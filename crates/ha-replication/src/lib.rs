//! Replication monitoring and safe promotion.
//!
//! Status: being built (issue 6).

pub mod error;
pub mod lsn;
pub mod pg;
pub mod sentinel;

pub use error::Error;
pub use lsn::Lsn;
pub use pg::{LagConfig, PgMember, PgReplicationMonitor, Promoter};
pub use sentinel::SentinelMonitor;
