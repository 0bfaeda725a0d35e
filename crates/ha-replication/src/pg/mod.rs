//! PostgreSQL streaming replication: members, status queries, the lag monitor and safe
//! promotion.

pub mod member;
pub mod monitor;
pub mod promote;
pub mod status;

pub use member::PgMember;
pub use monitor::{LagConfig, Link, PgReplicationMonitor, ReplicaLag, Sample};
pub use promote::{
    CommandFence, Ineligible, NoFence, PrimaryFence, PromoteConfig, Promoter, PromotionReport,
    Refusal, RepointOutcome, SqlShutdownFence,
};
pub use status::{PrimaryStatus, ReplicaStatus, StandbyStatus, WalReceiver};
